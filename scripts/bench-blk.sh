#!/usr/bin/env bash
# Block IOPS benchmark: the agent against qemu-storage-daemon on the same
# preconditioned image, with the same libblkio client, buffered
# (BENCH_DIRECT=0) and then O_DIRECT (BENCH_DIRECT=1). Set BENCH_DIRECT to run
# one mode only; the other BENCH_* knobs (BENCH_SECONDS, BENCH_ROUNDS,
# BENCH_IMAGE_MB, ...; see tests/benches/blk_iops.rs) pass through.
# Needs qemu-storage-daemon: run `sudo scripts/install-test-deps.sh` first.
set -euo pipefail
cd "$(dirname "$0")/.."
for direct in ${BENCH_DIRECT:-0 1}; do
    BENCH_DIRECT=$direct cargo bench -p vhost-agent-tests --bench blk_iops
done
