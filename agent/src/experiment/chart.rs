//! SVG grouped bar charts of the experiment's medians (plotters, SVG
//! backend only): start critical path without versus with presetup, and
//! source stop time drain versus suspend. The y axis is logarithmic: the
//! figures span four decades (a 320 ms full start next to a 0.3 ms
//! presetup one), and a linear axis would show the small bars as nothing.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::net::memory_label;
use super::report::{blk_pairs, format_ms, net_pairs, Summary};
use super::Scenario;

/// One group of bars: a label under the x axis and one value per series
/// (`None` for a failed scenario: no bar).
#[derive(Clone, Debug)]
pub struct BarGroup {
    /// Label under the group.
    pub label: String,
    /// One value per series, in series order.
    pub values: Vec<Option<f64>>,
}

/// A grouped bar chart.
#[derive(Clone, Debug)]
pub struct BarChart {
    /// Title above the plot.
    pub title: String,
    /// The y axis' description (with its unit).
    pub y_label: String,
    /// The x axis' description.
    pub x_label: String,
    /// Series names (the legend), one bar per group each.
    pub series: Vec<String>,
    /// The groups, left to right.
    pub groups: Vec<BarGroup>,
}

/// Width of one group on the x axis, in coordinate units.
const GROUP: i32 = 1000;

/// Bar colours by series.
const COLORS: [RGBColor; 4] = [
    RGBColor(204, 85, 61),
    RGBColor(52, 120, 190),
    RGBColor(90, 160, 90),
    RGBColor(150, 110, 180),
];

/// The power of ten at or below `value` (positive).
fn decade_floor(value: f64) -> f64 {
    10f64.powf(value.log10().floor())
}

/// The power of ten at or above `value` (positive).
fn decade_ceil(value: f64) -> f64 {
    10f64.powf(value.log10().ceil())
}

/// An axis tick: `0.01`, `0.1`, `1`, `10`, `100`.
fn tick_label(value: f64) -> String {
    if value >= 1.0 {
        format!("{value:.0}")
    } else {
        let text = format!("{value:.6}");
        text.trim_end_matches('0').to_string()
    }
}

/// Draw `chart` into the SVG file `path`.
pub fn render_svg(chart: &BarChart, path: &Path) -> Result<(), String> {
    let values: Vec<f64> = chart
        .groups
        .iter()
        .flat_map(|g| g.values.iter().flatten().copied())
        .filter(|v| *v > 0.0)
        .collect();
    if values.is_empty() {
        return Err(format!("{}: nothing to draw", chart.title));
    }
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(0.0, f64::max);
    // Just below a decade, so that decade gets its tick label.
    let y_min = decade_floor(min / 2.0) * 0.8;
    let y_max = decade_ceil(max * 4.0);

    let groups = chart.groups.len();
    let width = (960).max(150 * groups as u32);
    let root = SVGBackend::new(path, (width, 540)).into_drawing_area();
    let error = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| error(&e))?;
    // Integer x: each group is GROUP units wide (float ranges do not take
    // custom key points with label formatters in plotters).
    let centers: Vec<i32> = (0..groups as i32).map(|g| g * GROUP + GROUP / 2).collect();
    let mut plot = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(72)
        .build_cartesian_2d(
            (0..groups as i32 * GROUP).with_key_points(centers),
            (y_min..y_max).log_scale(),
        )
        .map_err(|e| error(&e))?;
    let group_label = |x: &i32| {
        chart
            .groups
            .get(usize::try_from(x / GROUP).unwrap_or(usize::MAX))
            .map(|g| g.label.clone())
            .unwrap_or_default()
    };
    plot.configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&group_label)
        .y_label_formatter(&|y| tick_label(*y))
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| error(&e))?;

    let series = chart.series.len().max(1) as i32;
    // A margin of 15% on both sides of a group, its bars between.
    let bar_width = GROUP * 7 / 10 / series;
    let bar_x =
        |group: usize, s: usize| group as i32 * GROUP + GROUP * 15 / 100 + s as i32 * bar_width;
    let value_style = TextStyle::from(("sans-serif", 12).into_font())
        .pos(Pos::new(HPos::Center, VPos::Bottom))
        .color(&BLACK);
    for (s, name) in chart.series.iter().enumerate() {
        let color = COLORS[s % COLORS.len()];
        let bars = chart.groups.iter().enumerate().filter_map(|(g, group)| {
            let value = (*group.values.get(s)?)?;
            let x0 = bar_x(g, s);
            Some(Rectangle::new(
                [(x0, y_min), (x0 + bar_width * 9 / 10, value.max(y_min))],
                color.filled(),
            ))
        });
        plot.draw_series(bars)
            .map_err(|e| error(&e))?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        let labels = chart.groups.iter().enumerate().filter_map(|(g, group)| {
            let value = (*group.values.get(s)?)?;
            let x = bar_x(g, s) + bar_width * 9 / 20;
            Some(Text::new(
                format_ms(Some(value)),
                (x, value.max(y_min) * 1.08),
                value_style.clone(),
            ))
        });
        plot.draw_series(labels).map_err(|e| error(&e))?;
    }
    plot.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| error(&e))?;
    root.present().map_err(|e| error(&e))?;
    Ok(())
}

