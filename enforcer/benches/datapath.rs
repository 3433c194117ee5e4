//! Per-packet cost of the datapath, measured with `BPF_PROG_TEST_RUN` and reported as ratios
//! against an empty XDP program timed in the same run: the cost enforcer adds over the cheapest
//! possible program. Also `xdp-filter` (xdp-tools) on the same frame, the anchor the
//! established path is held to, and the same paths under a 10-rule and a 100 000-rule policy,
//! whose ratio shows the lookup does not grow with the number of rules. An established flow's
//! packets repeat on one CPU here, so they pass from that CPU's flow cache; the same flows
//! through programs without the cache give the conntrack path's cost beside it, for either
//! family. IPv6's paths are timed under a policy whose services have both families' addresses
//! (see `dual_stack_rows`).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::OwnedFd,
    path::PathBuf,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};

use enforcer::{
    compile::{self, HostView},
    datapath::maps::{Installer, KernelMaps},
    datapath::{
        hook::Hook,
        loader::{self, Datapath, LoadOptions},
        pins::PinLayout,
    },
    policy,
};
use enforcer_testbed::{
    anchors, bpf,
    frames::{self, Ipv4},
    policies, results,
};

/// Packets per run and runs per figure (`--quick`: a tenth of the packets, three runs).
fn sizes() -> (u32, usize) {
    if results::quick() {
        (50_000, 3)
    } else {
        (500_000, 5)
    }
}

/// The median of `rounds` timings by `run`.
fn median_of(rounds: usize, mut run: impl FnMut() -> Duration) -> Duration {
    let mut samples: Vec<Duration> = (0..rounds).map(|_| run()).collect();
    samples.sort();
    samples[samples.len() / 2]
}

fn install(maps: &mut KernelMaps, installer: &mut Installer, text: &str) {
    let policy = policy::parse_sources(vec![(PathBuf::from("bench.toml"), text.to_owned())])
        .expect("valid policy");
    let compiled = compile::compile(&policy, &HostView::default(), None).expect("compiles");
    installer.install(maps, &compiled).expect("installs");
}

fn tcp(src: Ipv4Addr, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    Ipv4::new(src, dst, frames::TCP).frame(&frames::tcp(40000, dport, flags))
}

fn tcp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    frames::ipv6_frame(
        src,
        dst,
        frames::TCP,
        64,
        &[],
        &frames::tcp(sport, dport, flags),
    )
}

/// Addresses no service or CIDR peer names (identity `world`) among the services' own, as a
/// scan of their neighbours meets them: a walk of the trie would follow the services' entries
/// down to the last bits.
const UNNAMED: Ipv4Addr = Ipv4Addr::new(10, 100, 128, 1);
const UNNAMED6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 0x8000);

/// An established IPv6 flow's packet from `s0` to `s1` of [`policies::generated_dual_stack`].
fn established6() -> Vec<u8> {
    let (s0, s1) = (policies::service_address6(0), policies::service_address6(1));
    tcp6(s0, s1, 40000, 10_000, frames::TCP_ACK)
}

/// The IPv6 flow of [`established6`].
fn flow6() -> Flow {
    let (s0, s1) = (policies::service_address6(0), policies::service_address6(1));
    Flow {
        syn: tcp6(s0, s1, 40000, 10_000, frames::TCP_SYN),
        answer: tcp6(s1, s0, 10_000, 40000, frames::TCP_SYN | frames::TCP_ACK),
        established: established6(),
    }
}

/// The IPv6 established flow's row.
const ESTABLISHED6: &str = "XDP, established flow, IPv6 (flow cache hit), 10000 rules";

/// The same paths over IPv6, and a service's SYN to an unnamed address of either family,
/// under a policy of 1 000 services and 10 000 rules, every service with an IPv6 address beside
/// its IPv4 one: 2 000 whole addresses in the trie, which an address no one names would walk.
fn dual_stack_rows(
    datapath: &mut Datapath,
    maps: &mut KernelMaps,
    installer: &mut Installer,
    time: &dyn Fn(&mut Datapath, Hook, &[u8]) -> Duration,
) -> Vec<(String, Duration)> {
    install(
        maps,
        installer,
        &policies::generated_dual_stack(1_000, 10_000),
    );
    let (s0, s1) = (policies::service_address6(0), policies::service_address6(1));
    let flow = flow6();
    open_flow(datapath, &flow.syn, &flow.answer);
    let denied = tcp6(s1, s0, 40000, 10_000, frames::TCP_SYN);
    let to_world6 = tcp6(s1, UNNAMED6, 40000, 10_000, frames::TCP_SYN);
    let to_world = tcp(
        policies::service_address(1),
        UNNAMED,
        10_000,
        frames::TCP_SYN,
    );
    [
        (ESTABLISHED6, flow.established),
        (
            "XDP, denied new flow (rule lookups, default-deny, report de-dup), IPv6, 10000 rules",
            denied,
        ),
        (
            "XDP, denied new flow to an unnamed address, IPv6, 10000 rules",
            to_world6,
        ),
        (
            "XDP, denied new flow to an unnamed address, IPv4, 10000 rules",
            to_world,
        ),
    ]
    .into_iter()
    .map(|(path, frame)| (path.to_owned(), time(datapath, Hook::Xdp, &frame)))
    .collect()
}

