//! Small-packet rate through the host, the filters side by side: 64-byte UDP datagrams from one
//! endpoint namespace to another, routed through the simulated host, with 10 000 rules between
//! other services in force, each as the packets per second received relative to no filter in
//! the same run. Anchors: iptables with the rules as a linear chain (every packet walks it
//! before the rule for its flow), nftables with them as a set (one lookup), both in the host's
//! forward hook; enforcer attached to both host-side veths (TC ingress and egress), and its hooks
//! again with programs that pass everything, the floor any program on them starts from.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
};

use enforcer_testbed::{Topology, bpf, policies, results};
use serde_json::Value;

const ENFORCER: &str = env!("CARGO_BIN_EXE_enforcer");
const RULES: usize = 10_000;
const SERVICES: usize = 200;
const PAYLOAD: usize = 64;

/// Seconds per iperf3 run and runs per figure (`--quick`: one second, one run).
fn sizes() -> (u32, usize) {
    if results::quick() { (1, 1) } else { (3, 3) }
}

/// The generated policy's rules, as (source, destination, TCP port).
fn rules() -> Vec<(Ipv4Addr, Ipv4Addr, u16)> {
    policies::generated_rules(SERVICES, RULES)
        .map(|(from, to, port)| {
            (
                policies::service_address(from),
                policies::service_address(to),
                port,
            )
        })
        .collect()
}

