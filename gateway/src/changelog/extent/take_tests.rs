//! Reference-model test of `Inner::take_uncut`, the one walk a small write's piece takes:
//! random writes of one or more blocks (and a few unaligned ones), plain extents, syncs
//! (`Inner::settle_to`) and cuts over a 4 MiB disk (four merge windows), applied to two maps —
//! one through `take_uncut`, one through the rules as first written, in separate steps
//! (walk for a cut or a renumber; remove what the write covers; check the bounds; enter the
//! piece with `Inner::insert_deferred`, which finds and merges the neighbours). The two share
//! what a write does with a piece under it and the bounds (`Write`); what differs, and what
//! this checks, is how the neighbours are found and joined. After every step both answer alike
//! and hold the same pieces, indexes and byte counts, and those agree with each other.

use proptest::prelude::*;

use super::deferred::{Under, Write};
use super::{Inner, Piece};

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 1024;

/// The rules of `take_uncut` in separate steps (each its own walk of the pieces), as they
/// were before the single walk: the reference. What a write does with a piece under it
/// (`Write::under`) and the bounds (`Write::fits`) are shared; the neighbours and the
/// merge are what the single walk does differently, and what this checks.
fn reference(
    m: &mut Inner,
    lsn: u64,
    offset: u64,
    len: u64,
    defer_max: u64,
    pieces_max: usize,
) -> Option<bool> {
    if len == 0 {
        return Some(false);
    }
    let w = Write::new(m, lsn, offset, len, defer_max);
    let (mut hit, mut renumbered) = (false, None);
    for (&s, p) in m.pieces.range_mut(..w.end).rev() {
        if p.end <= offset {
            break;
        }
        match w.under(s, p) {
            Under::Decline => return None,
            Under::Renumbered => return Some(true),
            Under::Absorbed => {
                m.absorbed_lsn = lsn;
                return Some(true);
            }
            Under::Exact(old) => {
                renumbered = Some(old);
                break;
            }
            Under::Hit => hit = true,
        }
    }
    if let Some(old) = renumbered {
        m.renumber_exact(&w, old);
        return Some(true);
    }
    if hit {
        m.remove(offset, w.end);
    }
    let deferred = w.fits(m, pieces_max);
    if deferred {
        m.insert_deferred(lsn, offset, len);
    }
    Some(deferred)
}

#[derive(Debug, Clone)]
enum Op {
    /// A small write of `blocks` blocks at block `at` (or 512 bytes at a byte offset).
    Write {
        at: u64,
        blocks: u64,
        unaligned: bool,
    },
    /// A plain extent (a large write, or one a cut needs), as `Inner::insert` enters it.
    Extent { at: u64, blocks: u64 },
    /// The image synced through the newest record.
    Sync,
    /// A cut: its pass logs every deferred piece (they leave the map), then the barrier.
    Cut,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        24 => (0..BLOCKS, 1..4u64, prop::bool::weighted(0.05))
            .prop_map(|(at, blocks, unaligned)| Op::Write { at, blocks, unaligned }),
        // Writes clustered in a few windows, so that neighbours meet and join.
        24 => (0..64u64, 0..8u64, 1..3u64).prop_map(|(i, w, blocks)| Op::Write {
            at: (w % 4) * 256 + 250 + i % 12,
            blocks,
            unaligned: false,
        }),
        3 => (0..BLOCKS, 1..300u64).prop_map(|(at, blocks)| Op::Extent { at, blocks }),
        2 => Just(Op::Sync),
        1 => Just(Op::Cut),
    ]
}

fn same(a: &Inner, b: &Inner) -> Result<(), String> {
    let pieces = |m: &Inner| {
        m.pieces
            .iter()
            .map(|(&s, &p)| (s, p))
            .collect::<Vec<(u64, Piece)>>()
    };
    if pieces(a) != pieces(b) {
        return Err(format!("pieces {:?}\nreference {:?}", pieces(a), pieces(b)));
    }
    if a.absorbed_lsn != b.absorbed_lsn {
        return Err(format!(
            "absorbed {} reference {}",
            a.absorbed_lsn, b.absorbed_lsn
        ));
    }
    if (&a.live, &a.synced, a.deferred, a.synced_bytes)
        != (&b.live, &b.synced, b.deferred, b.synced_bytes)
    {
        return Err(format!(
            "indexes {:?} {:?} {} {}\nreference {:?} {:?} {} {}",
            a.live,
            a.synced,
            a.deferred,
            a.synced_bytes,
            b.live,
            b.synced,
            b.deferred,
            b.synced_bytes
        ));
    }
    // And the indexes say what the pieces are.
    a.check_deferred_index()
}

