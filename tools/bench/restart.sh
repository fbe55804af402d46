#!/usr/bin/env bash
# Restart benchmark: what a stop and a restart cost a protected disk. One tracked disk (change
# log on) over a random raw image; per run: the log reset (tracking disabled and enabled), the
# page cache dropped and the image read once, `standby serve` started, random 4 KiB QD32
# writes for --before seconds, one FLUSH (`qemu-io -c flush`), then the server stopped —
# cleanly (SIGTERM, timed until the process is gone) or by a crash (SIGKILL) — started again,
# and the same writes for --after seconds. Builds given with --bin are alternated A B B A per
# stop kind, --reps times. Prints a Markdown table: medians of the write rate before the stop,
# the stop time and the write rate after the restart, per build and stop kind.
#
# Why: the first writes after a restart show whether the reopened change log knows which of
# its extents belong to a cut (an overwrite of one saves and syncs its bytes first); a clean
# stop shows what the close does (docs/changelog.md, "After a restart").
#
# Usage: tools/bench/restart.sh [--bin PATH ...] [--reps 2] [--size-mib 512] [--before 7]
#                               [--after 5] [--workdir DIR]
# Without --bin, this tree is built (release) and run alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
bins=(); reps=2; size_mib=512; before=7; after=5; work=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bins+=("$(realpath "$2")"); shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    --size-mib) size_mib=$2; shift 2 ;;
    --before) before=$2; shift 2 ;;
    --after) after=$2; shift 2 ;;
    --workdir) work=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
for tool in fio qemu-io python3; do
  command -v "$tool" >/dev/null || { echo "$tool is not installed" >&2; exit 1; }
done
if [ ${#bins[@]} -eq 0 ]; then
  cargo build --release --quiet -p standby-tools --bin standby
  bins=("$(realpath "${CARGO_TARGET_DIR:-target}/release/standby")")
fi
work=${work:-$(mktemp -d -t standby-bench-restart-XXXXXX)}
mkdir -p "$work"
img="$work/disk.img"; data="$work/data"; out="$work/runs.tsv"
if [ ! -f "$img" ] || [ "$(stat -c %s "$img")" -ne $((size_mib << 20)) ]; then
  head -c $((size_mib << 20)) /dev/urandom > "$img"
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cli() { "$1" --data-dir "$data" --log warn "${@:2}" >/dev/null 2>&1; }
if [ ! -f "$data/disks/bench.toml" ]; then
  mkdir -p "$data"
  "${bins[0]}" --data-dir "$data" --log warn disk import bench "$img" >/dev/null
fi
pid=""
serve() {
  "$1" --data-dir "$data" --log warn serve --listen "127.0.0.1:$port" --no-api >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || { echo "server exited early" >&2; exit 1; }
    sleep 0.1
  done
  echo "server did not start" >&2; exit 1
}
stopped_ms=0
stop() {  # stop SIGNAL: sets stopped_ms, the milliseconds until the process is gone
  local t0; t0=$(date +%s%N)
  kill "-$1" "$pid"; wait "$pid" 2>/dev/null || true
  stopped_ms=$(( ($(date +%s%N) - t0) / 1000000 )); pid=""
}
trap '[ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true' EXIT
writes() {  # writes SECONDS: prints IOPS
  fio --name=w --ioengine=nbd --uri="nbd://127.0.0.1:$port/bench" --rw=randwrite --bs=4k \
    --iodepth=32 --size=$((size_mib << 20)) --runtime="$1" --time_based --randrepeat=0 \
    --norandommap --output-format=json --output="$work/fio.json" >/dev/null
  python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['jobs'][0]['write']['iops']))" "$work/fio.json"
}
one() {  # one BIN SIGNAL
  cli "$1" log disable bench; cli "$1" log enable bench
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; cat "$img" > /dev/null
  serve "$1"; local b; b=$(writes "$before")
  qemu-io -f raw -c flush "nbd://127.0.0.1:$port/bench" >/dev/null
  stop "$2"; local ms=$stopped_ms
  serve "$1"; local a; a=$(writes "$after"); stop TERM
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$b" "$ms" "$a" | tee -a "$out" >&2
}
: > "$out"
for sig in TERM KILL; do
  for _ in $(seq "$reps"); do
    for b in "${bins[@]}"; do one "$b" "$sig"; done
    for ((i=${#bins[@]}-1; i>=0; i--)); do one "${bins[$i]}" "$sig"; done
  done
done
python3 - "$out" "$size_mib" "$before" "$after" <<'PY'
import collections, statistics, sys
out, size, before, after = sys.argv[1], *map(int, sys.argv[2:])
runs = collections.defaultdict(list)
for line in open(out):
    b, sig, bi, ms, ai = line.split("\t")
    runs[(b, sig)].append((int(bi), int(ms), int(ai)))
print("| build | stop | IOPS before | stop ms | IOPS after restart | runs (before / stop / after) |")
print("|---|---|---|---|---|---|")
for (b, sig), r in runs.items():
    med = [statistics.median(x[i] for x in r) for i in range(3)]
    each = "; ".join(f"{x[0]:,} / {x[1]:,} / {x[2]:,}" for x in r)
    print(f"| {b} | {'clean (SIGTERM)' if sig == 'TERM' else 'crash (SIGKILL)'} | {med[0]:,.0f} | "
          f"{med[1]:,.0f} | {med[2]:,.0f} | {each} |")
print(f"\n{size} MiB random image; random 4 KiB QD32 writes for {before} s, one FLUSH, the stop, "
      f"a restart, the same writes for {after} s; medians of {len(next(iter(runs.values())))} runs "
      "per row, builds alternated A B B A.")
PY
