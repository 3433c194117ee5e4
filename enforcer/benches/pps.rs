//! Small-packet rate through the host, the filters side by side: 64-byte UDP datagrams from one
//! endpoint namespace to another, routed through the simulated host, with 10 000 rules between
//! other services in force, each as the packets per second received relative to no filter in
//! the same run. Anchors: iptables with the rules as a linear chain (every packet walks it
//! before the rule for its flow), nftables with them as a set (one lookup), both in the host's
//! forward hook; enforcer attached to both host-side veths (TC ingress and egress), and its hooks
//! again with programs that pass everything, the floor any program on them starts from; and
//! enforcer with BPF host routing (`--host-routing bpf`), where the client's TC ingress sends
//! what it passed straight into the server's namespace: no forward path, no second hook.
//!
//! The same run also times enforcer's programs over many flows at once: 4 096 answered UDP
//! flows from the client, a datagram from each in turn, against one flow from the same sender.
//! One flow is the best case of a flow cache; a host's traffic is many.
//!
//! The filters are measured in rounds, one run of each per round, in an order that turns from
//! round to round, and each ratio is the median of its rounds' ratios: this machine's speed
//! drifts within a run by more than the filters differ, and a filter measured in a block of its
//! own took whatever the machine was doing then (one run had the floor itself at 0.91 of no
//! filter). iptables, two orders of magnitude behind, is measured once after the rounds.
//!
//! Last, once: a process of the host in a service's cgroup sending over one UDP flow, the case
//! the forwarded traffic above never is (it has no local socket): the TC egress program that
//! binds each of its packets to the service's cgroup, against a pass-all program on the link.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
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
    /// Enforcer with `--host-routing bpf`: the client's allowed packets go from its veth's TC
    /// ingress straight into the server's namespace.
    bpf_routed: f64,
    attached_only: f64,
    nftables: f64,
    /// What the programs on enforcer's hooks cost a packet, in nanoseconds (see
    /// [`program_cost`]): enforcer's, and the pass-all programs'.
    enforcer_cost: f64,
    pass_all_cost: f64,
    /// The same, with the client's own sender (see [`flows_cost`]): enforcer's programs over
    /// one flow and over [`MANY_FLOWS`], and the pass-all programs over as many.
    one_flow_cost: f64,
    many_flows_cost: f64,
    many_flows_pass_all_cost: f64,
}

/// The TC egress link of the server's interface, which every packet to the server leaves
/// through, forwarded or sent by a process of the host.
const SERVER_EGRESS: &str = "tc-v-server";

/// The hooks a client-to-server packet passes, by the name of their pinned links: TC ingress
/// where it enters the host, TC egress where it leaves it. (The socket hook is attached only for
/// a policy with services identified by cgroup, which this one has not.)
const PACKET_HOOKS: [&str; 2] = ["tci-v-client", SERVER_EGRESS];

/// What the programs on [`PACKET_HOOKS`] cost each packet they ran for while `traffic` ran, in
/// nanoseconds: the kernel's own timing of every program run, on only for that while, summed
/// over the hooks, each hook's time divided by its own runs. Exact to a few nanoseconds where
/// the packet rate moves by a tenth between runs; the timing adds two clock reads to every
/// run, to enforcer's programs and the pass-all ones alike.
fn hooks_cost(topology: &Topology, traffic: impl FnOnce()) -> f64 {
    links_cost(topology, &PACKET_HOOKS, traffic)
}

/// [`hooks_cost`] on the programs of the pinned links `hooks`.
fn links_cost(topology: &Topology, hooks: &[&str], traffic: impl FnOnce()) -> f64 {
    let links: Vec<PathBuf> = hooks
        .iter()
        .map(|hook| topology.pin_path().join("links").join(hook))
        .collect();
    let links: Vec<&Path> = links.iter().map(PathBuf::as_path).collect();
    bpf::mean_run_times(&links, traffic)
        .expect("the hooks' programs' run-time statistics")
        .iter()
        .sum()
}

/// What the programs on [`PACKET_HOOKS`] cost each packet of a short iperf3 run at full
/// speed (see [`hooks_cost`]).
fn program_cost(topology: &Topology) -> f64 {
    hooks_cost(topology, || {
        topology
            .iperf3(
                "client",
                "server",
                &["-u", "-b", "0", "-l", &PAYLOAD.to_string(), "-t", "1"],
            )
            .expect("iperf3");
    })
}

/// Flows in the many-flows run: each flow forwarded through the host takes a slot of the flow
/// cache at each of its two hooks, so 4 096 flows sent in turn want 16 times the 512 slots a
/// CPU has, and nearly every packet misses the cache.
const MANY_FLOWS: usize = 4096;
/// The port the client's flows go to: the one the policy allows (iperf3's).
const SERVER_PORT: u16 = 5201;
/// At most this many datagrams in one run of [`flows_cost`], whatever its duration.
const MOST_DATAGRAMS: usize = 5_000_000;

