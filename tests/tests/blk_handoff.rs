//! Handing in-flight requests from one back-end to another: vhost-user-blk
//! inflight migration (QEMU 11's `inflight-migration=on`, protocol bits 12,
//! 20 and 23) and crash recovery, driven by the test front-end against real
//! agent processes on one image.
//!
//! A migration here is what two QEMUs would do, on one host: the source
//! front-end stops its agent (SET_VRING_ENABLE(0), then GET_VRING_BASE or
//! request 45), copies the inflight region as QEMU migrates it, and a
//! destination front-end starts a second agent over the SAME guest RAM
//! (both agents map one memfd, so rings and buffers stay put) with
//! SET_INFLIGHT_FD and no GET, at the source's ring index.
//!
//! The source agent runs with `latency-ms=500` (every storage operation
//! starts 500 ms after submission), so requests are in flight when it is
//! stopped, and a suspended source's abandoned writes land late. That is
//! the hazard the write fence exists for, and `fence=none` shows it.
//!
//! Every agent has a control socket, and the tests assert what the agents
//! themselves report, never how long something took: a stop that must not
//! wait for storage shows as operations abandoned at the stop
//! (`abandoned-total`), a drain as every used entry published before the
//! reply; absence (nothing written after a suspend, nothing completed
//! twice) is checked once the agent reports that nothing of it is left
//! running (`in-flight` all 0, no abandoned write outstanding). The
//! timings themselves are the `blk_stop` benchmark's business.

use std::time::Duration;

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Error as VhostUserError, VhostUserFrontend};
use vhost::VhostBackend;
use vhost_agent_tests::frontend::inflight::{queue_region_size, InflightRegion};
use vhost_agent_tests::frontend::raw;
use vhost_agent_tests::frontend::{
    wait_until, BlkRequest, Inflight, StartOptions, StopRequest, TestFrontend,
    PROTOCOL_F_GET_VRING_BASE_SKIP_DRAIN, PROTOCOL_F_INFLIGHT_SHMFD, PROTOCOL_SUSPEND,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT,
};
use vhost_agent_tests::handoff::*;

#[test]
fn suspend_replies_at_once_and_the_destination_completes_every_request() {
    let mut host = Host::new();
    let source = host.agent("source", SOURCE_KEYS);
    let destination = host.agent("destination", "");
    let options = StartOptions::with_protocol(1, QUEUE_SIZE, PROTOCOL_SUSPEND);
    let mut src = TestFrontend::start(&source.socket, &options);

    let submitted = workload(&mut src, 0, 0, REQUESTS);
    wait_taken(&src, 0, REQUESTS);
    wait_in_flight(&source, 0, REQUESTS as u64);
    let stopped = src.stop(StopRequest::GetVringBase);
    let snapshot = Snapshot::take(&src);
    assert_eq!(stopped.bases, [REQUESTS as u16], "next avail index");
    // The reply did not wait for storage: the stop abandoned every write
    // still running (a stop that waited would have left none), and no
    // used entry was published (assert_source_stays_quiet).
    let writes = submitted.iter().filter(|s| s.request.is_write()).count() as u64;
    assert_eq!(
        abandoned_total(&source),
        writes,
        "writes abandoned at the suspend"
    );

    // The region holds every request, in fetch order, marked for the
    // destination.
    let queue = src.region().queue(0);
    assert_eq!((queue.version, queue.desc_num), (1, QUEUE_SIZE));
    let heads: Vec<u16> = submitted.iter().map(|s| s.head).collect();
    assert_eq!(queue.inflight_heads(), heads, "heads in flight, by counter");
    assert_source_stays_quiet(&source, &src, &snapshot, &submitted);

    let region = src.region().migrate();
    let mut dst = TestFrontend::resume(&destination.socket, &options, &src, region, &stopped.bases);
    let heads = dst.collect_used(0, REQUESTS, COMPLETE_TIMEOUT);
    assert_completed_once(&destination, &mut dst, &submitted, &heads);
    assert_data(&host, &dst, &submitted);
    assert!(
        dst.round_trip(0, 200, SPARE_BLOCK * SECTORS_PER_BLOCK),
        "the destination does not serve new requests"
    );
}

