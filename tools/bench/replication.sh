#!/usr/bin/env bash
# Replication benchmark: standby's replication engine against restic and rsync in one run
# (peers alternated A B A B ..., medians of the rounds). Prints one Markdown table per benchmark:
#   1. initial replication of a SIZE_GIB image (alternating 4 MiB random / 4 MiB zero extents):
#      `standby protect` until Protected vs `restic backup` (--compression auto);
#   2. delta cost after 1% random 4 KiB writes to a DELTA_GIB disk (fio nbd engine): one
#      delta-replication job vs restic's incremental backup (time, bytes added);
#   3. resync of a disk differing from its replica in 1% of its 4 KiB blocks, (a) after a change
#      log overflow (log + dirty bitmap) and (b) `standby resync VM --full`, vs
#      `rsync --ignore-times --inplace --no-whole-file`;
#   4. RPO (p50/p95/p99/max) sampled from `standby status` every RPO_SAMPLE_SECS while fio writes
#      each of RPO_RATES for RPO_SECONDS to a protected RPO_GIB disk, policy `continuous` and
#      `30s` (RPO_INTERVALS), local store and/or Garage (RPO_STORES=local,garage); RPO_BINS=
#      "before=PATH,after=PATH" measures several binaries row by row in one run (one gateway
#      process per binary and store serves all of its rows; binaries alternated A B / B A).
#   5. import-s3 (BENCHES=...,import-s3; not in the default set): Garage import vs `restic backup`
#      of the same IMPORT_S3_MIB image to the same bucket in one run (MB/s, PUTs, bytes stored),
#      through tools/bench/store.sh MODE=garage-restic (needs garage; STORE_BENCH_BIN optional).
# Details: tools/bench/replication.py; results: docs/bench-replication.md.
#
# Usage: tools/bench/replication.sh [WORKDIR]
#   env: STANDBY_BIN=<prebuilt standby> (otherwise built here, in CARGO_TARGET_DIR if set)
#        SIZE_GIB=8 DELTA_GIB=2 RPO_GIB=4 ROUNDS=3 ROUNDS_INITIAL=2 DELTAS_PER_ROUND=2
#        RPO_SECONDS=60 RPO_RATES=50m,200m RPO_STORES=local RPO_INTERVALS=continuous,30s
#        RPO_SAMPLE_SECS=0.2 RPO_BINS= RPO_FOLD_VARIANTS=1 RPO_REPS=1 BENCHES=initial,delta,resync,rpo KEEP=0
# Needs: cargo, python3, fio (with the nbd engine), restic, rsync.
# Free space: about 1.25 x SIZE_GIB + 4 GiB (at least 12 GiB) in WORKDIR (default: a new
# directory under $TMPDIR, removed at the end). Default run: about 12-15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
for tool in python3 fio restic rsync; do
  command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 1; }
done
if [ -z "${STANDBY_BIN:-}" ]; then
  echo "building standby (release)..." >&2
  cargo build --release --quiet -p standby-tools --bin standby
  STANDBY_BIN="${CARGO_TARGET_DIR:-target}/release/standby"
  export BENCH_BIN_ORIGIN=built
fi
export STANDBY_BIN
# The command line as given (parameters that were set in the environment first).
cmd=""
for v in SIZE_GIB DELTA_GIB RPO_GIB ROUNDS ROUNDS_INITIAL DELTAS_PER_ROUND RPO_SECONDS RPO_RATE RPO_RATES RPO_STORES RPO_INTERVALS RPO_SAMPLE_SECS RPO_BINS RPO_FOLD_VARIANTS RPO_REPS BENCHES KEEP IMPORT_S3_MIB IMPORT_S3_ROUNDS; do
  [ -n "${!v:-}" ] && cmd+="$v=${!v} "
done
export BENCH_COMMAND="${cmd}tools/bench/replication.sh${*:+ $*}"
exec python3 tools/bench/replication.py "$@"
