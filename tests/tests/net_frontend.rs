//! The net device through the real agent process, driven by the test
//! front-end (a QEMU stand-in that owns guest RAM and the driver side of
//! the rings): frames reflected by the `loop` dataplane with a fresh
//! header, merged RX buffers, drops, hostile TX chains, exact ring indices
//! across a stop, RSS steering checked against the Toeplitz hash, the
//! agent-handled NET_SET_MTU / SEND_RARP, device state moving to another
//! agent, and dirty logging of what the device writes.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::time::Duration;

use serde_json::Value;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vhost_agent_tests::frontend::{
    raw, sealed_memfd, Desc, StartOptions, TestFrontend, BUFFER_BASE, RAM_SIZE,
};
use vhost_agent_tests::net_rig::{
    counter, ctl, early_config, query_metrics, udp_frame, vdpa_191ms_profile, NetRig as Rig, HDR,
    QUEUE_SIZE, WAIT,
};
use vhost_agent_tests::support::agent_binary;
use vm_memory::{Bytes, GuestAddress};

const PAGE: u64 = 4096;
/// VHOST_USER_SEND_RARP and VHOST_USER_NET_SET_MTU (the crate's front-end
/// cannot send them).
const SEND_RARP: u32 = 19;
const NET_SET_MTU: u32 = 20;

#[test]
fn loop_reflects_every_frame_with_a_fresh_header() {
    let mut rig = Rig::start(1, "", VhostUserProtocolFeatures::empty());
    let rx = rig.post_rx(0, 8, 2048);
    let frames: Vec<Vec<u8>> = (0..8)
        .map(|i| udp_frame(1000 + i, 80, 100 + 50 * usize::from(i)))
        .collect();
    // A dirty TX header must not leak into RX: the guest acked no
    // offloads, so the device owes it a clean one.
    for frame in &frames {
        rig.queue_tx(0, frame);
    }
    rig.kick_tx(0);
    let tx_used = rig.used(1, 8);
    assert!(
        tx_used.iter().all(|&(_, len)| len == 0),
        "TX used lengths {tx_used:?}"
    );
    let rx_used = rig.used(0, 8);
    for ((head, len), (frame, &(posted, addr))) in rx_used.iter().zip(frames.iter().zip(&rx)) {
        assert_eq!(*head, u32::from(posted), "RX buffers used out of order");
        assert_eq!(*len as usize, HDR + frame.len());
        let written = rig.read(addr, HDR + frame.len());
        let mut header = [0u8; HDR];
        header[10] = 1; // num_buffers
        assert_eq!(written[..HDR], header, "RX header");
        assert_eq!(&written[HDR..], &frame[..], "frame changed on the way");
    }
    let device = rig.device();
    assert_eq!(counter(&device, 0, "tx-packets"), 8);
    assert_eq!(counter(&device, 0, "rx-packets"), 8);
    let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
    assert_eq!(counter(&device, 0, "rx-bytes"), bytes);
    assert_eq!(counter(&device, 0, "rx-dropped"), 0);
}

#[test]
fn a_big_frame_spreads_over_merged_buffers() {
    let mut rig = Rig::start(1, "", VhostUserProtocolFeatures::empty());
    let rx = rig.post_rx(0, 4, 1024);
    let frame = udp_frame(7, 9, 3000 - 42);
    rig.queue_tx(0, &frame);
    rig.kick_tx(0);
    let used = rig.used(0, 3);
    let lens: Vec<u32> = used.iter().map(|&(_, len)| len).collect();
    assert_eq!(lens, [1024, 1024, (HDR + frame.len() - 2048) as u32]);
    let mut written = Vec::new();
    for (&(head, len), &(posted, addr)) in used.iter().zip(&rx) {
        assert_eq!(head, u32::from(posted));
        written.extend(rig.read(addr, len as usize));
    }
    assert_eq!(
        u16::from_le_bytes([written[10], written[11]]),
        3,
        "num_buffers"
    );
    assert_eq!(&written[HDR..], &frame[..]);
    // The fourth buffer is still the driver's.
    assert_eq!(rig.frontend.queues[0].pending_used(&rig.frontend.ram), 0);
}