#[test]
fn without_bit_20_get_vring_base_drains_before_replying() {
    let mut host = Host::new();
    let source = host.agent("source", SOURCE_KEYS);
    let destination = host.agent("destination", "");
    // QEMU 10: inflight tracking (bit 12) but no inflight migration (bit 20).
    let options = StartOptions::with_protocol(1, QUEUE_SIZE, PROTOCOL_F_INFLIGHT_SHMFD);
    let mut src = TestFrontend::start(&source.socket, &options);

    let submitted = workload(&mut src, 0, 0, REQUESTS);
    wait_taken(&src, 0, REQUESTS);
    wait_in_flight(&source, 0, REQUESTS as u64);
    let stopped = src.stop(StopRequest::GetVringBase);
    // Read before anything else: what was published by the time of the
    // reply. A drain publishes every request before it replies.
    let published = src.queues[0].pending_used(&src.ram);
    assert_eq!(stopped.bases, [REQUESTS as u16], "next avail index");
    assert_eq!(abandoned_total(&source), 0, "a drain abandons nothing");
    assert_eq!(
        published, REQUESTS as u16,
        "used entries published before the drain's reply"
    );
    let queue = src.region().queue(0);
    assert_eq!(
        queue.inflight_count(),
        0,
        "heads still marked after a drain"
    );
    assert_eq!(queue.used_idx, REQUESTS as u16, "region used_idx");
    let heads = src.collect_used(0, REQUESTS, COMPLETE_TIMEOUT);
    assert_completed_once(&source, &mut src, &submitted, &heads);

    // The destination gets a region with nothing to resubmit: once it has
    // served a new request (it resubmits before it serves the ring) and
    // holds nothing, only that request's entries are in the used ring.
    let region = src.region().migrate();
    let mut dst = TestFrontend::resume(&destination.socket, &options, &src, region, &stopped.bases);
    let before = dst.queues[0].used_idx(&dst.ram);
    assert!(
        dst.round_trip(0, 200, SPARE_BLOCK * SECTORS_PER_BLOCK),
        "the destination does not serve new requests"
    );
    wait_idle(&destination);
    assert_eq!(
        dst.queues[0].used_idx(&dst.ram).wrapping_sub(before),
        2,
        "the destination resubmitted drained requests"
    );
    assert_data(&host, &dst, &submitted);
}

