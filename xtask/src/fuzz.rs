//! `cargo xtask fuzz`: every cargo-fuzz target in `fuzz/` for a bounded time, on the pinned
//! nightly toolchain. Each run starts from the committed seeds (`fuzz/seeds/<target>`) and
//! regression cases (`fuzz/regressions/<target>`: inputs that once failed, run first), and
//! grows its corpus in `fuzz/corpus/<target>` (not committed). A failure leaves its input in
//! `fuzz/artifacts/<target>/`; once understood and fixed, it joins the regression cases.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};

use crate::prerequisites::FUZZ_TOOLCHAIN;

/// The targets, most important first: the packet parser is the one a bypass would come from.
pub const TARGETS: [&str; 4] = [
    "packet_parser",
    "policy_parser",
    "event_decoder",
    "cni_input",
];

/// Fuzzes each of `targets` (all if empty) for `time`.
pub fn run(workspace: &Path, targets: &[String], time: Duration) -> Result<()> {
    let targets: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    if let Some(unknown) = targets.iter().find(|target| !TARGETS.contains(target)) {
        bail!(
            "no fuzz target {unknown}; the targets are {}",
            TARGETS.join(", ")
        );
    }
    let fuzz = workspace.join("fuzz");
    for target in targets {
        println!("fuzz: {target} for {} s", time.as_secs());
        let corpus = fuzz.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let inputs = [
            corpus,
            fuzz.join("seeds").join(target),
            fuzz.join("regressions").join(target),
        ];
        let status = fuzz_command(workspace)
            .args(["run", target])
            .args(inputs.iter().filter(|dir| dir.is_dir()))
            .arg("--")
            .arg(format!("-max_total_time={}", time.as_secs()))
            .arg("-print_final_stats=1")
            .status()
            .context("starting cargo fuzz")?;
        if !status.success() {
            bail!(
                "fuzz target {target} failed ({status}): its input is in fuzz/artifacts/{target}/; \
                 once fixed, add it to fuzz/regressions/{target}/"
            );
        }
    }
    Ok(())
}

/// `cargo fuzz` on the pinned nightly, free of the environment `cargo xtask` runs in (its
/// toolchain and cargo), from the workspace root.
fn fuzz_command(workspace: &Path) -> Command {
    let mut command = Command::new("rustup");
    command
        .args(["run", FUZZ_TOOLCHAIN, "cargo", "fuzz"])
        .current_dir(workspace);
    for inherited in [
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTC",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        command.env_remove(inherited);
    }
    command
}
