#!/usr/bin/env python3
"""Cost of appending change-log records into zeroes written ahead, by the size of the writes
that put the zeroes there.

The change log writes zeroes ahead of its records (docs/changelog.md, "The active segment is
written ahead with zeroes") so that a FLUSH's fdatasync does not change the file's size. On
kernels that cache files in large page-cache folios, a buffered write makes folios as large as
itself, and every later small write into a folio walks all of its blocks. This measures a loop
of 4,136-byte appends (a 4 KiB write's record: 40-byte header + 4 KiB) into a new file whose
next 1 MiB is written as zeroes in pieces of each size (0 = no zeroes: appends extend the file),
without syncs and with an fdatasync every --sync-every appends. Prints a Markdown table of the
wall time per append spent in the append itself, in writing zeroes and in fdatasync, one row
per piece size, medians of --reps runs, rows alternated.

Usage: tools/bench/append.py [--dir DIR] [--records 100000] [--sync-every 64] [--reps 3]
                             [--pieces 0,4096,16384,65536,262144,1048576] [--record-size 4136]

--record-size 40: a deferred small write's record (the header alone).
"""
import argparse
import os
import statistics
import tempfile
import time

REC = 40 + 4096
FILL = 1 << 20


def run(path, piece, records, sync_every, size):
    """Wall time per append of `size` bytes spent appending, writing zeroes and syncing (µs)."""
    rec = os.urandom(size)
    zeroes = bytes(max(piece, 1))
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o600)
    clock = time.perf_counter
    try:
        off = filled = 0
        t_app = t_fill = t_sync = 0.0
        for i in range(records):
            if piece and off + FILL // 2 > filled:
                t = clock()
                start = max(off, filled)
                at = start
                while at < start + FILL:
                    end = min((at // piece + 1) * piece, start + FILL)
                    os.pwrite(fd, zeroes[: end - at], at)
                    at = end
                filled = start + FILL
                t_fill += clock() - t
            if sync_every and i % sync_every == 0:
                t = clock()
                os.fdatasync(fd)
                t_sync += clock() - t
            t = clock()
            os.pwrite(fd, rec, off)
            t_app += clock() - t
            off += size
        return tuple(x / records * 1e6 for x in (t_app, t_fill, t_sync))
    finally:
        os.close(fd)
        os.remove(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--sync-every", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pieces", default="0,4096,16384,65536,262144,1048576")
    ap.add_argument("--record-size", type=int, default=REC)
    args = ap.parse_args()
    pieces = [int(p) for p in args.pieces.split(",")]
    d = args.dir or tempfile.mkdtemp(prefix="standby-bench-append-", dir="/var/tmp")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "segment")
    res = {(p, s): [] for p in pieces for s in (0, args.sync_every)}
    for rep in range(args.reps):
        order = pieces if rep % 2 == 0 else list(reversed(pieces))
        for s in (0, args.sync_every):
            for p in order:
                os.sync()
                res[(p, s)].append(run(path, p, args.records, s, args.record_size))
    print(f"| zeroes written in pieces of | append (no sync) | zeroes (no sync) | "
          f"append (fdatasync every {args.sync_every}) | zeroes | fdatasync |")
    print("|---|---|---|---|---|---|")
    for p in pieces:
        a = res[(p, 0)]
        b = res[(p, args.sync_every)]
        med = lambda v, i: f"{statistics.median(x[i] for x in v):.2f}"
        label = "none (appends extend the file)" if p == 0 else f"{p // 1024} KiB"
        print(f"| {label} | {med(a, 0)} | {med(a, 1)} | {med(b, 0)} | {med(b, 1)} | {med(b, 2)} |")
    print(f"\nµs of wall time per append, medians of {args.reps} runs of {args.records:,} appends "
          f"of {args.record_size:,} bytes; zeroes {FILL >> 20} MiB ahead (their cost spread over the appends), "
          f"refilled when the appends come within half of it; file in {d}. Every figure "
          "includes the interpreter's per-call cost (about the same in every row).")
    if not args.dir:
        os.rmdir(d)


main()
