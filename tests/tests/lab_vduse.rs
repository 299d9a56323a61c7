//! The lab's NIC (labnic, a VDUSE virtio-net loopback device) behind the
//! real uAPI: created through /dev/vduse/control, made a vDPA device with
//! `vdpa dev add`, bound to vhost_vdpa as /dev/vhost-vdpa-0, and driven by
//! DPDK 22.11's testpmd (`net_virtio_user` on the vhost-vdpa device, io
//! forwarding after `start tx_first`): the NIC's counters and testpmd's
//! agree and are not zero. The NIC charges the `vdpa-191ms` cost profile
//! and records the pages it wrote.
//!
//! DPDK 22.11's vhost-vdpa backend uses one queue pair only (it strips
//! VIRTIO_NET_F_MQ); two pairs, the exact ring bases at a stop, a restart
//! from them and the dirty-page record are checked with the lab's own
//! front-end (`vdpa-frontend`), which also checks every frame's bytes.
//!
//! `cargo nextest run -p vhost-agent-tests --release --test lab_vduse`

use std::time::Duration;

use vhost_agent_tests::lab::{lab, labnic_binary, LabConfig, LabRun, Payload};
use vhost_agent_tests::support::workspace_root;

/// The payload: labnic up, `vdpa dev add`, checks of the vhost-vdpa
/// device, then the front-end the kernel command line names
/// (`labnic_driver=testpmd`: io forwarding for `labnic_forward_s` seconds;
/// `labnic_driver=frontend`: two phases of `labnic_frames` per pair), then
/// the NIC's counters, operations and dirty record after SIGTERM.
const SCRIPT: &str = r#"
. /etc/lab/lib.sh
param() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p"; }
QP=$(param labnic_qp)
DRIVER=$(param labnic_driver)
FORWARD_S=$(param labnic_forward_s)
FRAMES=$(param labnic_frames)
POLL_MS=$(param labnic_poll_ms)
FE_ARGS=""
[ "$(param labnic_event_idx)" = 1 ] && FE_ARGS="--event-idx"

wait_for() { # wait_for SECONDS TEST...: until the test holds
    n=$(($1 * 10)); shift
    while ! "$@"; do
        n=$((n - 1)); [ "$n" -gt 0 ] || return 1
        sleep 0.1
    done
}
prefixed() { # prefixed PREFIX MARKER FILE: the marker's key=value words, prefixed
    sed -n "s/^$2 //p" "$3" | tail -n 1 | awk -v p="$1" '{for (i = 1; i <= NF; i++) printf " %s%s", p, $i}'
}

taskset -c 0 /usr/bin/labnic --name labnic0 --queue-pairs "$QP" --poll-ms "${POLL_MS:-100}" \
    --profile /lab/vdpa-191ms.json \
    --dirty-log /tmp/dirty.txt --ready-file /tmp/nic.ready >/tmp/labnic.out 2>/tmp/labnic.err &
nic=$!
if ! wait_for 30 test -e /tmp/nic.ready; then
    cat /tmp/labnic.err; lab_result nic_ready=0; exit 1
fi
lab_result nic_ready=1 nic_dev=$([ -c /dev/vduse/labnic0 ] && echo 1 || echo 0)

lab_check vdpa_dev_add vdpa dev add name labnic0 mgmtdev vduse
wait_for 10 test -c /dev/vhost-vdpa-0
lab_result vhost_vdpa_dev=$([ -c /dev/vhost-vdpa-0 ] && echo 1 || echo 0)
lab_result vdpa_driver=$(basename "$(readlink /sys/bus/vdpa/devices/labnic0/driver)")
vdpa dev show labnic0
/usr/bin/lab-probe vhost-vdpa /dev/vhost-vdpa-0 || LAB_FAILED=$((LAB_FAILED + 1))