/// Whether the net summaries use more than one profile (then group labels
/// name it).
fn several_profiles(summaries: &[Summary]) -> bool {
    let mut names = summaries.iter().filter_map(|s| match &s.scenario {
        Scenario::Net(net) => Some(&net.profile_name),
        Scenario::Blk(_) => None,
    });
    let first = names.next();
    names.any(|name| Some(name) != first)
}

/// Chart (a): start critical path without versus with presetup, per
/// profile, queue pairs and guest RAM. `None` without net results.
pub fn presetup_chart(summaries: &[Summary]) -> Option<BarChart> {
    let pairs = net_pairs(summaries);
    let several = several_profiles(summaries);
    let mut profiles: Vec<String> = Vec::new();
    let groups: Vec<BarGroup> = pairs
        .iter()
        .filter_map(|(without, with)| {
            let Scenario::Net(net) = &without.scenario else {
                return None;
            };
            if !profiles.contains(&net.profile_name) {
                profiles.push(net.profile_name.clone());
            }
            let mut label = format!("{} qp, {}", net.queue_pairs, memory_label(net.memory_mib));
            if several {
                label = format!("{} {label}", net.profile_name);
            }
            Some(BarGroup {
                label,
                values: vec![without.critical_path_ms, with.critical_path_ms],
            })
        })
        .collect();
    if groups.is_empty() {
        return None;
    }
    Some(BarChart {
        title: format!(
            "dev_conf / start critical path without vs with presetup (sim profile {})",
            profiles.join(", ")
        ),
        y_label: "agent start critical path, ms (log scale)".to_string(),
        x_label: "queue pairs, guest RAM".to_string(),
        series: vec!["without presetup".to_string(), "with presetup".to_string()],
        groups,
    })
}

/// Chart (b): source stop time, drain versus suspend, per in-flight count
/// and storage latency. `None` without blk results.
pub fn blk_stop_chart(summaries: &[Summary]) -> Option<BarChart> {
    let groups: Vec<BarGroup> = blk_pairs(summaries)
        .iter()
        .filter_map(|(drain, suspend)| {
            let Scenario::Blk(blk) = &drain.scenario else {
                return None;
            };
            Some(BarGroup {
                label: format!("{} in flight, {} ms", blk.in_flight, blk.latency_ms),
                values: vec![drain.stop_ms, suspend.stop_ms],
            })
        })
        .collect();
    if groups.is_empty() {
        return None;
    }
    Some(BarChart {
        title: "blk source stop (GET_VRING_BASE send to reply): drain vs suspend".to_string(),
        y_label: "stop time, ms (log scale)".to_string(),
        x_label: "requests in flight, storage latency".to_string(),
        series: vec![
            "drain (GET_VRING_BASE)".to_string(),
            "suspend (GET_VRING_BASE_INFLIGHT)".to_string(),
        ],
        groups,
    })
}