#[test]
fn with_bit_23_request_11_drains_and_request_45_suspends() {
    const PER_QUEUE: usize = 32;
    let mut host = Host::new();
    let source = host.agent("source", &format!("{SOURCE_KEYS},num-queues=2"));
    let destination = host.agent("destination", "num-queues=2");
    let options = StartOptions::with_protocol(
        2,
        QUEUE_SIZE,
        PROTOCOL_SUSPEND | PROTOCOL_F_GET_VRING_BASE_SKIP_DRAIN,
    );
    let mut src = TestFrontend::start(&source.socket, &options);
    assert!(
        src.protocol & PROTOCOL_F_GET_VRING_BASE_SKIP_DRAIN != 0,
        "bit 23 not acked"
    );

    let drained = workload(&mut src, 0, 0, PER_QUEUE);
    let suspended = workload(&mut src, 1, PER_QUEUE as u64, PER_QUEUE);
    wait_taken(&src, 0, PER_QUEUE);
    wait_taken(&src, 1, PER_QUEUE);
    wait_in_flight(&source, 0, PER_QUEUE as u64);
    wait_in_flight(&source, 1, PER_QUEUE as u64);
    for queue in 0..2 {
        src.frontend
            .set_vring_enable(queue, false)
            .expect("SET_VRING_ENABLE(0)");
    }
    // Queue 1 first, while its requests are still in flight.
    let (reply, _) = src.get_vring_base_skip_drain(1);
    assert_eq!(reply.request, raw::GET_VRING_BASE_SKIP_DRAIN, "reply code");
    assert_eq!(
        reply.flags,
        raw::FLAG_VERSION | raw::FLAG_REPLY,
        "reply flags"
    );
    assert_eq!(
        reply.vring_state(),
        Some((1, PER_QUEUE as u32)),
        "reply payload"
    );
    // Request 45 suspended: it abandoned queue 1's running writes (it did
    // not wait for them) and published nothing for them.
    let writes = suspended.iter().filter(|s| s.request.is_write()).count() as u64;
    assert_eq!(
        abandoned_total(&source),
        writes,
        "request 45 abandoned queue 1's writes"
    );
    assert_eq!(src.queues[1].pending_used(&src.ram), 0);
    assert_eq!(src.region().queue(1).inflight_count(), PER_QUEUE);

    let (base, _) = src.get_vring_base_timed(0, StopRequest::GetVringBase);
    assert_eq!(base, PER_QUEUE as u16);
    // Request 11 with bit 23 drains: everything published before the reply.
    assert_eq!(src.queues[0].pending_used(&src.ram), PER_QUEUE as u16);
    assert_eq!(
        abandoned_total(&source),
        writes,
        "request 11 abandoned nothing more"
    );
    let heads = src.collect_used(0, PER_QUEUE, COMPLETE_TIMEOUT);
    assert_completed_once(&source, &mut src, &drained, &heads);
    // Queue 0's drain wrote guest memory legitimately, so no snapshot here:
    // queue 1's requests, whose abandoned operations the source reports
    // finished (assert_completed_once waited for that), left no trace.
    assert_untouched(&src, &suspended);
    assert_eq!(src.region().queue(1).inflight_count(), PER_QUEUE);

    let region = src.region().migrate();
    let bases = [PER_QUEUE as u16, PER_QUEUE as u16];
    let mut dst = TestFrontend::resume(&destination.socket, &options, &src, region, &bases);
    let heads = dst.collect_used(1, PER_QUEUE, COMPLETE_TIMEOUT);
    assert_completed_once(&destination, &mut dst, &suspended, &heads);
    assert_eq!(
        dst.queues[0].pending_used(&dst.ram),
        0,
        "the drained queue was resubmitted"
    );
    assert_data(&host, &dst, &drained);
    assert_data(&host, &dst, &suspended);
}

/// What happened to sector S in a fence race.
struct FenceRace {
    /// The source held `<image>.fence` right after its suspending reply.
    fence_held_at_stop: bool,
    /// When W1's used entry was seen on the destination, the source
    /// already reported its abandoned copy of W1 finished.
    w1_after_source_done: bool,
    /// Block S once both agents hold nothing any more.
    final_block: Vec<u8>,
}

