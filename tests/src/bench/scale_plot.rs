//! The scale stage's figure: one PNG (plotters' bitmap backend) with a panel
//! per series against load, so the knee shows: calls/s, setup and install
//! p99, agent RSS, agent CPU per call against held calls (log x), and the
//! datapath's ns/packet against pinholes (log x).
//!
//! Text is rasterised by plotters' `ab_glyph` feature from a TrueType file
//! registered at run time ([`register_fonts`]): Debian's fonts-dejavu-core,
//! which `cargo xtask bench` installs. No fontconfig, no font-kit.

use std::path::Path;

use plotters::prelude::*;

use super::{
    scale::{ScaleLevel, ScaleStage},
    BenchError,
};

/// Font files tried in order (Debian's fonts-dejavu-core first).
const FONT_FILES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

static FONT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();

/// Register a sans-serif font for every plot of the run (the SVG plot lays
/// its text out with it too). Once per process.
pub fn register_fonts() -> Result<(), BenchError> {
    FONT.get_or_init(|| {
        let Some((path, bytes)) = FONT_FILES
            .iter()
            .find_map(|p| std::fs::read(p).ok().map(|b| (*p, b)))
        else {
            return Err(format!(
                "no font file ({}): install Debian's fonts-dejavu-core",
                FONT_FILES.join(", ")
            ));
        };
        // plotters keeps the font for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        for family in ["sans-serif", "serif", "monospace"] {
            plotters::style::register_font(family, FontStyle::Normal, bytes)
                .map_err(|_| format!("{path} is not a font plotters can read"))?;
        }
        Ok(())
    })
    .clone()
    .map_err(|detail| BenchError::Plot {
        path: "fonts".into(),
        detail,
    })
}

fn perr(path: &Path) -> impl Fn(String) -> BenchError + '_ {
    move |detail| BenchError::Plot {
        path: path.display().to_string(),
        detail,
    }
}

type Series<'a> = (&'a str, Box<dyn Fn(&ScaleLevel) -> f64 + 'a>);

/// One panel: `series` against held calls, log x.
fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    levels: &[ScaleLevel],
    series: Vec<Series<'_>>,
    path: &Path,
) -> Result<(), BenchError> {
    let e = perr(path);
    let xmax = levels
        .iter()
        .map(|l| l.held_calls)
        .max()
        .unwrap_or(10)
        .max(10) as f64
        * 2.0;
    let xmin = levels
        .iter()
        .map(|l| l.held_calls)
        .min()
        .unwrap_or(1)
        .max(1) as f64
        / 2.0;
    let ymax = series
        .iter()
        .flat_map(|(_, f)| levels.iter().map(f))
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((xmin..xmax).log_scale(), 0.0..ymax)
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("held calls")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(y_desc)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|x| e(x.to_string()))?;
    for (i, (name, f)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = levels
            .iter()
            .map(|l| (l.held_calls.max(1) as f64, f(l)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|x| e(x.to_string()))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(|x| e(x.to_string()))?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|x| e(x.to_string()))?;
    Ok(())
}

/// Draw the stage into `path` (PNG).
pub fn draw(stage: &ScaleStage, path: &Path) -> Result<(), BenchError> {
    register_fonts()?;
    let e = perr(path);
    let root = BitMapBackend::new(path, (1500, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let (top, body) = root.split_vertically(36);
    top.draw(&Text::new(
        "sip-edge: how cost grows with held calls and pinholes (cargo xtask bench --stages scale)",
        (12, 8),
        ("sans-serif", 20),
    ))
    .map_err(|x| e(x.to_string()))?;
    let panels = body.split_evenly((2, 3));
    let lv = &stage.levels;
    if !lv.is_empty() {
        panel(
            &panels[0],
            "new calls on top (calls/s)",
            "calls/s",
            lv,
            vec![
                ("new calls/s", Box::new(|l: &ScaleLevel| l.load.calls_per_s)),
                (
                    "ramp setups/s",
                    Box::new(|l: &ScaleLevel| l.ramp_calls_per_s),
                ),
            ],
            path,
        )?;
        panel(
            &panels[1],
            "setup and install p99 (ms)",
            "ms",
            lv,
            vec![
                ("setup p99", Box::new(|l: &ScaleLevel| l.load.setup_p99_ms)),
                ("install p99", Box::new(|l: &ScaleLevel| l.install.p99_ms)),
            ],
            path,
        )?;
        panel(
            &panels[2],
            "agent RSS (MB)",
            "MB",
            lv,
            vec![("VmRSS", Box::new(|l: &ScaleLevel| l.rss_kb as f64 / 1024.0))],
            path,
        )?;
        panel(
            &panels[3],
            "agent CPU per call (ms)",
            "ms CPU",
            lv,
            vec![
                (
                    "whole new call",
                    Box::new(|l: &ScaleLevel| l.cpu_ms_per_new_call),
                ),
                (
                    "held-call setup",
                    Box::new(|l: &ScaleLevel| l.ramp_cpu_ms_per_call),
                ),
            ],
            path,
        )?;
        panel(
            &panels[4],
            "agent RSS per held call (kB)",
            "kB",
            lv,
            vec![(
                "RSS growth / held calls",
                Box::new(|l: &ScaleLevel| l.rss_bytes_per_call / 1024.0),
            )],
            path,
        )?;
    }
    // Datapath: ns/packet against pinholes.
    let dp = &stage.datapath;
    if !dp.is_empty() {
        let xmax = dp.iter().map(|p| p.pinholes).max().unwrap_or(10).max(10) as f64 * 2.0;
        let ymax = dp.iter().map(|p| p.ns_per_packet).fold(50.0, f64::max) * 1.2;
        let mut chart = ChartBuilder::on(&panels[5])
            .caption("XDP hit cost vs pinholes (ns/packet)", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((0.5..xmax).log_scale(), 0.0..ymax)
            .map_err(|x| e(x.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("pinholes")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("ns/packet")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|x| e(x.to_string()))?;
        let mut i = 0;
        for case in ["hit-v4-udp-relay", "hit-v4-udp-nat"] {
            for phase in ["warm", "cold"] {
                let mut pts: Vec<(f64, f64)> = dp
                    .iter()
                    .filter(|p| p.case == case && p.phase == phase)
                    .map(|p| (p.pinholes.max(1) as f64, p.ns_per_packet))
                    .collect();
                if pts.is_empty() {
                    continue;
                }
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                let color = Palette99::pick(i).to_rgba();
                i += 1;
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                    .map_err(|x| e(x.to_string()))?
                    .label(format!("{case} {phase}"))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
                chart
                    .draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))
                    .map_err(|x| e(x.to_string()))?;
            }
        }
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|x| e(x.to_string()))?;
    }
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(())
}
