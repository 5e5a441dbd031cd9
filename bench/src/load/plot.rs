//! Latency plots: HDR percentile curves of several systems on one PNG chart.
//!
//! The x axis is the percentile on the usual HDR scale, `log10(1 / (1 - q))`, so 90%, 99%,
//! 99.9% and 99.99% are evenly spaced and the tail gets the room it deserves; the y axis is
//! latency in milliseconds on a log scale, so a 0.2 ms system and a 50 ms system fit on one
//! chart.

use hdrhistogram::Histogram;
use plotters::prelude::*;
use std::path::Path;

/// Points of a percentile curve: `(log10(1 / (1 - q)), latency in ms)`.
pub fn percentile_curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    // The last quantile is 1.0, which is infinitely far right; the curve ends at the
    // quantile of the last sample but one instead, and the max is drawn there.
    let x_max = (h.len() as f64).log10();
    let mut points: Vec<(f64, f64)> = h
        .iter_quantiles(5)
        .map(|v| {
            let q = v.quantile_iterated_to();
            let x = if q >= 1.0 {
                x_max
            } else {
                (1.0 / (1.0 - q)).log10().min(x_max)
            };
            (x, v.value_iterated_to() as f64 / 1000.0)
        })
        .collect();
    points.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    points
}

/// Draws the percentile curves of `series` (label, histogram) into a PNG at `path`.
pub fn percentile_chart(
    path: &Path,
    title: &str,
    series: &[(String, &Histogram<u64>)],
) -> anyhow::Result<()> {
    let curves: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(label, h)| (label.clone(), percentile_curve(h)))
        .filter(|(_, points)| !points.is_empty())
        .collect();
    anyhow::ensure!(!curves.is_empty(), "nothing to plot for {title}");
    let x_max = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|v| v.0))
        .fold(2.0, f64::max);
    let (y_min, y_max) = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|v| v.1))
        .fold((f64::MAX, 0.0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let y_range = (y_min.max(0.001) * 0.8)..(y_max.max(0.01) * 1.5);
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max.ceil(), y_range.log_scale())
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(x_max.ceil() as usize + 1)
        .x_label_formatter(&|x| percentile_label(*x))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()
        .map_err(plot_err)?;
    for (i, (label, points)) in curves.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(plot_err)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e}")
}

/// `0` → `0%`, `1` → `90%`, `2` → `99%`, `3` → `99.9%`, ...
fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let decimals = (x.round() as usize).saturating_sub(2);
    format!("{p:.decimals$}%")
}

#[cfg(test)]
mod tests {
    use super::*;

    // The axis labels read as percentiles, and a curve rises to its max at the right end.
    #[test]
    fn curve_and_labels() {
        assert_eq!(percentile_label(0.0), "0%");
        assert_eq!(percentile_label(2.0), "99%");
        assert_eq!(percentile_label(3.0), "99.9%");
        let mut h = crate::latency::histogram_us();
        for v in 1..=1000 {
            h.record(v).unwrap();
        }
        let points = percentile_curve(&h);
        assert!(points
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        let last = points.last().unwrap();
        assert!(
            (last.0 - 3.0).abs() < 1e-9 && (last.1 - 1.0).abs() < 0.01,
            "{last:?}"
        );
    }

    // A chart is written as a real PNG file.
    #[test]
    fn writes_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        let mut h = crate::latency::histogram_us();
        for v in [100, 200, 300, 5_000] {
            h.record(v).unwrap();
        }
        percentile_chart(&path, "test", &[("a".into(), &h)]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
    }
}
