#!/usr/bin/env bash
# Build a small BIOS-bootable raw disk image for boot tests, without root and
# without loop devices.
#
#   build.sh OUT.img [MARKER]
#
# Layout (64 MiB, MBR with syslinux's mbr.bin):
#   partition 1  FAT16, bootable, 40 MiB: syslinux, syslinux.cfg, vmlinuz, initrd.gz
#   partition 2  ext4, 20 MiB: file `marker` holding MARKER (default standby-boot-marker-0)
#
# The initramfs is busybox plus the few kernel modules needed to reach a
# virtio or IDE/SATA disk and mount ext4. Its /init mounts partition 2 of the
# first disk, prints `STANDBY-MARKER: <marker>` on the serial console, appends
# `guest-write` to /guest-wrote on that partition, and powers off.
#
# Debian packages: linux-image-amd64 busybox-static syslinux syslinux-common
# mtools dosfstools e2fsprogs fdisk cpio kmod
#
# BOOTIMG_SYSROOT=DIR takes the kernel from DIR/boot/vmlinuz-* and its modules
# from DIR/lib/modules/VERSION instead of the running system (for example a
# linux-image package unpacked with `dpkg-deb -x`).
#
# The output depends only on the inputs (kernel, busybox, syslinux, MARKER):
# time stamps, UUIDs and seeds are fixed, so the image can be cached.
set -euo pipefail

# Tools in /sbin are not on an ordinary user's PATH on Debian.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

die() { echo "build.sh: $*" >&2; exit 1; }

