//! `dataplane=vhost-net:TAP` on the lab guest's kernel (trixie's 6.12,
//! which has vhost-net; this host's has none): the agent hands the
//! front-end's rings to the real `/dev/vhost-net` and the kernel moves the
//! frames between them and a tap. The lab's front-end (`lab-frontend`,
//! `vhost_agent_tests::lab_net`) drives the agent over its socket and
//! counts on both sides: the rings, and the tap's own counters and a
//! packet socket on it.
//!
//! `cargo nextest run -p vhost-agent-tests --release --test lab_vhost_net --no-capture`
//! (the figures are printed; nothing asserts on time).

use std::time::Duration;

use vhost_agent_tests::lab::{lab, LabConfig, LabRun, Payload};
use vhost_agent_tests::lab_net::frontend_binary;
use vhost_agent_tests::support::agent_binary;

/// The payload: agents on vhost-net (and, for the figures, on tap), the
/// front-end scenario the kernel command line names, the agents' logs and
/// what the kernel shows of them.
const SCRIPT: &str = r#"
. /etc/lab/lib.sh
param() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p"; }
MODE=$(param vhn_mode)
PAIRS=$(param vhn_pairs)
FRAMES=$(param vhn_frames)
# No IPv6 on the taps: the kernel would send router solicitations and
# MLD reports into them, frames the counts do not expect.
echo 1 >/proc/sys/net/ipv6/conf/all/disable_ipv6
echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6

wait_for() { # wait_for SECONDS TEST...: until the test holds
    n=$(($1 * 10)); shift
    while ! "$@"; do
        n=$((n - 1)); [ "$n" -gt 0 ] || return 1
        sleep 0.1
    done
}
start_agent() { # start_agent NAME SPEC [SERVE-OPTIONS...]
    name=$1; spec=$2; shift 2
    /usr/bin/vhost-agent serve --net "$spec" --control "/tmp/$name.ctl" "$@" \
        >"/tmp/$name.log" 2>&1 &
    eval "pid_$name=$!"
    if ! wait_for 60 test -S "/tmp/$name.sock"; then
        cat "/tmp/$name.log"; lab_result "agent_${name}_up=0"; exit 1
    fi
    lab_result "agent_${name}_up=1"
}
stop_agent() { # stop_agent NAME: SIGTERM, wait, the log's last lines
    eval "pid=\$pid_$1"
    lab_result "agent_$1_vhost_threads=$(cat /proc/$pid/task/*/comm 2>/dev/null | grep -c '^vhost-[0-9]')"
    lab_result "agent_$1_threads=$(cat /proc/$pid/task/*/comm 2>/dev/null | tr '
' ',')"
    kill -TERM "$pid"
    wait "$pid"
    lab_result "agent_$1_rc=$?"
    lab_result "agent_$1_errors=$(grep -c ' ERROR ' "/tmp/$1.log")"
    lab_result "agent_$1_refusals=$(grep -c -e 'refused before it reaches the kernel' -e 'does not lie inside one memory region' "/tmp/$1.log")"
    echo "--- agent $1 log (tail) ---"
    tail -n 40 "/tmp/$1.log"
}
frontend() { # frontend ARGS...: lab-frontend, its status reported
    if /usr/bin/lab-frontend "$@"; then lab_result fe_rc=0
    else rc=$?; lab_result fe_rc=$rc; LAB_FAILED=$((LAB_FAILED + 1)); fi
}

case "$MODE" in
basic)
    start_agent a "socket=/tmp/a.sock,dataplane=vhost-net:vhn0,queue-pairs=$PAIRS"
    lab_result tap_multi_queue=$(ip -details link show vhn0 | grep -c multi_queue)
    frontend basic --socket /tmp/a.sock --control /tmp/a.ctl --tap vhn0 \
        --pairs "$PAIRS" --frames "$FRAMES"
    stop_agent a
    if [ "$(param vhn_unload)" = 1 ]; then
        # Without the module, /dev/vhost-net goes, and a vhost-net device
        # must be refused at start with the fix named.
        lab_check rmmod_vhost_net rmmod vhost_net
        lab_result vhost_net_node_after_rmmod=$([ -e /dev/vhost-net ] && echo present || echo absent)
        /usr/bin/vhost-agent serve --net socket=/tmp/x.sock,dataplane=vhost-net:vhnx \
            >/tmp/x.log 2>&1
        lab_result nomod_rc=$?
        cat /tmp/x.log
        lab_result nomod_names_fix=$(grep -c 'dataplane=vhost-net:vhnx needs /dev/vhost-net, which does not exist; load the vhost_net module' /tmp/x.log)
        lab_result nomod_tap=$([ -e /sys/class/net/vhnx ] && echo 1 || echo 0)
        lab_result nomod_socket=$([ -e /tmp/x.sock ] && echo 1 || echo 0)
        lab_check modprobe_vhost_net modprobe vhost_net
        lab_check vhost_net_node_again test -c /dev/vhost-net
    fi
    ;;
