//! SVG charts of the figures, written next to a scenario's JSON file.
//!
//! Drawn with `plotters` on its SVG backend only (no bitmap backend, no
//! system fonts: text stays SVG `<text>` that the browser lays out).
//! Each chart takes plain points, so that `all` and the single scenarios
//! draw the same chart from their reports.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::{http::HttpReport, scale::ScaleReport, storage::StorageReport};

/// Size of every chart, pixels.
const SIZE: (u32, u32) = (800, 480);
/// Font family of every text (the SVG viewer picks the face).
const FONT: &str = "sans-serif";

/// A chart could not be drawn or written.
#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    /// Nothing to draw.
    #[error("chart {path}: no points")]
    Empty {
        /// The chart's file.
        path: PathBuf,
    },
    /// plotters failed (laying out or writing the file).
    #[error("chart {path}: {message}")]
    Draw {
        /// The chart's file.
        path: PathBuf,
        /// What plotters said.
        message: String,
    },
}

/// One connection count of the HTTP claim load.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionPoint {
    /// Concurrent keep-alive connections.
    pub connections: usize,
    /// Claims per second.
    pub claims_per_s: f64,
    /// 99th percentile claim latency.
    pub p99_ms: f64,
}

/// One size of the `scale` scenario.
#[derive(Clone, Debug, PartialEq)]
pub struct DevicePoint {
    /// Provisioned devices.
    pub devices: usize,
    /// Median claim latency.
    pub p50_ms: f64,
    /// 99th percentile claim latency.
    pub p99_ms: f64,
}

/// One bar of the bytes-per-device chart.
#[derive(Clone, Debug, PartialEq)]
pub struct BytesBar {
    /// What the bar is (shown under it).
    pub label: String,
    /// Bytes per device, both sides together.
    pub bytes: f64,
}

/// `<dir>/<stem>-<name>.svg` for the JSON file `json`: the charts go next to
/// the figures they show.
pub fn path_beside(json: &Path, name: &str) -> PathBuf {
    let stem = json
        .file_stem()
        .map_or_else(|| "bench".into(), |s| s.to_string_lossy());
    json.with_file_name(format!("{stem}-{name}.svg"))
}

/// File name suffix of [`claims_vs_connections`].
pub const CLAIMS_VS_CONNECTIONS: &str = "claims-vs-connections";
/// File name suffix of [`p99_vs_devices`].
pub const P99_VS_DEVICES: &str = "p99-vs-devices";
/// File name suffix of [`bytes_per_device`].
pub const BYTES_PER_DEVICE: &str = "bytes-per-device";

/// The points of HTTP runs at several connection counts, in connection order.
pub fn connection_points(runs: &[HttpReport]) -> Vec<ConnectionPoint> {
    let mut points: Vec<_> = runs
        .iter()
        .map(|r| ConnectionPoint {
            connections: r.connections,
            claims_per_s: r.http_claims_per_s,
            p99_ms: r.http_p99_ms,
        })
        .collect();
    points.sort_by_key(|p| p.connections);
    points
}

/// The points of a `scale` run.
pub fn device_points(report: &ScaleReport) -> Vec<DevicePoint> {
    report
        .points
        .iter()
        .map(|p| DevicePoint {
            devices: p.devices,
            p50_ms: p.p50_ms,
            p99_ms: p.p99_ms,
        })
        .collect()
}

/// The three ways of holding keys of a `storage` run: on demand, an
/// uploaded pool (contacted device) and 50 uploaded keys.
pub fn bytes_bars(report: &StorageReport) -> Vec<BytesBar> {
    vec![
        BytesBar {
            label: "on demand (claims proxied)".to_owned(),
            bytes: report.bytes_per_device,
        },
        BytesBar {
            label: format!(
                "uploaded pool of {}, contacted device",
                report.pool.keys_per_device
            ),
            bytes: report.pool.total_bytes_per_device,
        },
        BytesBar {
            label: format!("{} uploaded keys", report.alternative.keys_per_device),
            bytes: report.alternative.total_bytes_per_device as f64,
        },
    ]
}

