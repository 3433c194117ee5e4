//! `cargo xtask <command>`: how people and CI set up, build, load, demonstrate, test and
//! benchmark enforcer.

mod bench;
mod chart;
mod compare;
mod demo;
mod demo_fleet;
mod fuzz;
mod kernels;
mod prerequisites;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Duration,
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
    Demo {
        /// Three simulated hosts sharing an etcd cluster instead (DESIGN §12).
        #[arg(long)]
        fleet: bool,
    },
    /// Run every test: the kernel matrix (the release binary on Debian's 5.10, 6.1 and 6.12
    /// kernels under QEMU), then unit tests and integration tests against this host's kernel
    /// (needs root), then a short run of every fuzz target.
    Test {
        /// Skip the kernel matrix (quicker, for work that does not touch the datapath).
        #[arg(long)]
        no_kernel_matrix: bool,
        /// Skip the short fuzzing run.
        #[arg(long)]
        no_fuzz: bool,
        /// Extra arguments for `cargo test`, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Only the kernel matrix, on every kernel or those named (5.10, 6.1, 6.12).
    Kernels { names: Vec<String> },
    /// Fuzz every target (or those named: packet_parser, policy_parser, event_decoder,
    /// cni_input) with cargo-fuzz on a pinned nightly toolchain.
    Fuzz {
        targets: Vec<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        time: u64,
    },
    /// Benchmarks, as ratios against baselines measured in the same run; writes
    /// bench/results.md and bench/results.csv, and the README's benchmark table.
    Bench {
        /// Every benchmark in a reduced form (fewer packets, shorter runs), in a few minutes:
        /// a regression shows without the full run. Writes bench/results-quick.*, not the
        /// README.
        #[arg(long)]
        quick: bool,
    },
    /// One benchmark of this tree and of an earlier git revision, run in turn for a number of
    /// rounds; prints each figure's best and median run for both builds and in how many rounds
    /// this tree's was better: how two builds are told apart on a noisy machine. Writes no
    /// results.
    Compare {
        /// The earlier revision (a commit, tag or branch).
        revision: String,
        /// The benchmark: datapath, apply, throughput, pps, pipeline, flood or fleet.
        #[arg(long, default_value = "datapath")]
        bench: String,
        /// Runs of each build.
        #[arg(long, default_value_t = 6)]
        rounds: usize,
    },
}

/// How long `cargo xtask test` fuzzes each target: enough to run the seeds and regression
/// cases and a few million packet parses, short enough for every run.
const SHORT_FUZZ: Duration = Duration::from_secs(20);

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
        Task::Demo { fleet } => {
            prerequisites::setup_if_missing()?;
            let binary = build_release()?;
            if fleet {
                demo_fleet::run(&binary)
            } else {
                demo::run(&binary, &workspace_root())
            }
        }
        Task::Test {
            no_kernel_matrix,
            no_fuzz,
            args,
        } => {
            prerequisites::setup_if_missing()?;
            if !no_kernel_matrix {
                kernels::run(&build_release()?, &[])?;
            }
            // The default members: everything but the eBPF crate, which builds only for the BPF
            // target (the controller's build script builds it), and the fuzz targets.
            cargo(&["test"], &args)?;
            if !no_fuzz {
                fuzz::run(&workspace_root(), &[], SHORT_FUZZ)?;
            }
            Ok(())
        }
        Task::Fuzz { targets, time } => {
            prerequisites::setup_if_missing()?;
            fuzz::run(&workspace_root(), &targets, Duration::from_secs(time))
        }
        Task::Kernels { names } => {
            prerequisites::setup_if_missing()?;
            kernels::run(&build_release()?, &names)
        }
        Task::Bench { quick } => {
            prerequisites::setup_if_missing()?;
            bench::run(&workspace_root(), quick)
        }
        Task::Compare {
            revision,
            bench,
            rounds,
        } => {
            prerequisites::setup_if_missing()?;
            compare::run(&workspace_root(), &revision, &bench, rounds)
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// The cargo that runs xtask (`CARGO`), for the cargo commands it runs in turn.
pub fn cargo_program() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// A command of [`cargo_program`], in the environment a cargo command typed at a shell gets,
/// so that what it builds is what such a command would have built, and neither rebuilds the
/// other's (about 2 minutes each time):
/// * without the variables `cargo run` set for xtask itself (`CARGO_MANIFEST_DIR` and the
///   others that describe a crate): build scripts take them as their own input (`ring`'s
///   reads `CARGO_MANIFEST_DIR`), and a changed input reruns the script and rebuilds
///   everything above it;
/// * the caller picks its targets (`--bin`, `--bench`) among the default members rather than
///   naming the package: cargo turns on a dependency's features for the packages a command
///   selects, and `--package enforcer` alone builds `tonic`, `etcd-client` and others with
///   fewer features than `cargo build`, `test` or `bench` does.
pub fn cargo_command() -> Command {
    let mut command = Command::new(cargo_program());
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("CARGO_PKG_")
            || matches!(
                name,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
        {
            command.env_remove(name);
        }
    }
    command.current_dir(workspace_root());
    command
}

/// Where cargo builds this workspace: `CARGO_TARGET_DIR`, else `target` in it.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

fn cargo(args: &[&str], extra: &[String]) -> Result<()> {
    let status = cargo_command()
        .args(args)
        .args(extra)
        .status()
        .with_context(|| format!("running {}", cargo_program()))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Builds the controller (which embeds the eBPF object) in release mode; returns its path.
/// Picked by target, not by package (see [`cargo_command`]).
pub fn build_release() -> Result<PathBuf> {
    cargo(&["build", "--release", "--bin", "enforcer"], &[])?;
    Ok(target_dir().join("release").join("enforcer"))
}