case "$DRIVER" in
testpmd)
    # testpmd: main lcore on CPU 0 (it sleeps on its command line), the
    # forwarding lcore on CPU 1; commands through a FIFO once its prompt shows.
    # One pair: 22.11's vhost-vdpa backend masks VIRTIO_NET_F_MQ.
    mkfifo /tmp/tpmd.in
    /usr/bin/dpdk-testpmd -l 0,1 --no-huge -m 512 --no-pci --iova-mode=va \
        --vdev "net_virtio_user0,path=/dev/vhost-vdpa-0,queues=$QP,queue_size=256" -- \
        -i --total-num-mbufs=8192 --forward-mode=io --rxq="$QP" --txq="$QP" --nb-cores=1 \
        --rxd=256 --txd=256 </tmp/tpmd.in >/tmp/tpmd.out 2>&1 &
    tpmd=$!
    exec 3>/tmp/tpmd.in
    tpmd_up() { grep -q 'testpmd>' /tmp/tpmd.out || ! kill -0 "$tpmd" 2>/dev/null; }
    wait_for 180 tpmd_up
    if grep -q 'testpmd>' /tmp/tpmd.out && kill -0 "$tpmd" 2>/dev/null; then
        echo "start tx_first" >&3
        sleep "$FORWARD_S"
        echo "show port stats 0" >&3
        sleep 3
        echo "show port stats 0" >&3
        sleep 1
        echo "stop" >&3
        sleep 3
        echo "quit" >&3
    else
        lab_result tpmd_prompt=0
        LAB_FAILED=$((LAB_FAILED + 1))
    fi
    exec 3>&-
    wait_for 60 sh -c "! kill -0 $tpmd 2>/dev/null" || kill -9 "$tpmd"
    wait "$tpmd"
    lab_result tpmd_rc=$?
    cat /tmp/tpmd.out

    # testpmd's figures: the two `show port stats` RX-packets (the loop still
    # moves), and port 0's forward statistics at `stop`.
    rx_seen=$(sed -n 's/^ *RX-packets: *\([0-9]*\).*/\1/p' /tmp/tpmd.out | head -n 2 | tr '\n' ' ')
    lab_result tpmd_stats_rx1=$(echo $rx_seen | cut -d' ' -f1) tpmd_stats_rx2=$(echo $rx_seen | cut -d' ' -f2)
    awk '/Forward statistics for port 0/ {f = 1}
         f && /RX-packets:/ {printf "LAB-RESULT tpmd_rx=%s tpmd_rx_dropped=%s\n", $2, $4}
         f && /TX-packets:/ {printf "LAB-RESULT tpmd_tx=%s tpmd_tx_dropped=%s\n", $2, $4; f = 0}' /tmp/tpmd.out
    ;;
frontend)
    # Both phases with every pair, a stop (GET_VRING_BASE, reset) and a
    # restart from the bases between them.
    # shellcheck disable=SC2086 # FE_ARGS is a list of options
    if /usr/bin/vdpa-frontend --path /dev/vhost-vdpa-0 --pairs "$QP" --frames "$FRAMES" \
        --phases 2 --expect-dirty /tmp/expect.txt $FE_ARGS; then
        lab_result fe_rc=0
    else
        lab_result fe_rc=$?
        LAB_FAILED=$((LAB_FAILED + 1))
    fi
    ;;
esac

# The NIC: counters after the front-end is gone, then stop it (it
# detaches and destroys the device).
sleep 1
kill -TERM "$nic"
wait "$nic"
lab_result nic_rc=$?
cat /tmp/labnic.err | tail -n 40
cat /tmp/labnic.out
lab_result $(prefixed nic_ LABNIC-COUNTERS /tmp/labnic.out)
lab_result $(prefixed ops_ LABNIC-OPS /tmp/labnic.out)
lab_result $(prefixed dirty_ LABNIC-DIRTY /tmp/labnic.out)
lab_result $(prefixed exit_ LABNIC-EXIT /tmp/labnic.out)
lab_result dirty_file_lines=$(grep -c '^0x' /tmp/dirty.txt)
if [ -f /tmp/expect.txt ]; then
    # The pages the front-end knows the device wrote vs the NIC's record.
    awk '/^0x/ && NR == FNR {e[$1] = 1; next} /^0x/ {d[$1] = 1}
         END {m = 0; x = 0; n = 0
              for (k in e) {n++; if (!(k in d)) m++}
              for (k in d) if (!(k in e)) x++
              printf "LAB-RESULT dirty_expected=%d dirty_missing=%d dirty_extra=%d\n", n, m, x}' \
        /tmp/expect.txt /tmp/dirty.txt
