//! `target/bench/boot.svg`: the boot comparison (median bars with min–max whiskers per boot
//! phase, katalite beside QEMU microvm) and the parallel-start curve, drawn with plotters'
//! SVG backend (text becomes SVG `<text>`, so no fonts are needed).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::stats::Stats;

/// Per VMM, start to init / workload / exit.
pub struct BootSeries {
    /// Legend name.
    pub name: String,
    /// The three phases, in that order.
    pub phases: [Stats; 3],
}

/// What the chart shows.
pub struct ChartData {
    /// One entry per VMM (katalite first).
    pub boot: Vec<BootSeries>,
    /// `(VMs started at once, wall time)`.
    pub parallel: Vec<(u32, Stats)>,
    /// Subtitle: date and the lab caveat.
    pub caption: String,
}

const PHASES: [&str; 3] = ["start → init", "start → workload", "start → exit"];
const COLORS: [RGBColor; 2] = [RGBColor(0x1f, 0x77, 0xb4), RGBColor(0xff, 0x7f, 0x0e)];
const WIDTH: u32 = 1000;
const HEIGHT: u32 = 440;

/// Writes the chart as SVG to `path`.
pub fn write(data: &ChartData, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    draw(data, &root)?;
    root.present()
        .map_err(|err| anyhow!("cannot write the chart: {err}"))
}

/// Renders the chart as an SVG document.
#[cfg(test)]
fn to_string(data: &ChartData) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        draw(data, &root)?;
        root.present().map_err(|err| anyhow!("{err}"))?;
    }
    Ok(svg)
}

fn draw<DB: DrawingBackend>(
    data: &ChartData,
    root: &DrawingArea<DB, plotters::coord::Shift>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("cannot draw the chart: {e}");
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled("katalite vs QEMU microvm", ("sans-serif", 22))
        .map_err(err)?;
    let (body, footer) = root.split_vertically(HEIGHT - 60);
    footer
        .draw(&Text::new(
            data.caption.clone(),
            (10, 10),
            ("sans-serif", 13).into_font().color(&BLACK.mix(0.7)),
        ))
        .map_err(err)?;
    let (left, right) = body.split_horizontally(WIDTH * 3 / 5);
    draw_boot(data, &left).map_err(err)?;
    draw_parallel(data, &right).map_err(err)?;
    Ok(())
}

fn draw_boot<DB: DrawingBackend>(
    data: &ChartData,
    area: &DrawingArea<DB, plotters::coord::Shift>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let top = data
        .boot
        .iter()
        .flat_map(|series| series.phases.iter().map(|s| s.max))
        .fold(1.0, f64::max)
        / 1000.0
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Boot of busybox `true` (median, min–max)",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5..PHASES.len() as f64 - 0.5, 0.0..top)?;
    // Phase i is centred on x = i, so the mesh's key points 0, 1, 2 carry the names.
    let label = |x: &f64| {
        PHASES
            .iter()
            .enumerate()
            .find(|(index, _)| (*x - *index as f64).abs() < 1e-9)
            .map_or(String::new(), |(_, name)| name.to_string())
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(PHASES.len())
        .x_label_formatter(&label)
        .x_label_style(("sans-serif", 13))
        .y_desc("seconds")
        .draw()?;
    let count = data.boot.len().max(1) as f64;
    let width = 0.8 / count;
    for (index, series) in data.boot.iter().enumerate() {
        let color = COLORS[index % COLORS.len()];
        let left = |phase: usize| phase as f64 - 0.4 + index as f64 * width;
        chart
            .draw_series(series.phases.iter().enumerate().map(|(phase, stats)| {
                Rectangle::new(
                    [
                        (left(phase), 0.0),
                        (left(phase) + width * 0.9, stats.median / 1000.0),
                    ],
                    color.filled(),
                )
            }))?
            .label(series.name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        chart.draw_series(series.phases.iter().enumerate().map(|(phase, stats)| {
            let x = left(phase) + width * 0.45;
            PathElement::new(
                vec![(x, stats.min / 1000.0), (x, stats.max / 1000.0)],
                BLACK.stroke_width(2),
            )
        }))?;
        chart.draw_series(series.phases.iter().enumerate().map(|(phase, stats)| {
            Text::new(
                format!("{:.2}", stats.median / 1000.0),
                (left(phase), stats.median / 1000.0 + top * 0.03),
                ("sans-serif", 11),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
}

fn draw_parallel<DB: DrawingBackend>(
    data: &ChartData,
    area: &DrawingArea<DB, plotters::coord::Shift>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let max_vms = data.parallel.iter().map(|(n, _)| *n).max().unwrap_or(1);
    let top = data.parallel.iter().map(|(_, s)| s.max).fold(1.0, f64::max) / 1000.0 * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption("VMs started at once → all exited", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0u32..max_vms + 1, 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("VMs (katalite, 64 MiB each)")
        .y_desc("seconds")
        .draw()?;
    let color = COLORS[0];
    let points: Vec<(u32, f64)> = data
        .parallel
        .iter()
        .map(|(n, s)| (*n, s.median / 1000.0))
        .collect();
    chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?;
    chart.draw_series(
        points
            .iter()
            .map(|&point| Circle::new(point, 4, color.filled())),
    )?;
    chart.draw_series(data.parallel.iter().map(|(n, s)| {
        PathElement::new(
            vec![(*n, s.min / 1000.0), (*n, s.max / 1000.0)],
            BLACK.stroke_width(1),
        )
    }))?;
    // Labels sit up and to the right of their points, clear of the marker and whisker.
    chart.draw_series(points.iter().map(|&(n, secs)| {
        EmptyElement::at((n, secs))
            + Text::new(format!("{secs:.1} s"), (7, -16), ("sans-serif", 11))
    }))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(median: f64) -> Stats {
        Stats::of(&[median * 0.9, median, median * 1.2]).expect("stats")
    }

    #[test]
    fn the_svg_shows_both_vmms_every_phase_and_the_parallel_curve() {
        let data = ChartData {
            boot: vec![
                BootSeries {
                    name: "katalite".into(),
                    phases: [stats(900.0), stats(1000.0), stats(1200.0)],
                },
                BootSeries {
                    name: "QEMU microvm".into(),
                    phases: [stats(1900.0), stats(2000.0), stats(2300.0)],
                },
            ],
            parallel: vec![(1, stats(1500.0)), (4, stats(3000.0)), (16, stats(9000.0))],
            caption: "2026-01-01, lab (emulated)".into(),
        };
        let svg = to_string(&data).expect("svg");
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        for text in [
            "katalite",
            "QEMU microvm",
            "start → init",
            "start → exit",
            "2026-01-01, lab (emulated)",
            "1.20",
            "9.0 s",
        ] {
            assert!(svg.contains(text), "missing {text:?}");
        }
        // Six bars, one per VMM and phase (legend swatches are rects too).
        assert!(svg.matches("<rect").count() >= 6);
    }
}
