//! What enforcer needs on a machine, how to check it (`doctor`), and how to install what can be
//! installed (`setup`).

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Debian packages, each with why it is needed.
const PACKAGES: &[(&str, &str)] = &[
    (
        "build-essential",
        "a C compiler: links the Rust binaries, builds mimalloc",
    ),
    ("llvm-22-dev", "bpf-linker is built against LLVM 22"),
    ("libpolly-22-dev", "LLVM 22's CMake files reference Polly"),
    ("zlib1g-dev", "linking bpf-linker"),
    ("libzstd-dev", "linking bpf-linker"),
    (
        "iproute2",
        "network namespaces and veths for tests and the demo",
    ),
    ("bpftool", "inspecting loaded programs (tests, doctor)"),
    ("prometheus", "promtool checks the metrics output in tests"),
    (
        "socat",
        "a client process the cgroup tests place in a service's cgroup",
    ),
    ("iperf3", "the throughput and packet-rate benchmarks"),
    (
        "iptables",
        "the packet-rate benchmark's linear-chain anchor (iptables-restore)",
    ),
    ("nftables", "the packet-rate benchmark's set anchor (nft)"),
    (
        "fonts-dejavu-core",
        "the benchmark chart's labels (bench/datapath.png) are set in DejaVu Sans",
    ),
    (
        "xdp-tools",
        "xdp-filter, the anchor the datapath benchmark holds the established path to",
    ),
    (
        "openssl",
        "the TLS syslog tests make their certificates (and a collector) with it",
    ),
    (
        "rsyslog",
        "the syslog tests deliver to a real rsyslog (started with their own configuration)",
    ),
    (
        "rsyslog-gnutls",
        "rsyslog's TLS (RFC 5425) for the syslog tests",
    ),
    (
        "python3",
        "the tests check every alert record with tests/siem/validate.py",
    ),
    (
        "protobuf-compiler",
        "the etcd client's gRPC code is generated with protoc when enforcer is built",
    ),
    (
        "etcd-server",
        "the fleet tests run a three-member etcd cluster",
    ),
    (
        "etcd-client",
        "etcdctl: the fleet tests write into etcd directly",
    ),
    (
        "containernetworking-plugins",
        "the CNI tests chain enforcer-cni after the reference bridge and host-local plugins",
    ),
    (
        "qemu-system-x86",
        "the kernel matrix boots Debian's kernels under QEMU",
    ),
    ("busybox-static", "the kernel matrix's guests run busybox"),
    ("zstd", "unpacking the kernel matrix's compressed modules"),
    (
        "xz-utils",
        "unpacking the kernel matrix's compressed modules",
    ),
];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The toolchain the fuzz targets build with (cargo-fuzz needs a nightly for its sanitizer
/// and coverage flags); pinned, so a run finds what the code does, not what a new nightly does.
pub const FUZZ_TOOLCHAIN: &str = "nightly-2026-05-19";
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn quiet(command: &mut Command) -> bool {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn output(command: &mut Command) -> Option<String> {
    let output = command.stderr(Stdio::null()).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

fn package_installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|status| status.contains("install ok installed"))
}

/// Rust toolchain components: `rust-src` builds core for the BPF target; `rustfmt` and
/// `clippy` are what CI checks the code with.
const COMPONENTS: [&str; 3] = ["rust-src", "rustfmt", "clippy"];

fn missing_components() -> Vec<&'static str> {
    let installed = output(
        Command::new("rustup")
            .args(["component", "list", "--installed"])
            .current_dir(crate::workspace_root()),
    )
    .unwrap_or_default();
    COMPONENTS
        .into_iter()
        .filter(|component| !installed.lines().any(|line| line.starts_with(component)))
        .collect()
}

fn bpf_linker_installed() -> bool {
    quiet(Command::new("bpf-linker").arg("--version"))
}

fn fuzz_toolchain_installed() -> bool {
    output(Command::new("rustup").args(["toolchain", "list"]))
        .is_some_and(|list| list.lines().any(|line| line.starts_with(FUZZ_TOOLCHAIN)))
}

fn cargo_fuzz_installed() -> bool {
    output(Command::new("cargo-fuzz").arg("--version"))
        .is_some_and(|version| version.contains(CARGO_FUZZ_VERSION))
}

fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .map(|(package, _)| *package)
        .filter(|package| !package_installed(package))
        .collect()
}

/// Whether everything `setup` installs is present (no network needed to find out).
fn tooling_complete() -> bool {
    missing_packages().is_empty()
        && missing_components().is_empty()
        && bpf_linker_installed()
        && fuzz_toolchain_installed()
        && cargo_fuzz_installed()
}