/// Source (latency 500 ms) takes W1 (pattern A) to block S and is
/// suspended; the destination (`fence=<destination_fence>`) resubmits W1;
/// once W1 completes there, the guest writes W2 (pattern B) to S.
fn fence_race(destination_fence: &str) -> (Host, FenceRace) {
    const S: u64 = 7;
    let mut host = Host::new();
    let source = host.agent("source", SOURCE_KEYS);
    let destination = host.agent("destination", &format!("fence={destination_fence}"));
    let options = StartOptions::with_protocol(1, QUEUE_SIZE, PROTOCOL_SUSPEND);
    let mut src = TestFrontend::start(&source.socket, &options);

    src.fill(0, &pattern(0xa, S));
    let w1 = src.submit(
        0,
        &[BlkRequest::write(0, S * SECTORS_PER_BLOCK, BLOCK as u32)],
    );
    wait_taken(&src, 0, 1);
    wait_in_flight(&source, 0, 1);
    let stopped = src.stop(StopRequest::GetVringBase);
    let fence_held_at_stop = host.fence_held();
    assert_eq!(abandoned_total(&source), 1, "the stop abandoned W1");

    let region = src.region().migrate();
    let mut dst = TestFrontend::resume(&destination.socket, &options, &src, region, &stopped.bases);
    // Look at the destination first, then at the source: if W1 had
    // completed there while the source's copy still ran, the source would
    // still report it outstanding (that report only ever drops to 0).
    let mut w1_after_source_done = false;
    let completed = wait_until(COMPLETE_TIMEOUT, || {
        let completed = dst.queues[0].pending_used(&dst.ram) > 0;
        if completed {
            w1_after_source_done = fence_state(&source.control)["abandoned-outstanding"] == 0;
        }
        completed
    });
    assert!(completed, "W1 did not complete on the destination");
    let heads = dst.collect_used(0, 1, COMPLETE_TIMEOUT);
    assert_eq!(heads, [w1[0].head], "W1 resubmitted and completed once");
    assert_eq!(dst.status(0), VIRTIO_BLK_S_OK, "W1 status");

    dst.fill(1, &pattern(0xb, S));
    let w2 = dst.request(0, 1, VIRTIO_BLK_T_OUT, S * SECTORS_PER_BLOCK, BLOCK as u32);
    assert_eq!(w2, Some(VIRTIO_BLK_S_OK), "W2");
    wait_idle(&source);
    wait_idle(&destination);
    let final_block = host.image_block(S);
    drop((source, destination));
    (
        host,
        FenceRace {
            fence_held_at_stop,
            w1_after_source_done,
            final_block,
        },
    )
}

#[test]
fn write_fence_keeps_an_abandoned_write_from_landing_after_a_newer_one() {
    let (_host, race) = fence_race("lock");
    assert!(
        race.fence_held_at_stop,
        "the source did not hold <image>.fence after abandoning a write"
    );
    assert!(
        race.w1_after_source_done,
        "W1 completed on the destination while the source's abandoned copy \
         was still running"
    );
    assert!(
        race.final_block == pattern(0xb, 7),
        "block S does not hold W2's data (A = the abandoned write landed last)"
    );
}

#[test]
fn without_the_fence_an_abandoned_write_overwrites_a_newer_one() {
    let (_host, race) = fence_race("none");
    let a = pattern(0xa, 7);
    let b = pattern(0xb, 7);
    let found = if race.final_block == a {
        "A"
    } else if race.final_block == b {
        "B"
    } else {
        "neither"
    };
    assert!(
        !race.w1_after_source_done,
        "without a fence W1 completed on the destination only after the \
         source's copy: the destination did not run ahead of the source"
    );
    assert!(
        race.final_block == a,
        "with fence=none block S holds {found}, expected A: the hazard the \
         fence prevents did not show (source keys {SOURCE_KEYS})"
    );
    println!(
        "fence=none: the source's abandoned W1 (A) landed after the guest's \
         newer W2 (B): lost write, the corruption the write fence prevents"
    );
}