/// A cut's pass and barrier on one map: every deferred piece is logged (leaves the map),
/// then the extents up to `lsn` are in the cut.
fn cut(m: &mut Inner, lsn: u64) {
    let deferred: Vec<(u64, u64)> = m
        .pieces
        .iter()
        .filter(|(_, p)| p.deferred && p.lsn > m.cut_lsn)
        .map(|(&s, p)| (s, p.end))
        .collect();
    for (a, b) in deferred {
        m.remove(a, b);
    }
    m.cut_lsn = lsn;
    m.retire_cut_deferred();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::changelog::tests::cases(200), ..ProptestConfig::default() })]

    #[test]
    fn one_walk_equals_the_steps(
        ops in proptest::collection::vec(arb_op(), 1..400),
        defer_max in prop_oneof![Just(0u64), Just(16 * BLOCK), Just(u64::MAX / 2)],
        pieces_max in prop_oneof![Just(6usize), Just(1 << 20)],
    ) {
        let (mut fast, mut slow) = (Inner::new(1), Inner::new(1));
        let mut lsn = 0u64;
        for op in &ops {
            lsn += 1;
            match *op {
                Op::Write { at, blocks, unaligned } => {
                    let (offset, len) = match unaligned {
                        true => (at * BLOCK + 512 * (at % 7), 512 * blocks),
                        false => (at * BLOCK, (blocks * BLOCK).min((BLOCKS - at) * BLOCK)),
                    };
                    let a = fast.take_uncut(lsn, offset, len, defer_max, pieces_max);
                    let b = reference(&mut slow, lsn, offset, len, defer_max, pieces_max);
                    prop_assert_eq!(a, b, "write {}+{} as LSN {}", offset, len, lsn);
                }
                Op::Extent { at, blocks } => {
                    let len = blocks.min(BLOCKS - at) * BLOCK;
                    fast.insert(lsn, at * BLOCK, len, false);
                    slow.insert(lsn, at * BLOCK, len, false);
                }
                Op::Sync => {
                    fast.settle_to(lsn);
                    slow.settle_to(lsn);
                }
                Op::Cut => {
                    cut(&mut fast, lsn);
                    cut(&mut slow, lsn);
                }
            }
            if let Err(e) = same(&fast, &slow) {
                return Err(TestCaseError::fail(format!("after {op:?} (LSN {lsn}): {e}")));
            }
        }
    }
}

/// The walk's own branches, one by one: a write after a live piece grows it in place, one
/// before it takes it in, one between two joins them, a window's edge keeps them apart.
#[test]
fn neighbours_join_in_one_walk() {
    let mut m = Inner::new(1);
    let w = |m: &mut Inner, lsn: u64, block: u64| {
        m.take_uncut(lsn, block * BLOCK, BLOCK, u64::MAX / 2, 1 << 20)
    };
    assert_eq!(w(&mut m, 1, 10), Some(true));
    assert_eq!(w(&mut m, 2, 11), Some(true)); // grows 10 in place
    assert_eq!(w(&mut m, 3, 13), Some(true));
    assert_eq!(w(&mut m, 4, 9), Some(true)); // takes 10.. in
    let starts = |m: &Inner| {
        m.pieces
            .iter()
            .map(|(&s, p)| (s / BLOCK, p.end / BLOCK, p.lsn))
            .collect::<Vec<_>>()
    };
    assert_eq!(starts(&m), vec![(9, 12, 4), (13, 14, 3)]);
    assert_eq!(w(&mut m, 5, 12), Some(true)); // joins both
    assert_eq!(starts(&m), vec![(9, 14, 5)]);
    assert_eq!(m.live.iter().copied().collect::<Vec<_>>(), vec![9 * BLOCK]);
    assert_eq!(m.deferred, 5 * BLOCK);
    // The window's edge (block 256 starts the second 1 MiB window).
    assert_eq!(w(&mut m, 6, 255), Some(true));
    assert_eq!(w(&mut m, 7, 256), Some(true));
    assert_eq!(starts(&m), vec![(9, 14, 5), (255, 256, 6), (256, 257, 7)]);
    // A synced piece is no neighbour: written next to, it stays apart.
    m.settle_to(7);
    assert_eq!(w(&mut m, 8, 14), Some(true));
    assert_eq!(
        starts(&m),
        vec![(9, 14, 5), (14, 15, 8), (255, 256, 6), (256, 257, 7)]
    );
    assert_eq!(m.deferred, BLOCK);
}

/// A small write inside a piece of a large write's extent newer than the cut is absorbed:
/// the map does not change, and the next FLUSH is told to sync the image. Not across the
/// piece's edge, not over a piece in a cut, and not when writes carry their data.
#[test]
fn a_write_inside_a_large_writes_piece_is_absorbed() {
    let mut m = Inner::new(1);
    m.insert(1, 0, 256 * BLOCK, false);
    let before = m.pieces.clone();
    let w = |m: &mut Inner, lsn: u64, block: u64, blocks: u64, defer_max: u64| {
        m.take_uncut(lsn, block * BLOCK, blocks * BLOCK, defer_max, 1 << 20)
    };
    assert_eq!(w(&mut m, 2, 10, 1, u64::MAX / 2), Some(true));
    assert_eq!(w(&mut m, 3, 255, 1, u64::MAX / 2), Some(true));
    assert_eq!(m.pieces, before, "absorbed writes change no piece");
    assert_eq!((m.absorbed_lsn, m.deferred), (3, 0));
    // Across the piece's end: the part inside leaves the extent's piece, the write is a
    // deferred piece of its own.
    assert_eq!(w(&mut m, 4, 255, 2, u64::MAX / 2), Some(true));
    let starts: Vec<(u64, u64, u64, bool)> = m
        .pieces
        .iter()
        .map(|(&s, p)| (s / BLOCK, p.end / BLOCK, p.lsn, p.deferred))
        .collect();
    assert_eq!(starts, vec![(0, 255, 1, false), (255, 257, 4, true)]);
    assert_eq!(m.absorbed_lsn, 3);
    // Writes that carry their data (`defer_max` 0) split the piece as before.
    assert_eq!(w(&mut m, 5, 20, 1, 0), Some(false));
    assert_eq!(m.pieces.range(..255 * BLOCK).count(), 2);
    m.check_deferred_index().unwrap();
    // Once the extent is in a cut, its bytes must be saved first: declined.
    let mut c = Inner::new(1);
    c.insert(1, 0, 256 * BLOCK, false);
    c.cut_lsn = 1;
    assert_eq!(w(&mut c, 2, 30, 1, u64::MAX / 2), None);
    assert_eq!(c.absorbed_lsn, 0);
}