fi
lab_result vduse_dev_after=$([ -e /dev/vduse/labnic0 ] && echo 1 || echo 0)
exit "$LAB_FAILED"
"#;

fn payload() -> Payload {
    let mut payload = Payload::new(SCRIPT);
    payload
        .binary("/usr/bin/labnic", &labnic_binary("labnic"))
        .unwrap()
        .binary("/usr/bin/lab-probe", &labnic_binary("lab-probe"))
        .unwrap()
        .binary("/usr/bin/vdpa-frontend", &labnic_binary("vdpa-frontend"))
        .unwrap()
        .binary(
            "/usr/bin/dpdk-testpmd",
            std::path::Path::new("/usr/bin/dpdk-testpmd"),
        )
        .unwrap_or_else(|e| panic!("{e} (scripts/install-test-deps.sh installs DPDK 22.11)"))
        .file(
            "/lab/vdpa-191ms.json",
            &workspace_root().join("netdev/profiles/vdpa-191ms.json"),
        );
    payload
        .dpdk_plugins(&["net_virtio", "mempool_ring", "bus_vdev"])
        .unwrap();
    payload
}

/// Which front-end drives the NIC.
enum Driver {
    /// testpmd, io forwarding for this many seconds.
    Testpmd { forward_s: u32 },
    /// vdpa-frontend, this many frames per pair per phase, with EVENT_IDX
    /// or without; labnic polls never, so a lost kick or interrupt is a
    /// stall the front-end reports, not a delay.
    Frontend { frames: u64, event_idx: bool },
}

fn run(name: &str, queue_pairs: u16, driver: Driver) -> LabRun {
    let dir = tempfile::tempdir().unwrap();
    let mut config = LabConfig::new(name)
        .timeout(Duration::from_secs(540))
        .param("labnic_qp", queue_pairs);
    config = match driver {
        Driver::Testpmd { forward_s } => config
            .param("labnic_driver", "testpmd")
            .param("labnic_forward_s", forward_s),
        Driver::Frontend { frames, event_idx } => config
            .param("labnic_driver", "frontend")
            .param("labnic_frames", frames)
            .param("labnic_poll_ms", 0)
            .param("labnic_event_idx", u8::from(event_idx)),
    };
    let run = lab()
        .run(&payload(), &config, dir.path())
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "lab {name}: boot to verdict {:.1?} (host clock), guest uptime {:?}, payload {} KiB",
        run.boot_to_verdict,
        run.guest_uptime(),
        run.payload_bytes / 1024
    );
    for line in &run.results {
        eprintln!("  LAB-RESULT {line}");
    }
    run
}

