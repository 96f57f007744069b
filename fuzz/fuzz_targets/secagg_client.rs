//! Fuzzes the SecAgg+ client state machine against a server that tampers with what it
//! forwards.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| guild_privacy::secagg::fuzzing::drive_client(data));