migrate)
    for n in a b c d e; do
        start_agent "$n" "socket=/tmp/$n.sock,dataplane=vhost-net:vhn$n,queue-pairs=$PAIRS" \
            --presetup-protocol=nvidia-rfc
    done
    frontend migrate --dir /tmp --agents a:vhna,b:vhnb,c:vhnc,d:vhnd,e:vhne \
        --pairs "$PAIRS" --frames "$FRAMES"
    for n in a b c d e; do stop_agent "$n"; done
    ;;
bench)
    start_agent v "socket=/tmp/v.sock,dataplane=vhost-net:vhnv"
    start_agent t "socket=/tmp/t.sock,dataplane=tap:vhnt"
    for round in 1 2; do
        frontend bench --socket /tmp/t.sock --tap vhnt --pid "$pid_t" --frames "$FRAMES" \
            --label "tap_copy_r$round"
        frontend bench --socket /tmp/v.sock --tap vhnv --pid "$pid_v" --frames "$FRAMES" \
            --label "vhost_net_r$round"
    done
    stop_agent v
    stop_agent t
    ;;
esac
lab_result uptime_ms=$(lab_uptime_ms)
exit "$LAB_FAILED"
"#;

fn run(name: &str, mode: &str, pairs: u16, frames: u64, unload: bool) -> LabRun {
    let mut payload = Payload::new(SCRIPT);
    payload
        .binary("/usr/bin/vhost-agent", &agent_binary())
        .unwrap()
        .binary("/usr/bin/lab-frontend", &frontend_binary())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = LabConfig::new(name)
        .timeout(Duration::from_secs(300))
        .param("vhn_mode", mode)
        .param("vhn_pairs", pairs)
        .param("vhn_frames", frames)
        .param("vhn_unload", u8::from(unload));
    let result = lab().run(&payload, &config, dir.path());
    let run = result.unwrap_or_else(|e| panic!("{e}"));
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

fn ok(run: &LabRun, check: &str) {
    assert_eq!(run.value(check), Some("ok"), "{check}: {:?}", run.results);
}

/// Frames both ways on every pair, counted on the tap and on the rings,
/// in every phase `prefix`es name; each phase moved `frames` per pair and
/// direction (plus the TX frames that teach the tap each flow).
fn check_phase(run: &LabRun, prefix: &str, pairs: u16, frames: u64) {
    ok(run, &format!("{prefix}_complete"));
    let tx = run.number(&format!("{prefix}_tx"));
    assert!(tx >= frames * u64::from(pairs), "{prefix}: {tx} TX frames");
    assert_eq!(
        run.number(&format!("{prefix}_tx_out_of_tap")),
        tx,
        "{prefix}"
    );
    assert_eq!(
        run.number(&format!("{prefix}_tx_seen_intact")),
        tx,
        "{prefix}"
    );
    for pair in 0..pairs {
        let injected = run.number(&format!("{prefix}_q{pair}_rx_injected"));
        assert_eq!(injected, frames, "{prefix} pair {pair}");
        assert_eq!(
            run.number(&format!("{prefix}_q{pair}_rx")),
            frames,
            "{prefix}: pair {pair}'s flow arrives on pair {pair}"
        );
    }
    assert_eq!(
        run.number(&format!("{prefix}_rx_on_own_pair")),
        frames * u64::from(pairs)
    );
    assert_eq!(run.number(&format!("{prefix}_rx_foreign")), 0);
    assert_eq!(run.number(&format!("{prefix}_tap_tx_dropped")), 0);
}

fn check_basic(run: &LabRun, pairs: u16, frames: u64) {
    assert_eq!(run.number("agent_a_up"), 1);
    assert_eq!(run.number("tap_multi_queue"), 1);
    assert_eq!(run.number("fe_rc"), 0, "lab-frontend failed");
    assert_eq!(run.number("fe_failures"), 0);
    // NET_SET_MTU reached the tap; VERSION_1, MRG_RXBUF and MQ (offered
    // whatever the pairs) negotiated.
    assert_eq!(run.number("tap_mtu"), 9000);
    let negotiated = u64::from_str_radix(
        run.value("negotiated")
            .and_then(|v| v.strip_prefix("0x"))
            .expect("negotiated=0x..."),
        16,
    )
    .unwrap();
    assert_ne!(negotiated & (1 << 32), 0, "VERSION_1 in {negotiated:#x}");
    assert_ne!(negotiated & (1 << 15), 0, "MRG_RXBUF in {negotiated:#x}");
    assert_ne!(negotiated & (1 << 22), 0, "MQ in {negotiated:#x}");
    // The first start had no presetup: the kernel's instances were opened
    // and given the memory table then.
    let heavy = run.value("start_heavy_applied").unwrap_or_default();
    assert_eq!(
        heavy.matches("create_queue").count(),
        usize::from(pairs),
        "{heavy}"
    );
    assert!(heavy.contains("map_region"), "{heavy}");

    check_phase(run, "p1", pairs, frames);
    // CSUM offload from the guest passes through the kernel to the tap.
    ok(run, "offload_csum");
    check_phase(run, "p2", pairs, frames);
    check_phase(run, "p3", pairs, frames / 2);
    for stop in ["stop1", "stop2", "stop3"] {
        ok(run, &format!("{stop}_bases_exact"));
    }
    assert_eq!(run.number("out_of_order"), 0);
    if pairs > 1 {
        ok(run, "mq_complete");
        let last = pairs - 1;
        assert_eq!(run.number(&format!("mq_off_q{last}_rx")), 0);
        assert_eq!(run.number(&format!("mq_off_stray_q{last}_rx")), 0);
        assert_eq!(run.number("mq_off_stray_q0_rx"), frames / 4);
    }
    // The kernel's dirty log: exactly the pages it wrote, none it read.
    ok(run, "dirty_exact");
    assert!(run.number("dirty_expected") > 0);
    assert_eq!(run.number("dirty_missing"), 0);
    assert_eq!(run.number("dirty_extra"), 0);
    assert!(run.number("dirty_tx_pages") > 0);
    assert_eq!(run.number("dirty_tx_marked"), 0);
    ok(run, "dirty_off_quiet");
    assert_eq!(run.number("dirty_after_off"), 0);
    // The hostile ring: its SET_VRING_ADDR refused by the session before
    // any ioctl (the agent's log says so), and a proper start afterwards
    // moves frames.
    ok(run, "hostile_refused");
    ok(run, "hostile_recovered");
    assert!(run.number("agent_a_refusals") >= 1);
    // The kernel's workers (one per pair) ran in the agent's process; it
    // stopped cleanly.
    assert_eq!(run.number("agent_a_vhost_threads"), u64::from(pairs));
    assert_eq!(run.number("agent_a_rc"), 0);
}

/// One pair, and the clear error without the module.
#[test]
fn one_pair_frames_bases_dirty_log_reconnect_hostile_ring_and_no_module() {
    let frames = 1000;
    let run = run("vhost-net-1", "basic", 1, frames, true);
    check_basic(&run, 1, frames);
    ok(&run, "rmmod_vhost_net");
    assert_eq!(run.value("vhost_net_node_after_rmmod"), Some("absent"));
    assert_eq!(run.number("nomod_rc"), 1);
    assert_eq!(run.number("nomod_names_fix"), 1);
    assert_eq!(run.number("nomod_tap"), 0, "no tap for a device not served");
    assert_eq!(run.number("nomod_socket"), 0);
    ok(&run, "modprobe_vhost_net");
    ok(&run, "vhost_net_node_again");
}

/// Two pairs: each pair's flow on its own pair, a disabled pair sees
/// nothing, and comes back.
#[test]
fn two_pairs_frames_on_every_pair_mq_and_bases() {
    let frames = 600;
    let run = run("vhost-net-2", "basic", 2, frames, false);
    check_basic(&run, 2, frames);
}

/// A to B (plain start) to C (in-band presetup) to D (plain) to E
/// (presetup): frames flow through each destination's tap, the indices
/// are exact at every stop, the device state and RARP go along, and with
/// presetup the switchover is light ops only.
#[test]
fn migration_across_agents_with_and_without_presetup() {
    let pairs = 2;
    let frames = 300;
    let run = run("vhost-net-mig", "migrate", pairs, frames, false);
    assert_eq!(run.number("fe_rc"), 0, "lab-frontend failed");
    check_phase(&run, "on_a", pairs, frames);
    ok(&run, "stop_e_bases_exact");
    let mut figures = Vec::new();
    for (source, dest, presetup) in [
        ("a", "b", false),
        ("b", "c", true),
        ("c", "d", false),
        ("d", "e", true),
    ] {
        ok(&run, &format!("stop_{source}_bases_exact"));
        check_phase(&run, &format!("on_{dest}"), pairs, frames);
        ok(&run, &format!("{dest}_rarp"));
        assert_eq!(run.number(&format!("{dest}_tap_mtu")), 4000);
        assert_eq!(
            run.value(&format!("{dest}_presetup")),
            Some(presetup.to_string().as_str())
        );
        let heavy = run
            .value(&format!("{dest}_heavy_applied"))
            .unwrap_or_default();
        if presetup {
            // Nothing heavy at the switchover: the bracket did it all.
            ok(&run, &format!("{dest}_presetup_negotiated"));
            assert_eq!(heavy, "none", "{dest}");
            assert_eq!(run.value(&format!("{dest}_early")), Some("true"));
            let skipped = run
                .value(&format!("{dest}_heavy_skipped"))
                .unwrap_or_default();
            assert_eq!(
                skipped.matches("create_queue").count(),
                usize::from(pairs),
                "{skipped}"
            );
            assert!(
                skipped.contains("map_region") && skipped.contains("set_mtu"),
                "{skipped}"
            );
            // One kick per ring (each carrying its call), at least.
            assert!(run.number(&format!("{dest}_light_applied")) >= 2 * u64::from(pairs));
        } else {
            assert_eq!(
                heavy.matches("create_queue").count(),
                usize::from(pairs),
                "{heavy}"
            );
            assert!(
                heavy.contains("map_region") && heavy.contains("set_mtu"),
                "{heavy}"
            );
            assert_eq!(run.value(&format!("{dest}_early")), Some("false"));
        }
        figures.push(format!(
            "{source}->{dest} {}: critical path {} us, agent {} us",
            if presetup {
                "with presetup   "
            } else {
                "without presetup"
            },
            run.number(&format!("{dest}_critical_path_us")),
            run.number(&format!("{dest}_agent_us")),
        ));
    }
    eprintln!("switchover on vhost-net, {pairs} pairs (TCG):");
    for line in figures {
        eprintln!("  {line}");
    }
    for n in ["a", "b", "c", "d", "e"] {
        assert_eq!(run.number(&format!("agent_{n}_rc")), 0);
        assert_eq!(
            run.number(&format!("agent_{n}_errors")),
            0,
            "agent {n} logged an error"
        );
    }
}

/// Figures: the kernel's vhost-net against the agent's own copy path to a
/// tap, two alternating rounds in one boot.
#[test]
fn figures_vhost_net_against_the_tap_copy_path() {
    let frames = 50_000;
    let run = run("vhost-net-bench", "bench", 1, frames, false);
    assert_eq!(run.number("fe_rc"), 0, "lab-frontend failed");
    for round in 1..=2 {
        for label in ["tap_copy", "vhost_net"] {
            let key = |k: &str| format!("{label}_r{round}_{k}");
            ok(&run, &key("tx_all_out"));
            ok(&run, &key("rx_complete"));
            ok(&run, &key("bases_exact"));
            eprintln!(
                "round {round} {label:9}: TX {:>7} frames/s, agent {:>6} + vhost worker {:>6} ms CPU per Mframe; \
                 RX {:>7} frames/s, agent {:>6} + vhost worker {:>6} ms CPU per Mframe (TX+RX)",
                run.value(&key("tx_fps")).unwrap_or("?"),
                run.value(&key("tx_agent_ms_per_mframe")).unwrap_or("?"),
                run.value(&key("tx_vhost_ms_per_mframe")).unwrap_or("?"),
                run.value(&key("rx_fps")).unwrap_or("?"),
                run.value(&key("txrx_agent_ms_per_mframe")).unwrap_or("?"),
                run.value(&key("txrx_vhost_ms_per_mframe")).unwrap_or("?"),
            );
        }
    }
    // The copy path has no kernel worker; on vhost-net the kernel's worker
    // does the work.
    assert_eq!(run.number("tap_copy_r1_tx_vhost_cpu_ms"), 0);
    assert_eq!(run.number("agent_v_vhost_threads"), 1);
    assert_eq!(run.number("agent_t_vhost_threads"), 0);
}