/// The device came up as /dev/vhost-vdpa-0 on vhost_vdpa, and went away
/// cleanly at SIGTERM; the profile was charged.
fn check_device(run: &LabRun, queue_pairs: u64) {
    assert_eq!(run.value("nic_ready"), Some("1"));
    assert_eq!(run.value("nic_dev"), Some("1"));
    assert_eq!(run.value("vdpa_dev_add"), Some("ok"));
    assert_eq!(run.value("vhost_vdpa_dev"), Some("1"));
    assert_eq!(run.value("vdpa_driver"), Some("vhost_vdpa"));
    assert_eq!(run.value("vhost_vdpa_set_owner"), Some("ok"));
    assert_eq!(run.number("vhost_vdpa_device_id"), 1, "a virtio-net device");
    assert_eq!(run.value("vhost_vdpa_mac"), Some("52:54:00:12:34:56"));
    assert_eq!(run.number("nic_queue_errors"), 0);
    assert_eq!(run.number("nic_tx_errors"), 0);
    assert_eq!(run.number("nic_rx_dropped"), 0);

    // What the driver accepted: VERSION_1 and ACCESS_PLATFORM (VDUSE's
    // requirements), and MQ exactly with more than one pair.
    let features = u64::from_str_radix(
        run.value("nic_features")
            .and_then(|f| f.strip_prefix("0x"))
            .expect("nic_features=0x..."),
        16,
    )
    .unwrap();
    assert_ne!(features & (1 << 32), 0, "VERSION_1 in {features:#x}");
    assert_ne!(features & (1 << 33), 0, "ACCESS_PLATFORM in {features:#x}");
    assert_eq!(
        features & (1 << 22) != 0,
        queue_pairs > 1,
        "MQ in {features:#x}"
    );

    // The cost profile was charged per configuration operation: each
    // queue created at DRIVER_OK (40 ms each in vdpa-191ms) and destroyed
    // at the reset, the features, the MTU if negotiated, a memory mapping
    // per IOTLB update.
    assert_eq!(run.value("ops_profile"), Some("vdpa-191ms"));
    assert!(run.number("ops_create_queue") >= 2 * queue_pairs);
    assert!(run.number("ops_create_queue_us") >= 40_000 * 2 * queue_pairs);
    assert!(run.number("ops_destroy_queue") >= 2 * queue_pairs);
    assert!(run.number("ops_set_features") >= 1);
    let mtu_ops = run.number("ops_set_mtu");
    if features & (1 << 3) != 0 {
        assert!(mtu_ops >= 1 && run.number("ops_set_mtu_us") >= 6_400 * mtu_ops);
    } else {
        assert_eq!(mtu_ops, 0, "MTU not negotiated ({features:#x}) but charged");
    }
    assert!(run.number("ops_map_memory") >= 1);
    assert_eq!(
        run.number("ops_map_memory"),
        run.number("nic_iotlb_updates")
    );

    // Pages written: RX buffers and used rings, also in the dump file.
    let pages = run.number("dirty_pages");
    assert!(pages > 0);
    assert_eq!(run.number("dirty_file_lines"), pages);

    // SIGTERM: the vDPA device deleted, the VDUSE device destroyed.
    assert_eq!(run.number("nic_rc"), 0);
    assert_eq!(run.value("exit_destroyed"), Some("1"));
    assert_eq!(run.value("vduse_dev_after"), Some("0"));
}

/// testpmd and the NIC agree on the frames moved.
fn check_testpmd_counters(run: &LabRun, queue_pairs: u64) {
    assert_eq!(run.number("tpmd_rc"), 0, "testpmd exited cleanly");

    let nic_tx = run.number("nic_tx_frames");
    let nic_rx = run.number("nic_rx_frames");
    let tpmd_tx = run.number("tpmd_tx");
    let tpmd_rx = run.number("tpmd_rx");
    assert!(tpmd_tx > 0 && tpmd_rx > 0, "testpmd moved no frames");
    assert!(
        run.number("tpmd_stats_rx2") > run.number("tpmd_stats_rx1"),
        "the io loop stopped moving"
    );
    // Every frame testpmd transmitted was taken off the TX ring, and every
    // one taken was reflected into an RX buffer (the loop is lossless).
    assert_eq!(nic_tx, tpmd_tx, "NIC TX vs testpmd TX-packets");
    assert_eq!(nic_rx + run.number("nic_rx_dropped"), nic_tx);
    assert_eq!(run.number("nic_rx_dropped"), 0);
    assert_eq!(run.number("nic_tx_errors"), 0);
    // testpmd received what the NIC delivered, but for the frames still in
    // the RX ring when forwarding stopped: at most the first burst of 32
    // it started with (io forwarding creates no frames).
    assert!(nic_rx >= tpmd_rx, "NIC RX {nic_rx} < testpmd RX {tpmd_rx}");
    assert!(
        nic_rx - tpmd_rx <= 32 * queue_pairs,
        "NIC RX {nic_rx}, testpmd RX {tpmd_rx}"
    );
    assert_eq!(run.number("tpmd_tx_dropped"), 0);
}