#[test]
fn frames_without_rx_buffers_are_dropped_and_counted() {
    let mut rig = Rig::start(1, "", VhostUserProtocolFeatures::empty());
    for i in 0..5 {
        rig.queue_tx(0, &udp_frame(i, 1, 64));
    }
    rig.kick_tx(0);
    rig.used(1, 5);
    let device = rig.device();
    assert_eq!(counter(&device, 0, "tx-packets"), 5);
    assert_eq!(counter(&device, 0, "rx-dropped"), 5);
    assert_eq!(counter(&device, 0, "rx-packets"), 0);
    // Buffers posted later carry later frames.
    let rx = rig.post_rx(0, 1, 2048);
    let frame = udp_frame(99, 1, 64);
    rig.queue_tx(0, &frame);
    rig.kick_tx(0);
    rig.used(0, 1);
    assert_eq!(rig.read(rx[0].1 + HDR as u64, frame.len()), frame);
}

#[test]
fn hostile_tx_chains_are_returned_and_the_device_keeps_working() {
    let mut rig = Rig::start(1, "", VhostUserProtocolFeatures::empty());
    let rx = rig.post_rx(0, 1, 2048);
    let ram = rig.frontend.ram.clone();
    let a = rig.slot();
    let b = rig.slot();
    let tx = &mut rig.frontend.queues[1];
    // A device-writable descriptor in a TX chain.
    tx.add_chain(
        &ram,
        &[Desc::readable(a, HDR as u32), Desc::writable(a + 64, 64)],
    );
    // A buffer beyond guest RAM.
    tx.add_chain(&ram, &[Desc::readable(RAM_SIZE + PAGE, 100)]);
    // Shorter than the virtio-net header.
    tx.add_chain(&ram, &[Desc::readable(a, 4)]);
    // Larger than any Ethernet frame (80 KB).
    tx.add_chain(
        &ram,
        &[Desc::readable(a, 40_000), Desc::readable(b, 40_000)],
    );
    tx.kick();
    let used = rig.used(1, 4);
    assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
    let device = rig.device();
    assert_eq!(counter(&device, 0, "tx-errors"), 4, "{device}");
    assert_eq!(counter(&device, 0, "rx-packets"), 0);
    // The device still works.
    let frame = udp_frame(1, 2, 200);
    rig.queue_tx(0, &frame);
    rig.kick_tx(0);
    rig.used(0, 1);
    assert_eq!(rig.read(rx[0].1 + HDR as u64, frame.len()), frame);
    assert!(
        rig.log().contains("dropped"),
        "no log line about the bad chains"
    );
}

#[test]
fn a_stop_returns_exact_indices_and_a_restart_continues_there() {
    let mut rig = Rig::start(1, "", VhostUserProtocolFeatures::empty());
    rig.post_rx(0, 10, 2048);
    for i in 0..7 {
        rig.queue_tx(0, &udp_frame(i, 1, 64));
    }
    rig.kick_tx(0);
    rig.used(1, 7);
    rig.used(0, 7);
    let rx_base = rig
        .frontend
        .frontend
        .get_vring_base(0)
        .expect("GET_VRING_BASE");
    let tx_base = rig
        .frontend
        .frontend
        .get_vring_base(1)
        .expect("GET_VRING_BASE");
    assert_eq!((rx_base, tx_base), (7, 7));
    // Restart where it stopped, like a migration destination: 3 RX buffers
    // are still posted, a new frame uses the first of them.
    rig.frontend.start_device(
        vhost_agent_tests::frontend::Inflight::None,
        &[rx_base as u16, tx_base as u16],
    );
    let frame = udp_frame(42, 1, 64);
    rig.queue_tx(0, &frame);
    rig.kick_tx(0);
    let used = rig.used(0, 1);
    assert_eq!(
        used[0].0, 7,
        "the restarted RX ring skipped or reused a buffer"
    );
    assert_eq!(rig.frontend.frontend.get_vring_base(1).unwrap(), 8);
}

