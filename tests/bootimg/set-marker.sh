#!/usr/bin/env bash
# Replace the `marker` file on the ext4 partition (partition 2) of an image
# made by build.sh, without root and without mounting.
#
#   set-marker.sh IMG MARKER
#
# Debian packages: e2fsprogs fdisk
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

die() { echo "set-marker.sh: $*" >&2; exit 1; }

[[ $# -eq 2 ]] || die "usage: set-marker.sh IMG MARKER"
img=$1
marker=$2
command -v debugfs >/dev/null 2>&1 || die "missing 'debugfs' (apt-get install e2fsprogs)"
command -v sfdisk >/dev/null 2>&1 || die "missing 'sfdisk' (apt-get install fdisk)"
[[ -w $img ]] || die "cannot write $img"
[[ $img != *'?'* ]] || die "image path must not contain '?'"

# Byte offset of partition 2, from the MBR.
start=$(sfdisk --dump "$img" 2>/dev/null |
    awk -F'start=' '/start=/ { if (++n == 2) { split($2, a, ","); print a[1] + 0 } }' || true)
[[ -n $start && $start -gt 0 ]] || die "$img has no second partition"
fs="$img?offset=$((start * 512))"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf '%s\n' "$marker" >"$work/marker"
# debugfs `write` does not overwrite, so remove the old file first (an error
# if it is already gone is harmless). Owner and times fixed as build.sh sets
# them, so the same input image and MARKER always give the same output.
t=${SOURCE_DATE_EPOCH:-1700000000}
export E2FSPROGS_FAKE_TIME=$t # superblock write time
cat >"$work/cmds" <<CMDS
rm /marker
write "$work/marker" marker
sif /marker uid 0
sif /marker gid 0
sif /marker atime @$t
sif /marker mtime @$t
sif /marker crtime @$t
sif /marker ctime @$t
CMDS
debugfs -w -f "$work/cmds" "$fs" >/dev/null 2>&1 || die "debugfs failed on $img"

# debugfs reports most errors only as text, so check the result instead.
got=$(debugfs -R 'cat /marker' "$fs" 2>/dev/null) || true
[[ $got == "$marker" ]] || die "marker in $img reads '$got' after writing '$marker'"
