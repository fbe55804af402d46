#!/usr/bin/env bash
# Failover benchmark: how fast a replica becomes a usable disk, against restic and nbdkit, in one
# run (peers alternated A B A B ..., order reversed every other round; medians of the rounds).
# Prints one Markdown table per benchmark:
#   1. RTO of a sparse disk (SIZES_GIB, default 2 and 20 GiB) holding only the 64 MiB boot image
#      of tests/bootimg at its start, protected in a local store:
#      (a) `standby failover test vm --no-launch` started -> first 4 KiB read from the export;
#      (b) `standby failover test vm` (failover command: qemu, TCG) -> `STANDBY-MARKER` on the
#          guest's serial console; then `failover cleanup`;
#      vs `restic restore` of the same disk image into a file + qemu booted from it, and qemu booted
#      from the boot image file itself (floor);
#   2. sequential read (`nbdcopy URI null:`) of a READ_GIB disk holding DATA_GIB of random data:
#      the replica attached read-only (`standby attach vm/disk0@latest`, detached after every run so
#      its chunk cache starts empty) from the local store and from a single-node Garage S3 server on
#      127.0.0.1, vs the live disk export of the same gateway and `nbdkit file` on the raw image.
# The OS page cache is dropped before every measured run when running as root (DROP_CACHES=auto).
# Details: tools/bench/failover.py; results: docs/bench-failover.md.
#
# Usage: tools/bench/failover.sh [WORKDIR]
#   env: STANDBY_BIN=<prebuilt standby> (otherwise target/release/standby if present, else built
#        here, in CARGO_TARGET_DIR if set)
#        SIZES_GIB=2,20 ROUNDS=3 READ_GIB=2 DATA_GIB=1 NO_EXTENTS=1 BENCHES=rto,read
#        DROP_CACHES=auto RESTIC_HEADROOM_GIB=8 BOOT_TIMEOUT=120 KEEP=0
# Needs: python3, qemu-system-x86_64, qemu-img, qemu-io, nbdcopy, nbdkit, restic,
#   garage (cargo install garage --version 2.5.0 --locked), and the boot image's build tools
#   (see tests/bootimg/build.sh).
# Free space: about 3 x READ_GIB + 2 GiB in WORKDIR (default: a new directory under $TMPDIR,
# removed at the end); restic restores every byte of a disk (restic 0.14 has no sparse restore),
# so its row for a size runs only with that size + RESTIC_HEADROOM_GIB free.
# Default run: about 8-12 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
for tool in python3 qemu-system-x86_64 qemu-img qemu-io nbdcopy nbdkit restic; do
  command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 1; }
done
if [ -z "${STANDBY_BIN:-}" ]; then
  if [ -x target/release/standby ]; then
    STANDBY_BIN=target/release/standby
  else
    echo "building standby (release)..." >&2
    cargo build --release --quiet -p standby-tools --bin standby
    STANDBY_BIN="${CARGO_TARGET_DIR:-target}/release/standby"
  fi
fi
export STANDBY_BIN
# The command line as given (parameters that were set in the environment first).
cmd=""
for v in SIZES_GIB ROUNDS READ_GIB DATA_GIB NO_EXTENTS BENCHES DROP_CACHES RESTIC_HEADROOM_GIB BOOT_TIMEOUT KEEP; do
  [ -n "${!v:-}" ] && cmd+="$v=${!v} "
done
export BENCH_COMMAND="${cmd}tools/bench/failover.sh${*:+ $*}"
exec python3 tools/bench/failover.py "$@"
