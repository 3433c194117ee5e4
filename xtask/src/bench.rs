//! `cargo xtask bench`: every benchmark, each reporting ratios against a baseline measured in
//! the same run (see the bench targets in `enforcer/benches/`). Needs root: they load eBPF
//! programs and build network namespaces.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

const BENCHES: [&str; 4] = ["datapath", "apply", "throughput", "fleet"];

pub fn run(workspace: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmarks load eBPF programs and build network namespaces: run them as root");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(&cargo);
    command
        .args(["bench", "--package", "enforcer"])
        .current_dir(workspace);
    for bench in BENCHES {
        command.args(["--bench", bench]);
    }
    let status = command
        .status()
        .with_context(|| format!("running {cargo} bench"))?;
    if !status.success() {
        bail!("a benchmark failed ({status})");
    }
    Ok(())
}