/// Runs `setup` only if something it installs is missing.
pub fn setup_if_missing() -> Result<()> {
    if tooling_complete() {
        return Ok(());
    }
    println!("xtask: some build or test prerequisites are missing; running setup first");
    setup()
}

fn run_step(what: &str, command: &mut Command) -> Result<()> {
    println!("  -> {what}");
    let status = command
        .status()
        .with_context(|| format!("starting: {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Installs what is missing, saying what it does; does nothing for what is present.
pub fn setup() -> Result<()> {
    println!("setup: Debian packages");
    let missing = missing_packages();
    for (package, why) in PACKAGES {
        if !missing.contains(package) {
            println!("  ok {package}");
        } else {
            println!("  missing {package} ({why})");
        }
    }
    if !missing.is_empty() {
        if !nix::unistd::geteuid().is_root() {
            bail!(
                "installing {} needs root: run `sudo cargo xtask setup`",
                missing.join(" ")
            );
        }
        run_step(
            "apt-get update",
            Command::new("apt-get").args(["update", "-q"]),
        )?;
        run_step(
            &format!("apt-get install {}", missing.join(" ")),
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }

    println!(
        "setup: Rust toolchain components (rust-src builds core for the BPF target; rustfmt and clippy check the code)"
    );
    let missing = missing_components();
    for component in COMPONENTS {
        if !missing.contains(&component) {
            println!("  ok {component}");
        }
    }
    if !missing.is_empty() {
        run_step(
            &format!("rustup component add {}", missing.join(" ")),
            Command::new("rustup")
                .args(["component", "add"])
                .args(&missing)
                .current_dir(crate::workspace_root()),
        )?;
    }

    println!(
        "setup: bpf-linker {BPF_LINKER_VERSION} built against LLVM 22 (links the eBPF object)"
    );
    if bpf_linker_installed() {
        println!("  ok bpf-linker");
    } else {
        // Prebuilt downloads do not work here; build it against Debian's LLVM 22.
        run_step(
            &format!("cargo install bpf-linker {BPF_LINKER_VERSION} (takes a few minutes)"),
            crate::cargo_command()
                .args([
                    "install",
                    "bpf-linker",
                    "--locked",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", LLVM_PREFIX),
        )?;
    }
    setup_fuzzing()?;
    println!("setup: done");
    Ok(())
}

/// The pinned nightly toolchain and cargo-fuzz, for `cargo xtask fuzz` only.
fn setup_fuzzing() -> Result<()> {
    println!("setup: {FUZZ_TOOLCHAIN} and cargo-fuzz {CARGO_FUZZ_VERSION} (the fuzz targets only)");
    if fuzz_toolchain_installed() {
        println!("  ok {FUZZ_TOOLCHAIN}");
    } else {
        run_step(
            &format!("rustup toolchain install {FUZZ_TOOLCHAIN}"),
            Command::new("rustup").args([
                "toolchain",
                "install",
                FUZZ_TOOLCHAIN,
                "--profile",
                "minimal",
            ]),
        )?;
    }
    if cargo_fuzz_installed() {
        println!("  ok cargo-fuzz");
    } else {
        run_step(
            &format!("cargo install cargo-fuzz {CARGO_FUZZ_VERSION}"),
            crate::cargo_command().args([
                "install",
                "cargo-fuzz",
                "--locked",
                "--version",
                CARGO_FUZZ_VERSION,
            ]),
        )?;
    }
    Ok(())
}

struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
    fix: String,
}

fn kernel_release() -> (u32, u32, String) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse::<u32>().ok());
    (
        numbers.next().unwrap_or(0),
        numbers.next().unwrap_or(0),
        release,
    )
}

fn filesystem_magic(path: &str) -> Option<i64> {
    nix::sys::statfs::statfs(path)
        .ok()
        .map(|stat| stat.filesystem_type().0)
}

fn cgroup2_mount() -> Option<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .ok()?
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| fields[1].to_owned())
        })
}

/// Whether a clsact qdisc can be added, tried on a dummy interface in a throwaway namespace.
fn clsact_works() -> bool {
    let namespace = format!("enf-doctor-{}", std::process::id());
    if !quiet(Command::new("ip").args(["netns", "add", &namespace])) {
        return false;
    }
    let works = quiet(
        Command::new("ip").args(["-n", &namespace, "link", "add", "probe0", "type", "dummy"]),
    ) && quiet(Command::new("ip").args([
        "netns", "exec", &namespace, "tc", "qdisc", "add", "dev", "probe0", "clsact",
    ]));
    quiet(Command::new("ip").args(["netns", "delete", &namespace]));
    works
}

