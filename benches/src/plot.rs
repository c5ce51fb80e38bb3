//! `--plot FILE.svg`: bar charts drawn with plotters' SVG backend: one bar per method or tool
//! ([`bar_chart`]), or one group of bars per operation with one bar per tool
//! ([`grouped_bar_chart`]). Every bar carries its value as a label; the x axis has exactly one
//! slot per label. More than [`GROUPS_PER_ROW`] groups are drawn in rows, one under another,
//! on the same y scale.

use std::ops::Range;
use std::path::Path;

use plotters::coord::combinators::BindKeyPoints;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::{BenchError, Result};

/// Draws a bar chart of `bars` (label, value; bars whose value is not positive are left out)
/// to the SVG file `path`, each bar in its own colour with its value on top. The y axis is
/// logarithmic when the largest value is over 20 times the smallest, so that microseconds and
/// seconds fit on one chart.
pub fn bar_chart(path: &Path, title: &str, y_label: &str, bars: &[(String, f64)]) -> Result<()> {
    let bars: Vec<&(String, f64)> = bars.iter().filter(|(_, v)| *v > 0.0).collect();
    let labels: Vec<String> = bars.iter().map(|(l, _)| l.clone()).collect();
    let values: Vec<f64> = bars.iter().map(|(_, v)| *v).collect();
    draw(
        path,
        &Chart {
            title,
            y_label,
            groups: &labels,
            series: &[("", values)],
            value_label: &|v| format!("{v:.1}"),
        },
    )
}

/// Draws one group of bars per entry of `groups`, with one bar per series in each (series:
/// name, one value per group; a value that is not positive leaves its bar out, and a group
/// without any bar is left out with its slot), a legend naming the series, and each bar's value
/// written on it by `value_label`. The y axis is logarithmic when the values span more than 20×.
pub fn grouped_bar_chart(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[(&str, Vec<f64>)],
    value_label: &dyn Fn(f64) -> String,
) -> Result<()> {
    let drawn = |g: usize| {
        series
            .iter()
            .any(|(_, values)| values.get(g).is_some_and(|v| *v > 0.0 && v.is_finite()))
    };
    let kept: Vec<usize> = (0..groups.len()).filter(|&g| drawn(g)).collect();
    let groups: Vec<String> = kept.iter().map(|&g| groups[g].clone()).collect();
    let series: Vec<(&str, Vec<f64>)> = series
        .iter()
        .map(|(name, values)| {
            let values = kept
                .iter()
                .map(|&g| values.get(g).copied().unwrap_or(0.0))
                .collect();
            (*name, values)
        })
        .collect();
    draw(
        path,
        &Chart {
            title,
            y_label,
            groups: &groups,
            series: &series,
            value_label,
        },
    )
}

/// What to draw.
struct Chart<'a> {
    /// Drawn above the chart (above its first row).
    title: &'a str,
    y_label: &'a str,
    groups: &'a [String],
    /// (name, one value per group); a single series with an empty name gets one colour per
    /// bar and no legend.
    series: &'a [(&'a str, Vec<f64>)],
    value_label: &'a dyn Fn(f64) -> String,
}

/// At most this many groups side by side; more are laid out in rows of (nearly) equal length.
pub const GROUPS_PER_ROW: usize = 8;

/// The rows `groups` groups are laid out in: ranges of group indices, in order.
fn rows(groups: usize) -> Vec<Range<usize>> {
    let rows = groups.div_ceil(GROUPS_PER_ROW).max(1);
    let per_row = groups.div_ceil(rows);
    (0..rows)
        .map(|r| r * per_row..((r + 1) * per_row).min(groups))
        .filter(|r| !r.is_empty())
        .collect()
}

