//! The HTML report: one self-contained page (no scripts, no network) with
//! SVG charts (throughput, latency and goodput against load, latency
//! distributions) and the tables, one column per target.

use std::fmt::Write;

use crate::load::Load;
use crate::report::{LevelReport, Report};

const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];
const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 340.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 48.0;

/// Escapes text for HTML and SVG.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A line chart: one polyline (with markers) per series.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let points = series.iter().flat_map(|s| s.1.iter());
    let (mut x_max, mut y_max) = (0f64, 0f64);
    let mut x_min = f64::INFINITY;
    for &(x, y) in points {
        x_max = x_max.max(x);
        x_min = x_min.min(x);
        y_max = y_max.max(y);
    }
    if !x_min.is_finite() {
        x_min = 0.0;
    }
    let x_min = x_min.min(0.0);
    let x_max = if x_max > x_min { x_max } else { x_min + 1.0 };
    let y_max = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let sx = |x: f64| LEFT + (x - x_min) / (x_max - x_min) * plot_w;
    let sy = |y: f64| TOP + plot_h - y / y_max * plot_h;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        svg,
        r#"<text x="{}" y="20" font-size="13" font-weight="bold">{}</text>"#,
        LEFT,
        escape(title)
    );
    let _ = write!(
        svg,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#999\"/>"
    );
    for i in 0..=4 {
        let fx = i as f64 / 4.0;
        let (x, y) = (x_min + fx * (x_max - x_min), fx * y_max);
        let _ = write!(
            svg,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y0}\" y2=\"{y0}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            LEFT + plot_w,
            LEFT - 4.0,
            sy(y) + 4.0,
            tick(y),
            y0 = sy(y),
        );
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            sx(x),
            TOP + plot_h + 16.0,
            tick(x)
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 8.0,
        escape(x_label)
    );
    let _ = write!(
        svg,
        r#"<text x="14" y="{}" text-anchor="middle" transform="rotate(-90 14 {})">{}</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        escape(y_label)
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        if pts.len() <= 64 {
            for &(x, y) in pts {
                let _ = write!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                    sx(x),
                    sy(y)
                );
            }
        }
        let ly = TOP + 12.0 + i as f64 * 16.0;
        let _ = write!(
            svg,
            r#"<rect x="{}" y="{}" width="12" height="3" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
            WIDTH - RIGHT + 10.0,
            ly - 4.0,
            WIDTH - RIGHT + 26.0,
            ly,
            escape(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

fn tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Cumulative distribution points of `values`.
fn cdf(values: &[f64]) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    v.iter()
        .enumerate()
        .map(|(i, &x)| (x, (i + 1) as f64 / n))
        .collect()
}

/// Reads one figure of a level.
type Pick = fn(&LevelReport) -> f64;
/// A chart: title, unit, and the series (label suffix and figure).
type ChartSpec = (&'static str, &'static str, Vec<(String, Pick)>);
/// A load mode: its axis label and which levels belong to it.
type Mode = (&'static str, fn(&Load) -> bool);

/// The page.
pub fn render(report: &Report) -> String {
    let mut body = String::new();
    let modes: [Mode; 2] = [
        ("concurrency", |l| matches!(l, Load::Concurrency(_))),
        ("rate (requests/s)", |l| matches!(l, Load::Rate(_))),
    ];
    for (mode, is_mode) in modes {
        let levels: Vec<&LevelReport> = report.levels.iter().filter(|l| is_mode(&l.load)).collect();
        if levels.is_empty() {
            continue;
        }
        let _ = write!(
            body,
            "<h2>Load by {}</h2><div class=\"charts\">",
            escape(mode)
        );
        let mut charts: Vec<ChartSpec> = vec![
            (
                "Output throughput",
                "tokens/s",
                vec![("".into(), |l| l.output_throughput)],
            ),
            (
                "Time to first token",
                "ms",
                vec![
                    (" p50".into(), |l| l.ttft_s.p50 * 1e3),
                    (" p99".into(), |l| l.ttft_s.p99 * 1e3),
                ],
            ),
            (
                "Time per output token",
                "ms",
                vec![
                    (" p50".into(), |l| l.tpot_s.p50 * 1e3),
                    (" p99".into(), |l| l.tpot_s.p99 * 1e3),
                ],
            ),
            (
                "End-to-end latency p50",
                "s",
                vec![("".into(), |l| l.e2e_s.p50)],
            ),
        ];
        if report.slo.is_some() {
            charts.push((
                "Goodput",
                "requests/s",
                vec![("".into(), |l| {
                    l.goodput.as_ref().map_or(0.0, |g| g.requests_per_s)
                })],
            ));
        }
        if levels.iter().any(|l| l.energy.is_some()) {
            charts.push((
                "Energy per output token",
                "J/token",
                vec![("".into(), |l| {
                    l.energy.as_ref().map_or(0.0, |e| e.joules_per_output_token)
                })],
            ));
        }
        for (title, unit, picks) in charts {
            let mut series = Vec::new();
            for (t, target) in report.targets.iter().enumerate() {
                for (suffix, pick) in &picks {
                    let pts = levels
                        .iter()
                        .filter(|l| l.target == t)
                        .map(|l| (l.load.value(), pick(l)))
                        .collect();
                    series.push((format!("{}{suffix}", target.name), pts));
                }
            }
            body.push_str(&line_chart(title, mode, unit, &series));
        }
        // Distributions at each target's heaviest level.
        let mut ttft = Vec::new();
        let mut e2e = Vec::new();
        for (t, target) in report.targets.iter().enumerate() {
            if let Some(l) = levels
                .iter()
                .filter(|l| l.target == t)
                .max_by(|a, b| a.load.value().total_cmp(&b.load.value()))
            {
                let label = format!("{} @ {}", target.name, tick(l.load.value()));
                ttft.push((label.clone(), cdf(&l.samples.ttft_s)));
                e2e.push((label, cdf(&l.samples.e2e_s)));
            }
        }
        body.push_str(&line_chart(
            "TTFT distribution (heaviest level)",
            "seconds",
            "share of requests",
            &ttft,
        ));
        body.push_str(&line_chart(
            "End-to-end distribution (heaviest level)",
            "seconds",
            "share of requests",
            &e2e,
        ));
        body.push_str("</div>");
        body.push_str(&table(report, &levels));
    }
    format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>neocloud bench</title><style>{STYLE}</style></head><body><h1>neocloud bench</h1><p>Schema {}, seed {}, started at {} (Unix seconds). Targets: {}.</p><pre>{}</pre>{body}</body></html>\n",
        escape(&report.schema),
        report.seed,
        report.started_at,
        report
            .targets
            .iter()
            .map(|t| format!("<b>{}</b> {} ({})", escape(&t.name), escape(&t.base_url), escape(&t.model)))
            .collect::<Vec<_>>()
            .join(", "),
        escape(&serde_json::to_string_pretty(&report.settings).unwrap_or_default()),
    )
}

const STYLE: &str = "body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:12px 0 28px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th:first-child,td:first-child{text-align:left}.charts{display:flex;flex-wrap:wrap;gap:8px}";

fn table(report: &Report, levels: &[&LevelReport]) -> String {
    let mut values: Vec<f64> = levels.iter().map(|l| l.load.value()).collect();
    values.sort_by(f64::total_cmp);
    values.dedup();
    let mut out = String::new();
    let rows: [(&str, Pick); 13] = [
        ("completed", |l| l.completed as f64),
        ("errors", |l| l.errors.values().sum::<usize>() as f64),
        ("TTFT mean (ms)", |l| l.ttft_s.mean * 1e3),
        ("TTFT p50 (ms)", |l| l.ttft_s.p50 * 1e3),
        ("TTFT p90 (ms)", |l| l.ttft_s.p90 * 1e3),
        ("TTFT p99 (ms)", |l| l.ttft_s.p99 * 1e3),
        ("TPOT p50 (ms)", |l| l.tpot_s.p50 * 1e3),
        ("TPOT p99 (ms)", |l| l.tpot_s.p99 * 1e3),
        ("ITL p50 (ms)", |l| l.itl_s.p50 * 1e3),
        ("E2E p50 (s)", |l| l.e2e_s.p50),
        ("requests/s", |l| l.request_throughput),
        ("output tokens/s", |l| l.output_throughput),
        ("total tokens/s", |l| l.total_throughput),
    ];
    for v in values {
        let at: Vec<Option<&&LevelReport>> = (0..report.targets.len())
            .map(|t| levels.iter().find(|l| l.target == t && l.load.value() == v))
            .collect();
        let _ = write!(out, "<table><tr><th>load {}</th>", tick(v));
        for t in &report.targets {
            let _ = write!(out, "<th>{}</th>", escape(&t.name));
        }
        out.push_str("</tr>");
        for (name, pick) in rows {
            let _ = write!(out, "<tr><td>{name}</td>");
            for l in &at {
                let _ = write!(out, "<td>{}</td>", l.map_or("-".into(), |l| tick(pick(l))));
            }
            out.push_str("</tr>");
        }
        let _ = write!(out, "<tr><td>goodput (requests/s)</td>");
        for l in &at {
            let cell = l
                .and_then(|l| l.goodput.as_ref())
                .map_or("-".into(), |g| tick(g.requests_per_s));
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr><tr><td>energy (J/token)</td>");
        for l in &at {
            let cell = l.and_then(|l| l.energy.as_ref()).map_or("-".into(), |e| {
                format!(
                    "{}{}",
                    tick(e.joules_per_output_token),
                    if e.estimate { " (est.)" } else { "" }
                )
            });
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr></table>");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_with_escaped_labels() {
        let svg = line_chart(
            "t<1>",
            "x",
            "y",
            &[
                ("a&b".into(), vec![(1.0, 2.0), (2.0, 3.0)]),
                ("c".into(), vec![]),
            ],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("t&lt;1&gt;") && svg.contains("a&amp;b"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(cdf(&[3.0, 1.0]), vec![(1.0, 0.5), (3.0, 1.0)]);
    }
}