fn checks() -> Vec<Check> {
    let mut checks = Vec::new();
    let root = nix::unistd::geteuid().is_root();
    checks.push(Check {
        name: "privileges",
        ok: root,
        detail: if root {
            "running as root".to_owned()
        } else {
            "not root".to_owned()
        },
        fix: "run as root (or with CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and CAP_SYS_ADMIN)"
            .to_owned(),
    });
    let (major, minor, release) = kernel_release();
    checks.push(Check {
        name: "kernel",
        ok: (major, minor) >= (5, 10),
        detail: format!(
            "Linux {release}{}",
            if (major, minor) >= (6, 6) {
                " (TCX links available)"
            } else {
                " (TC via clsact)"
            }
        ),
        fix: "use kernel 5.10 or newer (the oldest the kernel matrix proves)".to_owned(),
    });
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    checks.push(Check {
        name: "BTF",
        // The datapath uses no CO-RE: kernel BTF is not needed (the kernel matrix boots
        // kernels with it, so that is what is proven).
        ok: true,
        detail: if btf {
            "/sys/kernel/btf/vmlinux present".to_owned()
        } else {
            "no kernel BTF (not needed: the datapath uses no CO-RE)".to_owned()
        },
        fix: "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y".to_owned(),
    });
    let jit = std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable")
        .unwrap_or_default()
        .trim()
        .to_owned();
    checks.push(Check {
        name: "BPF JIT",
        ok: jit == "1" || jit == "2",
        detail: format!(
            "net.core.bpf_jit_enable = {}",
            if jit.is_empty() { "unknown" } else { &jit }
        ),
        fix: "sysctl -w net.core.bpf_jit_enable=1".to_owned(),
    });
    let bpffs = filesystem_magic("/sys/fs/bpf") == Some(0xcafe_4a11);
    checks.push(Check {
        name: "bpffs",
        // enforcer mounts it when missing; a missing mount point is the real problem.
        ok: Path::new("/sys/fs/bpf").is_dir(),
        detail: if bpffs {
            "mounted at /sys/fs/bpf".to_owned()
        } else {
            "not mounted at /sys/fs/bpf (enforcer mounts it on start)".to_owned()
        },
        fix: "mount -t bpf bpf /sys/fs/bpf".to_owned(),
    });
    let cgroup2 = cgroup2_mount();
    checks.push(Check {
        name: "cgroup v2",
        ok: cgroup2.is_some(),
        detail: cgroup2.map_or(
            "not mounted (cgroup identities unavailable)".to_owned(),
            |mount| format!("mounted at {mount}"),
        ),
        fix: "mount -t cgroup2 none /sys/fs/cgroup/unified".to_owned(),
    });
    if root {
        let clsact = (major, minor) >= (6, 6) || clsact_works();
        checks.push(Check {
            name: "TC egress hook",
            ok: clsact,
            detail: if (major, minor) >= (6, 6) {
                "TCX".to_owned()
            } else if clsact {
                "clsact qdisc works".to_owned()
            } else {
                "clsact unavailable".to_owned()
            },
            fix: "enable CONFIG_NET_CLS_ACT and CONFIG_NET_SCH_INGRESS".to_owned(),
        });
    }
    for (package, why) in PACKAGES {
        let ok = package_installed(package);
        checks.push(Check {
            name: package,
            ok,
            detail: (*why).to_owned(),
            fix: format!("cargo xtask setup (installs {package})"),
        });
    }
    let missing = missing_components();
    for component in COMPONENTS {
        checks.push(Check {
            name: component,
            ok: !missing.contains(&component),
            detail: if component == "rust-src" {
                "builds core for bpfel-unknown-none"
            } else {
                "checks the code (CI)"
            }
            .to_owned(),
            fix: format!("rustup component add {component}"),
        });
    }
    checks.push(Check {
        name: "bpf-linker",
        ok: bpf_linker_installed(),
        detail: "links the eBPF object".to_owned(),
        fix: format!("LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker --no-default-features --features llvm-22"),
    });
    checks
}

/// Prints every check; returns whether all pass.
pub fn doctor() -> bool {
    let mut all_ok = true;
    for check in checks() {
        if check.ok {
            println!("ok      {:<16} {}", check.name, check.detail);
        } else {
            all_ok = false;
            println!(
                "MISSING {:<16} {}\n        fix: {}",
                check.name, check.detail, check.fix
            );
        }
    }
    if all_ok {
        // The BPF features the datapath relies on, probed by the binary that relies on them.
        println!("\nthis kernel's BPF features (`enforcer features`):");
        all_ok = crate::build_release()
            .and_then(|binary| Ok(Command::new(binary).arg("features").status()?))
            .is_ok_and(|status| status.success());
    }
    all_ok
}
