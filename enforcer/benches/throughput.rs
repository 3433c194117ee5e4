//! TCP throughput between two endpoint namespaces routed through the simulated host, with
//! enforcer attached to both host-side veths, as a ratio to the same path without it, measured
//! in the same run (iperf3, bounded runs): with the default ingress hook (TC on veths) and with
//! XDP forced, which shows why the default is what it is.

use std::path::Path;

use enforcer_testbed::{Topology, results, results::median};
use serde_json::Value;

const ENFORCER: &str = env!("CARGO_BIN_EXE_enforcer");
/// Seconds per iperf3 run and runs per figure (`--quick`: one second, one run).
fn sizes() -> (u32, usize) {
    if results::quick() { (1, 1) } else { (3, 3) }
}

/// TCP from the `client` endpoint to the `server` endpoint's one-shot iperf3; returns bits/s.
fn iperf(topology: &Topology) -> f64 {
    let seconds = sizes().0.to_string();
    let output = topology
        .iperf3("client", "server", &["-t", &seconds])
        .expect("iperf3 (cargo xtask setup installs it)");
    let report: Value = serde_json::from_slice(&output).expect("iperf3 JSON");
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no result: {report}"))
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "the throughput benchmark builds network namespaces: run it as root (cargo xtask bench)"
        );
        std::process::exit(1);
    }
    let topology = Topology::build(&["client", "server"]).expect("topology");
    let (seconds, rounds) = sizes();
    let without: Vec<f64> = (0..rounds).map(|_| iperf(&topology)).collect();

    let policy = format!(
        "[[service]]\nname = \"client\"\ninterfaces = [\"v-client\"]\naddresses = [\"{}/32\"]\n[[service]]\nname = \"server\"\ninterfaces = [\"v-server\"]\naddresses = [\"{}/32\"]\n[[allow]]\nfrom = \"client\"\nto = \"server\"\nports = [\"5201/tcp\"]\n",
        topology.endpoint("client").ipv4,
        topology.endpoint("server").ipv4
    );
    let policy_path = topology.write_file("policy.toml", &policy).unwrap();
    let enforced = |ingress: &str| -> f64 {
        let args = [
            "--policy".as_ref(),
            policy_path.as_os_str(),
            "--ingress-hook".as_ref(),
            ingress.as_ref(),
            "--attach".as_ref(),
            "v-client".as_ref(),
            "--attach".as_ref(),
            "v-server".as_ref(),
        ];
        let daemon = topology
            .run_enforcer(
                Path::new(ENFORCER),
                &args,
                &format!("enforcer-{ingress}.log"),
            )
            .expect("enforcer starts");
        let rate = median((0..rounds).map(|_| iperf(&topology)).collect());
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
