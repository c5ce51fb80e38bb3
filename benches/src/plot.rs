//! `--plot FILE.svg`: a bar chart of one figure per method or tool, drawn with plotters' SVG
//! backend.

use std::path::Path;

use plotters::prelude::*;

use crate::{BenchError, Result};

/// Draws a bar chart of `bars` (label, value; values must be positive) to the SVG file
/// `path`. The y axis is logarithmic when the largest value is over 20 times the smallest,
/// so that microseconds and seconds fit on one chart.
pub fn bar_chart(path: &Path, title: &str, y_label: &str, bars: &[(String, f64)]) -> Result<()> {
    let fail = |message: String| BenchError::Plot {
        path: path.to_owned(),
        message,
    };
    let bars: Vec<&(String, f64)> = bars.iter().filter(|(_, v)| *v > 0.0).collect();
    if bars.is_empty() {
        return Err(fail("nothing to plot: no method was measured".into()));
    }
    let max = bars.iter().map(|(_, v)| *v).fold(f64::MIN, f64::max);
    let min = bars.iter().map(|(_, v)| *v).fold(f64::MAX, f64::min);
    let width = 160 + 120 * bars.len() as u32;
    let root = SVGBackend::new(path, (width.max(480), 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let labels: Vec<String> = bars.iter().map(|(l, _)| l.clone()).collect();
    let x_range = (0..bars.len() as i32).into_segmented();
    let x_label_of = |x: &SegmentValue<i32>| match x {
        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
            labels.get(*i as usize).cloned().unwrap_or_default()
        }
        SegmentValue::Last => String::new(),
    };
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80);
    let color = |i: usize| Palette99::pick(i).filled();
    if max / min > 20.0 {
        let mut chart = builder
            .build_cartesian_2d(x_range, (min / 2.0..max * 2.0).log_scale())
            .map_err(|e| fail(e.to_string()))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&x_label_of)
            .y_desc(format!("{y_label} (log scale)"))
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
                let i = i as i32;
                bar(
                    (SegmentValue::Exact(i), min / 2.0),
                    (SegmentValue::Exact(i + 1), *v),
                    color(i as usize),
                )
            }))
            .map_err(|e| fail(e.to_string()))?;
    } else {
        let mut chart = builder
            .build_cartesian_2d(x_range, 0.0..max * 1.1)
            .map_err(|e| fail(e.to_string()))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&x_label_of)
            .y_desc(y_label)
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
                let i = i as i32;
                bar(
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), *v),
                    color(i as usize),
                )
            }))
            .map_err(|e| fail(e.to_string()))?;
    }
    root.present().map_err(|e| fail(e.to_string()))?;
    Ok(())
}

/// One bar: a filled rectangle between two corners, with a gap on each side.
fn bar<X, Y>(corner: (X, Y), opposite: (X, Y), style: ShapeStyle) -> Rectangle<(X, Y)> {
    let mut rect = Rectangle::new([corner, opposite], style);
    rect.set_margin(0, 0, 12, 12);
    rect
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_an_svg_naming_every_bar_and_refuses_an_empty_chart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.svg");
        let bars = vec![
            ("native-qcow2".to_owned(), 50.0),
            ("qemu-img".to_owned(), 7000.0),
        ];
        bar_chart(&path, "clone time", "median µs", &bars).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(100)]);
        assert!(svg.contains("native-qcow2") && svg.contains("qemu-img"));
        assert!(svg.contains("log scale"));
        let err = bar_chart(&path, "t", "y", &[("x".into(), 0.0)]).unwrap_err();
        assert!(matches!(err, BenchError::Plot { .. }));
    }
}