fn draw_error(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> ChartError + '_ {
    move |e| ChartError::Draw {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// A log axis range around `lo..=hi` with room on both sides.
fn log_span(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let (lo, hi) = (lo.max(1e-9), hi.max(lo.max(1e-9)));
    lo / 1.5..hi * 1.5
}

/// Top of a linear axis from 0 that shows `max` with room above.
fn top(max: f64) -> f64 {
    if max > 0.0 && max.is_finite() {
        max * 1.2
    } else {
        1.0
    }
}

/// Claims/s (left axis) and p99 latency (right axis) against connections
/// (log axis, one tick per count measured).
pub fn claims_vs_connections(path: &Path, points: &[ConnectionPoint]) -> Result<(), ChartError> {
    let fail = draw_error(path);
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return Err(ChartError::Empty {
            path: path.to_owned(),
        });
    };
    let ticks: Vec<f64> = points.iter().map(|p| p.connections as f64).collect();
    let span = log_span(first.connections as f64, last.connections as f64);
    let max_rate = points.iter().map(|p| p.claims_per_s).fold(0.0, f64::max);
    let max_p99 = points.iter().map(|p| p.p99_ms).fold(0.0, f64::max);

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("HTTP key claims against connections", (FONT, 22))
        .margin(16)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .right_y_label_area_size(70)
        .build_cartesian_2d(
            span.clone().log_scale().with_key_points(ticks.clone()),
            0f64..top(max_rate),
        )
        .map_err(|e| fail(&e))?
        .set_secondary_coord(span.log_scale().with_key_points(ticks), 0f64..top(max_p99));
    chart
        .configure_mesh()
        .x_desc("connections")
        .y_desc("claims/s")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(|e| fail(&e))?;
    chart
        .configure_secondary_axes()
        .y_desc("p99 latency (ms)")
        .draw()
        .map_err(|e| fail(&e))?;
    let rate: Vec<(f64, f64)> = points
        .iter()
        .map(|p| (p.connections as f64, p.claims_per_s))
        .collect();
    let p99: Vec<(f64, f64)> = points
        .iter()
        .map(|p| (p.connections as f64, p.p99_ms))
        .collect();
    chart
        .draw_series(LineSeries::new(rate.clone(), BLUE.stroke_width(2)))
        .map_err(|e| fail(&e))?
        .label("claims/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .draw_series(rate.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))
        .map_err(|e| fail(&e))?;
    chart
        .draw_secondary_series(LineSeries::new(p99.clone(), RED.stroke_width(2)))
        .map_err(|e| fail(&e))?
        .label("p99 latency (ms)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart
        .draw_secondary_series(p99.iter().map(|&p| Circle::new(p, 4, RED.filled())))
        .map_err(|e| fail(&e))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

/// p50 and p99 claim latency against provisioned devices (log axis), with
/// the `scale_ratio` goal drawn as `goal_ratio` x the smallest size's p99.
pub fn p99_vs_devices(
    path: &Path,
    points: &[DevicePoint],
    goal_ratio: f64,
) -> Result<(), ChartError> {
    let fail = draw_error(path);
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return Err(ChartError::Empty {
            path: path.to_owned(),
        });
    };
    let ticks: Vec<f64> = points.iter().map(|p| p.devices as f64).collect();
    let (lo, hi) = (first.devices as f64, last.devices as f64);
    let span = log_span(lo.min(hi), lo.max(hi));
    let goal = first.p99_ms * goal_ratio;
    let max = points.iter().map(|p| p.p99_ms).fold(goal, f64::max);

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Claim latency against provisioned devices (cold)",
            (FONT, 22),
        )
        .margin(16)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(
            span.clone().log_scale().with_key_points(ticks),
            0f64..top(max),
        )
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("provisioned devices")
        .y_desc("latency (ms)")
        .x_label_formatter(&|x| devices_label(*x))
        .draw()
        .map_err(|e| fail(&e))?;
    for (name, color, value) in [
        (
            "p99 latency (ms)",
            RED,
            (|p: &DevicePoint| p.p99_ms) as fn(&DevicePoint) -> f64,
        ),
        ("p50 latency (ms)", BLUE, |p: &DevicePoint| p.p50_ms),
    ] {
        let series: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.devices as f64, value(p)))
            .collect();
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(series.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|e| fail(&e))?;
    }
    chart
        .draw_series(DashedLineSeries::new(
            vec![(span.start, goal), (span.end, goal)],
            6,
            4,
            BLACK.stroke_width(1),
        ))
        .map_err(|e| fail(&e))?
        .label(format!(
            "goal: p99 <= {goal_ratio} x p99 at {}",
            devices_label(lo)
        ))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

/// `1k`, `100k`, `1M` (and plain numbers in between).
fn devices_label(devices: f64) -> String {
    let n = devices.round();
    if n >= 1e6 && (n / 1e6).fract() == 0.0 {
        format!("{}M", n / 1e6)
    } else if n >= 1e3 && (n / 1e3).fract() == 0.0 {
        format!("{}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

/// Bytes per device as bars, with the `bytes_per_device` goal as a dashed
/// line (`goal_bytes`).
pub fn bytes_per_device(path: &Path, bars: &[BytesBar], goal_bytes: f64) -> Result<(), ChartError> {
    let fail = draw_error(path);
    if bars.is_empty() {
        return Err(ChartError::Empty {
            path: path.to_owned(),
        });
    }
    let max = bars.iter().map(|b| b.bytes).fold(goal_bytes, f64::max);
    let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Storage per puppet device", (FONT, 22))
        .margin(16)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((0..bars.len()).into_segmented(), 0f64..top(max))
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("how the one-time keys are held")
        .y_desc("bytes per device (bridge + homeserver)")
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(|e| fail(&e))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), b.bytes),
                ],
                BLUE.mix(0.7).filled(),
            );
            bar.set_margin(0, 0, 40, 40);
            bar
        }))
        .map_err(|e| fail(&e))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            Text::new(
                format!("{:.0}", b.bytes),
                (SegmentValue::CenterOf(i), b.bytes + max * 0.06),
                (FONT, 15),
            )
        }))
        .map_err(|e| fail(&e))?;
    chart
        .draw_series(DashedLineSeries::new(
            vec![
                (SegmentValue::Exact(0), goal_bytes),
                (SegmentValue::Last, goal_bytes),
            ],
            6,
            4,
            RED.stroke_width(1),
        ))
        .map_err(|e| fail(&e))?
        .label(format!("goal: on demand <= {goal_bytes:.0} bytes"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The contents of the SVG's `<text>` elements, trimmed, unescaped.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                let (_, rest) = t.split_once('>')?;
                let (content, _) = rest.split_once("</text>")?;
                Some(
                    content
                        .trim()
                        .replace("&lt;", "<")
                        .replace("&gt;", ">")
                        .replace("&amp;", "&"),
                )
            })
            .collect()
    }

    fn assert_texts(path: &Path, expected: &[&str]) {
        let svg = std::fs::read_to_string(path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        let texts = texts(&svg);
        for text in expected {
            assert!(
                texts.iter().any(|t| t == text),
                "{text:?} missing from the chart's texts {texts:?}"
            );
        }
    }

    #[test]
    fn charts_go_next_to_the_json_with_its_stem() {
        assert_eq!(
            path_beside(
                Path::new("docs/bench-results/all-2026-12-06.json"),
                P99_VS_DEVICES
            ),
            Path::new("docs/bench-results/all-2026-12-06-p99-vs-devices.svg")
        );
    }

    #[test]
    fn device_counts_are_labelled_in_thousands_and_millions() {
        assert_eq!(devices_label(1_000.0), "1k");
        assert_eq!(devices_label(100_000.0), "100k");
        assert_eq!(devices_label(1_000_000.0), "1M");
        assert_eq!(devices_label(2_500.0), "2500");
        assert_eq!(devices_label(100.0), "100");
    }

    #[test]
    fn claims_chart_is_an_svg_with_both_series_and_axis_titles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r-claims-vs-connections.svg");
        let points: Vec<_> = [
            (1, 900.0, 1.5),
            (4, 3_100.0, 2.0),
            (16, 7_000.0, 4.0),
            (64, 8_800.0, 12.3),
        ]
        .into_iter()
        .map(|(connections, claims_per_s, p99_ms)| ConnectionPoint {
            connections,
            claims_per_s,
            p99_ms,
        })
        .collect();
        claims_vs_connections(&path, &points).unwrap();
        assert_texts(
            &path,
            &[
                "HTTP key claims against connections",
                "claims/s",
                "p99 latency (ms)",
                "connections",
                "64",
                "16",
            ],
        );
    }

    #[test]
    fn device_chart_labels_sizes_and_draws_the_goal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r-p99-vs-devices.svg");
        let points: Vec<_> = [
            (1_000, 2.8, 7.3),
            (100_000, 4.3, 12.3),
            (1_000_000, 4.0, 10.1),
        ]
        .into_iter()
        .map(|(devices, p50_ms, p99_ms)| DevicePoint {
            devices,
            p50_ms,
            p99_ms,
        })
        .collect();
        p99_vs_devices(&path, &points, 1.5).unwrap();
        assert_texts(
            &path,
            &[
                "provisioned devices",
                "p99 latency (ms)",
                "p50 latency (ms)",
                "1M",
                "100k",
                "goal: p99 <= 1.5 x p99 at 1k",
            ],
        );
    }

    #[test]
    fn bytes_chart_names_each_way_and_its_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r-bytes-per-device.svg");
        let bars = vec![
            BytesBar {
                label: "on demand".to_owned(),
                bytes: 785.0,
            },
            BytesBar {
                label: "50 uploaded keys".to_owned(),
                bytes: 24_235.0,
            },
        ];
        bytes_per_device(&path, &bars, 512.0).unwrap();
        assert_texts(
            &path,
            &[
                "on demand",
                "50 uploaded keys",
                "785",
                "24235",
                "bytes per device (bridge + homeserver)",
                "goal: on demand <= 512 bytes",
            ],
        );
    }

    #[test]
    fn no_points_is_an_error_not_an_empty_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.svg");
        assert!(matches!(
            claims_vs_connections(&path, &[]),
            Err(ChartError::Empty { .. })
        ));
        assert!(!path.exists());
    }
}
