//! `cargo xtask demo`: the shop of `policies/demo.toml` in network namespaces, real listeners,
//! real connections, and a table of what enforcer allowed and refused, and why.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use enforcer_testbed::{Daemon, Topology};
use serde_json::Value;

/// Endpoints in the order `policies/demo.toml` assumes (endpoint i gets 10.200.i.2).
const ENDPOINTS: [&str; 4] = ["frontend", "api", "db", "world"];
const TIMEOUT: Duration = Duration::from_millis(1500);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C or SIGTERM stop the demo between steps, so the clean-up below still runs.
fn catch_interrupts() {
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_interrupt),
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    for signal in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        // SAFETY: the handler only stores to an atomic.
        let _ = unsafe { nix::sys::signal::sigaction(signal, &action) };
    }
}

pub(crate) fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Probe {
    Tcp(u16),
    Ping,
}

struct Attempt {
    from: &'static str,
    to: &'static str,
    probe: Probe,
    expect_allowed: bool,
}

const ATTEMPTS: [Attempt; 9] = [
    Attempt {
        from: "world",
        to: "frontend",
        probe: Probe::Tcp(80),
        expect_allowed: true,
    },
    Attempt {
        from: "world",
        to: "frontend",
        probe: Probe::Ping,
        expect_allowed: true,
    },
    Attempt {
        from: "frontend",
        to: "api",
        probe: Probe::Tcp(8080),
        expect_allowed: true,
    },
    Attempt {
        from: "api",
        to: "db",
        probe: Probe::Tcp(5432),
        expect_allowed: true,
    },
    Attempt {
        from: "world",
        to: "api",
        probe: Probe::Tcp(8080),
        expect_allowed: false,
    },
    Attempt {
        from: "world",
        to: "db",
        probe: Probe::Tcp(5432),
        expect_allowed: false,
    },
    Attempt {
        from: "frontend",
        to: "db",
        probe: Probe::Tcp(5432),
        expect_allowed: false,
    },
    Attempt {
        from: "db",
        to: "api",
        probe: Probe::Tcp(8080),
        expect_allowed: false,
    },
    Attempt {
        from: "api",
        to: "frontend",
        probe: Probe::Tcp(80),
        expect_allowed: false,
    },
];

/// What the machine looks like from the outside, to prove the demo left nothing behind.
fn footprint() -> (String, usize, String, String) {
    let run = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .output()
            .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
            .unwrap_or_default()
    };
    let entries = |dir: &str| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            // The kernel's own views of a freshly mounted bpffs (the bpf_preload iterators),
            // there whenever the demo had to mount it: not the demo's leftovers.
            .filter(|name| name != "maps.debug" && name != "progs.debug")
            .collect();
        names.sort();
        names.join(" ")
    };
    (
        run(&["ip", "netns", "list"]),
        run(&["ip", "-o", "link", "show"]).lines().count(),
        entries("/sys/fs/bpf"),
        // The controller's socket and rule-names file.
        entries("/run/enforcer"),
    )
}

pub fn run(enforcer: &Path, workspace: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    footprint_unchanged(|| show(enforcer, &workspace.join("policies/demo.toml")))
}

/// Runs `demo` with Ctrl-C caught, then says whether the machine is as it was before.
pub(crate) fn footprint_unchanged(demo: impl FnOnce() -> Result<()>) -> Result<()> {
    catch_interrupts();
    let before = footprint();
    let outcome = demo();
    let after = footprint();
    println!();
    if before == after {
        println!(
            "clean-up: no namespace, link, pin or state file left behind (ip netns, ip link, /sys/fs/bpf, /run/enforcer as before)"
        );
    } else {
        println!(
            "clean-up: WARNING, the machine differs from before the demo:\n  before {before:?}\n  after  {after:?}"
        );
    }
    outcome
}

