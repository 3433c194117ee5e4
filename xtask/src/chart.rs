//! `bench/datapath.png`: the datapath benchmark's cost per packet, one bar per path and rule
//! count, enforcer's beside the anchors' (the empty XDP program and `xdp-filter`), with a line
//! at `xdp-filter`'s cost, the one the established path is held to.

use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use plotters::{
    prelude::*,
    style::{FontStyle, register_font},
};

/// Where setup's `fonts-dejavu-core` puts the font the labels are set in.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const WIDTH: u32 = 1200;
const ROW: i32 = 30;
const TOP: i32 = 70;
const LABEL_WIDTH: i32 = 610;
const ANCHOR: RGBColor = RGBColor(150, 150, 150);
const FEW_RULES: RGBColor = RGBColor(31, 119, 180);
const MANY_RULES: RGBColor = RGBColor(255, 127, 14);

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type Failed = DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>;

/// One bar: what was measured, its cost in ns, and its colour (anchor, or the rule count).
struct Bar {
    label: String,
    ns: f64,
    color: RGBColor,
}

/// The datapath benchmark's per-packet costs of one frame repeated (`bench,figure,value,unit,
/// baseline,ratio`, already split): the rows measured against the empty program, once each
/// (rows that repeat a figure against another baseline, and the flood's cost over the empty
/// program, are left out), a path's rule counts side by side.
fn bars(rows: &[Vec<String>]) -> Vec<Bar> {
    let bars = rows
        .iter()
        .filter_map(|fields| {
            let [bench, figure, value, unit, baseline, _] = &fields[..] else {
                return None;
            };
            if bench != "datapath" || unit != "ns/packet" || baseline != "empty XDP program" {
                return None;
            }
            let color = if figure.starts_with("empty ") || figure.contains("xdp-filter") {
                ANCHOR
            } else if figure.ends_with(" 100000 rules") {
                MANY_RULES
            } else {
                FEW_RULES
            };
            Some(Bar {
                label: figure.clone(),
                ns: value.parse().ok()?,
                color,
            })
        })
        .collect();
    side_by_side(bars)
}

/// The same path at each rule count side by side, paths in the order they were measured.
fn side_by_side(mut bars: Vec<Bar>) -> Vec<Bar> {
    let path = |bar: &Bar| {
        let label = bar.label.as_str();
        label
            .rsplit_once(", ")
            .filter(|(_, count)| count.ends_with(" rules"))
            .map_or(label, |(path, _)| path)
            .to_owned()
    };
    let mut paths: Vec<String> = Vec::new();
    for bar in &bars {
        if !paths.contains(&path(bar)) {
            paths.push(path(bar));
        }
    }
    bars.sort_by_key(|bar| paths.iter().position(|known| *known == path(bar)));
    bars
}

/// Draws the chart into `path`; `heading` says when and where it was measured.
pub fn write(rows: &[Vec<String>], heading: &str, path: &Path) -> Result<()> {
    let bars = bars(rows);
    if bars.is_empty() {
        return Ok(());
    }
    let font = std::fs::read(FONT).with_context(|| {
        format!("reading {FONT} (cargo xtask setup installs fonts-dejavu-core)")
    })?;
    register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("{FONT} is not a font plotters can read"))?;
    let height = (TOP + ROW * bars.len() as i32 + 60) as u32;
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    draw(&root, &bars, heading).map_err(|error| anyhow!("drawing {}: {error}", path.display()))?;
    root.present()
        .map_err(|error| anyhow!("writing {}: {error}", path.display()))
}

/// The labels' style: the registered font, black, `size` pixels.
fn text(size: u32) -> TextStyle<'static> {
    ("sans-serif", size).into_font().color(&BLACK)
}

