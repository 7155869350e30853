//! Line charts as SVG, written by hand: the benchmarks' plots need axes (linear or log), a few
//! series with points, dashed variants and a legend — not a plotting crate.

use std::fmt::Write as _;

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub dashed: bool,
    /// (x, y) points; non-positive values are skipped on a log axis.
    pub points: Vec<(f64, f64)>,
}

/// One panel.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_log: bool,
    pub y_log: bool,
    pub series: Vec<Series>,
}

const PANEL_W: f64 = 560.0;
/// Height of the plot area.
const PLOT_H: f64 = 260.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 44.0;
/// Room for the x axis label, above the legend.
const AXIS_LABEL: f64 = 52.0;
const LEGEND_ROW: f64 = 18.0;

/// The panels side by side, under a caption line.
pub fn render(caption: &str, charts: &[Chart]) -> String {
    let width = PANEL_W * charts.len().max(1) as f64;
    let rows = charts.iter().map(|c| c.series.len()).max().unwrap_or(0) as f64;
    let height = 24.0 + TOP + PLOT_H + AXIS_LABEL + rows * LEGEND_ROW + 8.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{width}" height="{height}" fill="white"/>"#);
    let _ = writeln!(out, r##"<text x="8" y="16" font-size="11" fill="#555">{}</text>"##, escape(caption));
    for (i, chart) in charts.iter().enumerate() {
        let _ = writeln!(out, r#"<g transform="translate({},24)">"#, PANEL_W * i as f64);
        panel(&mut out, chart);
        out.push_str("</g>\n");
    }
    out.push_str("</svg>\n");
    out
}

/// A mapping from data to pixels along one axis.
struct Axis {
    log: bool,
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Axis {
    fn new(values: impl Iterator<Item = f64>, log: bool) -> Self {
        let values: Vec<f64> = values.filter(|v| v.is_finite() && (!log || *v > 0.0)).collect();
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if values.is_empty() {
            return Self { log, lo: if log { 1.0 } else { 0.0 }, hi: 10.0, ticks: vec![] };
        }
        if log {
            let lo = 10f64.powf(min.log10().floor());
            let mut hi = 10f64.powf(max.log10().ceil());
            if hi <= lo {
                hi = lo * 10.0;
            }
            let mut ticks = Vec::new();
            let mut t = lo;
            while t <= hi * 1.0001 && ticks.len() < 20 {
                ticks.push(t);
                t *= 10.0;
            }
            Self { log, lo, hi, ticks }
        } else {
            let hi = nice_ceiling(max.max(0.0));
            let step = hi / 5.0;
            let ticks = (0..=5).map(|i| step * f64::from(i)).collect();
            Self { log, lo: 0.0, hi, ticks }
        }
    }

    /// 0..1 along the axis.
    fn frac(&self, v: f64) -> f64 {
        if self.log {
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }

    fn usable(&self, v: f64) -> bool {
        v.is_finite() && (!self.log || v > 0.0)
    }
}

/// The smallest of 1, 2, 2.5, 5 × 10^k at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * magnitude >= v * 0.999_999 {
            return m * magnitude;
        }
    }
    10.0 * magnitude
}

/// Tick labels: 1, 10, 100, 1k, 10k; fractions keep their digits.
pub fn short_number(v: f64) -> String {
    let abs = v.abs();
    if abs >= 1e6 && (v / 1e6).fract() == 0.0 {
        format!("{}M", v / 1e6)
    } else if abs >= 1e3 && (v / 1e3).fract() == 0.0 {
        format!("{}k", v / 1e3)
    } else if v.fract() == 0.0 {
        format!("{v}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

fn panel(out: &mut String, chart: &Chart) {
    let plot_w = PANEL_W - LEFT - RIGHT;
    let plot_h = PLOT_H;
    let xs = Axis::new(chart.series.iter().flat_map(|s| s.points.iter().map(|p| p.0)), chart.x_log);
    let ys = Axis::new(chart.series.iter().flat_map(|s| s.points.iter().map(|p| p.1)), chart.y_log);
    let px = |v: f64| LEFT + xs.frac(v) * plot_w;
    let py = |v: f64| TOP + plot_h - ys.frac(v) * plot_h;

    let _ = writeln!(
        out,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
        PANEL_W / 2.0,
        escape(&chart.title)
    );
    // Grid and ticks.
    for &t in &ys.ticks {
        let y = py(t);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e3e3e3"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0,
            short_number(t)
        );
    }
    for &t in &xs.ticks {
        let x = px(t);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#e3e3e3"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 16.0,
            short_number(t)
        );
    }
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>"##
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + plot_w / 2.0,
        TOP + plot_h + 34.0,
        escape(&chart.x_label)
    );
    let _ = writeln!(
        out,
        r#"<text transform="translate(16,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + plot_h / 2.0,
        escape(&chart.y_label)
    );

    for s in &chart.series {
        let points: Vec<(f64, f64)> =
            s.points.iter().copied().filter(|&(x, y)| xs.usable(x) && ys.usable(y)).collect();
        let dash = if s.dashed { r#" stroke-dasharray="6 4""# } else { "" };
        if points.len() > 1 {
            let path: Vec<String> =
                points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
            let _ = writeln!(
                out,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
                path.join(" "),
                s.color
            );
        }
        for &(x, y) in &points {
            let _ =
                writeln!(out, r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{}"/>"#, px(x), py(y), s.color);
        }
    }

    // Legend: one line per series under the x label.
    let legend_top = TOP + plot_h + AXIS_LABEL;
    for (i, s) in chart.series.iter().enumerate() {
        let x = LEFT;
        let y = legend_top + i as f64 * LEGEND_ROW;
        let dash = if s.dashed { r#" stroke-dasharray="6 4""# } else { "" };
        let _ = writeln!(
            out,
            r#"<line x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            x + 26.0,
            s.color,
            x + 32.0,
            y + 4.0,
            escape(&s.name)
        );
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_axis_should_span_whole_decades() {
        let axis = Axis::new([3.0, 420.0].into_iter(), true);
        assert_eq!((axis.lo, axis.hi), (1.0, 1000.0));
        assert_eq!(axis.ticks, vec![1.0, 10.0, 100.0, 1000.0]);
        assert!((axis.frac(10.0) - 1.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn linear_axis_should_end_on_a_nice_number() {
        let axis = Axis::new([12.0, 87.0].into_iter(), false);
        assert_eq!((axis.lo, axis.hi), (0.0, 100.0));
        assert_eq!(axis.ticks.len(), 6);
    }

    #[test]
    fn short_numbers_should_read_like_axis_labels() {
        assert_eq!(short_number(10_000.0), "10k");
        assert_eq!(short_number(1.0), "1");
        assert_eq!(short_number(0.1), "0.1");
        assert_eq!(short_number(2_000_000.0), "2M");
    }

    #[test]
    fn render_should_draw_every_series_and_escape_text() {
        let chart = Chart {
            title: "a < b".into(),
            x_label: "services".into(),
            y_label: "ms".into(),
            x_log: true,
            y_log: true,
            series: vec![Series {
                name: "ferry".into(),
                color: "#000",
                dashed: true,
                points: vec![(1.0, 2.0), (1000.0, 30.0), (10_000.0, 0.0)],
            }],
        };
        let svg = render("caption & more", &[chart]);
        assert!(svg.contains("a &lt; b") && svg.contains("caption &amp; more"));
        assert_eq!(svg.matches("<circle").count(), 2, "the zero on a log axis is skipped");
        assert!(svg.contains("stroke-dasharray"));
    }
}
