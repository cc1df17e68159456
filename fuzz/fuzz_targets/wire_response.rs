//! The peer-to-peer response decoder: never panics, and whatever it accepts re-encodes to the same
//! bytes (see `shoal_protocol::wire::fuzz_decode_response`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    shoal_protocol::wire::fuzz_decode_response(data);
});
