//! Fuzzes the SecAgg+ server state machine against a client that sends corrupted,
//! replayed, reordered and forged messages.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| guild_privacy::secagg::fuzzing::drive_server(data));