#[test]
fn rss_steers_each_flow_where_the_toeplitz_hash_says() {
    use netdev::rss::{Rss, RssConfig};
    let mut rig = Rig::start(2, ",rss=on", VhostUserProtocolFeatures::empty());
    rig.post_rx(0, 64, 2048);
    rig.post_rx(1, 64, 2048);
    let rss = Rss::new(RssConfig::spread(2), 2).unwrap();
    let mut expected = [0u16; 2];
    for port in 0..40u16 {
        let frame = udp_frame(10_000 + port * 13, 4789, 64);
        expected[usize::from(rss.select_queue(&frame))] += 1;
        rig.queue_tx(0, &frame);
    }
    assert!(
        expected[0] > 0 && expected[1] > 0,
        "flows all hash to one queue: {expected:?}"
    );
    rig.kick_tx(0);
    rig.used(1, 40);
    rig.used(0, expected[0]);
    let ram = rig.frontend.ram.clone();
    rig.frontend.queues[2]
        .wait_used(&ram, expected[1], WAIT)
        .expect("pair 1 RX");
    let device = rig.device();
    assert_eq!(counter(&device, 0, "rx-packets"), u64::from(expected[0]));
    assert_eq!(counter(&device, 1, "rx-packets"), u64::from(expected[1]));
    assert!(device["rss"].is_object(), "{device}");
}

