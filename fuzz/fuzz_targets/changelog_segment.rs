//! Fuzzes the change-log segment decoder: arbitrary bytes must never panic, and whatever it
//! accepts must be self-consistent (records inside the input, contiguous LSNs, the cut at
//! the end of the last whole record).
#![no_main]

use gateway::changelog::format::{decode_segment, End, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(d) = decode_segment(data) else {
        return;
    };
    assert!(d.valid_len as usize <= data.len());
    assert!(d.valid_len as usize >= HEADER_LEN);
    let mut at = HEADER_LEN as u64;
    let mut lsn = d.header.first_lsn;
    for r in &d.records {
        assert_eq!(r.at, at);
        assert_eq!(r.header.lsn, lsn);
        assert!(r.data.end <= data.len());
        at += r.encoded_len();
        lsn = lsn.wrapping_add(1);
    }
    assert_eq!(at, d.valid_len);
    match d.end {
        End::Open => assert_eq!(d.valid_len as usize, data.len()),
        End::Sealed(f) => assert_eq!(f.footer_offset, d.valid_len),
        End::Torn { .. } => {}
    }
});