/// What the programs on [`PACKET_HOOKS`] cost each 64-byte datagram of a run that sends over
/// `flows` UDP flows from the client to the server, one datagram per flow in turn (see
/// [`hooks_cost`]). Before the timing, every flow sends one datagram and the server answers
/// it, so the run measures answered flows, as most of a host's are.
fn flows_cost(topology: &Topology, flows: usize) -> f64 {
    let server = SocketAddrV4::new(topology.endpoint("server").ipv4, SERVER_PORT);
    let receiver = topology
        .netns("server")
        .run(|| UdpSocket::bind(server))
        .expect("in the server's namespace")
        .expect("the receiving socket binds");
    let senders = topology
        .netns("client")
        .run(|| {
            (0..flows)
                .map(|_| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
                .collect::<std::io::Result<Vec<_>>>()
        })
        .expect("in the client's namespace")
        .expect("the sending sockets bind (one per flow)");
    let datagram = [0u8; PAYLOAD];
    answer_each_flow(&senders, &receiver, server);
    let send_round = || {
        for socket in &senders {
            // A full socket buffer refuses one now and then; the rest go.
            let _ = socket.send_to(&datagram, server);
        }
    };
    let duration = Duration::from_secs(u64::from(sizes().0));
    hooks_cost(topology, || {
        let started = Instant::now();
        let mut sent = 0;
        while started.elapsed() < duration && sent < MOST_DATAGRAMS {
            send_round();
            sent += flows;
        }
    })
}

/// Sends a datagram from each sender and has the server answer it, one flow at a time: the
/// receiving socket's buffer holds a few hundred datagrams, and a flow whose first one it
/// dropped would stay unanswered.
fn answer_each_flow(senders: &[UdpSocket], receiver: &UdpSocket, server: SocketAddrV4) {
    receiver
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("a read timeout");
    let mut buffer = [0u8; PAYLOAD];
    for (flow, sender) in senders.iter().enumerate() {
        sender
            .send_to(&buffer, server)
            .expect("a flow's first datagram");
        let (_, from) = receiver
            .recv_from(&mut buffer)
            .unwrap_or_else(|error| panic!("flow {flow}'s first datagram: {error}"));
        receiver.send_to(&buffer, from).expect("the answer");
    }
}

/// Lets the process hold a socket per flow of the many-flows run (the usual soft limit is
/// 1 024 descriptors).
fn allow_a_socket_per_flow() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a struct of ours.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        let wanted = (MANY_FLOWS as libc::rlim_t) * 2;
        assert!(
            limit.rlim_max >= wanted,
            "the many-flows run needs {wanted} file descriptors; the hard limit is {}",
            limit.rlim_max
        );
        limit.rlim_cur = limit.rlim_cur.max(wanted);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

/// The filters' runs of round `index`, starting with a different one each round.
fn round(topology: &Topology, index: usize, client: Ipv4Addr, server: Ipv4Addr) -> Round {
    let mut round = Round::default();
    for step in 0..4 {
        match (index + step) % 4 {
            0 => round.unfiltered = pps(topology),
            2 => round.bpf_routed = with_bpf_host_routing(topology, client, server),
            1 => {
                let enforcer = with_enforcer(topology, client, server);
                (round.enforced, round.enforcer_cost) = enforcer.active;
                (round.attached_only, round.pass_all_cost) = enforcer.pass_all;
                (round.one_flow_cost, round.many_flows_cost) = enforcer.flows;
                round.many_flows_pass_all_cost = enforcer.many_flows_pass_all;
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
/// (TCX on the veths) with programs that pass everything
/// swapped in: what being attached costs, before any of enforcer's work. Each with its rate and
/// its programs' cost per packet (see [`program_cost`]), measured in a run of its own; and the
/// programs' cost over one flow and over many (see [`flows_cost`]).
struct WithEnforcer {
    active: (f64, f64),
    pass_all: (f64, f64),
    flows: (f64, f64),
    many_flows_pass_all: f64,
}

fn with_enforcer(topology: &Topology, client: Ipv4Addr, server: Ipv4Addr) -> WithEnforcer {
    let daemon = run_enforcer(topology, client, server, &[]);
    let links = topology.pin_path().join("links");
    assert!(
        !links.join("sockets").exists(),
        "no socket hook for a policy without services identified by cgroup"
    );
    let active = (pps(topology), program_cost(topology));
    let flows = (flows_cost(topology, 1), flows_cost(topology, MANY_FLOWS));
    for (prefix, egress) in [("tci", false), ("tc", true)] {
        let pass_all = bpf::load_pass_all_tcx(egress).expect("a pass-all TC program loads");
        for interface in ["v-client", "v-server"] {
            bpf::swap_link_program(&links.join(format!("{prefix}-{interface}")), &pass_all)
                .expect("the pass-all program replaces enforcer's on its TCX link");
        }
    }
    let pass_all = (pps(topology), program_cost(topology));
    let many_flows_pass_all = flows_cost(topology, MANY_FLOWS);
    drop(daemon);
    WithEnforcer {
        active,
        pass_all,
        flows,
        many_flows_pass_all,
    }
}

/// The packet rate with enforcer run with `--host-routing bpf`.
fn with_bpf_host_routing(topology: &Topology, client: Ipv4Addr, server: Ipv4Addr) -> f64 {
    let _daemon = run_enforcer(topology, client, server, &["--host-routing", "bpf"]);
    pps(topology)
}

/// Enforcer on the client's and server's veths with `extra` arguments, the generated rules in
/// force and the client allowed to reach the server's iperf3.
fn run_enforcer(
    topology: &Topology,
    client: Ipv4Addr,
    server: Ipv4Addr,
    extra: &[&str],
) -> enforcer_testbed::Daemon {
    let policy = format!(
        "{}[[service]]\nname = \"client\"\ninterfaces = [\"v-client\"]\naddresses = [\"{client}/32\"]\n\
         [[service]]\nname = \"server\"\ninterfaces = [\"v-server\"]\naddresses = [\"{server}/32\"]\n\
         [[allow]]\nfrom = \"client\"\nto = \"server\"\nports = [\"5201/tcp\", \"5201/udp\"]\n",
        policies::generated(SERVICES, RULES)
    );
    let policy_path = topology.write_file("policy.toml", &policy).unwrap();
    let mut args = vec!["--policy".as_ref(), policy_path.as_os_str()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    topology
        .run_enforcer(Path::new(ENFORCER), &args, "enforcer.log")
        .expect("enforcer starts")
}

/// What the TC egress program costs each 64-byte datagram a process of the host in a service's
/// cgroup sends to the server over one UDP flow, enforcer's (the flow answered) and a pass-all
/// one's (see [`hooks_cost`]).
fn cgroup_sender_costs(topology: &Topology, server: Ipv4Addr) -> (f64, f64) {
    let cgroup = enforcer_testbed::Cgroup::create("pps-sender").expect("a cgroup for the sender");
    let policy = format!(
        "{}[[service]]\nname = \"sender\"\ncgroups = [\"{}\"]\n\
         [[service]]\nname = \"server\"\ninterfaces = [\"v-server\"]\naddresses = [\"{server}/32\"]\n\
         [[allow]]\nfrom = \"sender\"\nto = \"server\"\nports = [\"5201/udp\"]\n",
        policies::generated(SERVICES, RULES),
        cgroup.path.display()
    );
    let policy_path = topology.write_file("cgroup-policy.toml", &policy).unwrap();
    let daemon = topology
        .run_enforcer(
            Path::new(ENFORCER),
            &["--policy".as_ref(), policy_path.as_os_str()],
            "enforcer-cgroup.log",
        )
        .expect("enforcer starts");
    let enforced = cgroup_sender_cost(topology, &cgroup, server, true);
    let pass_all = bpf::load_pass_all_tcx(true).expect("a pass-all TC program loads");
    let link = topology.pin_path().join("links").join(SERVER_EGRESS);
    bpf::swap_link_program(&link, &pass_all)
        .expect("the pass-all program replaces enforcer's on its TCX link");
    // Unanswered: enforcer's TC ingress and socket hook refuse the answers of a flow its egress
    // program no longer sees.
    let passed = cgroup_sender_cost(topology, &cgroup, server, false);
    drop(daemon);
    (enforced, passed)
}

/// [`cgroup_sender_costs`]' one measurement: a Python sender in `cgroup` has its first datagram
/// answered if `answered`, then sends for the run's duration (at most [`MOST_DATAGRAMS`]).
fn cgroup_sender_cost(
    topology: &Topology,
    cgroup: &enforcer_testbed::Cgroup,
    server: Ipv4Addr,
    answered: bool,
) -> f64 {
    let address = SocketAddrV4::new(server, SERVER_PORT);
    let receiver = topology
        .netns("server")
        .run(|| UdpSocket::bind(address))
        .expect("in the server's namespace")
        .expect("the receiving socket binds");
    receiver
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("a read timeout");
    let script = format!(
        "import socket, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(5)\n\
         d = bytes({PAYLOAD})\n\
         s.sendto(d, ('{server}', {SERVER_PORT}))\n\
         if {answered}: s.recv(100)\n\
         s.setblocking(False)\n\
         end = time.monotonic() + {seconds}\n\
         n = 0\n\
         while n < {MOST_DATAGRAMS} and time.monotonic() < end:\n\
         \x20   for _ in range(1000):\n\
         \x20       try: s.sendto(d, ('{server}', {SERVER_PORT}))\n\
         \x20       except BlockingIOError: pass\n\
         \x20   n += 1000\n",
        seconds = sizes().0,
        answered = if answered { "True" } else { "False" },
    );
    let mut sender = topology
        .host
        .command_in_cgroup("python3", cgroup)
        .expect("a command in the sender's cgroup");
    sender.args(["-c", &script]);
    let mut buffer = [0u8; PAYLOAD];
    links_cost(topology, &[SERVER_EGRESS], || {
        let mut running = sender.spawn().expect("python3 runs");
        if answered {
            let (_, from) = receiver
                .recv_from(&mut buffer)
                .expect("the sender's first datagram");
            receiver.send_to(&buffer, from).expect("the answer");
        }
        assert!(running.wait().expect("the sender ends").success());
    })
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "the pps benchmark builds network namespaces: run it as root (cargo xtask bench)"
        );
        std::process::exit(1);
    }
    allow_a_socket_per_flow();
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
                "  round {}: no filter {:.0}, enforcer {:.0}, with BPF host routing {:.0}, its hooks passing all {:.0}, nftables {:.0} packets/s; programs per packet: enforcer's {:.0} ns, pass-all {:.0} ns; {MANY_FLOWS} flows: enforcer's {:.0} ns (one flow {:.0}), pass-all {:.0} ns",
                index + 1,
                round.unfiltered,
                round.enforced,
                round.bpf_routed,
                round.attached_only,
                round.nftables,
                round.enforcer_cost,
                round.pass_all_cost,
                round.many_flows_cost,
                round.one_flow_cost,
                round.many_flows_pass_all_cost,
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
            "enforcer with BPF host routing (--host-routing bpf)",
            figure(|round| round.bpf_routed, |round| round.unfiltered),
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
    let (bpf_routed, bpf_routed_against_nftables) =
        figure(|round| round.bpf_routed, |round| round.nftables);
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
    results::record(
        "pps",
        &format!("64-byte UDP over veths, {RULES} rules, enforcer with BPF host routing"),
        bpf_routed.round(),
        "packets/s",
        Some(("nftables set (anchor)", bpf_routed_against_nftables)),
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
        "  programs on a packet's two hooks (kernel run-time statistics): enforcer's {enforcer_cost:.0} ns, pass-all {pass_all_cost:.0} ns, {over_pass_all:.0} ns more"
    );
    let figure = "64-byte UDP over veths, 10000 rules, enforcer's programs per packet (TC ingress + egress, kernel run-time statistics)";
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
    record_many_flows(&rounds);
    let (enforced, passed) = cgroup_sender_costs(&topology, server);
    println!(
        "  a host process in a service's cgroup, one flow: TC egress program {enforced:.0} ns a packet, pass-all {passed:.0} ns"
    );
    results::record(
        "pps",
        "64-byte UDP from a host process in a service's cgroup, one flow, enforcer's TC egress program per packet over a pass-all one",
        (enforced - passed).round(),
        "ns",
        None,
    );
}

/// The many-flows figures: enforcer's programs per packet over the pass-all ones, and against
/// the same sender's single flow.
fn record_many_flows(rounds: &[Round]) {
    let median_of = |cost: fn(&Round) -> f64| median(rounds.iter().map(cost).collect());
    let over_pass_all = median_of(|round| round.many_flows_cost - round.many_flows_pass_all_cost);
    let against_one_flow = median_of(|round| round.many_flows_cost / round.one_flow_cost);
    let many = median_of(|round| round.many_flows_cost);
    println!(
        "  {MANY_FLOWS} flows sent in turn: enforcer's programs {many:.0} ns a packet, {over_pass_all:.0} ns more than pass-all, {against_one_flow:.2} of one flow's"
    );
    results::record(
        "pps",
        &format!(
            "64-byte UDP over veths, {RULES} rules, {MANY_FLOWS} flows in turn, enforcer's programs per packet (two hooks)"
        ),
        many.round(),
        "ns",
        Some(("the same sender over one flow", against_one_flow)),
    );
    results::record(
        "pps",
        &format!(
            "64-byte UDP over veths, {RULES} rules, {MANY_FLOWS} flows in turn, enforcer's programs per packet over the pass-all programs"
        ),
        over_pass_all.round(),
        "ns",
        None,
    );
}
