#!/usr/bin/env bash
# Replica store benchmark: import a 4 GiB raw image (alternating 4 MiB random / 4 MiB zero
# extents: half random, half zeros) into
#   - the local-directory store (plain, and encrypted),
#   - a single-node Garage S3 server on 127.0.0.1,
# and back it up with `restic backup` (repository v2, zstd "auto", always encrypted),
# alternating the peers for ROUNDS rounds. Prints a markdown table of medians:
# MB/s of logical image bytes, stored bytes, and ratios against restic.
#
# Usage: tools/bench/store.sh [WORKDIR]
#   env: ROUNDS=3 SIZE_MIB=4096 CHUNK_SIZE=<bytes> STORE_BENCH_BIN=<prebuilt store_bench>
#
# MODE=garage-restic (SIZE_MIB defaults to 2048 there): Garage import vs `restic backup` to the
# same Garage bucket, one run, order A B C C B A per pair of rounds (A = packs layout, the S3
# default since format 5; B = restic; C = the chunks layout of format 4, one object per chunk).
# PUTs are counted by Garage itself (its /metrics: PutObject + UploadPart + CopyObject +
# CompleteMultipartUpload), so both peers are measured the same way; bytes stored = the
# objects under each run's prefix. Extra env: UPLOADS=<pack uploads in flight>.
# Needs: cargo, restic, garage (cargo install garage --version 2.5.0 --locked), python3.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
MODE=${MODE:-all}
if [ "$MODE" = garage-restic ]; then SIZE_MIB=${SIZE_MIB:-2048}; fi
SIZE_MIB=${SIZE_MIB:-4096}
REPO_ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${1:-$(mktemp -d -t standby-store-bench-XXXXXX)}
mkdir -p "$WORK"
IMG=$WORK/image.raw
command -v restic >/dev/null || { echo "restic is required" >&2; exit 1; }
GARAGE=$(command -v garage || echo "$HOME/.cargo/bin/garage")
[ -x "$GARAGE" ] || { echo "garage is required (cargo install garage --version 2.5.0 --locked)" >&2; exit 1; }

if [ -n "${STORE_BENCH_BIN:-}" ]; then
  BENCH=$STORE_BENCH_BIN
else
  echo "building the benchmark helper (release)..." >&2
  (cd "$REPO_ROOT" && cargo build --release -q -p replica-store --example store_bench)
  BENCH=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/examples/store_bench
fi
CHUNK_ARGS=()
[ -n "${CHUNK_SIZE:-}" ] && CHUNK_ARGS=(--chunk-size "$CHUNK_SIZE")

if [ ! -f "$IMG" ] || [ "$(stat -c %s "$IMG")" != $((SIZE_MIB << 20)) ]; then
  echo "writing $SIZE_MIB MiB image..." >&2
  python3 - "$IMG" "$SIZE_MIB" <<'PY'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