fn draw(path: &Path, chart: &Chart<'_>) -> Result<()> {
    let fail = |message: String| BenchError::Plot {
        path: path.to_owned(),
        message,
    };
    let values = || {
        chart
            .series
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .filter(|v| *v > 0.0 && v.is_finite())
    };
    if chart.groups.is_empty() || values().next().is_none() {
        return Err(fail("nothing to plot: no method was measured".into()));
    }
    let max = values().fold(f64::MIN, f64::max);
    let min = values().fold(f64::MAX, f64::min);
    let rows = rows(chart.groups.len());
    let columns = rows.iter().map(|r| r.len()).max().unwrap_or(1) as u32;
    let per_group = 40 + 70 * chart.series.len() as u32;
    let width = (120 + per_group * columns).max(480);
    let height = 40 + 420 * rows.len() as u32;
    let root = SVGBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let body = root
        .titled(chart.title, ("sans-serif", 20))
        .map_err(|e| fail(e.to_string()))?;
    for (area, range) in body.split_evenly((rows.len(), 1)).iter().zip(rows) {
        let series: Vec<(&str, Vec<f64>)> = chart
            .series
            .iter()
            .map(|(name, values)| {
                let part = range.clone().map(|g| values.get(g).copied().unwrap_or(0.0));
                (*name, part.collect())
            })
            .collect();
        let row = Chart {
            title: "",
            y_label: chart.y_label,
            groups: &chart.groups[range],
            series: &series,
            value_label: chart.value_label,
        };
        if max / min > 20.0 {
            let y = (min / 2.0..max * 3.0).log_scale();
            let y_label = format!("{} (log scale)", chart.y_label);
            draw_on(area, &row, y, min / 2.0, &y_label)
        } else {
            draw_on(area, &row, 0.0..max * 1.15, 0.0, chart.y_label)
        }
        .map_err(fail)?;
    }
    root.present().map_err(|e| fail(e.to_string()))?;
    Ok(())
}

/// Slot width on the x axis: group `i` spans `i × SLOT .. (i + 1) × SLOT`, its bars side by
/// side in the middle 80 %.
const SLOT: i32 = 100;

