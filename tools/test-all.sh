#!/usr/bin/env bash
# Installs what the test suite needs (when missing) and runs the whole suite.
#
#   tools/test-all.sh            # install missing dependencies, lint, build, run every test
#
# Environment:
#   STANDBY_SKIP_INSTALL=1   do not install anything (fail if something is missing)
#   STANDBY_SKIP_LINT=1      skip cargo fmt / clippy
set -euo pipefail
cd "$(dirname "$0")/.."

GARAGE_VERSION=2.5.0
APT_PACKAGES=(qemu-utils libnbd-bin nbdkit fio fuse3 e2fsprogs util-linux openssl restic rsync python3 ca-certificates
    # the boot test's disk image: kernel, busybox initramfs, syslinux on FAT, ext4 data partition
    linux-image-amd64 busybox-static syslinux syslinux-common mtools dosfstools fdisk cpio kmod)
export PATH="$HOME/.cargo/bin:$PATH"

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "need root (or sudo) to run: $*" >&2; return 1; fi
}

# The boot test runs qemu-system-x86_64. It must come from the same suite as qemu-utils: when
# qemu-utils is a backports build, install the emulator from bookworm-backports too (adding
# that suite, on the mirror the system already uses, if it is not configured).
install_qemu_system() {
    command -v qemu-system-x86_64 >/dev/null && return 0
    local ver suite=()
    ver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    if [[ "$ver" == *bpo* ]]; then
        if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
            local uri
            uri=$(grep -rhs '^URIs:' /etc/apt/sources.list.d/ | awk '{print $2; exit}')
            [ -n "$uri" ] || uri=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null)
            printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" \
                | as_root tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
        fi
        suite=(-t bookworm-backports)
    fi
    echo "== installing qemu-system-x86 ${suite[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${suite[@]}" qemu-system-x86
}

install_deps() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "== installing ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
    install_qemu_system
    if ! garage --version 2>/dev/null | grep -q "$GARAGE_VERSION"; then
        echo "== building the Garage S3 server $GARAGE_VERSION (takes ~15 minutes on 2 cores)"
        cargo install garage --version "$GARAGE_VERSION" --locked --quiet
    fi
    if ! cargo nextest --version >/dev/null 2>&1; then
        echo "== installing cargo-nextest"
        cargo install cargo-nextest --locked --quiet
    fi
}

[ "${STANDBY_SKIP_INSTALL:-0}" = 1 ] || install_deps

if [ "${STANDBY_SKIP_LINT:-0}" != 1 ]; then
    echo "== cargo fmt --check"
    cargo fmt --all -- --check
    echo "== cargo clippy"
    cargo clippy --workspace --all-targets --release --quiet -- -D warnings
fi

echo "== build"
cargo build --workspace --all-targets --release --quiet
# The end-to-end tests run this binary (built above with the workspace's feature set).
export STANDBY_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/standby"
echo "== tests"
cargo nextest run --workspace --release --no-fail-fast
