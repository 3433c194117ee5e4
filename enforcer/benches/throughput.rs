//! TCP throughput between two endpoint namespaces routed through the simulated host, with
//! enforcer attached to both host-side veths, as a ratio to the same path without it, measured
//! in the same run (iperf3, bounded runs): with the default ingress hook (TC on veths) and with
//! XDP forced, which shows why the default is what it is.

use std::{net::IpAddr, process::Stdio, time::Duration};

use enforcer_testbed::{Daemon, Topology, results};
use serde_json::Value;

const ENFORCER: &str = env!("CARGO_BIN_EXE_enforcer");
/// Seconds per iperf3 run and runs per figure (`--quick`: one second, one run).
fn sizes() -> (u32, usize) {
    if results::quick() { (1, 1) } else { (3, 3) }
}

/// Runs one iperf3 client from `client` to a one-shot server in `server`; returns bits/s.
fn iperf(topology: &Topology, server_ip: IpAddr) -> f64 {
    let mut server = topology
        .endpoint("server")
        .netns
        .command("iperf3")
        .unwrap()
        .args(["-s", "-1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 (cargo xtask setup installs it)");
    std::thread::sleep(Duration::from_millis(300));
    let output = topology
        .endpoint("client")
        .netns
        .command("iperf3")
        .unwrap()
        .args([
            "-c",
            &server_ip.to_string(),
            "-t",
            &sizes().0.to_string(),
            "-J",
        ])
        .output()
        .expect("iperf3 client");
    let _ = server.kill();
    let _ = server.wait();
    let report: Value = serde_json::from_slice(&output.stdout).expect("iperf3 JSON");
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no result: {report}"))
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "the throughput benchmark builds network namespaces: run it as root (cargo xtask bench)"
        );
        std::process::exit(1);
    }
    let topology = Topology::build(&["client", "server"]).expect("topology");
    let server_ip = IpAddr::V4(topology.endpoint("server").ipv4);
    let (seconds, rounds) = sizes();
    let without: Vec<f64> = (0..rounds).map(|_| iperf(&topology, server_ip)).collect();

    let policy = format!(
        "[[service]]\nname = \"client\"\ninterfaces = [\"v-client\"]\naddresses = [\"{}/32\"]\n[[service]]\nname = \"server\"\ninterfaces = [\"v-server\"]\naddresses = [\"{}/32\"]\n[[allow]]\nfrom = \"client\"\nto = \"server\"\nports = [\"5201/tcp\"]\n",
        topology.endpoint("client").ipv4,
        topology.endpoint("server").ipv4
    );
    let policy_path = topology.write_file("policy.toml", &policy).unwrap();
    let enforced = |ingress: &str| -> f64 {
        let pins = topology.pin_path();
        let mut command = topology.host.command(ENFORCER).unwrap();
        command
            .arg("run")
            .arg("--policy")
            .arg(&policy_path)
            .arg("--pin-path")
            .arg(&pins)
            .arg("--observe-socket")
            .arg(topology.dir.join("observe.sock"))
            .args([
                "--ingress-hook",
                ingress,
                "--attach",
                "v-client",
                "--attach",
                "v-server",
            ]);
        let daemon = Daemon::spawn_enforcer(
            command,
            ENFORCER.as_ref(),
            &pins,
            topology.dir.join(format!("enforcer-{ingress}.log")),
            Duration::from_secs(60),
        )
        .expect("enforcer starts");
        let rate = median((0..rounds).map(|_| iperf(&topology, server_ip)).collect());
        drop(daemon);
        rate
    };
    let with = enforced("auto");
    let with_xdp = enforced("xdp");
    let without = median(without);
    println!(
        "TCP throughput, client -> host -> server over veths (iperf3, {seconds} s, median of {rounds})"
    );
    println!(
        "  without enforcer:                    {:>7.2} Gbit/s",
        without / 1e9
    );
    println!(
        "  enforcer, TC ingress + TC egress:    {:>7.2} Gbit/s  ratio {:.3}  (default on veths)",
        with / 1e9,
        with / without
    );
    println!(
        "  enforcer, XDP ingress + TC egress:   {:>7.2} Gbit/s  ratio {:.3}  (--ingress-hook xdp)",
        with_xdp / 1e9,
        with_xdp / without
    );
    let gbits = |rate: f64| (rate / 1e7).round() / 100.0;
    results::record(
        "throughput",
        "TCP over veths, no enforcer",
        gbits(without),
        "Gbit/s",
        None,
    );
    results::record(
        "throughput",
        "TCP over veths, enforcer (TC ingress, default)",
        gbits(with),
        "Gbit/s",
        Some(("no enforcer", with / without)),
    );
    results::record(
        "throughput",
        "TCP over veths, enforcer (XDP ingress forced)",
        gbits(with_xdp),
        "Gbit/s",
        Some(("no enforcer", with_xdp / without)),
    );
}
