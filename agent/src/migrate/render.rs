//! The timeline as text, for people: one line per phase, one per device,
//! QEMU's own figures, and notes.

use std::fmt::Write;

use super::timeline::{DeviceFigures, Timeline};

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"))
}

/// `create_queue x4, set_mtu` (runs of one op counted).
pub fn ops(list: &[String]) -> String {
    if list.is_empty() {
        return "none".to_string();
    }
    let mut runs: Vec<(String, usize)> = Vec::new();
    for op in list {
        match runs.last_mut() {
            Some((last, count)) if last == op => *count += 1,
            _ => runs.push((op.clone(), 1)),
        }
    }
    runs.iter()
        .map(|(op, count)| {
            if *count > 1 {
                format!("{op} x{count}")
            } else {
                op.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn device_line(device: &DeviceFigures) -> String {
    let mut line = format!(
        "  {} -> {} ({}",
        device.source, device.destination, device.kind
    );
    if let Some(chardev) = &device.chardev {
        let _ = write!(line, ", chardev {chardev}");
    }
    let _ = write!(line, "): source stop {} ms", ms(device.source_stop_ms));
    if let Some(handed_off) = device.handed_off {
        let _ = write!(line, " ({handed_off} requests handed off)");
    }
    let _ = write!(
        line,
        "; destination critical path {} ms (agent {} ms){}; heavy ops at the start: {}; done before it: {}",
        ms(device.destination_critical_path_ms),
        ms(device.destination_agent_ms),
        if device.presetup_used { ", presetup used" } else { "" },
        ops(&device.heavy_applied),
        ops(&device.heavy_skipped),
    );
    line
}

/// The report `vhost-agent migrate` prints.
pub fn render(timeline: &Timeline) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "timeline of migrate {} ({}presetup): {}; ± is how exactly each clock was placed",
        timeline.uri,
        if timeline.presetup { "" } else { "no " },
        timeline.axis
    );
    let _ = writeln!(
        out,
        "  {:<34} {:>12} {:>12} {:>8}  clock: detail",
        "phase", "at ms", "end ms", "± ms"
    );
    for phase in &timeline.phases {
        let _ = writeln!(
            out,
            "  {:<34} {:>12} {:>12} {:>8}  {}: {}",
            phase.phase,
            ms(phase.at_ms),
            phase
                .end_ms
                .map_or(String::new(), |end| format!("{end:.3}")),
            ms(phase.uncertainty_ms),
            phase.clock,
            phase.detail
        );
    }
    if let Some(paused) = timeline.devices_paused_ms {
        let _ = writeln!(
            out,
            "no ring of the VM ran for {paused:.3} ms (source's first GET_VRING_BASE to the destination's rings running)"
        );
    }
    let _ = writeln!(out, "devices:");
    for device in &timeline.devices {
        let _ = writeln!(out, "{}", device_line(device));
    }
    let qemu = &timeline.qemu;
    let number = |value: Option<u64>| value.map_or_else(|| "-".to_string(), |v| v.to_string());
    let _ = writeln!(
        out,
        "QEMU: {}, downtime {} ms, total time {} ms, setup {} ms",
        qemu.status.as_deref().unwrap_or("?"),
        number(qemu.downtime_ms),
        number(qemu.total_time_ms),
        number(qemu.setup_time_ms)
    );
    for note in &timeline.notes {
        let _ = writeln!(out, "note: {note}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_one_op_are_counted() {
        let list: Vec<String> = ["create_queue", "create_queue", "set_mtu", "create_queue"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(ops(&list), "create_queue x2, set_mtu, create_queue");
        assert_eq!(ops(&[]), "none");
    }
}
