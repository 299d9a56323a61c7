//! `dataplane=vdpa:/dev/vhost-vdpa-N` on the lab guest's kernel (trixie's
//! 6.12, which has vhost-vdpa and VDUSE; this host's has neither): two
//! lab NICs (labnic, VDUSE loopback devices with the `vdpa-191ms` cost
//! profile) become /dev/vhost-vdpa-0 and -1, an agent serves each, and the
//! lab's front-end (`lab-frontend vdpa`) drives them: frames out and back
//! on every pair, exact bases across stops and restarts, the used-ring
//! dirty tracking against the NIC's own record of its writes, and a
//! migration from one agent to the other with in-band presetup. Then a
//! missing and a busy device node are refused with their fix. One boot.
//!
//! VDUSE has neither VHOST_VDPA_SUSPEND nor RESUME, so this exercises the
//! documented fallback (stop by reset, bases from the used rings, restart
//! by reprogramming); the SUSPEND/RESUME path is the engine's unit tests.
//!
//! `cargo nextest run -p vhost-agent-tests --release --test lab_vdpa --no-capture`
//! prints the switchover figures; nothing asserts on time.

use std::time::Duration;

use vhost_agent_tests::lab::{lab, labnic_binary, LabConfig, LabRun, Payload};
use vhost_agent_tests::lab_net::frontend_binary;
use vhost_agent_tests::support::{agent_binary, workspace_root};

const SCRIPT: &str = r#"
. /etc/lab/lib.sh
param() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p"; }
PAIRS=$(param vdpa_pairs)
FRAMES=$(param vdpa_frames)
wait_for() { # wait_for SECONDS TEST...: until the test holds
    tries=$(($1 * 10)); shift
    while ! "$@"; do
        tries=$((tries - 1)); [ "$tries" -gt 0 ] || return 1
        sleep 0.1
    done
}
for n in 0 1; do
    /usr/bin/labnic --name "nic$n" --queue-pairs "$PAIRS" --profile /lab/vdpa-191ms.json \
        --dirty-log "/tmp/dirty$n.txt" --ready-file "/tmp/nic$n.ready" \
        >"/tmp/nic$n.out" 2>"/tmp/nic$n.err" &
    eval "nic_$n=$!"
    if ! wait_for 30 test -e "/tmp/nic$n.ready"; then
        cat "/tmp/nic$n.err"; lab_result "nic${n}_ready=0"; exit 1
    fi
    lab_check "vdpa_dev_add_$n" vdpa dev add name "nic$n" mgmtdev vduse
    wait_for 10 test -c "/dev/vhost-vdpa-$n"
    lab_result "vhost_vdpa_$n=$([ -c /dev/vhost-vdpa-$n ] && echo 1 || echo 0)"
done
for n in a b; do
    [ $n = a ] && dev=0 || dev=1
    RUST_LOG=info /usr/bin/vhost-agent serve --presetup-protocol=nvidia-rfc \
        --net "socket=/tmp/$n.sock,dataplane=vdpa:/dev/vhost-vdpa-$dev,queue-pairs=$PAIRS" \
        --control "/tmp/$n.ctl" >"/tmp/$n.log" 2>&1 &
    eval "pid_$n=$!"
    if ! wait_for 60 test -S "/tmp/$n.sock"; then
        cat "/tmp/$n.log"; lab_result "agent_${n}_up=0"; exit 1
    fi
    lab_result "agent_${n}_up=1"
done

# A busy node (agent a holds /dev/vhost-vdpa-0) and a missing one.
/usr/bin/vhost-agent serve --net socket=/tmp/x.sock,dataplane=vdpa:/dev/vhost-vdpa-0 >/tmp/x.log 2>&1
lab_result busy_rc=$?
cat /tmp/x.log
lab_result busy_names_fix=$(grep -c 'dataplane=vdpa:/dev/vhost-vdpa-0 is busy' /tmp/x.log)
/usr/bin/vhost-agent serve --net socket=/tmp/y.sock,dataplane=vdpa:/dev/vhost-vdpa-9 >/tmp/y.log 2>&1
lab_result missing_rc=$?
cat /tmp/y.log
lab_result missing_names_fix=$(grep -c 'dataplane=vdpa:/dev/vhost-vdpa-9 does not exist; create the vDPA device' /tmp/y.log)
lab_result error_sockets=$(ls /tmp/x.sock /tmp/y.sock 2>/dev/null | wc -l)

if /usr/bin/lab-frontend vdpa --dir /tmp --agents a,b --pairs "$PAIRS" --frames "$FRAMES" \
    --nic-pid "$nic_0" --dirty-file /tmp/dirty0.txt; then lab_result fe_rc=0
else rc=$?; lab_result fe_rc=$rc; LAB_FAILED=$((LAB_FAILED + 1)); fi

for n in a b; do
    eval "pid=\$pid_$n"
    kill -TERM "$pid"; wait "$pid"
    lab_result "agent_${n}_rc=$?"
    lab_result "agent_${n}_errors=$(grep -c ' ERROR ' /tmp/$n.log)"
    lab_result "agent_${n}_reset_stops=$(grep -c 'has no VHOST_VDPA_SUSPEND: reset to stop it' /tmp/$n.log)"
    lab_result "agent_${n}_reset_restarts=$(grep -c 'rings restart by reset and a full reprogram' /tmp/$n.log)"
    lab_result "agent_${n}_driver_ok=$(grep -c 'DRIVER_OK with features' /tmp/$n.log)"
    echo "--- agent $n log (tail) ---"; tail -n 30 "/tmp/$n.log"
