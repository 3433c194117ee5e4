//! A scan at a sustained rate, end to end: an endpoint sends UDP datagrams to 100 000 distinct
//! (address, port) destinations a second, all refused by default-deny at the host-side veth,
//! while `enforcer run` writes its alerts file. Every destination is a new flow shape, so the
//! kernel sends one record for each and the controller must keep up: decode, describe, count,
//! detect, encode and write 100 000 records a second. Reported: the rate sent, the share of
//! shapes that arrived as their own record, the packets the records account for (and with
//! them those the kernel counted under a shape and has not reported yet), and the records
//! lost (the controller's loss records: ring buffer full or sequence gaps), whose
//! target is zero. The scanner's own CPU and the controller's share the machine's two.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use enforcer::datapath::maps::KernelMaps;
use enforcer_testbed::{Netns, Topology, bpf, results};
use serde_json::Value;

const ENFORCER: &str = env!("CARGO_BIN_EXE_enforcer");
const RATE: u64 = 100_000;
/// Ports used per destination address: shapes are (address, port) pairs, all distinct.
const PORTS: u32 = 60_000;
/// Destinations outside every service (RFC 2544's benchmarking range): identity `world`.
const FIRST_DESTINATION: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);

fn seconds() -> u64 {
    if results::quick() { 2 } else { 10 }
}

/// Shape `index`'s destination.
fn destination(index: u64) -> SocketAddrV4 {
    let address = u32::from(FIRST_DESTINATION) + (index / u64::from(PORTS)) as u32;
    let port = 1 + (index % u64::from(PORTS)) as u16;
    SocketAddrV4::new(Ipv4Addr::from(address), port)
}

/// Sends `RATE` datagrams a second for `seconds`, each to a new destination, from shape
/// `first` on, in 1 ms batches; returns how many the socket took and the time it took.
fn scan(socket: &UdpSocket, seconds: u64, first: u64) -> (u64, Duration) {
    let total = RATE * seconds;
    let per_batch = RATE / 1000;
    let started = Instant::now();
    let mut sent = 0;
    let mut index = 0;
    while index < total {
        let due = started + Duration::from_micros(index * 1_000_000 / RATE);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        for _ in 0..per_batch.min(total - index) {
            if socket
                .send_to(b"enforcer flood", destination(first + index))
                .is_ok()
            {
                sent += 1;
            }
            index += 1;
        }
    }
    (sent, started.elapsed())
}

/// What the alerts file says about the flood.
#[derive(Debug, Default, PartialEq)]
struct Tally {
    /// Flow records of one shape each.
    shapes: u64,
    /// Records standing for many shapes of one source (sent while the ring buffer filled).
    aggregated: u64,
    /// Packets the flow records stand for.
    packets: u64,
    /// Records the controller reports as lost.
    lost: u64,
}

fn tally(alerts: &Path) -> Tally {
    let text = std::fs::read_to_string(alerts).unwrap_or_default();
    let mut tally = Tally::default();
    for line in text.lines() {
        let Ok(record) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let enforcer = &record["unmapped"]["enforcer"];
        match record["class_uid"].as_u64() {
            Some(4001) if enforcer["reason"] == "default_deny" => {
                if enforcer["aggregated"] == true {
                    tally.aggregated += 1;
                } else {
                    tally.shapes += 1;
                }
                tally.packets += record["count"].as_u64().unwrap_or(1);
            }
            Some(1008) => tally.lost += enforcer["events_lost"].as_u64().unwrap_or(0),
            _ => {}
        }
    }
    tally
}

/// The tally once the alerts file has stopped changing for two seconds (the controller has
/// written what it will write, loss records included: those come once a second).
fn settled_tally(alerts: &Path) -> Tally {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = tally(alerts);
    let mut still_since = Instant::now();
    while still_since.elapsed() < Duration::from_secs(2) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        let now = tally(alerts);
        if now != last {
            (last, still_since) = (now, Instant::now());
        }
    }
    last
}

/// One-second scans the hook is timed over, with each program: from one second to the next
/// the same program's cost moves by a quarter on this machine; the median of three holds.
const HOOK_SAMPLES: u64 = 3;