fn show(enforcer: &Path, policy: &Path) -> Result<()> {
    println!(
        "demo: building the shop in network namespaces: {}",
        ENDPOINTS.join(", ")
    );
    let topology = Topology::build(&ENDPOINTS).context("building the demo topology")?;
    let _servers = [
        topology.endpoint("frontend").netns.tcp_echo_server(80)?,
        topology.endpoint("api").netns.tcp_echo_server(8080)?,
        topology.endpoint("db").netns.tcp_echo_server(5432)?,
    ];
    check_interrupt()?;

    let alerts = topology.dir.join("alerts.jsonl");
    let mut command = topology.host.command(enforcer)?;
    command
        .args(["run", "--ephemeral", "--policy"])
        .arg(policy)
        .arg("--pin-path")
        .arg(topology.pin_path())
        .arg("--alerts")
        .arg(&alerts);
    for endpoint in &topology.endpoints {
        command.args(["--attach", &endpoint.host_interface]);
    }
    println!(
        "demo: enforcer run --policy {} --attach {}",
        policy.display(),
        topology
            .endpoints
            .iter()
            .map(|e| e.host_interface.as_str())
            .collect::<Vec<_>>()
            .join(" --attach ")
    );
    let daemon = Daemon::spawn_enforcer(
        command,
        enforcer,
        &topology.pin_path(),
        topology.dir.join("enforcer.log"),
        Duration::from_secs(30),
    )
    .context("starting enforcer")?;
    check_interrupt()?;

    println!("demo: trying each connection\n");
    let mut results = Vec::new();
    for attempt in &ATTEMPTS {
        check_interrupt()?;
        let from = topology.endpoint(attempt.from);
        let to = topology.endpoint(attempt.to);
        let allowed = match attempt.probe {
            Probe::Tcp(port) => from
                .netns
                .tcp_exchange(
                    SocketAddr::new(IpAddr::V4(to.ipv4), port),
                    b"hello",
                    TIMEOUT,
                )
                .is_ok_and(|reply| reply == b"hello"),
            Probe::Ping => from
                .netns
                .ping(IpAddr::V4(to.ipv4), TIMEOUT)
                .unwrap_or(false),
        };
        results.push(allowed);
    }

    // The kernel's flow events say which rule decided each one.
    let mut decided = vec![None; ATTEMPTS.len()];
    enforcer_testbed::eventually(Duration::from_secs(5), || {
        let records: Vec<Value> = std::fs::read_to_string(&alerts)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect();
        for (index, attempt) in ATTEMPTS.iter().enumerate() {
            decided[index] = records
                .iter()
                .find(|record| matches(record, attempt))
                .cloned();
        }
        decided.iter().all(Option::is_some)
    });

    println!(
        "{:<9} {:<9} {:<10} {:<9} {:<20} WHY",
        "FROM", "TO", "SERVICE", "RESULT", "DECIDED BY"
    );
    let mut surprises = 0;
    for ((attempt, allowed), record) in ATTEMPTS.iter().zip(&results).zip(&decided) {
        let service = match attempt.probe {
            Probe::Tcp(port) => format!("{port}/tcp"),
            Probe::Ping => "icmp echo".to_owned(),
        };
        let (rule, why) = match record {
            Some(record) => (
                record["firewall_rule"]["uid"]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned(),
                explain(record),
            ),
            None => ("-".to_owned(), "no flow event seen".to_owned()),
        };
        let mark = if *allowed == attempt.expect_allowed {
            ""
        } else {
            "  <-- UNEXPECTED"
        };
        if !mark.is_empty() {
            surprises += 1;
        }
        let result = if *allowed { "allowed" } else { "refused" };
        println!(
            "{:<9} {:<9} {:<10} {:<9} {:<20} {why}{mark}",
            attempt.from, attempt.to, service, result, rule
        );
    }
    drop(daemon);
    if surprises > 0 {
        bail!(
            "{surprises} connection(s) did not go as the policy says; enforcer log: {}",
            topology.dir.join("enforcer.log").display()
        );
    }
    println!("\ndemo: every connection went as policies/demo.toml says");
    Ok(())
}

fn matches(record: &Value, attempt: &Attempt) -> bool {
    let endpoints = record["src_endpoint"]["svc_name"] == attempt.from
        && record["dst_endpoint"]["svc_name"] == attempt.to;
    let service = match attempt.probe {
        Probe::Tcp(port) => {
            record["connection_info"]["protocol_name"] == "tcp"
                && record["dst_endpoint"]["port"] == port
        }
        Probe::Ping => record["connection_info"]["protocol_name"] == "icmp",
    };
    endpoints && service
}

fn explain(record: &Value) -> String {
    let rule = record["firewall_rule"]["uid"].as_str().unwrap_or("?");
    match record["unmapped"]["enforcer"]["reason"]
        .as_str()
        .unwrap_or("")
    {
        "policy_allow" => format!("allowed by rule {rule}"),
        "policy_deny" => format!("explicitly denied by rule {rule}"),
        "default_deny" => "no rule allows it, and a declared service is involved".to_owned(),
        "rate_limited" => format!("over the new-connection limit of {rule}"),
        "spoofed" => "source address is not the sender's".to_owned(),
        other => other.to_owned(),
    }
}
