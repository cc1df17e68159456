//! The table-prefix decoder: never panics, decoding is canonical, and chunk verification against
//! whatever decodes is total (see `shoal_protocol::chunk::fuzz_decode_prefix`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    shoal_protocol::chunk::fuzz_decode_prefix(data);
});
