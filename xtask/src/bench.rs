//! `cargo xtask bench`: every benchmark, each reporting ratios against a baseline measured in
//! the same run (see the bench targets in `enforcer/benches/`). Needs root: they load eBPF
//! programs and build network namespaces. Each figure a benchmark records (through
//! `enforcer_testbed::results`) lands in `bench/results.csv` and, as a table with the date and
//! the machine, in `bench/results.md`, which a full run also writes into the README.

use std::{fs, path::Path, process::Command, time::Instant};

use anyhow::{Context as _, Result, bail};

pub(crate) const BENCHES: [&str; 7] = [
    "datapath",
    "apply",
    "throughput",
    "pps",
    "pipeline",
    "flood",
    "fleet",
];
const CSV_HEADER: &str = "bench,figure,value,unit,baseline,ratio";
/// The README's benchmark table sits between these lines.
const README_START: &str = "<!-- bench/results.md: written by `cargo xtask bench` -->";
const README_END: &str = "<!-- end of bench/results.md -->";

pub fn run(workspace: &Path, quick: bool) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmarks load eBPF programs and build network namespaces: run them as root");
    }
    let out = workspace.join("bench");
    fs::create_dir_all(&out)?;
    let name = if quick { "results-quick" } else { "results" };
    let rows_file = out.join(format!("{name}.rows"));
    let _ = fs::remove_file(&rows_file);
    let started = Instant::now();
    let mut command = crate::cargo_command();
    command
        // Targets, not the package: see `cargo_command`.
        .arg("bench")
        .current_dir(workspace)
        .env("ENFORCER_BENCH_RESULTS", &rows_file);
    if quick {
        command.env("ENFORCER_BENCH_QUICK", "1");
    }
    for bench in BENCHES {
        command.args(["--bench", bench]);
    }
    let status = command
        .status()
        .with_context(|| format!("running {} bench", crate::cargo_program()))?;
    if !status.success() {
        bail!("a benchmark failed ({status})");
    }
    let rows = fs::read_to_string(&rows_file)
        .with_context(|| format!("reading {}", rows_file.display()))?;
    let _ = fs::remove_file(&rows_file);
    fs::write(
        out.join(format!("{name}.csv")),
        format!("{CSV_HEADER}\n{rows}"),
    )?;
    let machine = machine();
    let markdown = markdown(&rows, &machine, quick, started.elapsed().as_secs());
    fs::write(out.join(format!("{name}.md")), &markdown)?;
    let chart = if quick {
        "datapath-quick.png"
    } else {
        "datapath.png"
    };
    let split: Vec<Vec<String>> = rows.lines().map(split_csv).collect();
    crate::chart::write(&split, &format!("Measured {machine}"), &out.join(chart))?;
    println!("bench: wrote bench/{name}.md, bench/{name}.csv and bench/{chart}");
    if !quick {
        write_into_readme(&workspace.join("README.md"), &markdown)?;
        println!("bench: the README's benchmark table is bench/results.md");
    }
    Ok(())
}

/// The date, kernel, CPU and core count, for the table's heading.
fn machine() -> String {
    let output = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!(
        "{} UTC, Linux {}, {} × {cpu}",
        output("date", &["-u", "+%Y-%m-%d %H:%M"]),
        output("uname", &["-r"]),
        std::thread::available_parallelism().map_or(0, usize::from)
    )
}

/// The rows as one Markdown table per benchmark.
fn markdown(rows: &str, machine: &str, quick: bool, seconds: u64) -> String {
    let mut text = format!(
        "Measured {machine}, by `cargo xtask bench{}` in {seconds} s. Ratios are against the \
         baseline named beside them, measured in the same run.\n",
        if quick { " --quick" } else { "" }
    );
    let mut current = String::new();
    for row in rows.lines() {
        let fields = split_csv(row);
        let [bench, figure, value, unit, baseline, ratio] = &fields[..] else {
            continue;
        };
        if *bench != current {
            text.push_str(&format!(
                "\n**{bench}**\n\n| figure | value | against | ratio |\n|---|---:|---|---:|\n"
            ));
            current = bench.clone();
        }
        // Where enforcer is behind an anchor (the same work done by another tool), say so: a
        // cost above the anchor's, or a rate below it.
        let is_cost = unit.starts_with("ns") || ["ms", "bytes", "MiB"].contains(&unit.as_str());
        let behind = baseline.contains("(anchor)")
            && ratio
                .parse::<f64>()
                .is_ok_and(|r| if is_cost { r > 1.0 } else { r < 1.0 });
        let ratio = if behind {
            format!("{ratio} (**behind**)")
        } else {
            ratio.clone()
        };
        text.push_str(&format!(
            "| {figure} | {value} {unit} | {baseline} | {ratio} |\n"
        ));
    }
    text
}

/// One CSV row's fields (RFC 4180 quoting).
pub(crate) fn split_csv(row: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    let mut chars = row.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                fields.last_mut().expect("one field").push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(String::new()),
            (c, _) => fields.last_mut().expect("one field").push(c),
        }
    }
    fields
}

/// Replaces what lies between the README's markers with `markdown`.
fn write_into_readme(readme: &Path, markdown: &str) -> Result<()> {
    let text = fs::read_to_string(readme)?;
    let (Some(start), Some(end)) = (text.find(README_START), text.find(README_END)) else {
        bail!("the README has no benchmark markers ({README_START})");
    };
    let updated = format!(
        "{}{README_START}\n{markdown}{}",
        &text[..start],
        &text[end..]
    );
    fs::write(readme, updated)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_become_one_table_per_benchmark() {
        let rows = "datapath,empty XDP program,6,ns/packet,empty XDP program,1.00\n\
                    datapath,\"XDP, established\",82,ns/packet,empty XDP program,13.67\n\
                    datapath,XDP established,82,ns/packet,xdp-filter (anchor),2.50\n\
                    apply,full load,590,ms,,\n\
                    pps,enforcer,438000,packets/s,nftables set (anchor),0.93\n";
        let text = markdown(rows, "today", false, 60);
        assert!(text.contains("**datapath**"), "{text}");
        assert!(
            text.contains("| XDP, established | 82 ns/packet | empty XDP program | 13.67 |"),
            "{text}"
        );
        assert!(text.contains("**apply**"), "{text}");
        assert!(text.contains("| 2.50 (**behind**) |"), "{text}");
        assert!(text.contains("| full load | 590 ms |  |  |"), "{text}");
        assert!(
            text.contains(
                "| enforcer | 438000 packets/s | nftables set (anchor) | 0.93 (**behind**) |"
            ),
            "{text}"
        );
    }

    #[test]
    fn the_readme_keeps_what_lies_outside_the_markers() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let readme = dir.join("README.md");
        fs::write(
            &readme,
            format!("before\n{README_START}\nold\n{README_END}\nafter\n"),
        )
        .unwrap();
        write_into_readme(&readme, "new\n").unwrap();
        let text = fs::read_to_string(&readme).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            text,
            format!("before\n{README_START}\nnew\n{README_END}\nafter\n")
        );
    }
}
