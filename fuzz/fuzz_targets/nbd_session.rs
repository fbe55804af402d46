//! Fuzzes a whole NBD server session: the input is everything a client sends (greeting,
//! options, requests, payloads). The server must never panic and must always end the session.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // Also exercise the pure decoders directly.
    let _ = nbd_server::proto::decode_request(input);
    let _ = nbd_server::proto::decode_info(input);
    let _ = nbd_server::proto::decode_meta(input);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ended = rt.block_on(nbd_server::mem::session_over_bytes(
        input.to_vec(),
        1 << 16,
        Duration::from_secs(5),
    ));
    assert!(ended.is_some(), "session hung");
});
