//! `cargo xtask compare REV`: one benchmark of this tree and of an earlier revision, run in
//! turn round after round, each figure read as the best and the median of its runs. On a
//! machine whose speed moves between levels from one process to the next (this one's flood row
//! has moved between about 230 and 450 ns for one build), a figure from a run of each build
//! says more about the machine than the builds; the best of alternated runs (the lowest cost,
//! the highest rate), and in how many rounds one build did better, separate them. Each build
//! runs its own benchmark code: compare revisions whose benchmark records the figures in
//! question. Writes nothing but a worktree of REV under `target/compare`, which it removes, and
//! that revision's build in `target/compare/target`, kept to build the next comparison
//! quicker.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::bench::split_csv;

/// A figure as a benchmark records it: the figure and the baseline it is read against (one
/// figure may be recorded against several).
type FigureKey = (String, String);

/// One round's values of a figure: the earlier revision's, this tree's (`None`: that build did
/// not record the figure).
type RoundValues = (Option<f64>, Option<f64>);

pub fn run(workspace: &Path, revision: &str, bench: &str, rounds: usize) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmarks load eBPF programs and build network namespaces: run them as root");
    }
    if !crate::bench::BENCHES.contains(&bench) {
        bail!(
            "no benchmark {bench}: the benchmarks are {}",
            crate::bench::BENCHES.join(", ")
        );
    }
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let compare = workspace.join("target").join("compare");
    let tree = compare.join("tree");
    let _ = git(
        workspace,
        &["worktree", "remove", "--force", path_str(&tree)?],
    );
    git(
        workspace,
        &["worktree", "add", "--detach", path_str(&tree)?, revision],
    )?;
    let result = (|| {
        println!("compare: building {bench} of {revision}");
        let earlier = bench_executable(&tree, &compare.join("target"), bench)?;
        println!("compare: building {bench} of this tree");
        let this = bench_executable(workspace, &crate::target_dir(), bench)?;
        let mut runs = Runs::default();
        for round in 0..rounds {
            // The order turns from round to round: neither build always runs first.
            let order = if round % 2 == 0 {
                [(Build::Earlier, &earlier), (Build::This, &this)]
            } else {
                [(Build::This, &this), (Build::Earlier, &earlier)]
            };
            for (build, executable) in order {
                let rows = run_once(executable, &compare.join("rows.csv"))?;
                runs.add(build, round, &rows);
            }
            println!("compare: round {} of {rounds} done", round + 1);
        }
        print!("{}", runs.table(revision, rounds));
        Ok(())
    })();
    let _ = git(
        workspace,
        &["worktree", "remove", "--force", path_str(&tree)?],
    );
    let _ = fs::remove_file(compare.join("rows.csv"));
    result
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