/// The first SYN opens the flow at every hook, the answer establishes it (it moves to the
/// table of answered flows); the ACKs that follow are an established flow's.
fn open_flow(datapath: &mut Datapath, syn: &[u8], answer: &[u8]) {
    for hook in Hook::ALL {
        datapath.test_run(hook, syn, 1).expect("open the flow");
    }
    datapath
        .test_run(Hook::Xdp, answer, 1)
        .expect("answer the flow");
}

/// A flow as the benchmark opens and then times it: its first SYN, the answer that
/// establishes it, and a packet of the established flow.
struct Flow {
    syn: Vec<u8>,
    answer: Vec<u8>,
    established: Vec<u8>,
}

/// The established flows' costs through programs loaded without the flow cache: the conntrack
/// lookup and update every flow's packets take on a CPU that has not cached it (its first
/// packets there, and one a second after). Under a policy of 10 services and 10 rules, each
/// service with an IPv6 address beside its IPv4 one.
fn conntrack_paths(
    flows: &[Flow],
    time: &dyn Fn(&mut Datapath, Hook, &[u8]) -> Duration,
) -> Vec<Duration> {
    let pins = PinLayout::new(
        PathBuf::from("/sys/fs/bpf").join(format!("enfbench-{}-uncached", std::process::id())),
    );
    let options = LoadOptions {
        without_flow_cache: true,
        ..LoadOptions::default()
    };
    let (mut datapath, mut maps, _ring) =
        Datapath::load_with(pins.clone(), &options).expect("load");
    let mut installer = Installer::adopt(&maps).expect("adopt");
    install(
        &mut maps,
        &mut installer,
        &policies::generated_dual_stack(10, 10),
    );
    let costs = flows
        .iter()
        .map(|flow| {
            open_flow(&mut datapath, &flow.syn, &flow.answer);
            time(&mut datapath, Hook::Xdp, &flow.established)
        })
        .collect();
    drop(datapath);
    let _ = loader::unload(&pins);
    costs
}

/// Distinct denied shapes per flood measurement, and how many are judged between two drains
/// of the ring buffer (the controller's part, which keeps it from filling).
const FLOOD_SHAPES: u16 = 50_000;
const FLOOD_BATCH: u16 = 1_000;

/// The mean cost of one packet in `frames`, each run once (`BPF_PROG_TEST_RUN` times each run
/// in the kernel), draining the ring buffer after each batch.
fn once_each(
    mut run: impl FnMut(&[u8]) -> Duration,
    frames: impl Iterator<Item = Vec<u8>>,
    ring: &mut RingBuf<MapData>,
) -> Duration {
    let (mut total, mut count) = (Duration::ZERO, 0u32);
    for frame in frames {
        total += run(&frame);
        count += 1;
        if count % u32::from(FLOOD_BATCH) == 0 {
            while ring.next().is_some() {}
        }
    }
    total / count.max(1)
}

