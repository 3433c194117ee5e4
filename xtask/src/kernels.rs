//! The kernel matrix: enforcer's release binary booted on Debian's own kernels under QEMU, with
//! a smoke test inside each (`xtask/kernels/init`): load, attach to two endpoint veths, an
//! allowed connection works and denied ones do not, a reload changes the verdict, kill -9
//! leaves enforcement in place and a restart adopts it, `status` tells the truth, `unload`
//! leaves nothing, a failed start leaves nothing, and the XDP ingress hook.
//!
//! Kernels are Debian packages, downloaded and unpacked under `/var/tmp/enforcer-kernels`
//! (nothing is installed on the host; a later run reuses them). Software emulation (no KVM
//! here): 20-70 s a kernel.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

/// A kernel of the matrix.
pub struct Kernel {
    /// Short name, also the cache directory's.
    pub name: &'static str,
    /// Where this kernel runs, for the summary.
    pub examples: &'static str,
    release: &'static str,
    package: &'static str,
}

/// Oldest first: the README's "Supported kernels" table lists the same.
pub const MATRIX: [Kernel; 3] = [
    Kernel {
        name: "5.10",
        examples: "Debian 11",
        release: "bullseye",
        package: r"^linux-image-5\.10\.0-[0-9]+-amd64-unsigned$",
    },
    Kernel {
        name: "6.1",
        examples: "Debian 12, Amazon Linux 2023",
        release: "bookworm",
        package: r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
    },
    Kernel {
        name: "6.12",
        examples: "Debian 12 backports, Debian 13",
        release: "bookworm",
        package: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$",
    },
];

const CACHE: &str = "/var/tmp/enforcer-kernels";

/// Boots `binary` on every kernel of the matrix (or those named in `only`); fails if any
/// check fails on any kernel.
pub fn run(binary: &Path, only: &[String]) -> Result<()> {
    let scripts = crate::workspace_root().join("xtask/kernels");
    let logs = crate::workspace_root().join("target/kernel-matrix");
    fs::create_dir_all(&logs)?;
    let mut failures = Vec::new();
    for kernel in MATRIX
        .iter()
        .filter(|kernel| only.is_empty() || only.iter().any(|name| name == kernel.name))
    {
        let started = Instant::now();
        let dir = fetch(kernel, &scripts)?;
        let log = logs.join(format!("{}.log", kernel.name));
        let mut outcome = boot(&dir, binary, &scripts, &log)?;
        if outcome.passed == 0 && outcome.failed.is_empty() {
            // The guest died before its first check (seen once: an oops while the 6.12 kernel
            // patched its own text during boot, under QEMU): that says nothing of enforcer.
            // Boot it once more; a second such death fails the matrix.
            println!(
                "kernel matrix: Linux {}: the guest ran no check; booting it again",
                kernel.name
            );
            outcome = boot(&dir, binary, &scripts, &log)?;
        }
        println!(
            "kernel matrix: Linux {} ({}, {}): {} passed, {} failed in {:.0} s; console in {}",
            kernel.name,
            kernel.examples,
            fs::read_to_string(dir.join("package"))?.trim(),
            outcome.passed,
            outcome.failed.len(),
            started.elapsed().as_secs_f64(),
            log.display()
        );
        for check in &outcome.failed {
            println!("  FAILED: {check}");
        }
        if !outcome.finished {
            println!("  the guest did not finish its checks (see the console log)");
        }
        if !outcome.failed.is_empty() || !outcome.finished || outcome.passed == 0 {
            failures.push(kernel.name);
        }
    }
    if !failures.is_empty() {
        bail!("the kernel matrix failed on Linux {}", failures.join(", "));
    }
    Ok(())
}

/// The unpacked kernel package (`boot/vmlinuz-*`, `lib/modules/*`), downloaded if not cached.
fn fetch(kernel: &Kernel, scripts: &Path) -> Result<PathBuf> {
    let cache = Path::new(CACHE).join(kernel.name);
    let unpacked = cache.join("unpacked");
    if !unpacked.join("package").exists() {
        println!("kernel matrix: fetching Debian's {} kernel", kernel.name);
        let status = Command::new(scripts.join("fetch-kernel.sh"))
            .args([kernel.release, kernel.package])
            .arg(&cache)
            .status()
            .context("running fetch-kernel.sh")?;
        if !status.success() {
            bail!("fetching the {} kernel failed ({status})", kernel.name);
        }
    }
    Ok(unpacked)
}

struct Outcome {
    passed: usize,
    failed: Vec<String>,
    /// The guest printed its summary line (it did not hang or panic).
    finished: bool,
}

fn boot(kernel: &Path, binary: &Path, scripts: &Path, log: &Path) -> Result<Outcome> {
    let version = fs::read_dir(kernel.join("lib/modules"))?
        .flatten()
        .next()
        .context("no lib/modules in the kernel package")?
        .file_name();
    let version = version.to_string_lossy();
    let initramfs = std::env::temp_dir().join(format!("enforcer-matrix-{version}.cpio.gz"));
    let status = Command::new(scripts.join("build-initramfs.sh"))
        .arg(kernel)
        .arg(&initramfs)
        .arg(binary)
        .status()
        .context("running build-initramfs.sh")?;
    if !status.success() {
        bail!("building the initramfs for {version} failed ({status})");
    }
    let console = fs::File::create(log)?;
    let status = Command::new("timeout")
        .args([
            "600",
            "qemu-system-x86_64",
            "-cpu",
            "max",
            "-m",
            "1024",
            "-smp",
            "2",
        ])
        .arg("-kernel")
        .arg(kernel.join(format!("boot/vmlinuz-{version}")))
        .arg("-initrd")
        .arg(&initramfs)
        .args([
            "-append",
            "console=ttyS0 panic=-1 loglevel=4",
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .status()
        .context("running qemu-system-x86_64")?;
    let _ = fs::remove_file(&initramfs);
    let output = String::from_utf8_lossy(&fs::read(log)?).into_owned();
    let outcome = parse(&output);
    if !status.success() && !outcome.finished {
        println!("  qemu exited with {status}");
    }
    Ok(outcome)
}

/// Reads the guest's `CHECK <name>: ok|FAIL` lines and its closing `MATRIX` line.
fn parse(console: &str) -> Outcome {
    let mut outcome = Outcome {
        passed: 0,
        failed: Vec::new(),
        finished: false,
    };
    for line in console.lines().map(str::trim) {
        if let Some(check) = line.strip_prefix("CHECK ") {
            match check.rsplit_once(": ") {
                Some((_, "ok")) => outcome.passed += 1,
                Some((name, _)) => outcome.failed.push(name.to_owned()),
                None => outcome.failed.push(check.to_owned()),
            }
        }
        outcome.finished |= line.starts_with("MATRIX passed=");
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_and_the_closing_line_are_read_from_the_console() {
        let outcome = parse(
            "noise\nCHECK run starts: ok\r\nCHECK reload: FAIL\nCHECK unload: ok\nMATRIX passed=2 failed=1\n",
        );
        assert_eq!(outcome.passed, 2);
        assert_eq!(outcome.failed, ["reload"]);
        assert!(outcome.finished);
        assert!(!parse("CHECK a: ok\nKernel panic").finished);
    }
}
