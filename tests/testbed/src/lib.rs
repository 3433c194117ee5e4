//! Test topologies in network namespaces, for enforcer's integration tests, demo and benchmarks.
//!
//! A [`Topology`] is one simulated host (a network namespace where enforcer runs and where the
//! host ends of the veths live) and endpoint namespaces, each behind its own veth. Everything is
//! created by the topology and removed when it is dropped, also when a test fails: the endpoint
//! and host namespaces (which takes their veths with them), the pin directory, the temp
//! directory. Names carry the process id, so parallel runs never collide, and a topology left by
//! a killed run is swept by the next one.
//!
//! Sockets are created inside a namespace by a thread that entered it (`setns` is per thread),
//! so listeners and clients are plain std sockets, no external tools.

use std::{
    fs::{self},
    io::{self},
    path::Path,
    process::{Command, Output},
    sync::{
        Once,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

pub mod anchors;
pub mod bpf;
mod cgroups;
mod daemon;
pub mod fleet;
pub mod frames;
mod netns;
mod pki;
pub mod policies;
pub mod results;
mod rsyslog;
mod servers;
mod siem;
mod topology;

pub use enforcer_testbed_macros::root_test;

pub use self::{
    cgroups::{Cgroup, cgroup2_root},
    daemon::Daemon,
    netns::Netns,
    pki::TestCa,
    rsyslog::Rsyslog,
    servers::{Server, exchange, finish, socat_exchange},
    siem::assert_conform,
    topology::{Endpoint, Topology},
};

/// Prefix of every namespace, pin directory and temp directory the test bed creates.
pub const PREFIX: &str = "enft";
const NETNS_DIR: &str = "/var/run/netns";
const BPFFS: &str = "/sys/fs/bpf";
/// How often waits look again.
const POLL: Duration = Duration::from_millis(20);

/// Whether a root-only test can run. Without root it prints why it skips, except under
/// `CI=true`, where a skip would hide untested kernel behaviour and so fails the test.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|value| value == "true") {
        panic!("{test} needs root (network namespaces, eBPF) and CI=true forbids skipping it");
    }
    eprintln!("skipping {test}: needs root (network namespaces, eBPF)");
    false
}

fn run_checked(command: &mut Command) -> io::Result<Output> {
    let output = command.output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(output)
}

/// `ip` with arguments, failing with its stderr.
pub fn ip(args: &[&str]) -> io::Result<()> {
    run_checked(Command::new("ip").args(args)).map(drop)
}

/// A name no other topology, cgroup or pin directory of any run uses (`enft-<pid>-<n>`).
pub fn unique_id() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{PREFIX}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes namespaces and pins that runs which no longer exist left behind.
fn sweep_stale() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        let dead = |name: &str| -> bool {
            let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else {
                return false;
            };
            let Some(pid) = rest
                .split('-')
                .next()
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                return false;
            };
            pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
        };
        for entry in fs::read_dir(NETNS_DIR).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = ip(&["netns", "delete", &name]);
            }
        }
        for entry in fs::read_dir(BPFFS).into_iter().flatten().flatten() {
            if dead(&entry.file_name().to_string_lossy()) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    });
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
pub fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}
