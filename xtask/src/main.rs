//! `cargo xtask <command>`: how people and CI set up, build, load, demonstrate, test and
//! benchmark enforcer.

mod bench;
mod demo;
mod prerequisites;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "Set up, build, load, demonstrate, test and benchmark enforcer."
)]
enum Task {
    /// Install what building and testing need: Debian packages, rust-src, bpf-linker (idempotent).
    Setup,
    /// Report every prerequisite and kernel feature, with the fix for anything missing.
    Doctor,
    /// Build the eBPF programs and the controller (release).
    Build,
    /// Build, then run `enforcer run ARGS...` on this host (as root).
    Load {
        /// Arguments for `enforcer run`, after `--`.
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
    /// Enforce a demo policy on a topology of network namespaces, show what was allowed and
    /// refused and why, then remove everything.
    Demo,
    /// Run every test: unit tests, and integration tests against the real kernel (needs root).
    Test {
        /// Extra arguments for `cargo test`, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmarks, as ratios against baselines measured in the same run.
    Bench,
}

fn main() -> ExitCode {
    match run(Task::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup => prerequisites::setup(),
        Task::Doctor => {
            if prerequisites::doctor() {
                Ok(())
            } else {
                bail!("some prerequisites are missing (see the fixes above)")
            }
        }
        Task::Build => {
            prerequisites::setup_if_missing()?;
            let binary = build_release()?;
            println!("built {}", binary.display());
            Ok(())
        }
        Task::Load { args } => {
            prerequisites::setup_if_missing()?;
            let binary = build_release()?;
            let status = Command::new(&binary)
                .arg("run")
                .args(&args)
                .status()
                .with_context(|| format!("running {}", binary.display()))?;
            if !status.success() {
                bail!("enforcer run exited with {status}");
            }
            Ok(())
        }
        Task::Demo => {
            prerequisites::setup_if_missing()?;
            let binary = build_release()?;
            demo::run(&binary, &workspace_root())
        }
        Task::Test { args } => {
            prerequisites::setup_if_missing()?;
            // The default members: everything but the eBPF crate, which builds only for the BPF
            // target (the controller's build script builds it).
            cargo(&["test"], &args)
        }
        Task::Bench => {
            prerequisites::setup_if_missing()?;
            bench::run(&workspace_root())
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn cargo(args: &[&str], extra: &[String]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo)
        .args(args)
        .args(extra)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Builds the controller (which embeds the eBPF object) in release mode; returns its path.
pub fn build_release() -> Result<PathBuf> {
    cargo(&["build", "--release", "--package", "enforcer"], &[])?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from);
    Ok(target.join("release").join("enforcer"))
}
