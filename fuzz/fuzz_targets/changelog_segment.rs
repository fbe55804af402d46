//! Fuzzes the change-log segment decoder: arbitrary bytes must never panic, and whatever it
//! accepts must be self-consistent (records inside the input, contiguous LSNs, the cut at
//! the end of the last whole record). Extent records (kind 5: a write whose bytes stay in the
//! image) carry no data and cover at least one byte; writes carry exactly their length.
#![no_main]

use gateway::changelog::format::{decode_segment, End, Kind, HEADER_LEN};
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
        match r.header.kind {
            Kind::Extent => assert!(r.data.is_empty() && r.header.length > 0),
            Kind::Write => assert_eq!(r.data.len() as u64, r.header.length),
            _ => assert!(r.data.is_empty()),
        }
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