/// Draws the bars of one row on `root` with the y coordinate `y` (linear or logarithmic); bars
/// start at `floor`. The title is the caller's.
fn draw_on<Y>(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    chart: &Chart<'_>,
    y: Y,
    floor: f64,
    y_label: &str,
) -> std::result::Result<(), String>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let groups = chart.groups.len();
    let x: Range<i32> = 0..groups as i32 * SLOT;
    let x = x.with_key_points((0..groups as i32).map(|i| i * SLOT + SLOT / 2).collect());
    let mut plot = ChartBuilder::on(root)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(x, y)
        .map_err(|e| e.to_string())?;
    let names = chart.groups;
    plot.configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|x| {
            usize::try_from(x / SLOT)
                .ok()
                .and_then(|i| names.get(i))
                .cloned()
                .unwrap_or_default()
        })
        .y_label_formatter(&|v| (chart.value_label)(*v))
        .y_desc(y_label)
        .draw()
        .map_err(|e| e.to_string())?;

    let legend = chart.series.len() > 1 || !chart.series[0].0.is_empty();
    let width = SLOT * 8 / 10 / chart.series.len() as i32;
    let label_style = TextStyle::from(("sans-serif", 12)).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (s, (name, values)) in chart.series.iter().enumerate() {
        let colour = |g: usize| Palette99::pick(if legend { s } else { g }).filled();
        let bars: Vec<(usize, f64)> = values
            .iter()
            .copied()
            .enumerate()
            .filter(|(g, v)| *g < groups && *v > 0.0 && v.is_finite())
            .collect();
        let left = |g: usize| g as i32 * SLOT + SLOT / 10 + width * s as i32;
        let drawn = plot
            .draw_series(bars.iter().map(|&(g, v)| {
                let mut rect = Rectangle::new([(left(g), floor), (left(g) + width, v)], colour(g));
                rect.set_margin(0, 0, 2, 2);
                rect
            }))
            .map_err(|e| e.to_string())?;
        if legend {
            let style = colour(0);
            drawn
                .label(*name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], style));
        }
        plot.draw_series(bars.iter().map(|&(g, v)| {
            Text::new(
                (chart.value_label)(v),
                (left(g) + width / 2, v),
                label_style.clone(),
            )
        }))
        .map_err(|e| e.to_string())?;
    }
    if legend {
        plot.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text of every `<text>` element of an SVG, trimmed.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                let body = &t[t.find('>')? + 1..];
                Some(body[..body.find("</text>")?].trim().to_owned())
            })
            .collect()
    }

    #[test]
    fn draws_an_svg_naming_every_bar_with_its_value_and_refuses_an_empty_chart() {
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
        let texts = texts(&svg);
        assert!(
            texts.contains(&"50.0".to_owned()),
            "value labels: {texts:?}"
        );
        assert!(
            texts.contains(&"7000.0".to_owned()),
            "value labels: {texts:?}"
        );
        let err = bar_chart(&path, "t", "y", &[("x".into(), 0.0)]).unwrap_err();
        assert!(matches!(err, BenchError::Plot { .. }));
    }

    #[test]
    fn many_groups_are_laid_out_in_rows_of_nearly_equal_length() {
        assert_eq!(rows(3), vec![0..3]);
        assert_eq!(rows(GROUPS_PER_ROW), vec![0..GROUPS_PER_ROW]);
        assert_eq!(rows(9), vec![0..5, 5..9]);
        assert_eq!(rows(22), vec![0..8, 8..16, 16..22]);
        for n in 1..40 {
            let rows = rows(n);
            assert_eq!(rows.first().unwrap().start, 0);
            assert_eq!(rows.last().unwrap().end, n);
            assert!(rows.windows(2).all(|w| w[0].end == w[1].start));
            assert!(rows
                .iter()
                .all(|r| !r.is_empty() && r.len() <= GROUPS_PER_ROW));
        }

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("many.svg");
        let groups: Vec<String> = (0..22).map(|i| format!("op-{i}")).collect();
        let series = [
            ("cowclone", (1..=22).map(f64::from).collect()),
            ("qemu-img", (1..=22).map(|i| f64::from(i) * 100.0).collect()),
        ];
        grouped_bar_chart(&path, "many", "ms", &groups, &series, &|v| {
            format!("{v} ms")
        })
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let texts = texts(&svg);
        for text in groups
            .iter()
            .map(String::as_str)
            .chain(["22 ms", "2200 ms", "many"])
        {
            assert!(texts.iter().any(|t| t == text), "{text} missing");
        }
        assert_eq!(
            texts.iter().filter(|t| *t == "many").count(),
            1,
            "one title above the rows"
        );
        // Three rows of at most 8 slots: three times as tall as one row, 8 slots wide.
        let header = &svg[..svg.find('>').unwrap()];
        assert!(
            header.contains("height=\"1300\"") && header.contains("width=\"1560\""),
            "{header}"
        );
    }

    #[test]
    fn grouped_bars_have_a_legend_and_labels_and_skip_missing_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ops.svg");
        let groups = vec!["convert".to_owned(), "check".to_owned(), "map".to_owned()];
        let series = [
            ("cowclone", vec![1500.0, 0.0, 0.0]),
            ("qemu-img", vec![900.0, 0.0, 12.0]),
        ];
        grouped_bar_chart(&path, "ops", "ms", &groups, &series, &|v| format!("{v} ms")).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let texts = texts(&svg);
        for text in [
            "convert", "map", "cowclone", "qemu-img", "1500 ms", "12 ms", "900 ms",
        ] {
            assert!(
                texts.contains(&text.to_owned()),
                "{text} missing: {texts:?}"
            );
        }
        assert!(
            !texts.contains(&"0 ms".to_owned()),
            "no bar or label for a missing value"
        );
        assert!(
            !texts.contains(&"check".to_owned()),
            "no empty slot for a group without bars: {texts:?}"
        );
        // Two slots: the x axis is two groups wide (each slot is SLOT units).
        let labels: Vec<&String> = texts
            .iter()
            .filter(|t| *t == "convert" || *t == "map")
            .collect();
        assert_eq!(labels.len(), 2, "{texts:?}");
        // Three bars (one value is missing), each a filled rectangle of a series colour.
        let first = Palette99::pick(0).to_rgba();
        let fill = format!("fill=\"#{:02X}{:02X}{:02X}\"", first.0, first.1, first.2);
        assert_eq!(
            svg.matches(&fill).count(),
            1 + 1,
            "one cowclone bar + its legend mark"
        );
    }
}