/// Received 64-byte datagrams per second, client to server (iperf3 at full speed), median.
fn pps(topology: &Topology) -> f64 {
    let (seconds, rounds) = sizes();
    let mut samples: Vec<f64> = (0..rounds)
        .map(|_| {
            let args = [
                "-u",
                "-b",
                "0",
                "-l",
                &PAYLOAD.to_string(),
                "-t",
                &seconds.to_string(),
            ];
            let output = topology
                .iperf3("client", "server", &args)
                .expect("iperf3 (cargo xtask setup installs it)");
            let report: Value = serde_json::from_slice(&output).expect("iperf3 JSON");
            let received = &report["end"]["sum_received"];
            match (received["bytes"].as_f64(), received["seconds"].as_f64()) {
                (Some(bytes), Some(seconds)) if seconds > 0.0 => bytes / PAYLOAD as f64 / seconds,
                _ => panic!("no result: {report}"),
            }
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Runs `program` in the host namespace with `input` on its standard input.
fn feed(topology: &Topology, program: &str, args: &[&str], input: &str) {
    let mut child = topology
        .host
        .command(program)
        .unwrap()
        .args(args)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("{program}: {error}"));
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())
        .expect("rules written");
    let status = child.wait().expect("waited for");
    assert!(status.success(), "{program} {args:?} failed ({status})");
}

fn run(command: &mut Command) {
    let status = command.status().expect("runs");
    assert!(status.success(), "{command:?} failed ({status})");
}

/// The rules as an iptables chain walked rule by rule; the client's flow is accepted after
/// them, and so are packets of flows conntrack knows (also after them).
fn with_iptables(topology: &Topology, client: Ipv4Addr, server: Ipv4Addr) -> f64 {
    let mut text = String::from("*filter\n:FORWARD DROP [0:0]\n");
    for (from, to, port) in rules() {
        let _ = writeln!(
            text,
            "-A FORWARD -s {from} -d {to} -p tcp --dport {port} -j ACCEPT"
        );
    }
    let _ = writeln!(text, "-A FORWARD -s {client} -d {server} -j ACCEPT");
    let _ = writeln!(
        text,
        "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\nCOMMIT"
    );
    feed(topology, "iptables-restore", &[], &text);
    let rate = pps(topology);
    feed(
        topology,
        "iptables-restore",
        &[],
        "*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n",
    );
    rate
}

/// The rules as an nftables set of (source, destination, port), one lookup per packet.
fn with_nftables(topology: &Topology, client: Ipv4Addr, server: Ipv4Addr) -> f64 {
    let mut elements = String::new();
    for (from, to, port) in rules() {
        let _ = write!(elements, "{from} . {to} . {port}, ");
    }
    let text = format!(
        "table inet enforcer_bench {{\n\
         set allowed {{ type ipv4_addr . ipv4_addr . inet_service; elements = {{ {elements}{client} . {server} . 5201 }} }}\n\
         chain forward {{ type filter hook forward priority 0; policy drop;\n\
         ip saddr . ip daddr . tcp dport @allowed accept\n\
         ip saddr . ip daddr . udp dport @allowed accept\n\
         ct state established,related accept\n}}\n}}\n"
    );
    feed(topology, "nft", &["-f", "-"], &text);
    let rate = pps(topology);
    run(topology
        .host
        .command("nft")
        .unwrap()
        .args(["delete", "table", "inet", "enforcer_bench"]));
    rate
}

/// enforcer on both host-side veths, the same rules plus the client's edge; then the same hooks
/// (TCX on the veths, the socket hook on the cgroup root) with programs that pass everything
/// swapped in: what being attached costs, before any of enforcer's work.
fn with_enforcer(topology: &Topology, client: Ipv4Addr, server: Ipv4Addr) -> (f64, f64) {
    let policy = format!(
        "{}[[service]]\nname = \"client\"\ninterfaces = [\"v-client\"]\naddresses = [\"{client}/32\"]\n\
         [[service]]\nname = \"server\"\ninterfaces = [\"v-server\"]\naddresses = [\"{server}/32\"]\n\
         [[allow]]\nfrom = \"client\"\nto = \"server\"\nports = [\"5201/tcp\", \"5201/udp\"]\n",
        policies::generated(SERVICES, RULES)
    );
    let policy_path = topology.write_file("policy.toml", &policy).unwrap();
    let daemon = topology
        .run_enforcer(
            Path::new(ENFORCER),
            &["--policy".as_ref(), policy_path.as_os_str()],
            "enforcer.log",
        )
        .expect("enforcer starts");
    let rate = pps(topology);
    let links = topology.pin_path().join("links");
    for (prefix, egress) in [("tci", false), ("tc", true)] {
        let pass_all = bpf::load_pass_all_tcx(egress).expect("a pass-all TC program loads");
        for interface in ["v-client", "v-server"] {
            bpf::swap_link_program(&links.join(format!("{prefix}-{interface}")), &pass_all)
                .expect("the pass-all program replaces enforcer's on its TCX link");
        }
    }
    let socket_pass_all =
        bpf::load_pass_all_socket_ingress().expect("a pass-all socket filter loads");
    bpf::swap_link_program(&links.join("sockets"), &socket_pass_all)
        .expect("the pass-all program replaces enforcer's on the socket hook's link");
    let attached_only = pps(topology);
    drop(daemon);
    (rate, attached_only)
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "the pps benchmark builds network namespaces: run it as root (cargo xtask bench)"
        );
        std::process::exit(1);
    }
    let topology = Topology::build(&["client", "server"]).expect("topology");
    let (client, server) = (
        topology.endpoint("client").ipv4,
        topology.endpoint("server").ipv4,
    );
    let unfiltered = pps(&topology);
    let (enforced, attached_only) = with_enforcer(&topology, client, server);
    let figures = [
        ("enforcer (TC ingress + egress)", enforced),
        ("enforcer's hooks, pass-all programs", attached_only),
        (
            "nftables, the rules as a set",
            with_nftables(&topology, client, server),
        ),
        (
            "iptables, the rules as a linear chain",
            with_iptables(&topology, client, server),
        ),
    ];
    let (seconds, rounds) = sizes();
    println!(
        "64-byte UDP through the host over veths, {RULES} rules in force (iperf3, {seconds} s, median of {rounds})"
    );
    println!(
        "  no filter:                              {:>10.0} packets/s received",
        unfiltered
    );
    results::record(
        "pps",
        "64-byte UDP over veths, no filter",
        unfiltered.round(),
        "packets/s",
        None,
    );
    let (enforcer, nftables) = (figures[0].1, figures[2].1);
    results::record(
        "pps",
        &format!("64-byte UDP over veths, {RULES} rules, enforcer"),
        enforcer.round(),
        "packets/s",
        Some(("nftables set (anchor)", enforcer / nftables)),
    );
    for (filter, rate) in figures {
        println!(
            "  {filter:<38} {rate:>10.0} packets/s  ratio {:.3}",
            rate / unfiltered
        );
        results::record(
            "pps",
            &format!("64-byte UDP over veths, {RULES} rules, {filter}"),
            rate.round(),
            "packets/s",
            Some(("no filter", rate / unfiltered)),
        );
    }
}