/// `fence=api`: the destination holds the resubmitted W1 until an
/// orchestrator, having seen on the source's control API that its
/// abandoned operations are done, calls `fence-release` on the destination.
#[test]
fn api_fence_holds_resubmitted_writes_until_fence_release() {
    const S: u64 = 9;
    let mut host = Host::new();
    let source = host.agent("source", &format!("{SOURCE_KEYS},fence=api"));
    let destination = host.agent("destination", "fence=api");
    let (source_ctl, destination_ctl) = (source.control.clone(), destination.control.clone());
    let options = StartOptions::with_protocol(1, QUEUE_SIZE, PROTOCOL_SUSPEND);
    let mut src = TestFrontend::start(&source.socket, &options);
    src.fill(0, &pattern(0xa, S));
    let w1 = src.submit(
        0,
        &[BlkRequest::write(0, S * SECTORS_PER_BLOCK, BLOCK as u32)],
    );
    wait_taken(&src, 0, 1);
    wait_in_flight(&source, 0, 1);
    let stopped = src.stop(StopRequest::GetVringBase);
    assert_eq!(
        fence_state(&source_ctl)["abandoned-outstanding"],
        1,
        "the source reports its abandoned write"
    );
    let region = src.region().migrate();
    let mut dst = TestFrontend::resume(&destination.socket, &options, &src, region, &stopped.bases);
    // Held: the destination reports W1 in flight (held by the fence, as
    // nothing else would keep it: its own storage has no latency), and
    // nothing completed while the gate is closed.
    wait_in_flight(&destination, 0, 1);
    assert_eq!(
        dst.queues[0].pending_used(&dst.ram),
        0,
        "W1 completed with the api fence closed"
    );
    assert_eq!(fence_state(&destination_ctl)["open"], false);
    // The orchestrator: wait for the source, then release the destination.
    assert!(
        wait_until(Duration::from_secs(5), || {
            fence_state(&source_ctl)["abandoned-outstanding"] == 0
        }),
        "the source's abandoned write never finished"
    );
    control(
        &destination_ctl,
        "fence-release",
        serde_json::json!({ "device": "destination" }),
    );
    let heads = dst.collect_used(0, 1, COMPLETE_TIMEOUT);
    assert_eq!(heads, [w1[0].head], "W1 completed once after the release");
    assert_eq!(dst.status(0), VIRTIO_BLK_S_OK);
    assert_eq!(fence_state(&destination_ctl)["open"], true);
    dst.fill(1, &pattern(0xb, S));
    let w2 = dst.request(0, 1, VIRTIO_BLK_T_OUT, S * SECTORS_PER_BLOCK, BLOCK as u32);
    assert_eq!(w2, Some(VIRTIO_BLK_S_OK), "W2");
    wait_idle(&source);
    wait_idle(&destination);
    assert!(
        host.image_block(S) == pattern(0xb, S),
        "block S does not hold W2's data"
    );
    drop((source, destination));
}

#[test]
fn after_a_crash_a_restarted_agent_completes_every_request_once() {
    let mut host = Host::new();
    let mut agent = host.agent("disk", SOURCE_KEYS);
    // QEMU 10 with a back-end that offers inflight tracking.
    let options = StartOptions::with_protocol(1, QUEUE_SIZE, PROTOCOL_F_INFLIGHT_SHMFD);
    let mut fe = TestFrontend::start(&agent.socket, &options);
    let submitted = workload(&mut fe, 0, 0, REQUESTS);
    wait_taken(&fe, 0, REQUESTS);
    wait_in_flight(&agent, 0, REQUESTS as u64);

    agent.guard.child.kill().unwrap();
    agent.guard.child.wait().unwrap();
    let restarted = host.agent_on(&agent.socket, "restarted", "");
    // QEMU keeps the region and restarts the rings at the used index.
    let bases = fe.used_indices();
    let region = fe.region().try_clone();
    let mut fe = TestFrontend::resume(&restarted.socket, &options, &fe, region, &bases);
    let heads = fe.collect_used(0, REQUESTS, COMPLETE_TIMEOUT);
    assert_completed_once(&restarted, &mut fe, &submitted, &heads);
    assert_data(&host, &fe, &submitted);
}