/// A denied new flow's cost while a flood of distinct denied shapes is running: every packet a
/// shape the kernel has not reported yet (a new destination port), so each makes a
/// de-duplication entry and a record; less the empty program's cost measured the same way
/// (one packet per run, whose timing has a fixed cost of its own).
fn flood_cost_over_empty(
    datapath: &mut Datapath,
    ring: &mut RingBuf<MapData>,
    baseline: &OwnedFd,
    src: Ipv4Addr,
    dst: Ipv4Addr,
) -> Duration {
    let shapes = || (1..=FLOOD_SHAPES).map(|port| tcp(src, dst, port, frames::TCP_SYN));
    let flood = once_each(
        |frame| {
            datapath
                .test_run(Hook::Xdp, frame, 1)
                .expect("test run")
                .duration
        },
        shapes(),
        ring,
    );
    let empty = once_each(
        |frame| bpf::test_run(baseline, frame, 1).expect("baseline run").1,
        shapes(),
        ring,
    );
    flood.saturating_sub(empty)
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the datapath benchmark loads eBPF programs: run it as root (cargo xtask bench)");
        std::process::exit(1);
    }
    let pins = PinLayout::new(
        PathBuf::from("/sys/fs/bpf").join(format!("enfbench-{}", std::process::id())),
    );
    let (mut datapath, mut maps, mut ring) = Datapath::load(pins.clone()).expect("load");
    let mut installer = Installer::adopt(&maps).expect("adopt");
    let baseline = bpf::load_pass_all_xdp().expect("baseline program");
    let (repeat, rounds) = sizes();

    let (s0, s1) = (policies::service_address(0), policies::service_address(1));
    let syn = tcp(s0, s1, 10_000, frames::TCP_SYN);
    let established = tcp(s0, s1, 10_000, frames::TCP_ACK);
    let answer = Ipv4::new(s1, s0, frames::TCP).frame(&frames::tcp(
        10_000,
        40000,
        frames::TCP_SYN | frames::TCP_ACK,
    ));
    let denied = tcp(s1, s0, 10_000, frames::TCP_SYN);
    let arp = frames::ethernet(&[], frames::ETH_P_ARP, &[0u8; 28]);

    let time = |datapath: &mut Datapath, hook: Hook, frame: &[u8]| -> Duration {
        median_of(rounds, || {
            datapath
                .test_run(hook, frame, repeat)
                .expect("test run")
                .duration
        })
    };
    // An anchor program's cost per packet on `frame`, timed as enforcer's are.
    let time_program = |program: &OwnedFd, frame: &[u8]| -> Duration {
        median_of(rounds, || {
            bpf::test_run(program, frame, repeat).expect("anchor run").1
        })
    };
    // The simplest XDP filter there is, on the frame of an established flow: the anchor the
    // established path is held to.
    let xdp_filter = anchors::XdpFilter::load().expect("xdp-filter loads (xdp-tools)");
    let xdp_filter_program = xdp_filter.program().expect("its program");
    let xdp_filter_cost = time_program(&xdp_filter_program, &established);
    let xdp_filter_cost6 = time_program(&xdp_filter_program, &established6());
    drop(xdp_filter_program);
    drop(xdp_filter);
    let empty = time_program(&baseline, &syn);
    // What running any program at a TC hook costs here, for reading the TC rows beside it.
    let empty_tc_program = bpf::load_pass_all_tcx(false).expect("an empty TC program");
    let empty_tc = time_program(&empty_tc_program, &syn);

    // The same for the socket hook, which runs for every packet any socket receives.
    let empty_socket_program =
        bpf::load_pass_all_socket_ingress().expect("an empty socket hook program");
    let empty_socket = time_program(&empty_socket_program, &syn);

    let mut results = vec![
        ("empty TC program (r0 = TC_ACT_UNSPEC)".to_owned(), empty_tc),
        (
            "empty socket hook program (r0 = 1)".to_owned(),
            empty_socket,
        ),
    ];
    for (label, rules, services) in [("10 rules", 10, 10), ("100000 rules", 100_000, 1_000)] {
        install(
            &mut maps,
            &mut installer,
            &policies::generated(services, rules),
        );
        open_flow(&mut datapath, &syn, &answer);
        results.push((
            format!("XDP, established flow (flow cache hit), {label}"),
            time(&mut datapath, Hook::Xdp, &established),
        ));
        results.push((
            format!("XDP, denied new flow (rule lookups, default-deny, report de-dup), {label}"),
            time(&mut datapath, Hook::Xdp, &denied),
        ));
        results.push((
            format!("TC ingress, established flow, {label}"),
            time(&mut datapath, Hook::TcIngress, &established),
        ));
        results.push((
            format!("TC egress, established flow, {label}"),
            time(&mut datapath, Hook::TcEgress, &established),
        ));
        results.push((
            format!("TC egress, denied new flow, {label}"),
            time(&mut datapath, Hook::TcEgress, &denied),
        ));
    }
    // Under the 100 000-rule policy, installed last.
    let flood = flood_cost_over_empty(&mut datapath, &mut ring, &baseline, s1, s0);
    results.extend(dual_stack_rows(
        &mut datapath,
        &mut maps,
        &mut installer,
        &time,
    ));
    let flows = [
        Flow {
            syn: syn.clone(),
            answer: answer.clone(),
            established: established.clone(),
        },
        flow6(),
    ];
    for (family, cost) in ["", ", IPv6"].iter().zip(conntrack_paths(&flows, &time)) {
        results.push((
            format!(
                "XDP, established flow without the flow cache (conntrack hit){family}, 10 rules"
            ),
            cost,
        ));
    }
    results.push((
        "XDP, non-IP frame (ARP): parse only".to_owned(),
        time(&mut datapath, Hook::Xdp, &arp),
    ));
    // The socket hook runs for every packet any socket of the host receives; most are none of
    // its business, loopback's first.
    let socket_hook = median_of(rounds, || {
        datapath
            .test_run_socket_hook(&syn, repeat, None)
            .expect("socket hook test run")
            .duration
    });
    results.push((
        "socket hook, a packet over loopback, which no hook judges".to_owned(),
        socket_hook,
    ));

    println!(
        "datapath cost per packet (BPF_PROG_TEST_RUN, median of {rounds} runs of {repeat} packets)"
    );
    println!("  {:<78} {:>8}  {:>9}", "path", "ns", "x empty");
    println!(
        "  {:<78} {:>8}  {:>9}",
        "empty XDP program (baseline: r0 = XDP_PASS)",
        empty.as_nanos(),
        "1.00"
    );
    let ratio = |cost: Duration| cost.as_nanos() as f64 / empty.as_nanos().max(1) as f64;
    println!(
        "  {:<78} {:>8}  {:>9.2}",
        "xdp-filter (xdp-tools, C), no rules, the established flow's frame",
        xdp_filter_cost.as_nanos(),
        ratio(xdp_filter_cost)
    );
    let record = |figure: &str, cost: Duration| {
        results::record(
            "datapath",
            figure,
            cost.as_nanos() as f64,
            "ns/packet",
            Some(("empty XDP program", ratio(cost))),
        );
    };
    record("empty XDP program", empty);
    record(
        "xdp-filter (xdp-tools), established flow's frame",
        xdp_filter_cost,
    );
    record(
        "xdp-filter (xdp-tools), IPv6 established flow's frame",
        xdp_filter_cost6,
    );
    for (path, cost) in &results {
        println!("  {path:<78} {:>8}  {:>9.2}", cost.as_nanos(), ratio(*cost));
        record(path, *cost);
    }
    let by = |needle: &str| {
        results
            .iter()
            .find(|(path, _)| path == needle)
            .map(|(_, cost)| *cost)
            .expect("measured")
    };
    for path in [
        "XDP, established flow (flow cache hit)",
        "XDP, denied new flow (rule lookups, default-deny, report de-dup)",
    ] {
        let small = by(&format!("{path}, 10 rules"));
        let large = by(&format!("{path}, 100000 rules"));
        let growth = large.as_nanos() as f64 / small.as_nanos().max(1) as f64;
        println!("  {path}: 100000 rules / 10 rules = {growth:.2}");
        results::record(
            "datapath",
            &format!("{path}, 100000 rules"),
            large.as_nanos() as f64,
            "ns/packet",
            Some(("the same path at 10 rules", growth)),
        );
    }
    let established = by("XDP, established flow (flow cache hit), 10 rules");
    let behind = established.as_nanos() as f64 / xdp_filter_cost.as_nanos().max(1) as f64;
    println!(
        "  XDP, established flow / xdp-filter on the same frame = {behind:.2} (the target is 1.00 or less)"
    );
    results::record(
        "datapath",
        "XDP, established flow (flow cache hit), 10 rules",
        established.as_nanos() as f64,
        "ns/packet",
        Some(("xdp-filter on the same frame (anchor)", behind)),
    );
    let established6 = by(ESTABLISHED6);
    let behind6 = established6.as_nanos() as f64 / xdp_filter_cost6.as_nanos().max(1) as f64;
    println!(
        "  XDP, established flow, IPv6 / xdp-filter on the same frame ({} ns) = {behind6:.2}",
        xdp_filter_cost6.as_nanos()
    );
    results::record(
        "datapath",
        ESTABLISHED6,
        established6.as_nanos() as f64,
        "ns/packet",
        Some(("xdp-filter on the same frame (anchor)", behind6)),
    );
    let figure = "XDP, denied new flow, every packet a new shape (a flood), over the empty program, 100000 rules";
    println!(
        "  {figure}: {} ns (the target is 120 or less)",
        flood.as_nanos()
    );
    results::record(
        "datapath",
        figure,
        flood.as_nanos() as f64,
        "ns/packet",
        Some(("target 120 ns (anchor)", flood.as_nanos() as f64 / 120.0)),
    );
    drop(datapath);
    let _ = loader::unload(&pins);
}
