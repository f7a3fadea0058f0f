//! `loadgen --plot`: a PNG of throughput on the wire and replication lag over time.
//!
//! Labels are drawn with a TrueType font read from the system at run time (plotters'
//! ab_glyph backend), which links no fontconfig or freetype.

use std::path::Path;

use anyhow::{Context, bail};
use plotters::prelude::*;

use crate::loadgen::Report;

/// Where Debian, Fedora and Arch put a sans-serif TrueType font.
const FONT_CANDIDATES: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
];

/// A font registered for the plot's labels; checked before the run, so a missing font
/// costs seconds, not a whole benchmark.
#[derive(Debug, Clone, Copy)]
pub struct PlotFont(());

pub fn load_font() -> anyhow::Result<PlotFont> {
    let Some(path) = FONT_CANDIDATES.iter().find(|p| Path::new(p).exists()) else {
        bail!(
            "--plot needs a TrueType font for its labels and found none of {}: \
             apt-get install fonts-dejavu-core",
            FONT_CANDIDATES.join(", ")
        );
    };
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    // Registered once for the life of the process, as plotters wants it.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path} is not a TrueType font plotters can read"))?;
    Ok(PlotFont(()))
}

/// Draws the report's throughput and lag series, one above the other, into a PNG.
pub fn draw(report: &Report, path: &Path, _font: PlotFont) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (top, bottom) = root.split_vertically(400);
    let end = report
        .throughput_series
        .last()
        .map_or(1.0, |p| p.0)
        .max(report.lag_series.last().map_or(1.0, |p| p.0))
        .max(1.0);

    let peak = report
        .throughput_series
        .iter()
        .map(|p| p.1 / 1e6)
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!(
                "blockferry loadgen: {} agents x {} disks; wire throughput",
                report.agents, report.disks_per_agent
            ),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end, 0.0..peak * 1.1)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("MB/s")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_error)?;
    chart
        .draw_series(LineSeries::new(
            report.throughput_series.iter().map(|&(t, r)| (t, r / 1e6)),
            &BLUE,
        ))
        .map_err(plot_error)?
        .label("all agents, sent")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    let sync_end = report.sync.seconds;
    chart
        .draw_series(LineSeries::new(
            [(sync_end, 0.0), (sync_end, peak * 1.1)],
            &BLACK.mix(0.4),
        ))
        .map_err(plot_error)?
        .label("initial sync durable")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.4)));
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;

    let lag_ms: Vec<(f64, f64)> = report
        .lag_series
        .iter()
        .map(|&(t, lag)| (t, lag * 1e3))
        .collect();
    let worst = lag_ms.iter().map(|p| p.1).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&bottom)
        .caption(
            "lag, write captured -> durable at the receiver (each sample)",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end, 0.0..worst * 1.1)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("ms")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_error)?;
    chart
        .draw_series(
            lag_ms
                .iter()
                .map(|&(t, l)| Circle::new((t, l), 2, RED.filled())),
        )
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn plot_error<E: std::fmt::Display>(err: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {err}")
}