ext = 4 << 20
with open(path, "wb") as f:
    f.truncate(mib << 20)
    for i in range(0, (mib << 20) // ext, 2):
        f.seek(i * ext)
        f.write(os.urandom(ext))
PY
fi
# Warm the page cache for every peer alike.
cat "$IMG" > /dev/null

# --- Garage -------------------------------------------------------------------------------
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
GDIR=$WORK/garage; rm -rf "$GDIR"; mkdir -p "$GDIR"
RPC=$(port); S3=$(port); ADM=$(port)
cat > "$GDIR/garage.toml" <<TOML
metadata_dir = "$GDIR/meta"
data_dir = "$GDIR/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$RPC"
rpc_public_addr = "127.0.0.1:$RPC"
rpc_secret = "$(openssl rand -hex 32)"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$S3"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$ADM"
TOML
export AWS_ACCESS_KEY_ID=GK$(openssl rand -hex 12)
export AWS_SECRET_ACCESS_KEY=$(openssl rand -hex 32)
export AWS_REGION=garage
export STANDBY_BENCH_S3_ENDPOINT=http://127.0.0.1:$S3
GARAGE_DEFAULT_ACCESS_KEY=$AWS_ACCESS_KEY_ID GARAGE_DEFAULT_SECRET_KEY=$AWS_SECRET_ACCESS_KEY \
  GARAGE_DEFAULT_BUCKET=bench RUST_LOG=garage=warn \
  "$GARAGE" -c "$GDIR/garage.toml" server --single-node --default-bucket >"$GDIR/log" 2>&1 &
GPID=$!
trap 'kill $GPID 2>/dev/null; wait $GPID 2>/dev/null || true; rm -rf "$GDIR" "$WORK"/local-*' EXIT
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$ADM/health" >/dev/null 2>&1 && break
  sleep 0.1
done
sleep 1

if [ "$MODE" = garage-restic ]; then
  export AWS_DEFAULT_REGION=garage RESTIC_PASSWORD=bench
  S3URL=http://127.0.0.1:$S3
  puts() { curl -fs "http://127.0.0.1:$ADM/metrics" | awk '/^api_s3_request_counter\{api_endpoint="(PutObject|UploadPart|CopyObject|CompleteMultipartUpload)"\}/ {s+=$2} END {print s+0}'; }
  prefix_bytes() { "$BENCH" du "s3://bench/$1" 2>/dev/null | sed -n 's/.*bytes=\([0-9]*\).*/\1/p'; }
  declare -A T P B
  run() { # run PEER ROUND
    local peer=$1 r=$2 p0 t0 t1 p1 out
    sync; p0=$(puts); t0=$(date +%s.%N)
    case $peer in
      packs)  out=$("$BENCH" import "s3://bench/packs-$r" "$IMG" --layout packs ${UPLOADS:+--uploads $UPLOADS}) ;;
      chunks) out=$("$BENCH" import "s3://bench/chunks-$r" "$IMG" --layout chunks) ;;
      restic) restic -q -r "s3:$S3URL/bench/restic-$r" init >/dev/null
              p0=$(puts); t0=$(date +%s.%N)
              restic -q -r "s3:$S3URL/bench/restic-$r" backup "$IMG" >/dev/null; out="" ;;
    esac
    t1=$(date +%s.%N); p1=$(puts)
    local secs mbps bytes
    secs=$(python3 -c "print(round($t1-$t0,2))")
    mbps=$(python3 -c "print(round($SIZE_MIB*1048576/($t1-$t0)/1e6))")
    bytes=$(prefix_bytes "$peer-$r")
    echo "  $peer: ${secs}s ${mbps} MB/s, $((p1-p0)) PUTs, $bytes bytes stored ${out:+($out)}" >&2
    T[$peer]+="$secs "; P[$peer]=$((p1-p0)); B[$peer]=$bytes
  }
  for r in $(seq "$ROUNDS"); do
    echo "round $r/$ROUNDS" >&2
    if [ $((r % 2)) = 1 ]; then order="packs restic chunks"; else order="chunks restic packs"; fi
    for peer in $order; do run "$peer" "$r"; done
  done
  median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
  RT=$(echo "${T[restic]}" | median)
  echo
  echo "| peer | seconds (median of $ROUNDS) | MB/s | speed vs restic | PUTs | PUTs per MiB stored | bytes stored |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for p in packs chunks restic; do
    t=$(echo "${T[$p]}" | median)
    python3 - "$p" "$t" "$RT" "${P[$p]}" "${B[$p]}" "$SIZE_MIB" <<'PY'
import sys
p, t, rt, puts, b, mib = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5] or 0), int(sys.argv[6])
name = {"packs": "standby, packs (format 5)", "chunks": "standby, one object per chunk (format 4)", "restic": "restic backup"}[p]
print(f"| {name} | {t:.2f} | {mib*1048576/t/1e6:.0f} | {rt/t:.2f}x | {puts:,} | {puts/(b/1048576) if b else 0:.3f} | {b:,} |")
PY
  done
  echo
  echo "runs (s): packs ${T[packs]}| chunks ${T[chunks]}| restic ${T[restic]}"
  echo "image: $SIZE_MIB MiB, alternating 4 MiB random / 4 MiB zero extents; page cache warm; $(nproc) cores; Garage $("$GARAGE" --version 2>/dev/null | head -1) single node on 127.0.0.1"
  exit 0
