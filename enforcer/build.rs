#[path = "build/stack_depth.rs"]
mod stack_depth;

use std::{env, path::PathBuf};

use anyhow::{Context as _, bail};
use aya_build::{Package, Toolchain};

/// Builds the eBPF object (`enforcer-ebpf`) that the controller embeds.
///
/// The eBPF crate needs `-Z build-std=core`. Rather than requiring a nightly toolchain, it is
/// built with the same toolchain as the controller and `RUSTC_BOOTSTRAP=1`, which aya-build
/// turns into `-Z build-std=core` (the toolchain needs the `rust-src` component; `cargo xtask
/// setup` installs it, with `bpf-linker`).
fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    println!("cargo:rerun-if-changed=build");
    let workspace = manifest_dir.parent().context("workspace root")?;
    let ebpf_dir = workspace.join("enforcer-ebpf");
    // aya-build watches the eBPF crate; its shared types live in enforcer-common.
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("enforcer-common").display()
    );
    println!("cargo:rerun-if-env-changed=RUSTUP_TOOLCHAIN");

    // SAFETY: build scripts are single-threaded; the variables are read by the child cargo.
    // aya-build forwards the child's stderr as build warnings: keep its diagnostics, drop its
    // progress lines.
    unsafe {
        env::set_var("RUSTC_BOOTSTRAP", "1");
        env::set_var("CARGO_TERM_QUIET", "true");
    }
    // The fuzz targets (`cargo xtask fuzz`, built with `--cfg fuzzing` on a nightly toolchain)
    // exercise parsers and encoders and load no programs: they embed an empty object rather
    // than link one with a toolchain bpf-linker was not built for.
    println!("cargo:rerun-if-env-changed=CARGO_CFG_FUZZING");
    if env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out_dir = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?);
        std::fs::write(out_dir.join("enforcer"), []).context("writing the empty object")?;
        return Ok(());
    }
    let toolchain = env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_owned());
    let ebpf_dir = ebpf_dir.to_str().context("eBPF crate path is not UTF-8")?;
    aya_build::build_ebpf(
        [Package {
            name: "enforcer-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
    .context("building the eBPF programs (run `cargo xtask doctor` to check the toolchain)")?;
    // aya-build's own switch for builds that leave the object as it is (editors, clippy).
    if env::var("AYA_BUILD_SKIP").is_ok_and(|skip| skip == "1" || skip.eq_ignore_ascii_case("true"))
    {
        return Ok(());
    }
    check_stack(&PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?).join("enforcer"))
}

/// Fails the build where the verifiers of 5.10 and 6.1 would refuse the programs for their
/// stack: every datapath change meets this limit first.
fn check_stack(object: &std::path::Path) -> anyhow::Result<()> {
    let object = std::fs::read(object).with_context(|| format!("reading {}", object.display()))?;
    let chains = stack_depth::deepest_chains(&object)
        .map_err(anyhow::Error::msg)
        .context("reading the eBPF object's call chains")?;
    let too_deep: Vec<String> = chains
        .iter()
        .filter(|chain| chain.bytes > stack_depth::STACK_LIMIT)
        .map(ToString::to_string)
        .collect();
    if !too_deep.is_empty() {
        bail!(
            "the verifiers of 5.10 and 6.1 allow a chain of calls {} bytes of stack, each frame \
             rounded up to 32, and would refuse:\n  {}",
            stack_depth::STACK_LIMIT,
            too_deep.join("\n  ")
        );
    }
    Ok(())
}