[[ $# -ge 1 && $# -le 2 ]] || die "usage: build.sh OUT.img [MARKER]"
out=$1
marker=${2:-standby-boot-marker-0}
sysroot=${BOOTIMG_SYSROOT:-}

need() { # need TOOL PACKAGE
    command -v "$1" >/dev/null 2>&1 || die "missing '$1' (apt-get install $2)"
}
need busybox busybox-static
need syslinux syslinux
need mcopy mtools
need mkfs.fat dosfstools
need mke2fs e2fsprogs
need sfdisk fdisk
need cpio cpio
need modprobe kmod
need debugfs e2fsprogs
need gzip gzip
mbr_bin=/usr/lib/syslinux/mbr/mbr.bin
[[ -r $mbr_bin ]] || die "missing $mbr_bin (apt-get install syslinux-common)"
busybox_bin=$(command -v busybox)
# The initramfs has no shared libraries, so busybox must be the static build.
if ldd "$busybox_bin" >/dev/null 2>&1; then
    die "$busybox_bin is dynamically linked (apt-get install busybox-static)"
fi

# Newest kernel under the sysroot.
shopt -s nullglob
kernels=("$sysroot"/boot/vmlinuz-*)
shopt -u nullglob
[[ ${#kernels[@]} -gt 0 ]] || die "no kernel at $sysroot/boot/vmlinuz-* (apt-get install linux-image-amd64)"
kernel=$(printf '%s\n' "${kernels[@]}" | sort -V | tail -n 1)
[[ -r $kernel ]] || die "kernel $kernel is not readable"
kver=${kernel##*/vmlinuz-}
moddir=$sysroot/lib/modules/$kver
[[ -r $moddir/modules.dep ]] || die "no $moddir/modules.dep for kernel $kver"

# Fixed values for reproducible output.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
export E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH
export MTOOLS_SKIP_CHECK=1
stamp=@$SOURCE_DATE_EPOCH
export TZ=UTC LC_ALL=C

# Geometry, in 512-byte sectors.
img_sectors=$((64 * 2048))   # 64 MiB
p1_start=2048                # 1 MiB
p1_sectors=$((40 * 2048))    # 40 MiB
p2_start=$((p1_start + p1_sectors))
p2_sectors=$((20 * 2048))    # 20 MiB
p1_offset=$((p1_start * 512))
p2_offset=$((p2_start * 512))

work=$(mktemp -d "${TMPDIR:-/tmp}/bootimg.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- initramfs ---------------------------------------------------------------
root=$work/initramfs
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,mnt,etc,lib/modules}
cp "$busybox_bin" "$root/bin/busybox"

# Modules in load order: each one after its dependencies (and soft
# dependencies such as crc32c for ext4). Built-in ones are skipped.
: >"$root/etc/modules"
for m in virtio_pci virtio_blk ata_piix ahci sd_mod crc32c_generic ext4; do
    modprobe -d "${sysroot:-/}" -S "$kver" --show-depends "$m" 2>/dev/null |
        awk '$1 == "insmod" { print $2 }' >>"$work/modlist" ||
        die "modprobe --show-depends $m failed for kernel $kver"
done
# Keep the first occurrence of each module.
awk '!seen[$0]++' "$work/modlist" | while read -r path; do
    src=$sysroot$path
    [[ -r $src ]] || die "module $src not readable"
    name=${path##*/}
    case $name in
    *.ko) cp "$src" "$root/lib/modules/$name" ;;
    *.ko.xz) need xz xz-utils; xz -dc "$src" >"$root/lib/modules/${name%.xz}"; name=${name%.xz} ;;
    *.ko.zst) need zstd zstd; zstd -qdc "$src" >"$root/lib/modules/${name%.zst}"; name=${name%.zst} ;;
    *.ko.gz) gzip -dc "$src" >"$root/lib/modules/${name%.gz}"; name=${name%.gz} ;;
    *) die "unexpected module file $src" ;;
    esac
    echo "$name" >>"$root/etc/modules"
done

cat >"$root/init" <<'EOF'
#!/bin/busybox sh
# Boot-test guest: print the marker of partition 2, record a write, power off.
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
    echo "STANDBY-ERROR: $*"
    poweroff -f
}

while read -r m; do
    # "File exists" for modules the kernel already loaded is fine.
    insmod "/lib/modules/$m" 2>/dev/null || true
done </etc/modules

# Partition 2 of the first virtio, then SCSI/SATA, then IDE disk.
dev=
i=0
while [ -z "$dev" ] && [ $i -lt 200 ]; do
    for d in vda sda hda; do
        if [ -b "/dev/${d}2" ]; then dev=/dev/${d}2; break; fi
    done
    [ -n "$dev" ] || usleep 50000
    i=$((i + 1))
done
[ -n "$dev" ] || fail "no second partition on vda, sda or hda"

mount -t ext4 -o rw "$dev" /mnt || fail "cannot mount $dev"
# Leading newline: the console may have left escape codes on the current line.
marker=$(cat /mnt/marker) || fail "no marker file on $dev"
printf '\nSTANDBY-MARKER: %s\n' "$marker"
echo guest-write >>/mnt/guest-wrote || fail "cannot write to $dev"
sync
umount /mnt || fail "cannot unmount $dev"
sync
poweroff -f
EOF
chmod 0755 "$root/init"

find "$root" -exec touch -h -d "$stamp" {} +
(cd "$root" && find . -mindepth 1 | sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -9 -n >"$work/initrd.gz"

# --- boot partition ----------------------------------------------------------
fat=$work/fat
mkdir "$fat"
cp "$kernel" "$fat/vmlinuz"
cp "$work/initrd.gz" "$fat/initrd.gz"
cat >"$fat/syslinux.cfg" <<'EOF'
SERIAL 0 115200
DEFAULT standby
PROMPT 0
TIMEOUT 0
LABEL standby
  KERNEL /vmlinuz
  INITRD /initrd.gz
  APPEND console=ttyS0 panic=-1 quiet
EOF
touch -d "$stamp" "$fat"/*

# --- data partition ----------------------------------------------------------
data=$work/data
mkdir "$data"
printf '%s\n' "$marker" >"$data/marker"
touch -d "$stamp" "$data/marker" "$data"

# --- disk --------------------------------------------------------------------
img=$work/disk.img
truncate -s $((img_sectors * 512)) "$img"
sfdisk --quiet --no-reread --no-tell-kernel "$img" <<EOF >/dev/null
label: dos
label-id: 0x53746e64
start=$p1_start, size=$p1_sectors, type=e, bootable
start=$p2_start, size=$p2_sectors, type=83
EOF
dd if="$mbr_bin" of="$img" bs=440 count=1 conv=notrunc status=none

# mkfs.fat warns that the file is larger than the file system: expected.
mkfs.fat -F 16 -n STANDBYBOOT --invariant -h "$p1_start" \
    --offset "$p1_start" "$img" $((p1_sectors / 2)) >"$work/mkfs.log" 2>&1 ||
    { cat "$work/mkfs.log" >&2; die "mkfs.fat failed"; }
mcopy -m -i "$img@@$p1_offset" "$fat/syslinux.cfg" "$fat/vmlinuz" "$fat/initrd.gz" ::/
syslinux --install --offset "$p1_offset" "$img"

mke2fs -q -F -t ext4 -L standby-data \
    -U 5374616e-6462-792d-626f-6f742d696d67 \
    -E offset=$p2_offset,nodiscard,root_owner=0:0,hash_seed=5374616e-6462-792d-6861-73682d736565 \
    -d "$data" "$img" $((p2_sectors / 2))k
# mke2fs -d keeps the builder's uid/gid: make the marker root's, whoever builds.
# Setting fields stamps ctime with the current time, so set it back last.
printf '%s\n' 'sif /marker uid 0' 'sif /marker gid 0' \
    "sif /marker ctime @$SOURCE_DATE_EPOCH" >"$work/owner.cmds"
debugfs -w -f "$work/owner.cmds" "$img?offset=$p2_offset" >/dev/null 2>&1 ||
    die "debugfs could not set the owner of /marker"

[[ $(stat -c %s "$img") -eq $((img_sectors * 512)) ]] || die "image size changed while building"
mv "$img" "$out"
