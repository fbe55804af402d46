#!/usr/bin/env bash
# Installs what the test suite needs (when missing) and runs the whole suite.
#
#   tools/test-all.sh            # install missing dependencies, lint, build, run every test
#   tools/test-all.sh --long     # the same, then the long change-log campaigns (hours on 2 cores):
#                                #   100,000 seeds of the storage-fault simulation (changelog::sim,
#                                #   one shard per core) and 1,000 iterations of the kill -9
#                                #   campaign (tests/tests/changelog_crash.rs), and 2,000 cases of
#                                #   each change-log reference-model property test; each prints
#                                #   its counts, and the run fails if any seed, iteration or case
#                                #   does. STANDBY_LONG_SIM_SEEDS / STANDBY_LONG_CRASH_ITERATIONS /
#                                #   STANDBY_LONG_PROPTEST_CASES change the sizes. `.ci/run` runs
#                                #   the suite without it.
#
# Works on a fresh Debian 12 machine with the Rust toolchain, whatever other APT repositories are
# listed (see tools/lib/deps.sh for how the Debian mirror and suites are chosen). When a
# dependency cannot be installed it says which, why and what to run by hand, and exits non-zero.
#
# Environment:
#   STANDBY_SKIP_INSTALL=1   do not install anything (tests fail if something is missing)
#   STANDBY_SKIP_LINT=1      skip cargo fmt / clippy
#   STANDBY_SKIP_S3=1        leave out the tests that need the Garage S3 server (every such test
#                            has "s3" in its name; nextest reports them as skipped) and do not
#                            install Garage (~15 minutes of building). Refused under CI=true:
#                            there a missing dependency fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
long=0
for arg in "$@"; do
    case "$arg" in
        --long) long=1 ;;
        *) echo "error: unknown argument $arg (the only one is --long)" >&2; exit 2 ;;
    esac
done
# shellcheck source=tools/lib/deps.sh
. tools/lib/deps.sh

GARAGE_VERSION=2.5.0
APT_PACKAGES=(qemu-utils libnbd-bin nbdkit fio fuse3 e2fsprogs util-linux openssl restic rsync python3 python3-prometheus-client chromium chromium-driver ca-certificates
    # the boot test's disk image: kernel, busybox initramfs, syslinux on FAT, ext4 data partition
    linux-image-amd64 busybox-static syslinux syslinux-common mtools dosfstools fdisk cpio kmod)
export PATH="$HOME/.cargo/bin:$PATH"

if [ "${CI:-}" = true ] && [ "${STANDBY_SKIP_S3:-0}" = 1 ]; then
    echo "error: STANDBY_SKIP_S3=1 is refused under CI=true: every test must run there" >&2
    exit 1
fi

install_deps() {
    install_apt_packages "${APT_PACKAGES[@]}"
    install_qemu_system
    if [ "${STANDBY_SKIP_S3:-0}" = 1 ]; then
        echo "== STANDBY_SKIP_S3=1: the Garage S3 server is not installed (only its tests need it)"
    else
        install_cargo_tool "the Garage S3 server $GARAGE_VERSION" "[[ \$(garage --version) == *'$GARAGE_VERSION'* ]]" \
            " (takes ~15 minutes on 2 cores)" garage --version "$GARAGE_VERSION" --locked
    fi
    install_cargo_tool cargo-nextest "cargo nextest --version" "" cargo-nextest --locked
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
# The fuzz targets are a separate crate (libFuzzer): they must keep compiling, against exactly
# the dependency versions of the workspace (--locked). tools/fuzz.sh runs them.
echo "== build the fuzz targets"
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}" cargo build --release --locked --quiet --manifest-path fuzz/Cargo.toml
# The end-to-end tests run this binary (built above with the workspace's feature set).
export STANDBY_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/standby"
filter=()
if [ "${STANDBY_SKIP_S3:-0}" = 1 ]; then
    echo "== STANDBY_SKIP_S3=1: the tests that need the Garage S3 server are left out (reported as skipped)"
    filter=(-E 'not (test(/s3/) | binary(/s3/))')
fi
echo "== tests"
cargo nextest run --workspace --release --no-fail-fast "${filter[@]}"

[ "$long" = 1 ] || exit 0
# The long campaigns, with cargo test (not nextest: its slow-test timeout would end them).
seeds="${STANDBY_LONG_SIM_SEEDS:-100000}"
shards="$(nproc)"
per=$(( (seeds + shards - 1) / shards ))
echo "== long: $seeds simulation seeds in $shards shards"
cargo test --release --quiet -p gateway --features testing --lib --no-run
pids=()
for ((i = 0; i < shards; i++)); do
    start=$(( i * per ))
    n=$(( seeds - start < per ? seeds - start : per ))
    [ "$n" -gt 0 ] || continue
    STANDBY_SIM_SEED_START=$start STANDBY_SIM_SEEDS=$n \
        cargo test --release --quiet -p gateway --features testing --lib changelog::sim::tests::sim_seeds \
        -- --nocapture &
    pids+=($!)
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
echo "== long: change-log reference-model property tests, ${STANDBY_LONG_PROPTEST_CASES:-2000} cases each"
PROPTEST_CASES="${STANDBY_LONG_PROPTEST_CASES:-2000}" \
    cargo test --release --quiet -p gateway --features testing --lib -- \
    changelog::tests::reference_model changelog::extent::model_tests::shipped_cuts_equal_the_model \
    || fail=1
echo "== long: kill -9 campaign, ${STANDBY_LONG_CRASH_ITERATIONS:-1000} iterations"
STANDBY_CRASH_ITERATIONS="${STANDBY_LONG_CRASH_ITERATIONS:-1000}" \
    cargo test --release -p standby-e2e --test changelog_crash -- --nocapture || fail=1
[ "$fail" = 0 ] || { echo "error: a long campaign failed (see above)" >&2; exit 1; }
echo "== long campaigns passed"