#[test]
fn net_set_mtu_is_acked_and_a_bad_one_refused() {
    // NET_SET_MTU and SEND_RARP each need their protocol feature (MTU is
    // acked by the test front-end whenever offered; RARP is asked here).
    let mut rig = Rig::start(1, ",mtu=1500", VhostUserProtocolFeatures::RARP);
    assert!(rig.frontend.protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0);
    let flags = raw::FLAG_VERSION | raw::FLAG_NEED_REPLY;
    rig.frontend
        .send_raw(NET_SET_MTU, flags, &9000u64.to_le_bytes());
    let reply = rig.frontend.recv_raw();
    assert_eq!((reply.request, reply.u64()), (NET_SET_MTU, Some(0)));
    assert_eq!(rig.device()["mtu"], 9000);
    rig.frontend
        .send_raw(NET_SET_MTU, flags, &10u64.to_le_bytes());
    let reply = rig.frontend.recv_raw();
    assert_ne!(reply.u64(), Some(0), "MTU 10 accepted");
    // SEND_RARP has no reply; the loop dataplane has no wire to announce
    // on, and the connection goes on.
    let mut mac = [0u8; 8];
    mac[..6].copy_from_slice(&[0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
    rig.frontend.send_raw(SEND_RARP, raw::FLAG_VERSION, &mac);
    rig.frontend.sync();
    assert_eq!(rig.device()["mac"], "52:54:00:ab:cd:ef");
    assert_eq!(rig.device()["mtu"], 9000);
}

/// vhost-user spec: SEND_RARP is for a front-end that negotiated
/// VHOST_USER_PROTOCOL_F_RARP; without it the request is refused and
/// changes nothing, and the connection goes on.
#[test]
fn send_rarp_without_its_protocol_feature_is_refused() {
    let rig = Rig::start(1, "", VhostUserProtocolFeatures::empty());
    assert_eq!(
        rig.frontend.protocol & VhostUserProtocolFeatures::RARP.bits(),
        0
    );
    let mut mac = [0u8; 8];
    mac[..6].copy_from_slice(&[0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
    rig.frontend
        .send_raw(SEND_RARP, raw::FLAG_VERSION | raw::FLAG_NEED_REPLY, &mac);
    let reply = rig.frontend.recv_raw();
    assert_eq!((reply.request, reply.u64()), (SEND_RARP, Some(1)), "a NACK");
    assert_eq!(rig.device()["mac"], "52:54:00:12:34:56", "unchanged");
    assert!(rig.log().contains("without protocol feature 2 negotiated"));
}

fn pipe() -> (File, File) {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two ints for pipe2 to fill.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2");
    // SAFETY: pipe2 succeeded, so both fds are open and ours alone.
    unsafe {
        use std::os::unix::io::FromRawFd;
        (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
    }
}

/// Load `state` into the device as QEMU does on a migration destination:
/// SET_DEVICE_STATE_FD(LOAD) with a pipe, write it all, close, then
/// CHECK_DEVICE_STATE (whose result is returned).
fn load_device_state(frontend: &TestFrontend, state: &[u8]) -> Result<(), vhost::Error> {
    let (reader, mut writer) = pipe();
    frontend
        .frontend
        .set_device_state_fd(
            VhostTransferStateDirection::LOAD,
            VhostTransferStatePhase::STOPPED,
            reader.into(),
        )
        .expect("SET_DEVICE_STATE_FD load");
    writer.write_all(state).unwrap();
    drop(writer);
    frontend.frontend.check_device_state()
}

#[test]
fn device_state_carries_rss_and_mtu_to_another_agent() {
    let source = Rig::start(
        2,
        ",rss=on,mtu=9000",
        VhostUserProtocolFeatures::DEVICE_STATE,
    );
    let destination = Rig::start(2, "", VhostUserProtocolFeatures::DEVICE_STATE);
    assert!(destination.device()["rss"].is_null());

    // SAVE: the agent writes into our pipe and we read to EOF, as QEMU does.
    let (mut reader, writer) = pipe();
    let returned = source
        .frontend
        .frontend
        .set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            writer.into(),
        )
        .expect("SET_DEVICE_STATE_FD save");
    assert!(returned.is_none(), "the agent should use our pipe");
    let mut state = Vec::new();
    reader.read_to_end(&mut state).unwrap();
    source
        .frontend
        .frontend
        .check_device_state()
        .expect("CHECK_DEVICE_STATE save");
    assert!(!state.is_empty());

    // LOAD on the destination.
    load_device_state(&destination.frontend, &state).expect("CHECK_DEVICE_STATE load");
    let device = destination.device();
    assert_eq!(device["rss"], source.device()["rss"]);
    assert_eq!(device["mtu"], 9000);

    // Garbage is refused at CHECK_DEVICE_STATE; the device keeps its state.
    assert!(load_device_state(&destination.frontend, b"{\"version\": 99").is_err());
    assert_eq!(destination.device()["rss"], device["rss"]);

    // Both transfers are on the timelines (what `vhost-agent migrate`
    // places as device-state save and load); the refused one is not.
    let transfers = |rig: &Rig, event: &str| -> Vec<u64> {
        rig.metrics()["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == event)
            .map(|e| e["bytes"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(
        transfers(&source, "device-state-saved"),
        [state.len() as u64]
    );
    assert_eq!(
        transfers(&destination, "device-state-loaded"),
        [state.len() as u64]
    );
    assert!(transfers(&destination, "device-state-saved").is_empty());
}

#[test]
fn what_the_device_writes_is_dirty_logged() {
    let mut rig = Rig::start(1, "", VhostUserProtocolFeatures::LOG_SHMFD);
    let log_size = RAM_SIZE / PAGE / 8;
    let log = sealed_memfd("vhost-log", log_size);
    rig.frontend
        .frontend
        .set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: log_size,
                mmap_offset: 0,
                mmap_handle: log.as_raw_fd(),
            }),
        )
        .expect("SET_LOG_BASE");
    let features = rig.frontend.features | (1 << 26);
    rig.frontend.frontend.set_features(features).unwrap();
    rig.frontend.sync();
    let rx = rig.post_rx(0, 1, 8192);
    let tx_slot = rig.next_slot();
    rig.queue_tx(0, &udp_frame(1, 2, 5000));
    rig.kick_tx(0);
    // Both used entries: the RX ring may be published a moment before the
    // TX ring.
    rig.used(0, 1);
    rig.used(1, 1);
    let mut bitmap = vec![0u8; log_size as usize];
    log.read_exact_at(&mut bitmap, 0).unwrap();
    let dirty = |gpa: u64| bitmap[(gpa / PAGE / 8) as usize] & (1 << ((gpa / PAGE) % 8)) != 0;
    let rx_addr = rx[0].1;
    for page in 0..2 {
        assert!(
            dirty(rx_addr + page * PAGE),
            "RX buffer page {page} not logged"
        );
    }
    assert!(
        !dirty(rx_addr + 2 * PAGE),
        "a page past the frame was logged"
    );
    let tx_addr = BUFFER_BASE + tx_slot * 0x1_0000;
    assert!(!dirty(tx_addr), "the TX buffer was only read, yet logged");
    // Both rings' used entries are in the first 128 KiB (queue i at i * 64 KiB).
    assert!(
        (0..0x1_0000).step_by(PAGE as usize).any(&dirty),
        "RX used ring not logged"
    );
    assert!(
        (0x1_0000..0x2_0000).step_by(PAGE as usize).any(&dirty),
        "TX used ring not logged"
    );
}

#[test]
fn the_sim_dataplane_charges_its_profile_and_moves_frames_like_loop() {
    let profile = vdpa_191ms_profile();
    let mut rig = Rig::start_on(
        &format!("sim:{}", profile.display()),
        1,
        "",
        VhostUserProtocolFeatures::empty(),
    );
    let sim = &rig.device()["sim"];
    assert_eq!(sim["profile"], "vdpa-191ms", "{sim}");
    // Two virtqueues created, each charged the profile's 40 ms (the sim
    // spends at least what it charges; its own account, not our clock).
    assert_eq!(sim["charged"]["create_queue"]["count"], 2, "{sim}");
    assert!(
        sim["charged"]["create_queue"]["us"].as_u64().unwrap() >= 2 * 40_000,
        "{sim}"
    );
    assert!(sim["charged"]["create_queue"]["us"].as_u64().unwrap() >= 80_000);
    // Frames move as with loop.
    let rx = rig.post_rx(0, 1, 2048);
    let frame = udp_frame(5, 6, 300);
    rig.queue_tx(0, &frame);
    rig.kick_tx(0);
    rig.used(0, 1);
    assert_eq!(rig.read(rx[0].1 + HDR as u64, frame.len()), frame);
    // Stopping the rings keeps the hardware queues for the next start: only
    // a plan's destroy_queue destroys one (as vDPA suspends a ring).
    rig.frontend.frontend.get_vring_base(0).unwrap();
    rig.frontend.frontend.get_vring_base(1).unwrap();
    let sim = &rig.device()["sim"];
    assert!(sim["charged"].get("destroy_queue").is_none(), "{sim}");
    assert_eq!(sim["charged"]["create_queue"]["count"], 2, "{sim}");
}

#[test]
fn indirect_chains_work_both_ways() {
    let mut rig = Rig::start(1, "", VhostUserProtocolFeatures::empty());
    let ram = rig.frontend.ram.clone();
    // RX: an indirect table of two writable buffers, 100 bytes then 4000.
    let rx_table = rig.slot();
    let rx_a = rig.slot();
    let rx_b = rig.slot();
    rig.frontend.queues[0].add_indirect(
        &ram,
        rx_table,
        &[Desc::writable(rx_a, 100), Desc::writable(rx_b, 4000)],
    );
    // TX: header and the frame in three pieces, through an indirect table.
    let frame = udp_frame(3, 4, 1000);
    let tx_table = rig.slot();
    let tx = rig.slot();
    rig.write(tx, &[0u8; HDR]);
    rig.write(tx + 0x100, &frame[..14]);
    rig.write(tx + 0x200, &frame[14..500]);
    rig.write(tx + 0x800, &frame[500..]);
    rig.frontend.queues[1].add_indirect(
        &ram,
        tx_table,
        &[
            Desc::readable(tx, HDR as u32),
            Desc::readable(tx + 0x100, 14),
            Desc::readable(tx + 0x200, 486),
            Desc::readable(tx + 0x800, (frame.len() - 500) as u32),
        ],
    );
    rig.kick_tx(0);
    let used = rig.used(0, 1);
    assert_eq!(used[0].1 as usize, HDR + frame.len());
    let mut written = rig.read(rx_a, 100);
    written.extend(rig.read(rx_b, HDR + frame.len() - 100));
    assert_eq!(&written[HDR..], &frame[..]);
}

#[test]
fn one_agent_serves_a_disk_and_a_net_device_side_by_side() {
    use vhost_agent_tests::support::{create_image, spawn_agent, wait_for_path};
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    create_image(&image, 1 << 20).unwrap();
    let net_socket = dir.path().join("net.sock");
    let control = dir.path().join("control.sock");
    let net_spec = format!("socket={},dataplane=loop", net_socket.display());
    let mut agent = spawn_agent(
        &[format!(
            "socket={},image={}",
            dir.path().join("blk.sock").display(),
            image.display()
        )],
        &["--net", &net_spec, "--control", control.to_str().unwrap()],
        Some(&dir.path().join("agent.log")),
    );
    wait_for_path(&net_socket, WAIT, &mut agent);
    let output = std::process::Command::new(agent_binary())
        .args(["ctl", control.to_str().unwrap(), "query-devices"])
        .output()
        .unwrap();
    let devices: Value = serde_json::from_slice(&output.stdout).unwrap();
    let kinds: Vec<(&str, &str)> = devices
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["id"].as_str().unwrap(), d["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(kinds, [("blk0", "blk"), ("net0", "net")]);
    // The net device works next to the disk.
    let mut options = StartOptions::plain(2, QUEUE_SIZE);
    options.queues_per_unit = 2;
    let mut frontend = TestFrontend::start(&net_socket, &options);
    let ram = frontend.ram.clone();
    frontend.queues[0].add_chain(&ram, &[Desc::writable(BUFFER_BASE, 2048)]);
    let frame = udp_frame(1, 1, 64);
    let tx = BUFFER_BASE + 0x1_0000;
    ram.mem.write_slice(&[0u8; HDR], GuestAddress(tx)).unwrap();
    ram.mem
        .write_slice(&frame, GuestAddress(tx + HDR as u64))
        .unwrap();
    frontend.queues[1].add_chain(&ram, &[Desc::readable(tx, (HDR + frame.len()) as u32)]);
    frontend.queues[1].kick();
    assert!(
        frontend.queues[0].wait_used(&ram, 1, WAIT).is_some(),
        "no frame came back"
    );
}

#[test]
fn query_metrics_measures_the_start_critical_path_and_the_stop_time() {
    let started = std::time::Instant::now();
    let mut rig = Rig::start(2, "", VhostUserProtocolFeatures::empty());
    let start_wall = started.elapsed();
    rig.post_rx(0, 1, 2048);
    rig.queue_tx(0, &udp_frame(1, 2, 64));
    rig.kick_tx(0);
    rig.used(0, 1);
    // QEMU's net stop: GET_VRING_BASE on every ring, nothing else.
    let stopping = std::time::Instant::now();
    for queue in 0..4 {
        rig.frontend.frontend.get_vring_base(queue).unwrap();
    }
    let stop_wall = stopping.elapsed();

    let metrics = query_metrics(&rig.control(), r#"{"device": "net0"}"#);
    let net = &metrics[0];
    assert_eq!(net["starts"], 1, "{net}");
    assert_eq!(net["stops"], 1, "{net}");
    let critical_path = net["start-critical-path-us"].as_u64().expect("a start");
    let stop_time = net["stop-time-us"].as_u64().expect("a stop");
    assert!(
        critical_path > 0 && critical_path < start_wall.as_micros() as u64,
        "critical path {critical_path} us, the start took {start_wall:?}"
    );
    assert!(
        stop_time > 0 && stop_time < stop_wall.as_micros() as u64,
        "stop time {stop_time} us, the stop took {stop_wall:?}"
    );
    // Message arrivals carry their code and name.
    let timeline = net["timeline"].as_array().unwrap();
    assert!(
        timeline
            .iter()
            .any(|e| e["event"] == "message" && e["code"] == 11 && e["name"] == "GET_VRING_BASE"),
        "{net}"
    );

    let text = query_metrics(&rig.control(), r#"{"format": "prometheus"}"#);
    let text = text.as_str().expect("a string");
    let line = text
        .lines()
        .find(|line| line.starts_with("vhost_agent_start_critical_path_seconds{"))
        .unwrap_or_else(|| panic!("no critical path sample in {text}"));
    assert!(line.starts_with("vhost_agent_start_critical_path_seconds{device=\"net0\"} "));
    let seconds: f64 = line.rsplit_once(' ').unwrap().1.parse().unwrap();
    assert!((seconds * 1e6 - critical_path as f64).abs() < 1.0, "{line}");
}

/// The op names of a `last-switchover` list.
fn ops(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|ops| {
            ops.iter()
                .filter_map(|op| op.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Start a 2-pair device on the 191 ms sim profile, optionally after a
/// `presetup` call; check frames move; return the agent's start critical
/// path and its presetup counters.
fn sim_start(presetup: Option<&str>) -> (Duration, Value, Rig) {
    let profile = vdpa_191ms_profile();
    let mut rig = Rig::start_after(
        &format!("sim:{}", profile.display()),
        2,
        "",
        VhostUserProtocolFeatures::empty(),
        |control| {
            if let Some(arguments) = presetup {
                let _ = ctl(control, "presetup", arguments);
            }
        },
    );
    for pair in 0..2 {
        let rx = rig.post_rx(pair, 1, 2048);
        let frame = udp_frame(pair as u16 + 7, 9, 200);
        rig.queue_tx(pair, &frame);
        rig.kick_tx(pair);
        rig.used(2 * pair, 1);
        assert_eq!(rig.read(rx[0].1 + HDR as u64, frame.len()), frame);
    }
    let metrics = query_metrics(&rig.control(), r#"{"device": "net0"}"#);
    let net = metrics[0].clone();
    let critical_path = net["start-critical-path-us"].as_u64().expect("a start");
    (
        Duration::from_micros(critical_path),
        net["presetup"].clone(),
        rig,
    )
}

#[test]
fn presetup_takes_the_sim_queue_creation_off_the_start_critical_path() {
    // What a start did on its critical path is the agent's own account of
    // it (last-switchover), not a time: how long the starts took is the
    // presetup experiment's business.
    let (full, counts, rig) = sim_start(None);
    let plan = &rig.metrics()["last-switchover"];
    assert!(
        ops(&plan["heavy-applied"]).contains(&"create_queue".to_string()),
        "without presetup the start creates the queues: {plan}"
    );
    assert_eq!(counts["hits"], 0, "{counts}");
    assert_eq!(counts["heavy-skipped"], 0, "{counts}");
    drop(rig);

    let (early, counts, rig) = sim_start(Some(&early_config(2)));
    // The 160 ms of queue creation is gone from the critical path: the
    // start skipped it, presetup did it.
    let plan = &rig.metrics()["last-switchover"];
    assert!(
        !ops(&plan["heavy-applied"]).contains(&"create_queue".to_string())
            && ops(&plan["heavy-skipped"]).contains(&"create_queue".to_string()),
        "with presetup the start still creates queues: {plan}"
    );
    assert_eq!(counts["hits"], 1, "{counts}");
    assert_eq!(counts["fallbacks"], 0, "{counts}");
    // Both pairs' dataplane queues and the MTU were done early.
    assert!(counts["heavy-skipped"].as_u64().unwrap() >= 3, "{counts}");
    // The sim charged queue creation once per virtqueue, at presetup.
    let sim = &rig.device()["sim"];
    assert_eq!(sim["charged"]["create_queue"]["count"], 4, "{sim}");
    eprintln!("start critical path on vdpa-191ms, 2 pairs: {full:?} full, {early:?} with presetup");
}

#[test]
fn garbage_presetup_is_refused_counted_and_the_device_still_works() {
    let profile = vdpa_191ms_profile();
    let mut refusals = Vec::new();
    let mut rig = Rig::start_after(
        &format!("sim:{}", profile.display()),
        1,
        "",
        VhostUserProtocolFeatures::empty(),
        |control| {
            for arguments in [
                r#"{"device": "net0", "config": {"version": 1}}"#.to_string(),
                r#"{"device": "net0", "config": "not a config"}"#.to_string(),
                // More pairs than the device has.
                early_config(4),
            ] {
                refusals.push(ctl(control, "presetup", &arguments).expect_err(&arguments));
            }
        },
    );
    assert!(
        refusals
            .iter()
            .all(|e| e.contains("presetup of net0 refused")),
        "{refusals:?}"
    );
    let rx = rig.post_rx(0, 1, 2048);
    let frame = udp_frame(3, 4, 100);
    rig.queue_tx(0, &frame);
    rig.kick_tx(0);
    rig.used(0, 1);
    assert_eq!(rig.read(rx[0].1 + HDR as u64, frame.len()), frame);
    let net = &query_metrics(&rig.control(), r#"{"device": "net0"}"#)[0];
    assert_eq!(net["presetup"]["fallbacks"], 3, "{net}");
    assert_eq!(net["presetup"]["hits"], 0, "{net}");
    assert!(rig.log().contains("presetup of net0 refused"));
}
