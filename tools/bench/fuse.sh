#!/usr/bin/env bash
# FUSE view benchmark: sequential read and write MB/s of one disk through its FUSE file
# (`standby mount`) against the same image file used directly, with fio, buffered (direct=0)
# and O_DIRECT (direct=1). Prints a Markdown table and writes it into docs/bench-fuse.md.
#
# Usage: [STANDBY_BIN=path] tools/bench/fuse.sh [--size-mib 1024] [--bs 1M] [--engine psync] [--iodepth 1]
#                            [--reps 3] [--workdir DIR] [--no-doc]
#
# Every cell is the median of --reps fio runs over the whole disk (size based). Writes end
# with fsync (end_fsync=1), so buffered writes to the image pay for their write-back too.
# Before every read the page cache is dropped (needs root), so buffered reads of the image
# come from the disk, not from memory. The image is filled with random data first, so reads
# never see holes. Needs root (or a user allowed to use FUSE and drop caches), fio, fuse3.
set -euo pipefail
cd "$(dirname "$0")/../.."

SIZE_MIB=1024 BS=1M ENGINE=psync IODEPTH=1 REPS=3 WORKDIR="" DOC=1
while [ $# -gt 0 ]; do
    case "$1" in
        --size-mib) SIZE_MIB=$2; shift 2 ;;
        --bs) BS=$2; shift 2 ;;
        --engine) ENGINE=$2; shift 2 ;;
        --iodepth) IODEPTH=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --workdir) WORKDIR=$2; shift 2 ;;
        --no-doc) DOC=0; shift ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
for tool in fio python3 fusermount3; do
    command -v "$tool" >/dev/null || { echo "fuse.sh: '$tool' is not installed" >&2; exit 1; }
done

# STANDBY_BIN: use this binary instead of building one.
if [ -n "${STANDBY_BIN:-}" ]; then
    BIN=$STANDBY_BIN
else
    cargo build --release --quiet --bin standby
    BIN="${CARGO_TARGET_DIR:-target}/release/standby"
fi

WORK=$(mktemp -d "${WORKDIR:-${TMPDIR:-/tmp}}/standby-bench-fuse.XXXXXX")
MNT="$WORK/mnt"
PID=""
cleanup() {
    if [ -n "$PID" ]; then
        kill -TERM "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    if grep -q " $MNT " /proc/mounts 2>/dev/null; then
        fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN" --data-dir "$WORK/data" --log warn disk create bench --size "${SIZE_MIB}M" >/dev/null
IMG="$WORK/data/disks/bench.img"
echo "filling the ${SIZE_MIB} MiB image with random data..." >&2
dd if=/dev/urandom of="$IMG" bs=1M count="$SIZE_MIB" conv=notrunc,fsync status=none

mkdir -p "$MNT"
"$BIN" --data-dir "$WORK/data" --log warn mount "$MNT" >"$WORK/mount.out" 2>"$WORK/mount.log" &
PID=$!
for _ in $(seq 1 300); do
    grep -q "mounted at" "$WORK/mount.out" 2>/dev/null && break
    kill -0 "$PID" 2>/dev/null || { cat "$WORK/mount.log" >&2; exit 1; }
    sleep 0.1
done
grep -q "mounted at" "$WORK/mount.out" || { echo "standby mount did not start" >&2; exit 1; }
FUSE_FILE="$MNT/disks/bench"

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
}

# fio_mbps FILE RW DIRECT -> MB/s (10^6 bytes per second)
fio_mbps() {
    local file=$1 rw=$2 direct=$3 extra=()
    if [ "$rw" = write ]; then extra+=(--end_fsync=1); else drop_caches; fi
    fio --name=seq --filename="$file" --rw="$rw" --bs="$BS" --size="${SIZE_MIB}M" \
        --ioengine="$ENGINE" --iodepth="$IODEPTH" --direct="$direct" --numjobs=1 \
        --allow_file_create=0 --output-format=json "${extra[@]}" |
        python3 -c 'import json,sys
j=json.load(sys.stdin)["jobs"][0]
k="write" if sys.argv[1]=="write" else "read"
print("%.0f" % (j[k]["bw_bytes"]/1e6))' "$rw"
}

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

ROWS=()
for direct in 1 0; do
    for rw in write read; do
        img=() fuse=()
        for _ in $(seq 1 "$REPS"); do
            # Alternate the targets so drift in the machine's load hits both alike.
            img+=("$(fio_mbps "$IMG" "$rw" "$direct")")
            fuse+=("$(fio_mbps "$FUSE_FILE" "$rw" "$direct")")
        done
        mi=$(median "${img[@]}") mf=$(median "${fuse[@]}")
        ratio=$(python3 -c "print('%.2f' % ($mf / $mi if $mi else 0))")
        ROWS+=("| seq $rw | $direct | $mi | $mf | $ratio |")
        echo "seq $rw direct=$direct: image ${img[*]} MB/s, fuse ${fuse[*]} MB/s" >&2
    done
done

TABLE=$(
    echo "| test ($BS, $ENGINE, QD$IODEPTH) | direct | image file MB/s | FUSE file MB/s | FUSE / image |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
)
echo "$TABLE"

if [ "$DOC" = 1 ]; then
    {
        echo "# FUSE view benchmark"
        echo
        echo "Sequential throughput of one ${SIZE_MIB} MiB disk through its FUSE file (\`standby mount\`)"
        echo "against the same raw image used directly, measured with fio by \`tools/bench/fuse.sh\`"
        echo "(median of $REPS runs per cell; the two targets alternate; page cache dropped before"
        echo "every read; writes end with fsync). Release build."
        echo
        echo "Machine: $(nproc) CPU(s), kernel $(uname -r), image on $(df -T "$WORK" | awk 'NR==2 {print $2}'),"
        echo "fio $(fio --version | sed 's/^fio-//'), $(date -u +%Y-%m-%d)."
        echo
        echo "$TABLE"
        echo
        echo "How to read it: the FUSE file is direct I/O inside the kernel (no page cache; see"
        echo "[fuse.md](fuse.md#caching-and-coherence)), so direct=0 and direct=1 behave alike for it."
        echo "The gateway itself reads and writes the image with buffered positioned I/O, so FUSE reads"
        echo "get the image's read-ahead even when the client uses O_DIRECT (hence FUSE reads can beat"
        echo "O_DIRECT reads of the image). Writes pay one more copy and one more trip through user"
        echo "space per request (kernel → standby → image)."
    } >docs/bench-fuse.md
    echo "wrote docs/bench-fuse.md" >&2
fi
