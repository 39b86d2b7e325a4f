//! The run's plot: forwarding rate per forwarder (bars) and ns per packet
//! vs table size per hit path (lines, log x), one SVG written by plotters'
//! SVG backend (text as <text> elements: no system fonts needed).

use std::path::Path;

use plotters::prelude::*;

use super::{BenchError, Report};

fn perr(path: &Path) -> impl Fn(String) -> BenchError + '_ {
    move |detail| BenchError::Plot {
        path: path.display().to_string(),
        detail,
    }
}

/// Draw `report` into `path`.
pub fn draw(report: &Report, path: &Path) -> Result<(), BenchError> {
    let e = perr(path);
    let root = SVGBackend::new(path, (1100, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let (left, right) = root.split_horizontally(550);
    if let Some(fwd) = &report.forward {
        let rows: Vec<(String, f64)> = fwd
            .forwarders
            .iter()
            .map(|f| (f.name.clone(), f.rate_pps / 1e6))
            .collect();
        let max = rows.iter().map(|r| r.1).fold(0.1, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(&left)
            .caption(
                "forwarding rate, 214-byte frames (Mpps)",
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(10)
            .build_cartesian_2d(0.0..max, 0.0..rows.len() as f64)
            .map_err(|x| e(x.to_string()))?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(2)
            .draw()
            .map_err(|x| e(x.to_string()))?;
        chart
            .draw_series(rows.iter().enumerate().map(|(i, (_, v))| {
                Rectangle::new(
                    [(0.0, i as f64 + 0.1), (*v, i as f64 + 0.9)],
                    BLUE.mix(0.4).filled(),
                )
            }))
            .map_err(|x| e(x.to_string()))?;
        chart
            .draw_series(rows.iter().enumerate().map(|(i, (n, v))| {
                Text::new(
                    format!("{n}: {v:.2}"),
                    (0.0, i as f64 + 0.85),
                    ("sans-serif", 12),
                )
            }))
            .map_err(|x| e(x.to_string()))?;
    }
    if let Some(prog) = &report.prog {
        let max_ns = prog
            .rows
            .iter()
            .filter(|r| r.class == "hit")
            .map(|r| r.ns_per_packet)
            .fold(50.0, f64::max)
            * 1.15;
        let max_size = prog.sizes.iter().copied().max().unwrap_or(1).max(10) as f64;
        let mut chart = ChartBuilder::on(&right)
            .caption(
                "XDP hit cost vs pinholes (ns/packet, warm)",
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d((1.0..max_size * 2.0).log_scale(), 0.0..max_ns)
            .map_err(|x| e(x.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("pinholes")
            .draw()
            .map_err(|x| e(x.to_string()))?;
        let cases = [
            "hit-v4-udp-relay",
            "hit-v6-udp-relay",
            "hit-v4-tcp-relay",
            "hit-v4-udp-nat",
        ];
        for (i, case) in cases.iter().enumerate() {
            let pts: Vec<(f64, f64)> = prog
                .rows
                .iter()
                .filter(|r| r.case == *case && r.phase == "warm")
                .map(|r| (r.pinholes.max(1) as f64, r.ns_per_packet))
                .collect();
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(|x| e(x.to_string()))?
                .label(*case)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(x.to_string()))?;
    }
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(())
}
