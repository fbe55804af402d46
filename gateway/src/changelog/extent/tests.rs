//! Unit tests of the extent map's pieces (`cut_out`) and side-file entries.

use super::*;

#[test]
fn cut_out_splits_pieces() {
    let mut p = BTreeMap::new();
    let piece = |end, lsn, deferred| Piece {
        end,
        lsn,
        deferred,
        merged: false,
    };
    p.insert(0, piece(100, 1, false));
    p.insert(200, piece(300, 2, true));
    let hit = cut_out(&mut p, 50, 250);
    assert_eq!(hit, vec![(50, 100, 1, false), (200, 250, 2, true)]);
    assert_eq!(p.get(&0), Some(&piece(50, 1, false)));
    assert_eq!(p.get(&250), Some(&piece(300, 2, true)));
    assert_eq!(p.len(), 2);
    let hit = cut_out(&mut p, 10, 20);
    assert_eq!(hit, vec![(10, 20, 1, false)]);
    assert_eq!(p.len(), 3);
    assert!(cut_out(&mut p, 100, 200).is_empty());
    assert!(cut_out(&mut p, 15, 15).is_empty());
    // Pieces now: [0,10) [20,50) [250,300). One range over all of them, whole or not.
    let hit = cut_out(&mut p, 5, 260);
    assert_eq!(
        hit,
        vec![(5, 10, 1, false), (20, 50, 1, false), (250, 260, 2, true)]
    );
    assert_eq!(p.get(&0), Some(&piece(5, 1, false)));
    assert_eq!(p.get(&260), Some(&piece(300, 2, true)));
    assert_eq!(p.len(), 2);
    // One piece running past both ends of the range.
    let hit = cut_out(&mut p, 270, 280);
    assert_eq!(hit, vec![(270, 280, 2, true)]);
    assert_eq!(p.get(&260), Some(&piece(270, 2, true)));
    assert_eq!(p.get(&280), Some(&piece(300, 2, true)));
}

#[test]
fn side_file_names_and_entries() {
    let n = side_file_name(7, 0xabc);
    assert_eq!(parse_side_file_name(&n), Some((7, 0xabc)));
    assert_eq!(parse_side_file_name("00000000000000000007.log"), None);
    let data = vec![5u8; 300];
    let mut b = encode_entry(9, 4096, &data).to_vec();
    b.extend_from_slice(&data);
    assert_eq!(decode_entry(&b, 0), Some((9, 4096, 300, 32)));
    for i in 0..b.len() {
        let mut c = b.clone();
        c[i] ^= 1;
        assert_eq!(decode_entry(&c, 0), None, "byte {i}");
        assert_eq!(decode_entry(&b[..i], 0), None, "cut at {i}");
    }
}
