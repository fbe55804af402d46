#!/usr/bin/env bash
# Print a file from the ext4 partition (partition 2) of an image made by
# build.sh, without root and without mounting.
#
#   read-file.sh IMG PATH        e.g. read-file.sh disk.img /guest-wrote
#
# Debian packages: e2fsprogs fdisk
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

die() { echo "read-file.sh: $*" >&2; exit 1; }

[[ $# -eq 2 ]] || die "usage: read-file.sh IMG PATH"
img=$1
path=$2
command -v debugfs >/dev/null 2>&1 || die "missing 'debugfs' (apt-get install e2fsprogs)"
command -v sfdisk >/dev/null 2>&1 || die "missing 'sfdisk' (apt-get install fdisk)"
[[ -r $img ]] || die "cannot read $img"
[[ $img != *'?'* ]] || die "image path must not contain '?'"

# Byte offset of partition 2, from the MBR.
start=$(sfdisk --dump "$img" 2>/dev/null |
    awk -F'start=' '/start=/ { if (++n == 2) { split($2, a, ","); print a[1] + 0 } }' || true)
[[ -n $start && $start -gt 0 ]] || die "$img has no second partition"
fs="$img?offset=$((start * 512))"

# debugfs exits 0 even when a command fails; its errors go to stderr after
# the version banner, so anything else there means failure.
err=$(mktemp)
trap 'rm -f "$err"' EXIT
debugfs -R "cat \"$path\"" "$fs" 2>"$err"
if grep -qv '^debugfs [0-9]' "$err"; then
    grep -v '^debugfs [0-9]' "$err" >&2
    die "cannot read $path from $img"
fi