done
for n in 0 1; do
    eval "pid=\$nic_$n"
    kill -TERM "$pid"; wait "$pid"
    cat "/tmp/nic$n.out"
    lab_result "$(sed -n 's/^LABNIC-OPS //p' /tmp/nic$n.out | tail -n 1 | awk -v p="nic${n}_ops_" '{for (i = 1; i <= NF; i++) printf " %s%s", p, $i}')"
    lab_result "$(sed -n 's/^LABNIC-COUNTERS //p' /tmp/nic$n.out | tail -n 1 | awk -v p="nic${n}_" '{for (i = 1; i <= NF; i++) printf " %s%s", p, $i}')"
done
lab_result uptime_ms=$(lab_uptime_ms)
exit "$LAB_FAILED"
"#;

fn run(pairs: u16, frames: u64) -> LabRun {
    let mut payload = Payload::new(SCRIPT);
    payload
        .binary("/usr/bin/vhost-agent", &agent_binary())
        .unwrap()
        .binary("/usr/bin/lab-frontend", &frontend_binary())
        .unwrap()
        .binary("/usr/bin/labnic", &labnic_binary("labnic"))
        .unwrap()
        .file(
            "/lab/vdpa-191ms.json",
            &workspace_root().join("netdev/profiles/vdpa-191ms.json"),
        );
    let dir = tempfile::tempdir().unwrap();
    let config = LabConfig::new("vdpa-agent")
        .timeout(Duration::from_secs(360))
        .param("vdpa_pairs", pairs)
        .param("vdpa_frames", frames);
    let run = lab()
        .run(&payload, &config, dir.path())
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "lab vdpa: boot to verdict {:.1?}, guest uptime {:?}",
        run.boot_to_verdict,
        run.guest_uptime()
    );
    for line in &run.results {
        eprintln!("  LAB-RESULT {line}");
    }
    run
}

fn ok(run: &LabRun, check: &str) {
    assert_eq!(run.value(check), Some("ok"), "{check}: {:?}", run.results);
}

/// Everything in one boot (module documentation).
#[test]
fn vdpa_frames_bases_dirty_pages_migration_and_refusals_on_two_vduse_nics() {
    let pairs = 2u16;
    let frames = 512u64;
    let run = run(pairs, frames);
    for n in 0..2 {
        ok(&run, &format!("vdpa_dev_add_{n}"));
        assert_eq!(run.number(&format!("vhost_vdpa_{n}")), 1);
    }
    assert_eq!(run.number("agent_a_up"), 1);
    assert_eq!(run.number("agent_b_up"), 1);
    assert_eq!(run.number("fe_rc"), 0, "lab-frontend failed");
    assert_eq!(run.number("fe_failures"), 0);
    // VERSION_1 and MQ negotiated (ACCESS_PLATFORM is the agent's, to the
    // device, never offered to the front-end).
    let negotiated = u64::from_str_radix(
        run.value("negotiated")
            .and_then(|v| v.strip_prefix("0x"))
            .expect("negotiated=0x..."),
        16,
    )
    .unwrap();
    assert_ne!(negotiated & (1 << 32), 0, "VERSION_1 in {negotiated:#x}");
    assert_ne!(negotiated & (1 << 22), 0, "MQ in {negotiated:#x}");
    assert_eq!(
        negotiated & (1 << 33),
        0,
        "ACCESS_PLATFORM in {negotiated:#x}"
    );
    // Frames out and back on every pair, in every phase, on both agents.
    for phase in ["p1", "p2", "p3", "p4", "p5"] {
        ok(&run, &format!("{phase}_complete"));
        for pair in 0..pairs {
            assert_eq!(
                run.number(&format!("{phase}_q{pair}_back")),
                frames,
                "{phase} pair {pair}"
            );
        }
    }
    // Every stop exact; the NIC has no SUSPEND: the stop reset it and the
    // restart reprogrammed it, each said in the log.
    for stop in ["a_stop1", "a_stop2", "a_stop3", "a_final", "b_stop"] {
        ok(&run, &format!("{stop}_bases_exact"));
    }
    assert!(run.number("agent_a_reset_stops") >= 4, "{:?}", run.results);
    assert!(run.number("agent_a_driver_ok") >= 4);
    assert_eq!(run.number("out_of_order"), 0);
    // Dirty pages: the NIC's own record of what it wrote in the logged
    // phase, all of it in the log; and every RX buffer the front-end saw.
    ok(&run, "dirty_complete");
    assert!(run.number("dirty_record_pages") > 0);
    assert_eq!(run.number("dirty_missed"), 0);
    assert_eq!(run.number("dirty_rx_known_missed"), 0);
    // The destination was set up early in-band and then moved frames.
    ok(&run, "b_presetup_negotiated");
    assert_eq!(run.value("b_early"), Some("true"));
    // A busy and a missing node: refused with the fix, no socket left.
    assert_eq!(run.number("busy_rc"), 1);
    assert_eq!(run.number("busy_names_fix"), 1);
    assert_eq!(run.number("missing_rc"), 1);
    assert_eq!(run.number("missing_names_fix"), 1);
    assert_eq!(run.number("error_sockets"), 0);
    for n in ["a", "b"] {
        assert_eq!(run.number(&format!("agent_{n}_rc")), 0);
        assert_eq!(run.number(&format!("agent_{n}_errors")), 0);
    }
    eprintln!(
        "figures: start critical path without presetup (a) {} us, with in-band presetup (b) {} us; \
         heavy at b's switchover: {}; source stop (reset fallback) {} us; NIC ops: {}",
        run.value("a_critical_path_us").unwrap_or("?"),
        run.value("b_critical_path_us").unwrap_or("?"),
        run.value("b_heavy_applied").unwrap_or("?"),
        run.value("source_stop_us").unwrap_or("?"),
        run.results
            .iter()
            .filter(|l| l.contains("nic1_ops_"))
            .cloned()
            .collect::<Vec<_>>()
            .join(" ")
    );
}