#[test]
fn a_crash_between_completions_loses_and_repeats_nothing() {
    const HALF: usize = REQUESTS / 2;
    let mut host = Host::new();
    let mut agent = host.agent("disk", "latency-ms=200");
    let options = StartOptions::with_protocol(1, QUEUE_SIZE, PROTOCOL_F_INFLIGHT_SHMFD);
    let mut fe = TestFrontend::start(&agent.socket, &options);
    // Two batches 100 ms apart: the kill comes as the first completes.
    let mut submitted = workload(&mut fe, 0, 0, HALF);
    wait_taken(&fe, 0, HALF);
    std::thread::sleep(Duration::from_millis(100));
    submitted.extend(workload(&mut fe, 0, HALF as u64, HALF));
    wait_taken(&fe, 0, REQUESTS);
    let first_done = wait_until(COMPLETE_TIMEOUT, || fe.queues[0].pending_used(&fe.ram) > 0);
    assert!(first_done, "no request completed");
    agent.guard.child.kill().unwrap();
    agent.guard.child.wait().unwrap();
    let mut heads = fe.collect_used(0, 0, Duration::ZERO);
    println!(
        "killed with {} of {REQUESTS} requests completed",
        heads.len()
    );

    let restarted = host.agent_on(&agent.socket, "restarted", "");
    let bases = fe.used_indices();
    let region = fe.region().try_clone();
    let mut fe = TestFrontend::resume(&restarted.socket, &options, &fe, region, &bases);
    heads.extend(fe.collect_used(0, REQUESTS - heads.len(), COMPLETE_TIMEOUT));
    assert_completed_once(&restarted, &mut fe, &submitted, &heads);
    assert_data(&host, &fe, &submitted);
}

#[test]
fn inflight_region_has_the_split_layout_at_a_64_byte_stride() {
    const SIZE: u16 = 128;
    let mut host = Host::new();
    let agent = host.agent("disk", "num-queues=2");
    let options = StartOptions::with_protocol(2, SIZE, PROTOCOL_F_INFLIGHT_SHMFD);
    let mut fe = TestFrontend::start(&agent.socket, &options);
    let region = fe.region();
    assert_eq!(queue_region_size(SIZE), 2112);
    assert_eq!(
        (region.mmap_size, region.mmap_offset),
        (2 * 2112, 0),
        "GET_INFLIGHT_FD mmap_size/offset for 2 queues of {SIZE}"
    );
    // Two requests on queue 0, one round trip (two requests) on queue 1:
    // each queue's header sits at its stride.
    assert!(fe.round_trip(0, 0, 0));
    assert!(fe.round_trip(1, 1, 8));
    assert!(fe.round_trip(1, 1, 8));
    for (queue, used) in [(0usize, 2u16), (1, 4)] {
        let state = fe.region().queue(queue);
        assert_eq!(
            (state.version, state.desc_num, state.used_idx),
            (1, SIZE, used),
            "queue {queue} header (version, desc_num, used_idx)"
        );
        assert_eq!(state.inflight_count(), 0, "queue {queue}");
    }
}

#[test]
fn set_inflight_fd_that_does_not_fit_the_device_is_refused() {
    let mut host = Host::new();
    let agent = host.agent("disk", "");
    let options = StartOptions::with_protocol(1, QUEUE_SIZE, PROTOCOL_F_INFLIGHT_SHMFD);
    let mut fe = TestFrontend::negotiate(&agent.socket, &options);
    fe.frontend.set_features(fe.features).expect("SET_FEATURES");
    let stride = queue_region_size(QUEUE_SIZE);
    fe.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let refused = |result: Result<(), vhost::Error>| {
        matches!(
            result,
            Err(vhost::Error::VhostUserProtocol(
                VhostUserError::BackendInternalError
            ))
        )
    };

    // Spec "Inflight I/O tracking": the region holds num_queues strides.
    let small = InflightRegion::zeroed(stride - 64, 1, QUEUE_SIZE);
    let result = fe.frontend.set_inflight_fd(&small.message(), small.fd());
    assert!(
        refused(result),
        "SET_INFLIGHT_FD with mmap_size {} < {stride} was not refused",
        stride - 64
    );
    let many = InflightRegion::zeroed(2 * stride, 2, QUEUE_SIZE);
    let result = fe.frontend.set_inflight_fd(&many.message(), many.fd());
    assert!(
        refused(result),
        "SET_INFLIGHT_FD for 2 queues on a 1-queue device was not refused"
    );

    // The refusals cost nothing: the device starts and serves.
    fe.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
    fe.start_device(Inflight::Get, &[0]);
    assert!(fe.round_trip(0, 0, 0), "the device after refused regions");
}
