//! Small-packet rate through the host, the filters side by side: 64-byte UDP datagrams from one
//! endpoint namespace to another, routed through the simulated host, with 10 000 rules between
//! other services in force, each as the packets per second received relative to no filter in
//! the same run. Anchors: iptables with the rules as a linear chain (every packet walks it
//! before the rule for its flow), nftables with them as a set (one lookup), both in the host's
//! forward hook; enforcer attached to both host-side veths (TC ingress and egress), and its hooks
//! again with programs that pass everything, the floor any program on them starts from.
//!
//! The filters are measured in rounds, one run of each per round, in an order that turns from
//! round to round, and each ratio is the median of its rounds' ratios: this machine's speed
//! drifts within a run by more than the filters differ, and a filter measured in a block of its
//! own took whatever the machine was doing then (one run had the floor itself at 0.91 of no
//! filter). iptables, two orders of magnitude behind, is measured once after the rounds.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use enforcer_testbed::{Topology, bpf, policies, results, results::median};
use serde_json::Value;

const ENFORCER: &str = env!("CARGO_BIN_EXE_enforcer");
const RULES: usize = 10_000;
const SERVICES: usize = 200;
const PAYLOAD: usize = 64;

/// Seconds per iperf3 run and rounds (`--quick`: one second, one round).
fn sizes() -> (u32, usize) {
    if results::quick() { (1, 1) } else { (3, 5) }
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

/// Received 64-byte datagrams per second, client to server: one iperf3 run at full speed, its
/// first second left out (`--omit`): it follows a change of filter, and measures warm-up.
fn pps(topology: &Topology) -> f64 {
    let (seconds, _) = sizes();
    let args = [
        "-u",
        "-b",
        "0",
        "-l",
        &PAYLOAD.to_string(),
        "-t",
        &seconds.to_string(),
        "--omit",
        "1",
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
}

/// What one round measures, one run each.
#[derive(Clone, Copy, Default)]
struct Round {
    unfiltered: f64,
    enforced: f64,
    attached_only: f64,
    nftables: f64,
    /// What the programs on enforcer's hooks cost a packet, in nanoseconds (see
    /// [`program_cost`]): enforcer's, and the pass-all programs'.
    enforcer_cost: f64,
    pass_all_cost: f64,
}

/// The hooks a client-to-server packet passes, by the name of their pinned links: TC ingress
/// where it enters the host, TC egress where it leaves it, the socket hook where it is received.
const PACKET_HOOKS: [&str; 3] = ["tci-v-client", "tc-v-server", "sockets"];

/// What the programs on [`PACKET_HOOKS`] cost each packet of a short run at full speed, in
/// nanoseconds: the kernel's own timing of every program run, on only for that run, summed
/// over the hooks, each hook's time divided by its own runs. Exact to a few nanoseconds where
/// the packet rate moves by a tenth between runs; the timing adds two clock reads to every
/// run, to enforcer's programs and the pass-all ones alike.
fn program_cost(topology: &Topology) -> f64 {
    let links = PACKET_HOOKS.map(|hook| topology.pin_path().join("links").join(hook));
    let links = links.each_ref().map(PathBuf::as_path);
    bpf::mean_run_times(&links, || {
        topology
            .iperf3(
                "client",
                "server",
                &["-u", "-b", "0", "-l", &PAYLOAD.to_string(), "-t", "1"],
            )
            .expect("iperf3");
    })
    .expect("the hooks' programs' run-time statistics")
    .iter()
    .sum()
}

/// The filters' runs of round `index`, starting with a different one each round.
fn round(topology: &Topology, index: usize, client: Ipv4Addr, server: Ipv4Addr) -> Round {
    let mut round = Round::default();
    for step in 0..3 {
        match (index + step) % 3 {
            0 => round.unfiltered = pps(topology),
            1 => {
                let enforcer = with_enforcer(topology, client, server);
                (round.enforced, round.enforcer_cost) = enforcer.active;
                (round.attached_only, round.pass_all_cost) = enforcer.pass_all;
            }
            _ => round.nftables = with_nftables(topology, client, server),
        }
    }
    round
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
    let runs = sizes().1.min(3);
    let rate = median((0..runs).map(|_| pps(topology)).collect());
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
/// swapped in: what being attached costs, before any of enforcer's work. Each with its rate and
/// its programs' cost per packet (see [`program_cost`]), measured in a run of its own.
struct WithEnforcer {
    active: (f64, f64),
    pass_all: (f64, f64),
}

fn with_enforcer(topology: &Topology, client: Ipv4Addr, server: Ipv4Addr) -> WithEnforcer {
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
    let active = (pps(topology), program_cost(topology));
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
    let pass_all = (pps(topology), program_cost(topology));
    drop(daemon);
    WithEnforcer { active, pass_all }
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
    let (seconds, rounds) = sizes();
    let rounds: Vec<Round> = (0..rounds)
        .map(|index| {
            let round = round(&topology, index, client, server);
            println!(
                "  round {}: no filter {:.0}, enforcer {:.0}, its hooks passing all {:.0}, nftables {:.0} packets/s; programs per packet: enforcer's {:.0} ns, pass-all {:.0} ns",
                index + 1,
                round.unfiltered,
                round.enforced,
                round.attached_only,
                round.nftables,
                round.enforcer_cost,
                round.pass_all_cost,
            );
            round
        })
        .collect();
    let iptables = with_iptables(&topology, client, server);
    // Each figure's median rate, and its median ratio to `against` over the rounds.
    let figure = |rate: fn(&Round) -> f64, against: fn(&Round) -> f64| {
        (
            median(rounds.iter().map(rate).collect()),
            median(
                rounds
                    .iter()
                    .map(|round| rate(round) / against(round))
                    .collect(),
            ),
        )
    };
    let unfiltered = median(rounds.iter().map(|round| round.unfiltered).collect());
    let figures = [
        (
            "enforcer (TC ingress + egress)",
            figure(|round| round.enforced, |round| round.unfiltered),
        ),
        (
            "enforcer's hooks, pass-all programs",
            figure(|round| round.attached_only, |round| round.unfiltered),
        ),
        (
            "nftables, the rules as a set",
            figure(|round| round.nftables, |round| round.unfiltered),
        ),
        (
            "iptables, the rules as a linear chain",
            (iptables, iptables / unfiltered),
        ),
    ];
    let (enforcer, against_nftables) = figure(|round| round.enforced, |round| round.nftables);
    println!(
        "64-byte UDP through the host over veths, {RULES} rules in force (iperf3, {seconds} s runs, {} rounds, medians)",
        rounds.len()
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
    results::record(
        "pps",
        &format!("64-byte UDP over veths, {RULES} rules, enforcer"),
        enforcer.round(),
        "packets/s",
        Some(("nftables set (anchor)", against_nftables)),
    );
    for (filter, (rate, ratio)) in figures {
        println!("  {filter:<38} {rate:>10.0} packets/s  ratio {ratio:.3}");
        results::record(
            "pps",
            &format!("64-byte UDP over veths, {RULES} rules, {filter}"),
            rate.round(),
            "packets/s",
            Some(("no filter", ratio)),
        );
    }
    println!("  enforcer / nftables, per round:        ratio {against_nftables:.3}");
    let (enforcer_cost, pass_all_cost) = (
        median(rounds.iter().map(|round| round.enforcer_cost).collect()),
        median(rounds.iter().map(|round| round.pass_all_cost).collect()),
    );
    let over_pass_all = median(
        rounds
            .iter()
            .map(|round| round.enforcer_cost - round.pass_all_cost)
            .collect(),
    );
    println!(
        "  programs on a packet's three hooks (kernel run-time statistics): enforcer's {enforcer_cost:.0} ns, pass-all {pass_all_cost:.0} ns, {over_pass_all:.0} ns more"
    );
    let figure = "64-byte UDP over veths, 10000 rules, enforcer's programs per packet (TC ingress + egress + socket hook, kernel run-time statistics)";
    results::record(
        "pps",
        figure,
        enforcer_cost.round(),
        "ns",
        Some((
            "the pass-all programs on the same hooks",
            enforcer_cost / pass_all_cost,
        )),
    );
    results::record(
        "pps",
        "64-byte UDP over veths, 10000 rules, enforcer's programs per packet over the pass-all programs",
        over_pass_all.round(),
        "ns",
        None,
    );
}