fi

declare -A MBPS STORED ALLOC
add() { MBPS[$1]+="$2 "; STORED[$1]=$3; ALLOC[$1]=$4; }
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }
# Object bytes: sum of file sizes (what an object store holds/bills); alloc: disk blocks used.
file_bytes() { find "$1" -type f -printf '%s\n' | awk '{s+=$1} END {printf "%.0f\n", s}'; }
alloc_of() { du -sB1 "$1" | cut -f1; }

# On ext4 without a journal, creating a file skips (and scans past, one buffer lookup each)
# every inode freed in the last 60 s, or 6 min while the inode table is dirty. Deleting a
# store's ~33,000 files right before an import makes that import up to 3x slower, so every
# round imports into new directories and the stores are deleted only after the last round
# (needs 4 GiB of free space per round). Run it where nothing deleted many files just before.
for r in $(seq "$ROUNDS"); do
  echo "round $r/$ROUNDS" >&2
  out=$("$BENCH" import "$WORK/local-$r" "$IMG" "${CHUNK_ARGS[@]}")
  echo "  local:     $out" >&2
  add local "$(echo "$out" | field mbps)" "$(file_bytes "$WORK/local-$r")" "$(alloc_of "$WORK/local-$r")"

  rm -rf "$WORK/restic"
  RESTIC_PASSWORD=bench restic init -q --repo "$WORK/restic" >/dev/null
  t0=$(date +%s.%N)
  RESTIC_PASSWORD=bench restic backup -q --repo "$WORK/restic" "$IMG" >/dev/null
  t1=$(date +%s.%N)
  mbps=$(python3 -c "print(round($SIZE_MIB*1048576/($t1-$t0)/1e6))")
  echo "  restic:    mbps=$mbps" >&2
  add restic "$mbps" "$(file_bytes "$WORK/restic")" "$(alloc_of "$WORK/restic")"
  rm -rf "$WORK/restic"

  out=$("$BENCH" import "$WORK/local-enc-$r" "$IMG" --encrypt "${CHUNK_ARGS[@]}")
  echo "  local-enc: $out" >&2
  add local-enc "$(echo "$out" | field mbps)" "$(file_bytes "$WORK/local-enc-$r")" "$(alloc_of "$WORK/local-enc-$r")"

  out=$("$BENCH" import "s3://bench/run$r" "$IMG" "${CHUNK_ARGS[@]}")
  echo "  garage:    $out" >&2
  add garage "$(echo "$out" | field mbps)" "$(echo "$out" | field stored_bytes)" "n/a"
done
for r in $(seq "$ROUNDS"); do rm -rf "$WORK/local-$r" "$WORK/local-enc-$r"; done

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
RM=$(echo "${MBPS[restic]}" | median); RS=${STORED[restic]}
echo
echo "| peer | MB/s (median of $ROUNDS) | object bytes | disk blocks | speed vs restic | object bytes vs restic |"
echo "|---|---:|---:|---:|---:|---:|"
for p in local local-enc garage restic; do
  m=$(echo "${MBPS[$p]}" | median); s=${STORED[$p]}
  printf "| %s | %s | %s | %s | %.2fx | %.4f |\n" "$p" "$m" "$s" "${ALLOC[$p]}" \
    "$(python3 -c "print($m/$RM)")" "$(python3 -c "print($s/$RS)")"
done
echo
echo "runs (MB/s): local ${MBPS[local]}| local-enc ${MBPS[local-enc]}| garage ${MBPS[garage]}| restic ${MBPS[restic]}"
echo "image: $SIZE_MIB MiB, alternating 4 MiB random / 4 MiB zero extents; page cache warm; $(nproc) cores"