fn draw(root: &Area<'_>, bars: &[Bar], heading: &str) -> Result<(), Failed> {
    root.fill(&WHITE)?;
    root.draw(&Text::new(
        "Cost per packet, ns (BPF_PROG_TEST_RUN, same frame): enforcer beside the anchors",
        (20, 15),
        text(20),
    ))?;
    root.draw(&Text::new(heading.to_owned(), (20, 42), text(14)))?;
    let widest = bars.iter().map(|bar| bar.ns).fold(1.0, f64::max);
    let scale = f64::from(WIDTH as i32 - LABEL_WIDTH - 80) / widest;
    let x = |ns: f64| LABEL_WIDTH + (ns * scale) as i32;
    for (row, bar) in bars.iter().enumerate() {
        let top = TOP + ROW * row as i32;
        root.draw(&Text::new(bar.label.clone(), (20, top + 6), text(13)))?;
        root.draw(&Rectangle::new(
            [
                (LABEL_WIDTH, top + 3),
                (x(bar.ns).max(LABEL_WIDTH + 1), top + ROW - 3),
            ],
            bar.color.filled(),
        ))?;
        root.draw(&Text::new(
            format!("{:.0}", bar.ns),
            (x(bar.ns) + 6, top + 6),
            text(13),
        ))?;
    }
    let bottom = TOP + ROW * bars.len() as i32;
    if let Some(filter) = bars.iter().find(|bar| bar.label.contains("xdp-filter")) {
        root.draw(&PathElement::new(
            [(x(filter.ns), TOP), (x(filter.ns), bottom)],
            BLACK.stroke_width(1),
        ))?;
    }
    legend(root, bottom + 20)
}

fn legend(root: &Area<'_>, top: i32) -> Result<(), Failed> {
    let entries = [
        (ANCHOR, "anchor"),
        (FEW_RULES, "enforcer, 10 rules (or none looked up)"),
        (MANY_RULES, "enforcer, 100 000 rules"),
    ];
    let mut left = 20;
    for (color, name) in entries {
        root.draw(&Rectangle::new(
            [(left, top), (left + 14, top + 14)],
            color.filled(),
        ))?;
        root.draw(&Text::new(name, (left + 20, top), text(13)))?;
        left += 300;
    }
    root.draw(&Text::new(
        "vertical line: xdp-filter",
        (left, top),
        text(13),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(text: &str) -> Vec<Vec<String>> {
        text.lines().map(crate::bench::split_csv).collect()
    }

    #[test]
    fn each_cost_is_one_bar_coloured_by_what_it_measures() {
        let rows = rows(
            "datapath,empty XDP program,6,ns/packet,empty XDP program,1.00\n\
             datapath,\"xdp-filter (xdp-tools), established flow's frame\",33,ns/packet,empty XDP program,5.50\n\
             datapath,\"XDP, established flow, 10 rules\",79,ns/packet,empty XDP program,13.17\n\
             datapath,\"XDP, denied new flow, 10 rules\",162,ns/packet,empty XDP program,27.00\n\
             datapath,\"XDP, established flow, 100000 rules\",76,ns/packet,empty XDP program,12.67\n\
             datapath,\"XDP, established flow, 100000 rules\",76,ns/packet,the same path at 10 rules,0.96\n\
             datapath,\"XDP, established flow, 10 rules\",79,ns/packet,xdp-filter on the same frame (anchor),2.39\n\
             apply,full load,702,ms,,\n",
        );
        let bars = bars(&rows);
        let drawn: Vec<(&str, f64)> = bars
            .iter()
            .map(|bar| (bar.label.as_str(), bar.ns))
            .collect();
        assert_eq!(
            drawn,
            [
                ("empty XDP program", 6.0),
                ("xdp-filter (xdp-tools), established flow's frame", 33.0),
                ("XDP, established flow, 10 rules", 79.0),
                ("XDP, established flow, 100000 rules", 76.0),
                ("XDP, denied new flow, 10 rules", 162.0),
            ]
        );
        let colors: Vec<RGBColor> = bars.iter().map(|bar| bar.color).collect();
        assert_eq!(colors, [ANCHOR, ANCHOR, FEW_RULES, MANY_RULES, FEW_RULES]);
        let path = std::env::temp_dir().join(format!("xtask-chart-{}.png", std::process::id()));
        write(&rows, "today", &path).unwrap();
        let png = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(&png[1..4], b"PNG");
        let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
        assert_eq!(height, (TOP + ROW * 5 + 60) as u32);
    }
}
