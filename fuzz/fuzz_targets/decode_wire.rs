//! Fuzzes every wire decoder and its validating conversion into a domain type.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| guild_proto::fuzzing::decode_wire(data));
