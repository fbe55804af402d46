//! Property tests of whole sessions: arbitrary client bytes — random, or valid traffic with
//! mutations — never panic the server, and every session ends (no hang).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use nbd_server::proto::*;
use proptest::prelude::*;

const DISK: usize = 64 * 1024;

/// Runs one session with `input` as everything the client sends; returns the server's bytes.
fn session(input: Vec<u8>) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(nbd_server::mem::session_over_bytes(
        input,
        DISK,
        Duration::from_secs(10),
    ))
    .expect("session did not end")
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// A valid client conversation: greeting, structured replies, meta context, GO, requests.
fn valid_traffic(reqs: &[(u16, u16, u64, u32)]) -> Vec<u8> {
    let mut b = 3u32.to_be_bytes().to_vec();
    b.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    let mut meta = 1u32.to_be_bytes().to_vec();
    meta.push(b'd');
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
    meta.extend_from_slice(BASE_ALLOCATION.as_bytes());
    b.extend(opt(OPT_SET_META_CONTEXT, &meta));
    let mut go = 1u32.to_be_bytes().to_vec();
    go.push(b'd');
    go.extend_from_slice(&0u16.to_be_bytes());
    b.extend(opt(OPT_GO, &go));
    for (i, &(flags, cmd, off, len)) in reqs.iter().enumerate() {
        b.extend_from_slice(&encode_request(&Request {
            flags,
            command: cmd,
            cookie: i as u64,
            offset: off,
            length: len,
        }));
        if cmd == CMD_WRITE {
            b.extend(std::iter::repeat_n(0xa5u8, len.min(70_000) as usize));
        }
    }
    b
}

fn request() -> impl Strategy<Value = (u16, u16, u64, u32)> {
    (
        prop_oneof![
            Just(0u16),
            Just(1),
            Just(2),
            Just(4),
            Just(8),
            Just(16),
            any::<u16>()
        ],
        prop_oneof![0u16..=8, any::<u16>()],
        prop_oneof![0u64..(DISK as u64 + 10), any::<u64>()],
        prop_oneof![0u32..8192, Just(DISK as u32), any::<u32>()],
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(mut input in proptest::collection::vec(any::<u8>(), 0..512)) {
        // Half the cases get a valid greeting so the option parser is reached.
        if input.first().is_some_and(|b| b % 2 == 0) {
            let mut v = 3u32.to_be_bytes().to_vec();
            v.extend(opt(u32::from(input[0] % 12), &input));
            input = v;
        }
        session(input);
    }

    #[test]
    fn mutated_valid_traffic_never_panics(
        reqs in proptest::collection::vec(request(), 1..12),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut input = valid_traffic(&reqs);
        for (i, x) in flips {
            let i = i.index(input.len());
            input[i] ^= x;
        }
        let keep = cut.index(input.len() + 1);
        input.truncate(keep.max(input.len() / 2));
        session(input);
    }
}

#[test]
fn valid_session_round_trip() {
    let out = session(valid_traffic(&[
        (0, CMD_WRITE, 0, 4096),
        (0, CMD_READ, 0, 4096),
        (0, CMD_BLOCK_STATUS, 0, 65536),
        (0, CMD_DISC, 0, 0),
    ]));
    // The read must return the written pattern inside an OFFSET_DATA chunk.
    let needle = vec![0xa5u8; 4096];
    assert!(out.windows(4096).any(|w| w == needle.as_slice()));
}