fn git(workspace: &Path, args: &[&str]) -> Result<()> {
    let status = Command::new("git")
        .args(args)
        .current_dir(workspace)
        .status()
        .context("running git")?;
    if !status.success() {
        bail!("git {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Builds benchmark `bench` of the tree at `tree` into `target`; returns its executable.
fn bench_executable(tree: &Path, target: &Path, bench: &str) -> Result<PathBuf> {
    let output = crate::cargo_command()
        // Targets, not the package: see `cargo_command`.
        .args(["bench", "--no-run", "--bench", bench])
        .args(["--message-format", "json"])
        .current_dir(tree)
        .env("CARGO_TARGET_DIR", target)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {} bench --no-run", crate::cargo_program()))?;
    if !output.status.success() {
        bail!(
            "building benchmark {bench} in {} failed ({})",
            tree.display(),
            output.status
        );
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|message| {
            message["target"]["name"] == bench
                && message["target"]["kind"]
                    .as_array()
                    .is_some_and(|kinds| kinds.iter().any(|kind| kind == "bench"))
        })
        .and_then(|message| message["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo built no executable for benchmark {bench}"))
}

/// Runs the benchmark once; returns the rows it recorded (`bench,figure,value,unit,baseline,
/// ratio`).
fn run_once(executable: &Path, rows_file: &Path) -> Result<Vec<Vec<String>>> {
    let _ = fs::remove_file(rows_file);
    let status = Command::new(executable)
        .arg("--bench")
        .env("ENFORCER_BENCH_RESULTS", rows_file)
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {}", executable.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", executable.display());
    }
    let rows = fs::read_to_string(rows_file)
        .with_context(|| format!("reading {}", rows_file.display()))?;
    Ok(rows.lines().map(split_csv).collect())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Build {
    Earlier,
    This,
}

/// Every run's value of every figure, by build and round, in the order figures were first
/// recorded.
#[derive(Default)]
struct Runs {
    order: Vec<FigureKey>,
    units: BTreeMap<FigureKey, String>,
    /// Per figure, per round.
    values: BTreeMap<FigureKey, BTreeMap<usize, RoundValues>>,
}

impl Runs {
    fn add(&mut self, build: Build, round: usize, rows: &[Vec<String>]) {
        for fields in rows {
            let [_, figure, value, unit, baseline, _] = &fields[..] else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let key = (figure.clone(), baseline.clone());
            if !self.units.contains_key(&key) {
                self.order.push(key.clone());
                self.units.insert(key.clone(), unit.clone());
            }
            let pair = self
                .values
                .entry(key)
                .or_default()
                .entry(round)
                .or_default();
            match build {
                Build::Earlier => pair.0 = Some(value),
                Build::This => pair.1 = Some(value),
            }
        }
    }

    /// A line per figure: each build's best and median run, and the rounds in which this
    /// tree's run was better than, equal to or worse than the earlier revision's.
    fn table(&self, revision: &str, rounds: usize) -> String {
        let mut text = format!(
            "figure (against) | {revision}, best (median) of {rounds} runs | this tree, best (median) | rounds this tree was better / equal / worse\n"
        );
        for key in &self.order {
            let by_round = &self.values[key];
            let unit = &self.units[key];
            let higher_is_better = is_rate(unit);
            let (mut better, mut equal, mut worse) = (0, 0, 0);
            for pair in by_round.values() {
                if let (Some(earlier), Some(this)) = pair {
                    match this.partial_cmp(earlier) {
                        Some(std::cmp::Ordering::Equal) => equal += 1,
                        Some(std::cmp::Ordering::Greater) if higher_is_better => better += 1,
                        Some(std::cmp::Ordering::Less) if !higher_is_better => better += 1,
                        _ => worse += 1,
                    }
                }
            }
            let (figure, baseline) = key;
            let against = if baseline.is_empty() {
                String::new()
            } else {
                format!(" ({baseline})")
            };
            text.push_str(&format!(
                "{figure}{against} | {} | {} {unit} | {better} / {equal} / {worse}\n",
                summary(
                    by_round.values().filter_map(|pair| pair.0),
                    higher_is_better
                ),
                summary(
                    by_round.values().filter_map(|pair| pair.1),
                    higher_is_better
                ),
            ));
        }
        text
    }
}

/// Whether a figure in `unit` is a rate (packets/s, records/s, Gbit/s), better when higher;
/// every other figure is a cost (ns, ms, bytes, MiB), better when lower.
fn is_rate(unit: &str) -> bool {
    unit.ends_with("/s")
}

/// "best (median)" of one build's runs of a figure, or "-" where it has none.
fn summary(runs: impl Iterator<Item = f64>, higher_is_better: bool) -> String {
    let mut values: Vec<f64> = runs.collect();
    values.sort_by(f64::total_cmp);
    let best = if higher_is_better {
        values.last()
    } else {
        values.first()
    };
    match best {
        None => "-".to_owned(),
        Some(best) => format!("{best} ({})", values[values.len() / 2]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(figure: &str, value: &str, baseline: &str, unit: &str) -> Vec<String> {
        ["datapath", figure, value, unit, baseline, "1.0"]
            .map(str::to_owned)
            .to_vec()
    }

    #[test]
    fn each_figure_reads_as_each_builds_best_and_median_run_and_the_rounds_this_tree_did_better() {
        let mut runs = Runs::default();
        for (round, earlier, this) in [(0, "250", "230"), (1, "240", "245"), (2, "400", "226")] {
            runs.add(
                Build::Earlier,
                round,
                &[row("flood", earlier, "", "ns/packet")],
            );
            runs.add(Build::This, round, &[row("flood", this, "", "ns/packet")]);
        }
        runs.add(
            Build::Earlier,
            0,
            &[row("flood", "9", "target 120 ns", "ns/packet")],
        );
        for (round, earlier, this) in [(0, "1200", "1100"), (1, "900", "1300")] {
            runs.add(
                Build::Earlier,
                round,
                &[row("pipeline", earlier, "", "records/s")],
            );
            runs.add(
                Build::This,
                round,
                &[row("pipeline", this, "", "records/s")],
            );
        }
        let table = runs.table("f2b5e46", 3);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[1],
            "flood | 240 (250) | 226 (230) ns/packet | 2 / 0 / 1"
        );
        assert_eq!(
            lines[2], "flood (target 120 ns) | 9 (9) | - ns/packet | 0 / 0 / 0",
            "one figure against another baseline is a figure of its own; a build without it shows -"
        );
        assert_eq!(
            lines[3], "pipeline | 1200 (1200) | 1300 (1300) records/s | 1 / 0 / 1",
            "a rate is better when higher"
        );
    }
}
