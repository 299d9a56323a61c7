#!/usr/bin/env bash
# The whole test suite, as CI runs it.
#
# As root it first installs what the tests need (QEMU 10 and
# qemu-storage-daemon from bookworm-backports, the guest build tools,
# cargo-fuzz);
# the guest kernel and initramfs are built on first use and cached in
# target/guest. Everything runs in the release profile so the agent binary
# the integration tests spawn is the one the unit tests were built with.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -eq 0 ]]; then
    scripts/install-test-deps.sh
else
    echo "test.sh: not root; assuming QEMU, qemu-storage-daemon, busybox-static and fio are installed" >&2
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --release --workspace --all-targets

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --release --no-fail-fast "$@"
else
    cargo test --workspace --release --no-fail-fast "$@"
fi

# Every fuzz target for a short, bounded time (fuzz/README.md); a crash
# fails the run.
scripts/fuzz.sh --ci