#[test]
fn testpmd_moves_frames_through_the_vduse_nic_one_pair() {
    let run = run("vduse1", 1, Driver::Testpmd { forward_s: 10 });
    check_device(&run, 1);
    check_testpmd_counters(&run, 1);
    assert_eq!(run.number("nic_q0_tx_frames"), run.number("nic_tx_frames"));
}

/// The lab's front-end got every frame back intact on its pair, the NIC
/// counted the same frames, the ring bases were exact at each stop, and
/// the NIC's dirty record holds exactly the pages the device wrote.
fn check_frontend(run: &LabRun, queue_pairs: u64, frames: u64, event_idx: bool) {
    assert_eq!(run.number("fe_rc"), 0, "vdpa-frontend failed");
    let negotiated = u64::from_str_radix(
        run.value("fe_negotiated")
            .and_then(|f| f.strip_prefix("0x"))
            .expect("fe_negotiated=0x..."),
        16,
    )
    .unwrap();
    assert_eq!(
        negotiated & (1 << 29) != 0,
        event_idx,
        "EVENT_IDX in {negotiated:#x}"
    );
    assert!(run.number("fe_kicks") > 0);
    assert_eq!(run.value("fe_ok"), Some("1"));
    assert_eq!(run.number("fe_pairs"), queue_pairs);
    assert_eq!(run.number("fe_mismatches"), 0);
    // Two phases of `frames` per pair.
    let per_pair = 2 * frames;
    for pair in 0..queue_pairs {
        assert_eq!(run.number(&format!("fe_q{pair}_sent")), per_pair);
        assert_eq!(run.number(&format!("fe_q{pair}_received")), per_pair);
        assert_eq!(run.number(&format!("nic_q{pair}_tx_frames")), per_pair);
        assert_eq!(run.number(&format!("nic_q{pair}_rx_frames")), per_pair);
    }
    assert_eq!(run.number("nic_tx_frames"), run.number("fe_sent"));
    assert_eq!(run.number("nic_tx_bytes"), run.number("nic_rx_bytes"));
    // GET_VRING_BASE after each phase, every virtqueue: exact.
    assert_eq!(run.number("fe_bases"), 2 * 2 * queue_pairs);
    assert_eq!(run.number("fe_bases_wrong"), 0);
    assert_eq!(run.number("nic_vq_state_reads"), 2 * 2 * queue_pairs);
    // The restart charged a second round of queue creations.
    assert_eq!(run.number("ops_create_queue"), 2 * 2 * queue_pairs);
    // Dirty pages: none missing, none extra.
    assert!(run.number("dirty_expected") > 0);
    assert_eq!(
        run.number("dirty_missing"),
        0,
        "pages written but not recorded"
    );
    assert_eq!(
        run.number("dirty_extra"),
        0,
        "pages recorded but not written"
    );
    assert_eq!(run.number("dirty_expected"), run.number("dirty_pages"));
}

#[test]
fn own_frontend_checks_every_frame_bases_and_dirty_pages_one_pair() {
    let frames = 3000;
    let run = run(
        "vduse-fe1",
        1,
        Driver::Frontend {
            frames,
            event_idx: false,
        },
    );
    check_device(&run, 1);
    check_frontend(&run, 1, frames, false);
}

/// With EVENT_IDX: kicks follow labnic's avail_event (some publishes
/// spared a kick) and interrupts the front-end's used_event.
#[test]
fn own_frontend_moves_frames_on_both_of_two_pairs_with_event_idx() {
    let frames = 2000;
    let run = run(
        "vduse-fe2",
        2,
        Driver::Frontend {
            frames,
            event_idx: true,
        },
    );
    check_device(&run, 2);
    check_frontend(&run, 2, frames, true);
}
