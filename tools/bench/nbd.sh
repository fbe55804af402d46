#!/usr/bin/env bash
# NBD data-path benchmark: standby vs nbdkit vs qemu-nbd (see tools/bench/nbd.py --help).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet --bin standby
exec python3 tools/bench/nbd.py "$@"
