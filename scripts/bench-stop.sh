#!/usr/bin/env bash
# Source stop time of a migration: GET_VRING_BASE draining (QEMU 10) versus
# suspending into the inflight region (bits 12+20, QEMU 11
# inflight-migration=on), against requests in flight and storage latency.
# Knobs (BENCH_REPS, BENCH_LATENCIES_MS, BENCH_INFLIGHT, VHOST_AGENT_BIN) pass
# through; see tests/benches/blk_stop.rs. Needs no QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -p vhost-agent-tests --bench blk_stop