/// What the program on the pinned TC ingress `link` costs a packet of the scan, in nanoseconds,
/// with enforcer's program on it and then with one that drops everything swapped in: the
/// kernel's own timing of every program run, on only while it scans new shapes (from shape
/// `first` on), the median of [`HOOK_SAMPLES`] seconds each. The timing adds two clock reads to
/// every run of either. This is the flood as the datapath meets it, packet after packet at the
/// rate; the datapath benchmark's flood row times each packet alone, in a system call of its
/// own.
fn hook_costs(scanner: &Netns, link: &Path, first: u64) -> (f64, f64) {
    let cost = |first: u64| {
        let means = bpf::mean_run_times(&[link], || {
            scanner
                .run(move || {
                    let socket = UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
                    scan(&socket, 1, first)
                })
                .expect("scanner namespace");
        });
        means.expect("the hook's program's run-time statistics")[0]
    };
    let median_cost = |first: u64| {
        results::median(
            (0..HOOK_SAMPLES)
                .map(|second| cost(first + second * RATE))
                .collect(),
        )
    };
    let judged = median_cost(first);
    let drop_all = bpf::load_drop_all_tcx(false).expect("a drop-all TC program loads");
    bpf::swap_link_program(link, &drop_all).expect("the drop-all program replaces enforcer's");
    (judged, median_cost(first + HOOK_SAMPLES * RATE))
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the flood benchmark runs enforcer: run it as root (cargo xtask bench)");
        std::process::exit(1);
    }
    let topology = Topology::build(&["scanner", "target"]).expect("topology");
    let (scanner, target) = (topology.endpoint("scanner"), topology.endpoint("target"));
    let policy = format!(
        "[[service]]\nname = \"scanner\"\ninterfaces = [\"{}\"]\naddresses = [\"{}/32\"]\n\
         [[service]]\nname = \"target\"\ninterfaces = [\"{}\"]\naddresses = [\"{}/32\"]\n",
        scanner.host_interface, scanner.ipv4, target.host_interface, target.ipv4
    );
    let policy = topology.write_file("policy.toml", &policy).unwrap();
    let alerts = topology.write_file("alerts.jsonl", "").unwrap();
    let daemon = topology
        .run_enforcer(
            Path::new(ENFORCER),
            &[
                "--policy".as_ref(),
                policy.as_os_str(),
                "--alerts".as_ref(),
                alerts.as_os_str(),
            ],
            "enforcer.log",
        )
        .expect("enforcer starts");
    let seconds = seconds();
    let first = SocketAddrV4::new(target.ipv4, 9);
    let (sent, took) = scanner
        .netns
        .run(move || {
            let socket = UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
            // The gateway's address resolved first: datagrams waiting for ARP would be dropped
            // before any hook sees them.
            let _ = socket.send_to(b"hello", first);
            std::thread::sleep(Duration::from_millis(200));
            scan(&socket, seconds, 0)
        })
        .expect("scanner namespace");
    let tally = settled_tally(&alerts);
    let (maps, _) = KernelMaps::from_pins(&topology.pin_path().join("maps"))
        .expect("the running enforcer's pinned maps");
    // Denied packets the kernel still holds under a shape (an aggregate's, mostly): they go
    // out with the shape's next record, and no packet of it comes any more.
    let unreported = maps.denied_packets_unreported();
    let link = topology
        .pin_path()
        .join("links")
        .join(format!("tci-{}", scanner.host_interface));
    let (judged, empty) = hook_costs(&scanner.netns, &link, RATE * seconds);
    drop(daemon);
    // The first datagram was sent to resolve the gateway: one shape more than the scan's.
    let shapes = sent + 1;
    let rate = sent as f64 / took.as_secs_f64();
    println!(
        "flood of distinct denied shapes, {seconds} s: {sent} sent ({rate:.0}/s); {} shapes recorded one by one, {} aggregated records, {} packets accounted for, {unreported} more not yet in a record, {} records lost",
        tally.shapes, tally.aggregated, tally.packets, tally.lost
    );
    println!(
        "  at the hook that refuses them (TC ingress, kernel run-time statistics): {judged:.0} ns a packet, an empty program there {empty:.0} ns, {:.0} ns more (target 120)",
        judged - empty
    );
    let figure = |what: &str| format!("{what}, {RATE} denied shapes/s for {seconds} s");
    results::record(
        "flood",
        &format!(
            "TC ingress, a denied new shape while {RATE} new shapes/s arrive, over an empty program on the same hook (kernel run-time statistics)"
        ),
        (judged - empty).round(),
        "ns/packet",
        Some(("target 120 ns (anchor)", (judged - empty) / 120.0)),
    );
    results::record("flood", &figure("sent"), rate.round(), "shapes/s", None);
    results::record(
        "flood",
        &figure("shapes with a record of their own"),
        tally.shapes as f64,
        "records",
        Some(("shapes sent (anchor)", tally.shapes as f64 / shapes as f64)),
    );
    results::record(
        "flood",
        &figure("packets the records account for"),
        tally.packets as f64,
        "packets",
        Some(("packets sent", tally.packets as f64 / shapes as f64)),
    );
    results::record(
        "flood",
        &figure("packets the records and the kernel's pending counts account for"),
        (tally.packets + unreported) as f64,
        "packets",
        Some((
            "packets sent",
            (tally.packets + unreported) as f64 / shapes as f64,
        )),
    );
    results::record(
        "flood",
        &figure("records lost (loss counter)"),
        tally.lost as f64,
        "records",
        None,
    );
}
