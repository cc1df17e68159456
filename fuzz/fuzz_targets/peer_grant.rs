//! The peer-grant decoder: never panics, and decoding is canonical (see
//! `shoal_protocol::grant::fuzz_decode_grant`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    shoal_protocol::grant::fuzz_decode_grant(data);
});
