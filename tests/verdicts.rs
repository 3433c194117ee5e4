//! Verdicts on hand-made frames, run through the real programs with `BPF_PROG_TEST_RUN`:
//! malformed, truncated, fragmented and tagged frames must never slip past the policy. All
//! three programs (XDP, TC ingress, TC egress) run the same decision; each case checks each.

mod support;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use aya::{
    Pod,
    maps::{HashMap, Map, MapData, PerCpuArray, PerCpuValues, RingBuf},
};
use enforcer::{
    compile::{self, Cgroup, HostView},
    datapath::maps::{Installer, KernelMaps},
    datapath::{
        hook::Hook,
        loader::{self, Datapath, LoadOptions},
        pins::PinLayout,
    },
    events::{self, SequenceTracker},
    policy,
};
use enforcer_common::{
    addr::{Ipcache4Key, v4_mapped},
    conntrack::{CachedFlow, CtEntry, CtKey, CtKey4, FlowCacheTable, FlowCacheTable6, timeout},
    event::{FlowEvent, flags as event_flags},
    identity::IdentityInfo,
    verdict::{ALLOW, DENY, reason},
};
use enforcer_testbed::{
    Netns,
    frames::{self, Ipv4},
};
use support::root_test;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_SHOT: u32 = 2;
const TC_NEXT: u32 = u32::MAX; // TC_ACT_UNSPEC (-1): let the next TCX program decide, i.e. pass

const A4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const B4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const A6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

/// a may reach b on 80/tcp, 53/udp and icmp; b may reach nothing.
const POLICY: &str = r#"
[[service]]
name = "a"
addresses = ["10.0.0.1/32", "fd00::1/128"]
[[service]]
name = "b"
addresses = ["10.0.0.2/32", "fd00::2/128"]
[[allow]]
from = "a"
to = "b"
ports = ["80/tcp", "53/udp", "icmp"]
id = "a-to-b"
"#;

/// The programs loaded with a policy installed, nothing attached. Unloaded on drop.
struct Kernel {
    datapath: Datapath,
    maps: KernelMaps,
    ring: RingBuf<MapData>,
    pins: PinLayout,
    next_port: u16,
}

impl Kernel {
    fn load(options: LoadOptions) -> Self {
        let pins = PinLayout::new(PathBuf::from("/sys/fs/bpf").join(enforcer_testbed::unique_id()));
        let (datapath, mut maps, ring) =
            Datapath::load_with(pins.clone(), &options).expect("the verifier accepts the programs");
        let policy =
            policy::parse_sources(vec![(PathBuf::from("verdicts.toml"), POLICY.to_owned())])
                .unwrap();
        let compiled = compile::compile(&policy, &HostView::default(), None).unwrap();
        Installer::adopt(&maps)
            .unwrap()
            .install(&mut maps, &compiled)
            .unwrap();
        Self {
            datapath,
            maps,
            ring,
            pins,
            next_port: 40000,
        }
    }

    /// Installs `text` as the next generation, returning it compiled.
    fn install(&mut self, text: &str) -> compile::Compiled {
        self.install_on(text, &HostView::default())
    }

    /// Installs `text` as the next generation for a host that looks like `host`.
    fn install_on(&mut self, text: &str, host: &HostView) -> compile::Compiled {
        let policy =
            policy::parse_sources(vec![(PathBuf::from("verdicts.toml"), text.to_owned())]).unwrap();
        let compiled = compile::compile(&policy, host, None).unwrap();
        Installer::adopt(&self.maps)
            .unwrap()
            .install(&mut self.maps, &compiled)
            .unwrap();
        compiled
    }

    fn xdp_passes(&mut self, frame: &[u8]) -> bool {
        self.passes(Hook::Xdp, frame)
    }

    /// A connection over `family` from a's next unused port to b:80.
    fn next_connection(&mut self, family: Family) -> Connection {
        self.next_port += 1;
        Connection {
            port: self.next_port,
            family,
        }
    }

    fn passes(&mut self, hook: Hook, frame: &[u8]) -> bool {
        self.passes_on(hook, frame, None)
    }

    /// Whether `hook`'s program passes `frame` coming through interface `ifindex` (of the
    /// calling thread's namespace), or through loopback.
    fn passes_on(&mut self, hook: Hook, frame: &[u8], ifindex: Option<u32>) -> bool {
        let action = self
            .datapath
            .test_run_on(hook, frame, 1, ifindex)
            .unwrap_or_else(|error| {
                panic!(
                    "{hook:?} test run of {} bytes {:02x?}: {error}",
                    frame.len(),
                    frame
                )
            })
            .return_value;
        match (hook, action) {
            (Hook::Xdp, XDP_PASS) | (Hook::TcIngress | Hook::TcEgress, TC_NEXT) => true,
            (Hook::Xdp, XDP_DROP) | (Hook::TcIngress | Hook::TcEgress, TC_ACT_SHOT) => false,
            (hook, other) => panic!("unexpected {hook:?} action {other}"),
        }
    }

    /// The verdict of each hook on a frame built for a fresh source port (so conntrack state
    /// from one hook's run does not decide another's).
    fn verdicts(&mut self, make: impl Fn(u16) -> Vec<u8>) -> [bool; 3] {
        Hook::ALL.map(|hook| {
            self.next_port += 1;
            self.passes(hook, &make(self.next_port))
        })
    }

    fn assert_passes(&mut self, what: &str, make: impl Fn(u16) -> Vec<u8>) {
        assert_eq!(
            self.verdicts(make),
            [true; 3],
            "{what} must pass at XDP, TC ingress and TC egress"
        );
    }

    fn assert_dropped(&mut self, what: &str, make: impl Fn(u16) -> Vec<u8>) {
        assert_eq!(
            self.verdicts(make),
            [false; 3],
            "{what} must be dropped at XDP, TC ingress and TC egress"
        );
    }

    fn events(&mut self) -> Vec<FlowEvent> {
        let mut received = Vec::new();
        while let Some(item) = self.ring.next() {
            received.extend(events::decode(&item));
        }
        received
    }

    /// Makes every tracked flow look idle for `idle` longer than it has been, as if that much
    /// time had passed without a packet.
    fn idle_flows(&self, idle: Duration) {
        let idle = idle.as_nanos() as u64;
        for table in ["CONNTRACK4", "UNANSWERED4"] {
            idle_table(&mut self.flow_table::<CtKey4>(table), idle);
        }
        for table in ["CONNTRACK", "UNANSWERED"] {
            idle_table(&mut self.flow_table::<CtKey>(table), idle);
        }
        // The flows the programs remember passing are as old.
        self.idle_cache("FLOW_CACHES", idle, |table: &mut FlowCacheTable| {
            &mut table.slots
        });
        self.idle_cache("FLOW_CACHES6", idle, |table: &mut FlowCacheTable6| {
            &mut table.slots
        });
    }

    /// Makes what every CPU's flow cache `name` remembers `idle` ns older (see `idle_flows`).
    fn idle_cache<Table: Pod, K>(
        &self,
        name: &str,
        idle: u64,
        slots: fn(&mut Table) -> &mut [CachedFlow<K>],
    ) {
        let data = MapData::from_pin(self.pins.maps().join(name)).unwrap();
        let mut cache: PerCpuArray<MapData, Table> =
            PerCpuArray::try_from(Map::from_map_data(data).unwrap()).unwrap();
        let mut tables: Vec<Table> = cache.get(&0, 0).unwrap().iter().copied().collect();
        for pass in tables
            .iter_mut()
            .flat_map(|table| slots(table).iter_mut().map(|flow| &mut flow.pass))
            .filter(|pass| pass.checked_at != 0)
        {
            pass.checked_at = pass.checked_at.saturating_sub(idle).max(1);
        }
        cache
            .set(0, PerCpuValues::try_from(tables).unwrap(), 0)
            .unwrap();
    }

    /// One of the conntrack tables: `CONNTRACK4`/`CONNTRACK` (answered flows) or
    /// `UNANSWERED4`/`UNANSWERED`, with the key of its family.
    fn flow_table<K: Pod>(&self, name: &str) -> HashMap<MapData, K, CtEntry> {
        self.table(name)
    }

    /// The pinned hash map `name`, to read or write as a test needs.
    fn table<K: Pod, V: Pod>(&self, name: &str) -> HashMap<MapData, K, V> {
        let data = MapData::from_pin(self.pins.maps().join(name)).unwrap();
        HashMap::try_from(Map::from_map_data(data).unwrap()).unwrap()
    }

    /// Packets passed as established, and packets allowed on any edge, so far.
    fn allowed_packets(&self) -> (u64, u64) {
        let established = self
            .maps
            .packet_counts()
            .unwrap()
            .iter()
            .filter(|(verdict, code, _)| (*verdict, *code) == (ALLOW, reason::ESTABLISHED))
            .map(|(_, _, counter)| counter.packets)
            .sum();
        let on_edges = self
            .maps
            .flow_counts()
            .iter()
            .filter(|(edge, _)| edge.verdict == ALLOW)
            .map(|(_, counter)| counter.packets)
            .sum();
        (established, on_edges)
    }

    fn packets_with_reason(&self, wanted: u8) -> u64 {
        self.maps
            .packet_counts()
            .unwrap()
            .iter()
            .filter(|(verdict, code, _)| *verdict == DENY && *code == wanted)
            .map(|(_, _, counter)| counter.packets)
            .sum()
    }
}

/// Makes every flow of `flows` look idle for `idle` longer than it has been. The stamps are
/// the kernel's monotonic clock, which starts at boot: a flow that would then look idle since
/// before boot (one the test made idle again and again) looks idle since boot, which is longer
/// than `idle` once the clock has passed it (see [`wait_for_clock`]), and so just as expired.
fn idle_table<K: Pod>(flows: &mut HashMap<MapData, K, CtEntry>, idle: u64) {
    let clock = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    assert!(
        Duration::from(clock) > Duration::from_nanos(idle),
        "the clock has not passed {:?} yet (see wait_for_clock)",
        Duration::from_nanos(idle)
    );
    let entries: Vec<_> = flows.iter().map(Result::unwrap).collect();
    for (key, mut entry) in entries {
        entry.last_seen_ns = entry.last_seen_ns.saturating_sub(idle).max(1);
        flows.insert(key, entry, 0).unwrap();
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        let _ = loader::unload(&self.pins);
    }
}

/// Keeps the calling test's thread on CPU 0, so that its test runs meet what earlier ones left
/// in the kernel's per-CPU state (the flow cache, the de-duplication of denials).
fn stay_on_one_cpu() {
    let mut one_cpu = nix::sched::CpuSet::new();
    one_cpu.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one_cpu).unwrap();
}

/// Waits (on a freshly booted machine only) until the kernel's monotonic clock, which the
/// datapath stamps entries with, reads at least `at_least`.
fn wait_for_clock(at_least: Duration) {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    let now = Duration::from(now);
    if now < at_least {
        std::thread::sleep(at_least - now);
    }
}

/// A connection over `family` from a's `port` to b:80: its segments each way, by their TCP
/// flags.
struct Connection {
    port: u16,
    family: Family,
}

/// The address family a test connection runs over: the flow caches are one per family.
#[derive(Clone, Copy, Debug)]
enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    const BOTH: [Family; 2] = [Family::Ipv4, Family::Ipv6];
}

impl Connection {
    fn a_to_b(&self, flags: u8) -> Vec<u8> {
        self.segment(true, flags)
    }

    fn b_to_a(&self, flags: u8) -> Vec<u8> {
        self.segment(false, flags)
    }

    /// A segment with `flags`, from a to b or the other way.
    fn segment(&self, from_a: bool, flags: u8) -> Vec<u8> {
        let ports = if from_a {
            (self.port, 80)
        } else {
            (80, self.port)
        };
        let segment = frames::tcp(ports.0, ports.1, flags);
        match (self.family, from_a) {
            (Family::Ipv4, true) => Ipv4::new(A4, B4, frames::TCP).frame(&segment),
            (Family::Ipv4, false) => Ipv4::new(B4, A4, frames::TCP).frame(&segment),
            (Family::Ipv6, true) => frames::ipv6_frame(A6, B6, frames::TCP, 64, &[], &segment),
            (Family::Ipv6, false) => frames::ipv6_frame(B6, A6, frames::TCP, 64, &[], &segment),
        }
    }
}

fn tcp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    Ipv4::new(src, dst, frames::TCP).frame(&frames::tcp(sport, dport, frames::TCP_SYN))
}

/// A kernel whose ring buffer is one page: a few dozen records, so a few hundred denied
/// shapes overflow it.
fn kernel_with_one_page_ring() -> Kernel {
    Kernel::load(LoadOptions {
        event_buffer_bytes: Some(4096),
        ..LoadOptions::default()
    })
}

/// Runs XDP on a denied SYN to `A4:22` from each of `sources` distinct addresses of
/// 198.18.0.0/16: a new shape each, and not aggregated (one source each).
fn deny_from_distinct_sources(kernel: &mut Kernel, sources: u16) {
    for n in 0..sources {
        let [high, low] = n.to_be_bytes();
        let source = Ipv4Addr::new(198, 18, high, low);
        kernel
            .datapath
            .test_run(Hook::Xdp, &tcp4(source, A4, 50000, 22), 1)
            .unwrap();
    }
}

/// A host where `a` (10.0.0.1) is an endpoint behind `veth-a` (ifindex 1000): its address
/// from anywhere else, loopback included, is a spoof.
fn a_behind_veth_a() -> HostView {
    HostView {
        interfaces: [("veth-a".to_owned(), 1000)].into(),
        routes: [(IpAddr::V4(A4), "veth-a".to_owned())].into(),
        ..HostView::default()
    }
}

/// The records among `events` that report a spoof.
fn spoofs(events: &[FlowEvent]) -> usize {
    events
        .iter()
        .filter(|event| event.reason == reason::SPOOFED)
        .count()
}

fn tcp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
    let syn = frames::tcp(sport, dport, frames::TCP_SYN);
    frames::ipv6_frame(src, dst, frames::TCP, 64, &[], &syn)
}

#[root_test]
fn well_formed_packets_follow_the_policy_at_both_hooks_as_root() {
    let mut kernel = Kernel::load(LoadOptions::default());
    kernel.assert_passes("a -> b 80/tcp", |port| tcp4(A4, B4, port, 80));
    kernel.assert_dropped("a -> b 81/tcp", |port| tcp4(A4, B4, port, 81));
    kernel.assert_dropped("b -> a 80/tcp", |port| tcp4(B4, A4, port, 80));
    kernel.assert_passes("a -> b 53/udp", |port| {
        Ipv4::new(A4, B4, frames::UDP).frame(&frames::udp(port, 53, b"q"))
    });
    kernel.assert_passes("a -> b echo", |port| {
        Ipv4::new(A4, B4, frames::ICMP).frame(&frames::icmp(
            8,
            0,
            [(port >> 8) as u8, port as u8, 0, 1],
            b"",
        ))
    });
    kernel.assert_dropped("b -> a echo", |port| {
        Ipv4::new(B4, A4, frames::ICMP).frame(&frames::icmp(
            8,
            0,
            [(port >> 8) as u8, port as u8, 0, 1],
            b"",
        ))
    });
    kernel.assert_passes("IPv6 a -> b 80/tcp", |port| tcp6(A6, B6, port, 80));
    kernel.assert_dropped("IPv6 a -> b 81/tcp", |port| tcp6(A6, B6, port, 81));
    kernel.assert_passes("ARP (not IP)", |_| {
        frames::ethernet(&[], frames::ETH_P_ARP, &[0u8; 28])
    });
}

#[root_test]
fn the_kernel_decides_new_flows_as_explain_does_on_random_policies_as_root() {
    use enforcer_testbed::policies::{RANDOM_PORTS, RANDOM_SERVICES, random};
    let mut kernel = Kernel::load(LoadOptions::default());
    let mut probes = 0;
    for seed in 0..40 {
        let text = random(seed);
        let compiled = kernel.install(&text);
        for (from, src) in RANDOM_SERVICES {
            for (to, dst) in RANDOM_SERVICES {
                let (src_info, dst_info) = (
                    compiled.resolve_address(src.into()),
                    compiled.resolve_address(dst.into()),
                );
                let flows = RANDOM_PORTS
                    .flat_map(|port| [(frames::TCP, port), (frames::UDP, port)])
                    .chain([(frames::ICMP, 0)]);
                for (protocol, port) in flows {
                    kernel.next_port += 1;
                    let source_port = kernel.next_port;
                    let frame = match protocol {
                        frames::TCP => tcp4(src, dst, source_port, port),
                        frames::UDP => Ipv4::new(src, dst, frames::UDP).frame(&frames::udp(
                            source_port,
                            port,
                            b"q",
                        )),
                        _ => Ipv4::new(src, dst, frames::ICMP).frame(&frames::icmp(
                            8,
                            0,
                            [(source_port >> 8) as u8, source_port as u8, 0, 1],
                            b"",
                        )),
                    };
                    let expected = compiled.evaluate(&src_info, &dst_info, protocol, port);
                    assert_eq!(
                        kernel.xdp_passes(&frame),
                        expected.action == enforcer_common::policy::action::ALLOW,
                        "{from} -> {to} protocol {protocol} port {port}: explain says rule {} under\n{text}",
                        compiled.names.rule_id(expected.rule)
                    );
                    probes += 1;
                }
            }
        }
    }
    assert_eq!(probes, 40 * 9 * (2 * RANDOM_PORTS.len() + 1));
}

/// A frame from `src` to `dst` shaped the ways an attacker varies one: VLAN tags (also a
/// third, and the old QinQ type), IPv4 options, fragments, a lying total length, bytes after
/// the packet, truncation, any TCP flags.
fn shaped_frame(
    draw: &mut enforcer_testbed::policies::Draw,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    source_port: u16,
) -> Vec<u8> {
    use enforcer_testbed::policies::RANDOM_PORTS;
    let port = RANDOM_PORTS.start + draw.below(RANDOM_PORTS.len() as u64) as u16;
    let (proto, transport) = match draw.below(3) {
        0 => {
            let flags = if draw.chance(70) {
                frames::TCP_SYN
            } else {
                draw.below(256) as u8
            };
            (frames::TCP, frames::tcp(source_port, port, flags))
        }
        1 => (frames::UDP, frames::udp(source_port, port, b"q")),
        // The echo identifier is the flow's "port" to conntrack: unique, like the ports.
        _ => {
            let [high, low] = source_port.to_be_bytes();
            (frames::ICMP, frames::icmp(8, 0, [high, low, 0, 1], b""))
        }
    };
    let mut ip = Ipv4::new(src, dst, proto);
    ip.id = source_port;
    if draw.chance(30) {
        ip.ihl = 6 + draw.below(10) as u8;
    }
    match draw.below(10) {
        0 => ip.more_fragments = true,
        1 => ip.fragment_offset = 1 + draw.below(100) as u16,
        _ => {}
    }
    if draw.chance(10) {
        ip.total_len = Some(draw.below(80) as u16);
    }
    let mut payload = transport;
    if draw.chance(10) {
        // A second transport header after the packet: bytes the stack ignores.
        payload.extend(frames::tcp(source_port, port + 1, frames::TCP_SYN));
    }
    let tags: Vec<(u16, u16)> = (0..draw.below(4))
        .map(|_| {
            (
                [frames::ETH_P_8021Q, frames::ETH_P_8021AD, 0x9100][draw.below(3) as usize],
                7,
            )
        })
        .collect();
    let mut frame = frames::ethernet(&tags, frames::ETH_P_IP, &ip.packet(&payload));
    if draw.chance(10) {
        // BPF_PROG_TEST_RUN takes no frame shorter than an Ethernet header.
        frame.truncate(14 + draw.below(frame.len() as u64 - 14) as usize);
    }
    frame
}

#[root_test]
fn shaped_frames_pass_only_as_a_flow_explain_allows_as_root() {
    use enforcer_testbed::policies::{Draw, RANDOM_SERVICES, random};
    let mut kernel = Kernel::load(LoadOptions::default());
    let mut draw = Draw::from_seed(0x5eed);
    let (mut passed, mut judged) = (0, 0);
    for seed in 0..40 {
        let text = random(seed);
        let compiled = kernel.install(&text);
        for _ in 0..300 {
            let (_, src) = RANDOM_SERVICES[draw.below(3) as usize];
            let (_, dst) = RANDOM_SERVICES[draw.below(3) as usize];
            kernel.next_port += 1;
            let frame = shaped_frame(&mut draw, src, dst, kernel.next_port);
            judged += 1;
            if !kernel.xdp_passes(&frame) {
                continue;
            }
            passed += 1;
            // What passed must be, as the stack takes it in, a flow the policy allows.
            let Some(taken_in) = frames::taken_in(&frame) else {
                continue; // not IP to the stack: nothing for the policy
            };
            assert_ne!(
                taken_in.fragment,
                frames::Fragment::Later,
                "a later fragment whose first was never seen passed: {frame:02x?}"
            );
            let address = |bytes: [u8; 16]| IpAddr::V6(Ipv6Addr::from(bytes)).to_canonical();
            let port = taken_in.ports.map_or(0, |(_, port)| port);
            let expected = compiled.evaluate(
                &compiled.resolve_address(address(taken_in.src)),
                &compiled.resolve_address(address(taken_in.dst)),
                taken_in.proto,
                port,
            );
            assert_eq!(
                expected.action,
                enforcer_common::policy::action::ALLOW,
                "passed, but explain says rule {} for {taken_in:?} under\n{text}\nframe {frame:02x?}",
                compiled.names.rule_id(expected.rule)
            );
        }
    }
    // Both outcomes came up often: the property was not checked on drops alone.
    assert!(
        passed > judged / 10 && passed < judged * 9 / 10,
        "{passed} of {judged} passed"
    );
}

#[root_test]
fn malformed_and_truncated_headers_are_dropped_as_root() {
    let mut kernel = Kernel::load(LoadOptions::default());
    let syn = |port| frames::tcp(port, 80, frames::TCP_SYN);
    kernel.assert_dropped("IPv4 header length 16 bytes", |port| {
        Ipv4 {
            ihl: 4,
            ..Ipv4::new(A4, B4, frames::TCP)
        }
        .frame(&syn(port))
    });
    kernel.assert_dropped("IPv4 total length shorter than its header", |port| {
        Ipv4 {
            total_len: Some(12),
            ..Ipv4::new(A4, B4, frames::TCP)
        }
        .frame(&syn(port))
    });
    // The kernel's test runner refuses to build an skb shorter than the IP header it names, so
    // frames cut inside the IP header run at XDP only; the parser is the same code at both hooks.
    let mut frame = tcp4(A4, B4, 40000, 80);
    frame.truncate(14 + 10);
    assert!(
        !kernel.xdp_passes(&frame),
        "IPv4 header cut at 10 bytes must be dropped"
    );
    kernel.assert_dropped("TCP header cut at 8 bytes", |port| {
        let mut frame = tcp4(A4, B4, port, 80);
        frame.truncate(14 + 20 + 8);
        frame
    });
    let mut frame = tcp6(A6, B6, 40000, 80);
    frame.truncate(14 + 30);
    assert!(
        !kernel.xdp_passes(&frame),
        "IPv6 header cut at 30 bytes must be dropped"
    );
    kernel.assert_dropped("version 6 in an IPv4 ethertype", |port| {
        let mut frame = tcp4(A4, B4, port, 80);
        frame[14] = 0x65;
        frame
    });
    assert!(
        kernel.packets_with_reason(reason::MALFORMED) >= 10,
        "drops are counted as malformed"
    );
}

#[root_test]
fn tracked_flows_expire_when_idle_and_soon_after_they_close_as_root() {
    // Idleness is simulated by moving entries' kernel timestamps back by up to a minute, which
    // only works once the kernel's clock has run that long.
    wait_for_clock(Duration::from_nanos(timeout::UDP_NS) + Duration::from_secs(2));
    let mut kernel = Kernel::load(LoadOptions::default());
    let second = Duration::from_secs(1);
    let nanos = Duration::from_nanos;
    // b may open nothing towards a: each packet from b passes only while a's flow is tracked.
    for hook in Hook::ALL {
        kernel.next_port += 1;
        let port = kernel.next_port;
        let query = Ipv4::new(A4, B4, frames::UDP).frame(&frames::udp(port, 53, b"q"));
        let answer = Ipv4::new(B4, A4, frames::UDP).frame(&frames::udp(53, port, b"a"));
        assert!(kernel.passes(hook, &query), "{hook:?}: a -> b 53/udp");
        assert!(kernel.passes(hook, &answer), "{hook:?}: its answer");
        kernel.idle_flows(nanos(timeout::UDP_NS) - 5 * second);
        assert!(
            kernel.passes(hook, &answer),
            "{hook:?}: an answer within the UDP idle timeout passes"
        );
        kernel.idle_flows(nanos(timeout::UDP_NS) + second);
        assert!(
            !kernel.passes(hook, &answer),
            "{hook:?}: an answer after the UDP idle timeout is a new flow b may not open"
        );

        let tcp = |src, dst, sport, dport, flags| {
            Ipv4::new(src, dst, frames::TCP).frame(&frames::tcp(sport, dport, flags))
        };
        let ack = frames::TCP_ACK;
        // Never answered: gone after the opening timeout.
        kernel.next_port += 1;
        let port = kernel.next_port;
        assert!(kernel.passes(hook, &tcp(A4, B4, port, 80, frames::TCP_SYN)));
        kernel.idle_flows(nanos(timeout::TCP_OPENING_NS) + second);
        assert!(
            !kernel.passes(hook, &tcp(B4, A4, 80, port, frames::TCP_SYN | ack)),
            "{hook:?}: a SYN-ACK after the opening timeout"
        );

        // Reset: the last packets still pass, a SYN reusing the ports is new, and the entry is
        // gone after the closing timeout.
        kernel.next_port += 1;
        let port = kernel.next_port;
        assert!(kernel.passes(hook, &tcp(A4, B4, port, 80, frames::TCP_SYN)));
        assert!(kernel.passes(hook, &tcp(B4, A4, 80, port, frames::TCP_SYN | ack)));
        kernel.idle_flows(nanos(timeout::UDP_NS) + second);
        assert!(
            kernel.passes(hook, &tcp(B4, A4, 80, port, ack)),
            "{hook:?}: an established connection outlives the UDP idle timeout"
        );
        assert!(kernel.passes(hook, &tcp(A4, B4, port, 80, frames::TCP_RST)));
        assert!(
            kernel.passes(hook, &tcp(B4, A4, 80, port, ack)),
            "{hook:?}: a packet in flight when the RST was sent"
        );
        assert!(
            !kernel.passes(hook, &tcp(B4, A4, 80, port, frames::TCP_SYN)),
            "{hook:?}: a SYN on the reset connection's ports is a new flow b may not open"
        );
        kernel.idle_flows(nanos(timeout::TCP_CLOSING_NS) + second);
        assert!(
            !kernel.passes(hook, &tcp(B4, A4, 80, port, ack)),
            "{hook:?}: a packet after the closing timeout of a reset connection"
        );

        // FIN from both ends closes; FIN from one end only (half close) does not.
        kernel.next_port += 1;
        let port = kernel.next_port;
        assert!(kernel.passes(hook, &tcp(A4, B4, port, 80, frames::TCP_SYN)));
        assert!(kernel.passes(hook, &tcp(B4, A4, 80, port, frames::TCP_SYN | ack)));
        assert!(kernel.passes(hook, &tcp(A4, B4, port, 80, frames::TCP_FIN | ack)));
        kernel.idle_flows(nanos(timeout::TCP_CLOSING_NS) + second);
        assert!(
            kernel.passes(hook, &tcp(B4, A4, 80, port, ack)),
            "{hook:?}: a half-closed connection is still open"
        );
        assert!(kernel.passes(hook, &tcp(B4, A4, 80, port, frames::TCP_FIN | ack)));
        kernel.idle_flows(nanos(timeout::TCP_CLOSING_NS) + second);
        assert!(
            !kernel.passes(hook, &tcp(B4, A4, 80, port, ack)),
            "{hook:?}: a packet after the closing timeout of a connection closed both ways"
        );
    }
}

/// Interfaces (one end of a veth pair each) in a namespace of their own, for frames that must
/// come through a given interface: `BPF_PROG_TEST_RUN` looks the index up in the calling
/// thread's namespace.
struct Interfaces {
    netns: Netns,
}

impl Interfaces {
    fn create(names: &[&str]) -> Self {
        Self::create_at(&names.iter().map(|name| (*name, None)).collect::<Vec<_>>())
    }

    /// Interfaces named as given, each at the index given where there is one.
    fn create_at(interfaces: &[(&str, Option<u32>)]) -> Self {
        let netns = Netns::create(&enforcer_testbed::unique_id()).unwrap();
        for (name, index) in interfaces {
            let index = index.map(|index| index.to_string());
            let at: &[&str] = match &index {
                Some(index) => &["index", index],
                None => &[],
            };
            let peer = format!("{name}-peer");
            let add = [
                &["link", "add", name][..],
                at,
                &["type", "veth", "peer", "name", &peer],
            ];
            netns
                .ip(&add.concat())
                .and_then(|()| netns.ip(&["link", "set", name, "up"]))
                .unwrap();
        }
        Self { netns }
    }

    fn index(&self, name: &str) -> u32 {
        let name = name.to_owned();
        self.netns
            .run(move || nix::net::if_::if_nametoindex(name.as_str()).unwrap())
            .unwrap()
    }
}

#[root_test]
fn a_reset_or_fin_from_elsewhere_does_not_end_the_flow_as_root() {
    wait_for_clock(Duration::from_nanos(timeout::TCP_CLOSING_NS) + Duration::from_secs(2));
    let mut kernel = Kernel::load(LoadOptions::default());
    // a's packets enter through `from-a`, b's through `from-b`; an attacker elsewhere forges
    // b's address through `forger` (on a world-facing uplink, identity cannot tell them apart).
    let interfaces = Interfaces::create(&["from-a", "from-b", "forger"]);
    let [from_a, from_b, forger] =
        ["from-a", "from-b", "forger"].map(|name| interfaces.index(name));
    let tcp = |src, dst, sport, dport, flags| {
        Ipv4::new(src, dst, frames::TCP).frame(&frames::tcp(sport, dport, flags))
    };
    let ack = frames::TCP_ACK;
    let closing_timeout = Duration::from_nanos(timeout::TCP_CLOSING_NS) + Duration::from_secs(1);
    interfaces
        .netns
        .run(|| {
            for hook in [Hook::Xdp, Hook::TcIngress] {
                for forged_flags in [frames::TCP_RST, frames::TCP_FIN | ack] {
                    kernel.next_port += 1;
                    let port = kernel.next_port;
                    let from_a_to_b = |flags| tcp(A4, B4, port, 80, flags);
                    let from_b_to_a = |flags| tcp(B4, A4, 80, port, flags);
                    assert!(kernel.passes_on(hook, &from_a_to_b(frames::TCP_SYN), Some(from_a)));
                    assert!(kernel.passes_on(hook, &from_b_to_a(frames::TCP_SYN | ack), Some(from_b)));
                    assert!(kernel.passes_on(hook, &from_a_to_b(frames::TCP_FIN | ack), Some(from_a)));
                    // The attack: b's half of the close, or a reset, forged from elsewhere.
                    kernel.passes_on(hook, &from_b_to_a(forged_flags), Some(forger));
                    kernel.idle_flows(closing_timeout);
                    assert!(
                        kernel.passes_on(hook, &from_b_to_a(ack), Some(from_b)),
                        "{hook:?}: flags {forged_flags:#x} forged through another interface ended the flow"
                    );
                    // The same from b's own interface does end it.
                    assert!(kernel.passes_on(hook, &from_b_to_a(forged_flags), Some(from_b)));
                    kernel.idle_flows(closing_timeout);
                    assert!(
                        !kernel.passes_on(hook, &from_b_to_a(ack), Some(from_b)),
                        "{hook:?}: flags {forged_flags:#x} from b's own interface end the flow"
                    );
                }
            }
        })
        .unwrap();
}

#[root_test]
fn a_flow_passed_a_moment_ago_is_judged_again_under_a_new_policy_as_root() {
    // What the flow cache of the CPU the runs stay on remembers.
    stay_on_one_cpu();
    let mut kernel = Kernel::load(LoadOptions::default());
    let revoked = POLICY.replace("[[allow]]", "[[deny]]");
    let ack = frames::TCP_ACK;
    for (hook, family) in Hook::ALL
        .into_iter()
        .flat_map(|hook| Family::BOTH.map(|family| (hook, family)))
    {
        kernel.install(POLICY);
        let connection = kernel.next_connection(family);
        let (established_before, allowed_before) = kernel.allowed_packets();
        assert!(kernel.passes(hook, &connection.a_to_b(frames::TCP_SYN)));
        assert!(kernel.passes(hook, &connection.b_to_a(frames::TCP_SYN | ack)));
        // Passed by conntrack, then from what this CPU remembers of the flow.
        for _ in 0..3 {
            assert!(
                kernel.passes(hook, &connection.a_to_b(ack)),
                "{hook:?} {family:?}: the connection's segments pass"
            );
        }
        let (established, allowed) = kernel.allowed_packets();
        assert_eq!(
            (established - established_before, allowed - allowed_before),
            (4, 5),
            "{hook:?} {family:?}: every packet passed is counted: the answer and the segments as \
             established, and all five on the edges"
        );
        // A second later the shortcut checks the flow again, and its slot starts over.
        kernel.idle_flows(Duration::from_secs(2));
        assert!(kernel.passes(hook, &connection.a_to_b(ack)));
        let (established, allowed) = kernel.allowed_packets();
        assert_eq!(
            (established - established_before, allowed - allowed_before),
            (5, 6),
            "{hook:?} {family:?}: what the slot counted is still counted once it is written again"
        );
        kernel.install(&revoked);
        assert!(
            !kernel.passes(hook, &connection.a_to_b(ack)),
            "{hook:?} {family:?}: the next segment after the rule became a deny is judged again, and refused"
        );
    }
}

/// A SYN opens a connection: its rule decides it before conntrack is asked (a denied one
/// then never costs a conntrack lookup). The ports of a tracked connection are no pass for a
/// SYN its rule refuses: not for the responder's, nor for the initiator's once its rule is
/// revoked; the initiator's retransmitted SYN still passes while its rule allows it.
#[root_test]
fn a_syn_its_rule_refuses_is_refused_on_a_tracked_connections_ports_as_root() {
    let mut kernel = Kernel::load(LoadOptions::default());
    let revoked = POLICY.replace("[[allow]]", "[[deny]]");
    let (syn, ack) = (frames::TCP_SYN, frames::TCP_ACK);
    for hook in Hook::ALL {
        kernel.install(POLICY);
        let connection = kernel.next_connection(Family::Ipv4);
        assert!(kernel.passes(hook, &connection.a_to_b(syn)));
        assert!(kernel.passes(hook, &connection.b_to_a(syn | ack)));
        assert!(
            kernel.passes(hook, &connection.a_to_b(syn)),
            "{hook:?}: a's SYN again, as a retransmission, on its open connection"
        );
        let refused_before = kernel.packets_with_reason(reason::DEFAULT_DENY);
        assert!(
            !kernel.passes(hook, &connection.b_to_a(syn)),
            "{hook:?}: b may not open a connection to a, not even on the ports a's connection holds"
        );
        assert_eq!(
            kernel.packets_with_reason(reason::DEFAULT_DENY) - refused_before,
            1,
            "{hook:?}: b's SYN is refused by the default deny"
        );
        assert!(
            kernel.passes(hook, &connection.b_to_a(ack)),
            "{hook:?}: the refused SYN leaves a's connection open"
        );
        kernel.install(&revoked);
        assert!(
            !kernel.passes(hook, &connection.a_to_b(syn)),
            "{hook:?}: a's SYN once its rule became a deny"
        );
    }
}

#[root_test]
fn a_flow_passed_a_moment_ago_is_no_pass_through_another_interface_as_root() {
    // What the flow cache of the CPU the runs stay on remembers.
    stay_on_one_cpu();
    let mut kernel = Kernel::load(LoadOptions::default());
    let interfaces = Interfaces::create(&["from-a", "forger"]);
    let [from_a, forger] = ["from-a", "forger"].map(|name| interfaces.index(name));
    // a is an endpoint of this host behind `from-a`: its address from anywhere else is a spoof.
    let host = HostView {
        interfaces: [("from-a".to_owned(), from_a)].into(),
        routes: [
            (IpAddr::V4(A4), "from-a".to_owned()),
            (IpAddr::V6(A6), "from-a".to_owned()),
        ]
        .into(),
        ..HostView::default()
    };
    kernel.install_on(
        &POLICY.replace(
            r#"addresses = ["10.0.0.1/32", "fd00::1/128"]"#,
            r#"addresses = ["10.0.0.1/32", "fd00::1/128"]
interfaces = ["from-a"]"#,
        ),
        &host,
    );
    let ack = frames::TCP_ACK;
    interfaces
        .netns
        .run(|| {
            for (hook, family) in [Hook::Xdp, Hook::TcIngress]
                .into_iter()
                .flat_map(|hook| Family::BOTH.map(|family| (hook, family)))
            {
                let connection = kernel.next_connection(family);
                assert!(kernel.passes_on(hook, &connection.a_to_b(frames::TCP_SYN), Some(from_a)));
                assert!(kernel.passes(hook, &connection.b_to_a(frames::TCP_SYN | ack)));
                for _ in 0..3 {
                    assert!(kernel.passes_on(hook, &connection.a_to_b(ack), Some(from_a)));
                }
                assert!(
                    !kernel.passes_on(hook, &connection.a_to_b(ack), Some(forger)),
                    "{hook:?} {family:?}: a segment of a's connection forged through another interface"
                );
            }
        })
        .unwrap();
}

#[root_test]
fn a_million_spoofed_syns_do_not_break_established_flows_as_root() {
    let mut kernel = Kernel::load(LoadOptions::default());
    kernel.install(
        r#"
[[service]]
name = "frontend"
addresses = ["10.0.0.2/32"]
[[allow]]
from = "world"
to = "frontend"
ports = ["443/tcp"]
id = "world-to-frontend"
"#,
    );
    let tcp = |src, dst, sport, dport, flags| {
        Ipv4::new(src, dst, frames::TCP).frame(&frames::tcp(sport, dport, flags))
    };
    let ack = frames::TCP_ACK;
    // Many clients with established connections, idle while the flood lasts: the kernel's
    // LRU keeps an entry used since the last pass over it, so one busy flow would survive
    // anything; idle ones are what an eviction takes.
    const CLIENTS: u32 = 150_000;
    let client = |n: u32| {
        let [_, _, high, low] = n.to_be_bytes();
        Ipv4Addr::new(100, 64 + (n >> 16) as u8, high, low)
    };
    for n in 0..CLIENTS {
        assert!(kernel.xdp_passes(&tcp(client(n), B4, 5000, 443, frames::TCP_SYN)));
        assert!(kernel.xdp_passes(&tcp(B4, client(n), 443, 5000, frames::TCP_SYN | ack)));
    }

    // The attack: SYNs on the allowed edge from a million spoofed sources, never answered —
    // four times what the established table holds.
    const SPOOFED: u32 = 1_000_000;
    for n in 0..SPOOFED {
        let [_, _, high, low] = n.to_be_bytes();
        let source = Ipv4Addr::new(198, 18 + (n >> 16) as u8 % 2, high, low);
        let frame = tcp(source, B4, 1024 + (n >> 17) as u16, 443, frames::TCP_SYN);
        assert!(
            kernel.xdp_passes(&frame),
            "spoofed SYN {n} is on an allowed edge"
        );
    }
    let refused = (0..CLIENTS)
        .filter(|&n| !kernel.xdp_passes(&tcp(B4, client(n), 443, 5000, ack)))
        .count();
    assert_eq!(
        refused, 0,
        "the frontend's next packet to its established clients is refused after the flood"
    );
    let counts = kernel.maps.flow_table_counts();
    assert!(
        counts.opened >= u64::from(CLIENTS + SPOOFED) && counts.answered == u64::from(CLIENTS),
        "{counts:?}"
    );
    let fill = kernel.maps.fill();
    let (unanswered, answered) = (&fill["UNANSWERED4"], &fill["CONNTRACK4"]);
    assert!(
        unanswered.entries > unanswered.capacity as usize * 9 / 10
            && answered.entries == CLIENTS as usize,
        "the flood fills the unanswered table, and only that: {fill:?}"
    );
}

#[root_test]
fn ip_options_do_not_hide_the_ports_as_root() {
    let mut kernel = Kernel::load(LoadOptions::default());
    for ihl in [6, 15] {
        kernel.assert_passes("allowed port behind IPv4 options", |port| {
            Ipv4 {
                ihl,
                ..Ipv4::new(A4, B4, frames::TCP)
            }
            .frame(&frames::tcp(port, 80, frames::TCP_SYN))
        });
        kernel.assert_dropped("denied port behind IPv4 options", |port| {
            Ipv4 {
                ihl,
                ..Ipv4::new(A4, B4, frames::TCP)
            }
            .frame(&frames::tcp(port, 81, frames::TCP_SYN))
        });
    }
}

#[root_test]
fn fragments_follow_their_first_fragment_or_are_dropped_as_root() {
    let mut kernel = Kernel::load(LoadOptions::default());
    let fragment = |id: u16, offset: u16, more: bool, payload: &[u8]| {
        Ipv4 {
            id,
            fragment_offset: offset,
            more_fragments: more,
            ..Ipv4::new(A4, B4, frames::UDP)
        }
        .frame(payload)
    };
    for (hook, first_id) in [
        (Hook::Xdp, 100u16),
        (Hook::TcIngress, 200),
        (Hook::TcEgress, 300),
    ] {
        let passes = |kernel: &mut Kernel, frame: &[u8]| kernel.passes(hook, frame);
        // An allowed datagram in two fragments: both pass.
        assert!(
            passes(
                &mut kernel,
                &fragment(first_id, 0, true, &frames::udp(5353, 53, &[0u8; 16]))
            ),
            "{hook:?}: first fragment of an allowed datagram"
        );
        assert!(
            passes(&mut kernel, &fragment(first_id, 3, false, &[0u8; 16])),
            "{hook:?}: its later fragment follows it"
        );
        // A denied datagram: the later fragment, which has no ports to judge, is dropped too.
        assert!(
            !passes(
                &mut kernel,
                &fragment(first_id + 1, 0, true, &frames::udp(5353, 54, &[0u8; 16]))
            ),
            "{hook:?}: first fragment of a denied datagram"
        );
        assert!(
            !passes(&mut kernel, &fragment(first_id + 1, 3, false, &[0u8; 16])),
            "{hook:?}: its later fragment"
        );
        // A later fragment whose first was never seen.
        assert!(
            !passes(&mut kernel, &fragment(first_id + 2, 3, false, &[0u8; 16])),
            "{hook:?}: orphan fragment"
        );
        // A later fragment that reaches back into the TCP header (RFC 1858) could rewrite the
        // ports its first fragment was judged on.
        let overlapping = Ipv4 {
            id: first_id,
            fragment_offset: 0,
            more_fragments: true,
            ..Ipv4::new(A4, B4, frames::TCP)
        };
        assert!(
            passes(
                &mut kernel,
                &overlapping.frame(&frames::tcp(6000, 80, frames::TCP_SYN))
            ),
            "{hook:?}: first TCP fragment"
        );
        assert!(
            !passes(
                &mut kernel,
                &Ipv4 {
                    fragment_offset: 1,
                    more_fragments: false,
                    ..overlapping.clone()
                }
                .frame(&[0u8; 24])
            ),
            "{hook:?}: fragment overlapping the TCP header"
        );
        // A first fragment too short to hold the transport header.
        assert!(
            !passes(
                &mut kernel,
                &Ipv4 {
                    id: first_id + 3,
                    more_fragments: true,
                    ..Ipv4::new(A4, B4, frames::TCP)
                }
                .frame(&[0u8; 8])
            ),
            "{hook:?}: tiny first fragment"
        );
    }
    // IPv6 fragment headers get the same treatment.
    let v6 = |id: u32, offset: u16, more: bool, payload: &[u8]| {
        frames::ipv6_frame(
            A6,
            B6,
            frames::UDP,
            64,
            &[frames::fragment_header(offset, more, id)],
            payload,
        )
    };
    assert!(
        kernel.xdp_passes(&v6(7, 0, true, &frames::udp(5353, 53, &[0u8; 16]))),
        "IPv6 first fragment, allowed"
    );
    assert!(
        kernel.xdp_passes(&v6(7, 3, false, &[0u8; 16])),
        "IPv6 later fragment follows"
    );
    assert!(
        !kernel.xdp_passes(&v6(8, 3, false, &[0u8; 16])),
        "IPv6 orphan fragment"
    );
    assert!(
        kernel.packets_with_reason(reason::BAD_FRAGMENT) >= 5,
        "orphan and overlapping fragments are counted as bad fragments"
    );
}

#[root_test]
fn vlan_tags_and_extension_headers_do_not_bypass_the_policy_as_root() {
    let mut kernel = Kernel::load(LoadOptions::default());
    let tagged = |tags: &'static [(u16, u16)], dport: u16| {
        move |port| {
            frames::ethernet(
                tags,
                frames::ETH_P_IP,
                &Ipv4::new(A4, B4, frames::TCP).packet(&frames::tcp(port, dport, frames::TCP_SYN)),
            )
        }
    };
    const ONE: &[(u16, u16)] = &[(frames::ETH_P_8021Q, 10)];
    const TWO: &[(u16, u16)] = &[(frames::ETH_P_8021AD, 10), (frames::ETH_P_8021Q, 20)];
    const THREE: &[(u16, u16)] = &[
        (frames::ETH_P_8021AD, 10),
        (frames::ETH_P_8021Q, 20),
        (frames::ETH_P_8021Q, 30),
    ];
    kernel.assert_passes("802.1Q-tagged allowed flow", tagged(ONE, 80));
    kernel.assert_dropped("802.1Q-tagged denied flow", tagged(ONE, 81));
    kernel.assert_passes("QinQ-tagged allowed flow", tagged(TWO, 80));
    kernel.assert_dropped("QinQ-tagged denied flow", tagged(TWO, 81));
    kernel.assert_dropped("three stacked tags", tagged(THREE, 80));

    let with_headers = |count: usize, dport: u16| {
        move |port| {
            let headers: Vec<_> = (0..count).map(|_| frames::hop_by_hop()).collect();
            frames::ipv6_frame(
                A6,
                B6,
                frames::TCP,
                64,
                &headers,
                &frames::tcp(port, dport, frames::TCP_SYN),
            )
        }
    };
    kernel.assert_passes("IPv6 hop-by-hop then an allowed port", with_headers(1, 80));
    kernel.assert_dropped("IPv6 hop-by-hop then a denied port", with_headers(1, 81));
    kernel.assert_dropped("IPv6 with five extension headers", with_headers(5, 80));
    assert!(kernel.packets_with_reason(reason::UNSUPPORTED_HEADERS) >= 4);
}

#[root_test]
fn icmp_errors_pass_only_to_the_sender_of_the_packet_they_quote_as_root() {
    let mut kernel = Kernel::load(LoadOptions::default());
    const C4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);
    const C6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 9);
    for hook in Hook::ALL {
        kernel.next_port += 1;
        let port = kernel.next_port;
        // a -> b 53/udp is allowed and now tracked, over IPv4 and IPv6.
        let query4 = Ipv4::new(A4, B4, frames::UDP).packet(&frames::udp(port, 53, b"q"));
        let query6 = frames::ipv6(A6, B6, frames::UDP, 64, &[], &frames::udp(port, 53, b"q"));
        assert!(kernel.passes(hook, &frames::ethernet(&[], frames::ETH_P_IP, &query4)));
        assert!(kernel.passes(hook, &frames::ethernet(&[], frames::ETH_P_IPV6, &query6)));
        // Port unreachable from b, quoting the query, `padding` bytes of payload after it.
        let error4 = |to: Ipv4Addr, padding: usize| {
            let mut quoted = query4.clone();
            quoted.resize(quoted.len() + padding, 0);
            Ipv4::new(B4, to, frames::ICMP).frame(&frames::icmp(3, 3, [0; 4], &quoted))
        };
        let error6 = |to: Ipv6Addr, padding: usize| {
            let mut quoted = query6.clone();
            quoted.resize(quoted.len() + padding, 0);
            frames::ipv6_frame(
                B6,
                to,
                frames::ICMPV6,
                64,
                &[],
                &frames::icmp(1, 4, [0; 4], &quoted),
            )
        };
        assert!(
            kernel.passes(hook, &error4(A4, 0)),
            "{hook:?}: the error to the querier"
        );
        assert!(
            kernel.passes(hook, &error6(A6, 0)),
            "{hook:?}: the ICMPv6 error to the querier"
        );
        // b may send nothing to anyone, yet used to reach anyone with an "error" about its flow.
        assert!(
            !kernel.passes(hook, &error4(C4, 0)),
            "{hook:?}: an error to a third party"
        );
        assert!(
            !kernel.passes(hook, &error6(C6, 0)),
            "{hook:?}: an ICMPv6 error to a third party"
        );
        // ... or carry anything, as long as it quoted a tracked flow first.
        assert!(
            !kernel.passes(hook, &error4(A4, 1400)),
            "{hook:?}: an error of 1448 bytes"
        );
        assert!(
            !kernel.passes(hook, &error6(A6, 1400)),
            "{hook:?}: an ICMPv6 error of 1496 bytes"
        );
    }
    assert_eq!(
        kernel.packets_with_reason(reason::FORGED_ICMP_ERROR),
        12,
        "counted as forged"
    );
}

/// Sets the IPv6 payload length of an untagged Ethernet frame.
fn with_ipv6_payload_length(mut frame: Vec<u8>, length: u16) -> Vec<u8> {
    frame[18..20].copy_from_slice(&length.to_be_bytes());
    frame
}

#[root_test]
fn headers_past_the_ip_length_are_not_judged_as_root() {
    let mut kernel = Kernel::load(LoadOptions::default());
    for (hook, id) in [
        (Hook::Xdp, 7001u32),
        (Hook::TcIngress, 7002),
        (Hook::TcEgress, 7003),
    ] {
        // The attack: an IPv6 first fragment whose payload is its fragment header alone, with a
        // SYN to an allowed port after the payload's end (bytes the receiving stack ignores).
        // It used to be judged by that SYN, allowed and recorded; then a later fragment of the
        // datagram passed as following it, whatever it carried (here, bytes for UDP 161).
        let first = with_ipv6_payload_length(
            frames::ipv6_frame(
                A6,
                B6,
                frames::TCP,
                64,
                &[frames::fragment_header(0, true, id)],
                &frames::tcp(6000, 80, frames::TCP_SYN),
            ),
            8,
        );
        assert!(
            !kernel.passes(hook, &first),
            "{hook:?}: a first fragment judged on bytes after its payload"
        );
        let later = frames::ipv6_frame(
            A6,
            B6,
            frames::TCP,
            64,
            &[frames::fragment_header(1, false, id)],
            &frames::udp(6000, 161, b"get"),
        );
        assert!(!kernel.passes(hook, &later), "{hook:?}: its later fragment");
        // An extension header chain that runs past the payload.
        let chain = with_ipv6_payload_length(
            frames::ipv6_frame(
                A6,
                B6,
                frames::TCP,
                64,
                &[frames::hop_by_hop()],
                &frames::tcp(6001, 80, frames::TCP_SYN),
            ),
            4,
        );
        assert!(
            !kernel.passes(hook, &chain),
            "{hook:?}: a header chain past the payload"
        );
        // IPv4: a SYN after the total length.
        let short = Ipv4 {
            total_len: Some(20),
            ..Ipv4::new(A4, B4, frames::TCP)
        };
        assert!(
            !kernel.passes(hook, &short.frame(&frames::tcp(6002, 80, frames::TCP_SYN))),
            "{hook:?}: a TCP header after the IPv4 total length"
        );
        // The same packets with honest lengths are judged as usual.
        let honest = frames::ipv6_frame(
            A6,
            B6,
            frames::TCP,
            64,
            &[frames::hop_by_hop()],
            &frames::tcp(6003, 80, frames::TCP_SYN),
        );
        assert!(kernel.passes(hook, &honest), "{hook:?}: an honest IPv6 SYN");
    }
    assert!(kernel.packets_with_reason(reason::MALFORMED) >= 9);
}

/// An IPv6 TCP segment whose header starts 246 bytes into the frame (after 192 bytes of
/// hop-by-hop options): whole, but its flags byte lies past the parser's old reach.
fn deep_tcp6(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut options = vec![23, 1, 188];
    options.resize(191, 0);
    let frame = frames::ipv6_frame(
        A6,
        B6,
        frames::TCP,
        64,
        &[(frames::IPV6_HOPOPTS, options)],
        &frames::tcp(sport, dport, flags),
    );
    assert_eq!(frame.len(), 246 + 20);
    frame
}

#[root_test]
fn only_a_syn_opens_a_tcp_connection_so_the_rate_limit_holds_as_root() {
    let mut kernel = Kernel::load(LoadOptions::default());
    let syn = frames::TCP_SYN;
    let ack = frames::TCP_ACK;
    let tcp = |sport, dport, flags| {
        Ipv4::new(A4, B4, frames::TCP).frame(&frames::tcp(sport, dport, flags))
    };
    for hook in Hook::ALL {
        // A fresh rate-limit bucket for each hook: one new connection a second to 443.
        kernel.install(&format!(
            "{POLICY}[[allow]]\nfrom = \"a\"\nto = \"b\"\nports = [\"443/tcp\"]\nmax_new_per_sec = 1\nid = \"limited-{hook:?}\"\n"
        ));
        let mut port = || {
            kernel.next_port += 1;
            kernel.next_port
        };
        let (first, second, probe, deep, stray) = (port(), port(), port(), port(), port());
        assert!(
            kernel.passes(hook, &tcp(first, 443, syn)),
            "{hook:?}: the first SYN of the second"
        );
        assert!(
            !kernel.passes(hook, &tcp(second, 443, syn)),
            "{hook:?}: the limit holds for SYNs"
        );
        // The bypass: a segment that is no SYN used to open a flow without meeting the limit,
        // and a SYN on its ports then passed as part of it.
        assert!(
            !kernel.passes(hook, &tcp(probe, 443, ack)),
            "{hook:?}: an ACK of no connection opens none"
        );
        assert!(
            !kernel.passes(hook, &tcp(probe, 443, syn)),
            "{hook:?}: a SYN after it meets the limit"
        );
        // Flags past the parser's old reach used to read as none: a SYN went unlimited.
        assert!(
            !kernel.passes(hook, &deep_tcp6(deep, 443, syn)),
            "{hook:?}: a SYN whose flags sit deep in the frame meets the limit"
        );
        assert!(
            !kernel.passes(hook, &tcp(stray, 80, ack)),
            "{hook:?}: an ACK of no connection, even where no limit applies"
        );
    }
    assert!(
        kernel.packets_with_reason(reason::NO_CONNECTION) >= 6,
        "segments of no connection are counted as such"
    );
    assert!(kernel.packets_with_reason(reason::RATE_LIMITED) >= 9);
}

#[root_test]
fn neighbour_discovery_passes_only_when_it_never_left_the_link_as_root() {
    let mut kernel = Kernel::load(LoadOptions::default());
    // b may send nothing to a, yet the link needs its neighbour solicitations.
    let solicitation = |hop_limit: u8| {
        move |_| {
            frames::ipv6_frame(
                B6,
                A6,
                frames::ICMPV6,
                hop_limit,
                &[],
                &frames::icmp(135, 0, [0; 4], &A6.octets()),
            )
        }
    };
    kernel.assert_passes("neighbour solicitation, hop limit 255", solicitation(255));
    kernel.assert_dropped(
        "neighbour solicitation that crossed a router",
        solicitation(64),
    );
    // The exemption used to look at the protocol number alone: an IPv4 packet of protocol 58
    // shaped like a solicitation passed, past the policy.
    kernel.assert_dropped("IPv4 protocol 58 shaped like a solicitation", |_| {
        let mut ipv4 = Ipv4::new(B4, A4, frames::ICMPV6);
        ipv4.ttl = 255;
        ipv4.frame(&frames::icmp(135, 0, [0; 4], &A6.octets()))
    });
    kernel.assert_dropped("echo request b -> a", |port| {
        frames::ipv6_frame(
            B6,
            A6,
            frames::ICMPV6,
            64,
            &[],
            &frames::icmp(128, 0, [(port >> 8) as u8, port as u8, 0, 1], b""),
        )
    });
}

#[root_test]
fn denials_are_deduplicated_in_the_kernel_and_losses_show_as_gaps_as_root() {
    let mut kernel = kernel_with_one_page_ring();

    // The kernel de-duplicates on each CPU: the runs below stay on one.
    stay_on_one_cpu();
    // A flood of one denied flow shape: one record, then one per second carrying the count.
    let flood = tcp4(B4, A4, 50000, 22);
    kernel.datapath.test_run(Hook::Xdp, &flood, 1000).unwrap();
    let first = kernel.events();
    assert_eq!(first.len(), 1, "1000 identical denials make one record");
    assert_eq!(
        (first[0].count, first[0].dst_port, first[0].reason),
        (1, 22, reason::DEFAULT_DENY)
    );
    std::thread::sleep(Duration::from_millis(1100));
    kernel.datapath.test_run(Hook::Xdp, &flood, 1).unwrap();
    let second = kernel.events();
    assert_eq!(second.len(), 1);
    assert_eq!(
        second[0].count, 1000,
        "the next record carries the 999 suppressed packets and itself"
    );

    // Distinct denied flows from distinct sources (from one source they would be aggregated
    // into one record), more than the ring buffer holds: the loss is counted in the kernel and
    // visible as sequence gaps.
    let attempts = 300u16;
    deny_from_distinct_sources(&mut kernel, attempts);
    let burst = kernel.events();
    assert!(
        burst.len() < usize::from(attempts),
        "the small ring buffer cannot hold all {attempts}"
    );
    let lost_in_kernel = kernel.maps.events_lost();
    assert!(
        lost_in_kernel > 0,
        "the kernel counted the records it could not deliver"
    );
    let mut tracker = SequenceTracker::default();
    for event in first.iter().chain(&second).chain(&burst) {
        tracker.observe(event.cpu, event.seq);
    }
    let trailing = u64::from(attempts) - burst.len() as u64 - tracker.lost();
    assert_eq!(
        tracker.lost() + trailing,
        lost_in_kernel,
        "gaps (plus records lost after the last delivered one) account for every loss"
    );
}

#[root_test]
fn a_lost_record_takes_its_packets_into_the_lost_count_as_root() {
    let mut kernel = kernel_with_one_page_ring();
    stay_on_one_cpu();
    // A shape reported once and held back 999 times; the ring then filled by other shapes
    // and left unread; the held-back shape's next report, a second later, finds no room.
    let held_back = tcp4(B4, A4, 50000, 22);
    kernel
        .datapath
        .test_run(Hook::Xdp, &held_back, 1000)
        .unwrap();
    let sources = 300u16;
    deny_from_distinct_sources(&mut kernel, sources);
    std::thread::sleep(Duration::from_millis(1100));
    kernel.datapath.test_run(Hook::Xdp, &held_back, 1).unwrap();

    let delivered: u64 = kernel
        .events()
        .iter()
        .map(|event| u64::from(event.count))
        .sum();
    let lost = kernel.maps.events_lost_packets();
    assert!(
        lost >= 1000,
        "the lost report stood for the 1000 packets of its shape: {lost} packets lost"
    );
    assert_eq!(
        delivered + lost + kernel.maps.denied_packets_unreported(),
        1000 + 1 + u64::from(sources),
        "every denied packet is in a delivered record, a lost one or a slot ({} records lost)",
        kernel.maps.events_lost()
    );
}

#[root_test]
fn a_small_ring_buffer_keeps_its_last_eighth_for_urgent_records_as_root() {
    // The programs know the ring buffer's size from the controller rather than ask for it:
    // if they took the declared 4 MiB for this page, the noise would fill all of it and the
    // spoof after it would be lost.
    let mut kernel = kernel_with_one_page_ring();
    let host = a_behind_veth_a();
    kernel.install_on(
        r#"
[[service]]
name = "a"
addresses = ["10.0.0.1/32"]
interfaces = ["veth-a"]
[[service]]
name = "b"
addresses = ["10.0.0.2/32"]
"#,
        &host,
    );
    stay_on_one_cpu();
    let attempts = 300u16;
    deny_from_distinct_sources(&mut kernel, attempts);
    assert!(
        kernel.maps.events_lost() > 0,
        "{attempts} records overflow one page"
    );
    assert!(!kernel.xdp_passes(&tcp4(A4, B4, 40000, 80)), "a spoof of a");
    let received = kernel.events();
    assert_eq!(
        spoofs(&received),
        1,
        "{} records, {} lost: the spoof found the room the others left",
        received.len(),
        kernel.maps.events_lost()
    );
}

#[root_test]
fn records_flow_again_once_the_reader_has_emptied_a_full_ring_buffer_as_root() {
    // Each CPU estimates the ring buffer's room from a reading once a tick, less its own
    // records since: an estimate that never read the room again would keep crowding out every
    // record that is not urgent after the first overflow.
    let mut kernel = kernel_with_one_page_ring();
    stay_on_one_cpu();
    deny_from_distinct_sources(&mut kernel, 300);
    let lost = kernel.maps.events_lost();
    assert!(lost > 0, "300 records overflow one page");
    assert!(
        !kernel.events().is_empty(),
        "the reader empties the ring buffer"
    );
    // A few ticks (4 ms at most each) for the estimate to be read again.
    std::thread::sleep(Duration::from_millis(50));
    let later = Ipv4Addr::new(198, 19, 0, 1);
    kernel
        .datapath
        .test_run(Hook::Xdp, &tcp4(later, A4, 50000, 22), 1)
        .unwrap();
    let received = kernel.events();
    assert_eq!(
        (received.len(), kernel.maps.events_lost()),
        (1, lost),
        "the next denied shape's record is delivered, nothing more lost"
    );
    assert_eq!(received[0].src_addr, v4_mapped(later.octets()));
}

#[root_test]
fn a_packet_handed_over_before_a_switch_is_judged_after_it_as_root() {
    // The interface hook hands a new flow for a local socket over to the socket hook while
    // the policy has services identified by cgroup; the policy then switches to one without
    // any before the packet reaches the socket. It must be judged under the live generation,
    // not pass unjudged because no service is identified by cgroup any more.
    let netns = Netns::create(&enforcer_testbed::unique_id()).unwrap();
    let local = Ipv4Addr::new(10, 99, 0, 1);
    netns
        .ip(&[
            "link",
            "add",
            "handover0",
            "type",
            "veth",
            "peer",
            "name",
            "handover1",
        ])
        .unwrap();
    netns
        .ip(&["addr", "add", "10.99.0.1/32", "dev", "handover0"])
        .unwrap();
    netns.ip(&["link", "set", "handover0", "up"]).unwrap();
    netns
        .run(|| {
            let ifindex = nix::net::if_::if_nametoindex("handover0").unwrap();
            let _receiver = std::net::UdpSocket::bind((local, 5300)).unwrap();
            let payments = PathBuf::from("/sys/fs/cgroup/unified/payments");
            let host = HostView {
                addresses: vec![IpAddr::V4(local)],
                interfaces: [("handover0".to_owned(), ifindex)].into(),
                cgroups: [(payments.clone(), Cgroup { id: 4242, level: 1 })].into(),
                ..HostView::default()
            };
            let without = "[[service]]\nname = \"b\"\naddresses = [\"10.0.0.2/32\"]\n";
            let with = format!(
                "{without}[[service]]\nname = \"payments\"\ncgroups = [\"{}\"]\n",
                payments.display()
            );
            let datagram = Ipv4::new(B4, local, frames::UDP).frame(&frames::udp(40000, 5300, b"x"));
            let mut kernel = Kernel::load(LoadOptions::default());
            let socket_hook_passes = |kernel: &mut Kernel| {
                kernel
                    .datapath
                    .test_run_socket_hook(&datagram, 1, Some(ifindex))
                    .unwrap()
                    .return_value
                    == 1
            };

            kernel.install_on(&with, &host);
            assert!(
                kernel.passes_on(Hook::TcIngress, &datagram, Some(ifindex)),
                "with a cgroup service, the interface hook hands the datagram over unjudged"
            );
            kernel.install_on(without, &host);
            assert!(
                !socket_hook_passes(&mut kernel),
                "delivered after the switch, the datagram is judged under the live generation, \
                 which lets b reach no port of the host"
            );
            assert!(
                socket_hook_passes(&mut kernel),
                "the same datagram not handed over is none of the socket hook's business"
            );
        })
        .unwrap();
}

#[root_test]
fn packets_suppressed_under_a_shape_go_out_when_another_shape_takes_its_slot_as_root() {
    let mut kernel = Kernel::load(LoadOptions::default());
    stay_on_one_cpu();
    // One shape a thousand times: reported once, 999 packets waiting for the next report.
    let repeated = tcp4(B4, A4, 50000, 22);
    kernel
        .datapath
        .test_run(Hook::Xdp, &repeated, 1000)
        .unwrap();
    // Then distinct shapes from distinct sources (not aggregated: the ring buffer stays nearly
    // empty), sixteen times as many as the CPU has slots: every slot is taken over, the
    // repeated shape's among them.
    let others = 8192u16;
    deny_from_distinct_sources(&mut kernel, others);
    let events = kernel.events();
    let repeated_records: Vec<_> = events
        .iter()
        .filter(|event| event.src_addr == v4_mapped(B4.octets()))
        .map(|event| (event.count, event.dst_port, event.reason, event.verdict))
        .collect();
    assert_eq!(
        repeated_records,
        [
            (1, 22, reason::DEFAULT_DENY, DENY),
            (999, 22, reason::DEFAULT_DENY, DENY)
        ],
        "the first packet's record, then the 999 suppressed ones as the slot is taken"
    );
    let accounted: u64 = events.iter().map(|event| u64::from(event.count)).sum();
    assert_eq!(
        (accounted, kernel.maps.events_lost()),
        (1000 + u64::from(others), 0),
        "every denied packet is in a record's count"
    );
}

#[root_test]
fn under_a_flood_denials_are_aggregated_per_source_and_a_spoof_still_arrives_as_root() {
    let mut kernel = Kernel::load(LoadOptions::default());
    // `frontend` is a /16 nobody may reach.
    let host = a_behind_veth_a();
    kernel.install_on(
        r#"
[[service]]
name = "a"
addresses = ["10.0.0.1/32"]
interfaces = ["veth-a"]
[[service]]
name = "frontend"
addresses = ["10.1.0.0/16"]
"#,
        &host,
    );
    // A new shape each time (a repeated one would be de-duplicated within the second).
    let spoof = |port| tcp4(A4, Ipv4Addr::new(10, 1, 0, 1), 40000, port);
    let denied = |source: Ipv4Addr, n: u32| {
        let [_, _, high, low] = n.to_be_bytes();
        tcp4(
            source,
            Ipv4Addr::new(10, 1, high, low),
            40000,
            1 + (n >> 16) as u16,
        )
    };
    const SHAPES: u32 = 1_000_000;

    // A scan from four sources, a million destinations and ports between them, then one spoof:
    // aggregated per source once the ring buffer is half full, so nothing is lost at all.
    let scanners = [1, 2, 3, 4].map(|n| Ipv4Addr::new(203, 0, 113, n));
    for n in 0..SHAPES {
        assert!(!kernel.xdp_passes(&denied(scanners[n as usize % 4], n)));
    }
    assert!(!kernel.xdp_passes(&spoof(80)));
    let received = kernel.events();
    let aggregated: BTreeSet<_> = received
        .iter()
        .filter(|event| event.flags & event_flags::AGGREGATED != 0)
        .map(|event| event.src_addr)
        .collect();
    assert_eq!(
        (
            aggregated.len(),
            kernel.maps.events_lost(),
            spoofs(&received)
        ),
        (4, 0, 1),
        "{} records: each scanner aggregated, nothing lost, the spoof delivered",
        received.len()
    );

    // A million distinct spoofed-looking sources, one denied shape each, then the spoof: the
    // flood overflows what the ring buffer leaves to the noise, the spoof still finds room.
    for n in 0..SHAPES {
        let [_, _, high, low] = n.to_be_bytes();
        let source = Ipv4Addr::new(198, 18 + (n >> 16) as u8 % 2, high, low);
        assert!(!kernel.xdp_passes(&denied(source, n)));
    }
    assert!(!kernel.xdp_passes(&spoof(81)));
    let received = kernel.events();
    assert!(
        kernel.maps.events_lost() > 0 && spoofs(&received) == 1,
        "{} records, {} lost, {} spoof records delivered",
        received.len(),
        kernel.maps.events_lost(),
        spoofs(&received)
    );
}

#[root_test]
fn a_load_that_fails_part_way_leaves_no_maps_pinned_as_root() {
    let pins = PinLayout::new(PathBuf::from("/sys/fs/bpf").join(enforcer_testbed::unique_id()));
    // The ring buffer cannot be pinned (a directory holds its name), after other maps were
    // made and pinned: a failure part way, as when a verifier refuses the second program.
    std::fs::create_dir_all(pins.maps().join("EVENTS")).unwrap();
    assert!(Datapath::load_with(pins.clone(), &LoadOptions::default()).is_err());
    let left = pins.root.exists();
    let _ = loader::unload(&pins);
    assert!(!left, "a failed load left pins for the next start to adopt");
}

#[root_test]
fn programs_pass_the_verifier_and_show_readable_names_as_root() {
    let kernel = Kernel::load(LoadOptions::default());
    let listing = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .expect("bpftool runs (cargo xtask setup installs it)");
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains("xdp  name enf_xdp_ingress"),
        "bpftool lists the XDP program by name:\n{listing}"
    );
    assert!(
        listing.contains("sched_cls  name enf_tc_ingress"),
        "bpftool lists the TC ingress program by name:\n{listing}"
    );
    assert!(
        listing.contains("sched_cls  name enf_tc_egress"),
        "bpftool lists the TC egress program by name:\n{listing}"
    );
    drop(kernel);
}

/// Established packets are counted per edge in a per-CPU cache slot in front of the counter
/// table; two edges sharing a slot take turns in it, and every packet is still counted once.
#[root_test]
fn edge_counts_stay_exact_when_edges_share_a_cache_slot_as_root() {
    use enforcer_common::counters::{FlowCounterKey, edge_cache_slot};
    let edge = |src_identity, dst_identity| FlowCounterKey {
        src_identity,
        dst_identity,
        verdict: enforcer_common::verdict::ALLOW,
        _pad: [0; 3],
    };
    let (a, b) = (1001, 1002);
    let c = (1003..100_000)
        .find(|&c| edge_cache_slot(&edge(a, c)) == edge_cache_slot(&edge(a, b)))
        .expect("an identity whose edge from a shares a slot with a -> b");
    const C4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
    let mut kernel = Kernel::load(LoadOptions::default());
    kernel.install(&format!(
        r#"
[[service]]
name = "a"
identity = {a}
addresses = ["10.0.0.1/32"]
[[service]]
name = "b"
identity = {b}
addresses = ["10.0.0.2/32"]
[[service]]
name = "c"
identity = {c}
addresses = ["10.0.0.3/32"]
[[allow]]
from = "a"
to = "b"
ports = ["80/tcp"]
[[allow]]
from = "a"
to = "c"
ports = ["80/tcp"]
"#
    ));
    let mut sent = std::collections::BTreeMap::new();
    for (to, identity, repeat) in [(B4, b, 700), (C4, c, 500), (B4, b, 300), (C4, c, 1)] {
        let frame = tcp4(A4, to, 41000, 80);
        let run = kernel
            .datapath
            .test_run(Hook::Xdp, &frame, repeat)
            .expect("test run");
        assert_eq!(run.return_value, XDP_PASS);
        *sent.entry(identity).or_insert(0u64) += u64::from(repeat);
    }
    let counted: std::collections::BTreeMap<u32, u64> = kernel
        .maps
        .flow_counts()
        .into_iter()
        .filter(|(key, _)| key.src_identity == a)
        .map(|(key, counter)| (key.dst_identity, counter.packets))
        .collect();
    assert_eq!(
        counted, sent,
        "packets counted per edge (a -> {b}, a -> {c})"
    );
}

/// The pair filter keeps the rule lookups of pairs in one bucket together: two pairs whose
/// identities hash to the same bucket each keep their own rules, as rules come and go, written
/// by a controller that knows what it wrote (changes only) and by one that adopted the maps.
#[root_test]
fn pairs_sharing_a_filter_bucket_each_keep_their_rules_as_root() {
    use enforcer_common::policy::pair_filter::bucket;
    let (a, b) = (1001, 1002);
    let (c, d) = (1003..)
        .flat_map(|c| (1003..101_003).map(move |d| (c, d)))
        .find(|&(c, d)| c != d && bucket(c, d) == bucket(a, b))
        .expect("a pair sharing a -> b's bucket");
    const C4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
    const D4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 4);
    let services = format!(
        "[[service]]\nname = \"a\"\nidentity = {a}\naddresses = [\"10.0.0.1/32\"]\n\
         [[service]]\nname = \"b\"\nidentity = {b}\naddresses = [\"10.0.0.2/32\"]\n\
         [[service]]\nname = \"c\"\nidentity = {c}\naddresses = [\"10.0.0.3/32\"]\n\
         [[service]]\nname = \"d\"\nidentity = {d}\naddresses = [\"10.0.0.4/32\"]\n"
    );
    // a -> b on one exact port, c -> d on any port of any protocol: different lookups.
    let a_to_b = "[[allow]]\nfrom = \"a\"\nto = \"b\"\nports = [\"80/tcp\"]\n";
    let c_to_d = "[[allow]]\nfrom = \"c\"\nto = \"d\"\n";
    let generations = [(true, true), (false, true), (true, false), (true, true)];
    for adopting in [false, true] {
        let mut kernel = Kernel::load(LoadOptions::default());
        let mut installer = Installer::adopt(&kernel.maps).unwrap();
        for (with_a_to_b, with_c_to_d) in generations {
            let text = format!(
                "{services}{}{}",
                if with_a_to_b { a_to_b } else { "" },
                if with_c_to_d { c_to_d } else { "" }
            );
            if adopting {
                installer = Installer::adopt(&kernel.maps).unwrap();
            }
            let policy =
                policy::parse_sources(vec![(PathBuf::from("verdicts.toml"), text)]).unwrap();
            let compiled = compile::compile(&policy, &HostView::default(), None).unwrap();
            installer.install(&mut kernel.maps, &compiled).unwrap();
            let what =
                format!("a -> b: {with_a_to_b}, c -> d: {with_c_to_d}, adopting: {adopting}");
            let a_to_b_80: [bool; 3] = kernel.verdicts(|port| tcp4(A4, B4, port, 80));
            assert_eq!(a_to_b_80, [with_a_to_b; 3], "a -> b 80/tcp, {what}");
            kernel.assert_dropped(&format!("a -> b 81/tcp, {what}"), |port| {
                tcp4(A4, B4, port, 81)
            });
            let c_to_d_443: [bool; 3] = kernel.verdicts(|port| tcp4(C4, D4, port, 443));
            assert_eq!(c_to_d_443, [with_c_to_d; 3], "c -> d 443/tcp, {what}");
        }
    }
}

/// Whole addresses are looked up in an exact table before the trie: an address the policy no
/// longer names must leave both, also in a slot used again two generations later — by a
/// controller that knows what it wrote (changes only) and by one that adopted the maps.
#[root_test]
fn an_address_the_policy_stops_naming_resolves_to_world_again_as_root() {
    const C4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
    let with_c = format!(
        "{POLICY}[[service]]\nname = \"c\"\naddresses = [\"10.0.0.3/32\"]\n\
         [[allow]]\nfrom = \"c\"\nto = \"b\"\nports = [\"80/tcp\"]\n"
    );
    // Without c, the world may reach b: were c's address still found, c (no rule) would be
    // refused.
    let without_c =
        format!("{POLICY}[[allow]]\nfrom = \"world\"\nto = \"b\"\nports = [\"80/tcp\"]\n");
    let compiled = |text: &str| {
        let policy =
            policy::parse_sources(vec![(PathBuf::from("verdicts.toml"), text.to_owned())]).unwrap();
        compile::compile(&policy, &HostView::default(), None).unwrap()
    };
    for adopting in [false, true] {
        let mut kernel = Kernel::load(LoadOptions::default());
        let mut installer = Installer::adopt(&kernel.maps).unwrap();
        for (text, c_named) in [(&with_c, true), (&without_c, false), (&without_c, false)] {
            if adopting {
                installer = Installer::adopt(&kernel.maps).unwrap();
            }
            installer
                .install(&mut kernel.maps, &compiled(text))
                .unwrap();
            let what = format!("10.0.0.3 -> b 80/tcp, c named: {c_named}, adopting: {adopting}");
            kernel.assert_passes(&what, |port| tcp4(C4, B4, port, 80));
            // An IPv4 address is in the exact table of the short key, and only while named.
            let live = installer.live().unwrap().slot as u8;
            let in_exact4 = kernel
                .table::<Ipcache4Key, IdentityInfo>("IPCACHE_EXACT4")
                .keys()
                .map(Result::unwrap)
                .any(|key| key.slot == live && key.addr == u32::from(C4));
            assert_eq!(
                in_exact4, c_named,
                "IPCACHE_EXACT4 holds c's address: {what}"
            );
        }
    }
}

/// Where the policy names IPv6 addresses only whole, an IPv6 address the exact table does not
/// hold is world without a walk of the trie (`IPV6_HOSTS_ONLY`); a CIDR peer's prefix turns
/// the walk back on, and its addresses then have the peer's rules as well as world's (world
/// includes what a CIDR rule names), on both sides of each switch.
#[root_test]
fn ipv6_addresses_no_one_names_are_world_and_a_cidr_peers_have_its_rules_as_root() {
    const PEER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 5);
    const STRANGER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb9, 0, 0, 0, 0, 0, 5);
    let world = format!("{POLICY}[[allow]]\nfrom = \"world\"\nto = \"b\"\nports = [\"81/tcp\"]\n");
    let with_peer =
        format!("{world}[[allow]]\nfrom = \"2001:db8::/32\"\nto = \"b\"\nports = [\"82/tcp\"]\n");
    let mut kernel = Kernel::load(LoadOptions::default());
    for (text, peer_named) in [(&world, false), (&with_peer, true), (&world, false)] {
        let compiled = kernel.install(text);
        assert_eq!(compiled.tables.ipv6_hosts_only, !peer_named);
        let what =
            |from: &str, port: u16| format!("{from} -> b {port}/tcp, peer named: {peer_named}");
        for from in [PEER, STRANGER] {
            kernel.assert_passes(&what(&from.to_string(), 81), |port| {
                tcp6(from, B6, port, 81)
            });
        }
        kernel.assert_dropped(&what("an unnamed address", 82), |port| {
            tcp6(STRANGER, B6, port, 82)
        });
        assert_eq!(
            kernel.verdicts(|port| tcp6(PEER, B6, port, 82)),
            [peer_named; 3],
            "{} at XDP, TC ingress and TC egress",
            what("the peer's address", 82)
        );
        kernel.assert_passes(&what("a", 80), |port| tcp6(A6, B6, port, 80));
    }
}

/// Addresses and endpoint interfaces are found in identity tables whose buckets hold a few keys
/// (see `enforcer_common::identity_table`: four IPv4 addresses or interfaces, two IPv6
/// addresses). Six services whose addresses share one bucket and whose interfaces share
/// another must each keep their identity (the keys a bucket cannot hold come from the hash
/// maps behind it), also as services leave and come back, in slots written again two
/// generations later: by a controller that knows what it wrote (changes only) and by one that
/// adopted the maps. For each family.
#[root_test]
fn services_sharing_an_identity_table_bucket_each_keep_their_identity_as_root() {
    for family in Family::BOTH {
        services_sharing_an_identity_table_bucket_each_keep_their_identity(family);
    }
}

fn services_sharing_an_identity_table_bucket_each_keep_their_identity(family: Family) {
    use enforcer_common::identity_table::{ADDRESSES4, ADDRESSES6, ENDPOINTS, Shape, TableKey};
    const SERVICES: usize = 6;
    const INTERFACE_WAYS: usize = 4;
    fn colliding<K: TableKey>(
        shape: Shape,
        keys: impl Iterator<Item = (K, IpAddr)>,
    ) -> Vec<IpAddr> {
        let mut keys = keys.peekable();
        let target = shape.bucket(&keys.peek().unwrap().0);
        keys.filter(|(key, _)| shape.bucket(key) == target)
            .map(|(_, address)| address)
            .take(SERVICES)
            .collect()
    }
    let (addresses, address_ways, sink, outsider, host_bits) = match family {
        Family::Ipv4 => (
            colliding(
                ADDRESSES4,
                (u32::from(Ipv4Addr::new(10, 8, 0, 1))..)
                    .map(|key| (key, Ipv4Addr::from(key).into())),
            ),
            4,
            IpAddr::from(Ipv4Addr::new(10, 9, 0, 1)),
            IpAddr::from(Ipv4Addr::new(192, 0, 2, 1)),
            32,
        ),
        Family::Ipv6 => (
            colliding(
                ADDRESSES6,
                (1..).map(|host: u128| {
                    let address = Ipv6Addr::from(0x2001_0db8_0008_u128 << 80 | host);
                    (
                        enforcer_common::addr::Address16(address.octets()).words(),
                        address.into(),
                    )
                }),
            ),
            2,
            IpAddr::from(Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 1)),
            IpAddr::from(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1)),
            128,
        ),
    };
    let syn = |src: IpAddr, dst: IpAddr, sport: u16, dport: u16| match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => tcp4(src, dst, sport, dport),
        (IpAddr::V6(src), IpAddr::V6(dst)) => tcp6(src, dst, sport, dport),
        _ => unreachable!("one family"),
    };
    let indexes: Vec<u32> = (100..)
        .filter(|index| ENDPOINTS.bucket(index) == ENDPOINTS.bucket(&100))
        .take(SERVICES)
        .collect();
    let names: Vec<String> = (0..SERVICES).map(|n| format!("ep{n}")).collect();
    let interfaces = Interfaces::create_at(
        &names
            .iter()
            .zip(&indexes)
            .map(|(name, index)| (name.as_str(), Some(*index)))
            .collect::<Vec<_>>(),
    );
    let host = HostView {
        interfaces: names.iter().cloned().zip(indexes.iter().copied()).collect(),
        routes: addresses
            .iter()
            .copied()
            .zip(names.iter().cloned())
            .collect(),
        ..HostView::default()
    };
    // Each present service may reach the sink on 80/tcp; the world, on 81/tcp.
    let policy_of = |present: &[usize]| {
        let mut text = format!(
            "[[service]]\nname = \"sink\"\naddresses = [\"{sink}/{host_bits}\"]\n\
             [[allow]]\nfrom = \"world\"\nto = \"sink\"\nports = [\"81/tcp\"]\n"
        );
        for n in present {
            text += &format!(
                "[[service]]\nname = \"e{n}\"\naddresses = [\"{}/{host_bits}\"]\ninterfaces = [\"ep{n}\"]\n\
                 [[allow]]\nfrom = \"e{n}\"\nto = \"sink\"\nports = [\"80/tcp\"]\n",
                addresses[*n]
            );
        }
        let policy = policy::parse_sources(vec![(PathBuf::from("verdicts.toml"), text)]).unwrap();
        compile::compile(&policy, &host, None).unwrap()
    };
    // Each slot holds all six, then as many from the middle as the address bucket holds (both
    // buckets then hold all their keys: nothing is sent to the hash maps), then all six again.
    let all: Vec<usize> = (0..SERVICES).collect();
    let middle = all[1..=address_ways.min(INTERFACE_WAYS)].to_vec();
    let generations = [&all, &all, &middle, &middle, &all];
    interfaces
        .netns
        .run(|| {
            for adopting in [false, true] {
                let mut kernel = Kernel::load(LoadOptions::default());
                let mut installer = Installer::adopt(&kernel.maps).unwrap();
                for present in generations {
                    if adopting {
                        installer = Installer::adopt(&kernel.maps).unwrap();
                    }
                    installer.install(&mut kernel.maps, &policy_of(present)).unwrap();
                    for hook in [Hook::Xdp, Hook::TcIngress] {
                        for n in 0..SERVICES {
                            let mut passes = |src: IpAddr, port: u16| {
                                kernel.next_port += 1;
                                let frame = syn(src, sink, kernel.next_port, port);
                                kernel.passes_on(hook, &frame, Some(indexes[n]))
                            };
                            let verdicts = [
                                passes(addresses[n], 80),
                                passes(addresses[n], 81),
                                passes(outsider, 81),
                            ];
                            // Present: e{n} reaches the sink on 80 only, and its interface
                            // speaks for nobody else. Gone: its address and interface are the
                            // world's again.
                            let expected = if present.contains(&n) {
                                [true, false, false]
                            } else {
                                [false, true, true]
                            };
                            assert_eq!(
                                verdicts, expected,
                                "{family:?}, {hook:?}: e{n} ({}, ifindex {}) to the sink on 80, 81, and \
                                 {outsider} through its interface on 81; present: {present:?}, \
                                 adopting: {adopting}",
                                addresses[n], indexes[n]
                            );
                        }
                    }
                }
            }
        })
        .unwrap();
}

#[root_test]
fn a_map_an_earlier_build_pinned_and_this_one_does_not_use_is_unpinned_as_root() {
    let mut kernel = Kernel::load(LoadOptions::default());
    // What an earlier build left: a map under a name this build does not have (the shared
    // de-duplication table before `DENIALS`).
    let earlier = kernel.pins.maps().join("REPORTS");
    MapData::from_pin(kernel.pins.maps().join("FRAGMENTS"))
        .unwrap()
        .pin(&earlier)
        .unwrap();
    assert!(earlier.exists());
    let (datapath, maps, ring) =
        Datapath::load_with(kernel.pins.clone(), &LoadOptions::default()).unwrap();
    (kernel.datapath, kernel.maps, kernel.ring) = (datapath, maps, ring);
    assert!(
        !earlier.exists(),
        "the earlier build's map is unpinned when this build adopts the pins"
    );
    assert!(
        kernel.pins.maps().join("FRAGMENTS").exists()
            && kernel.xdp_passes(&tcp4(A4, B4, 40000, 80)),
        "this build's maps stay, and enforce"
    );
}

#[root_test]
fn ipv4_flows_an_earlier_build_tracked_pass_after_an_upgrade_as_root() {
    let mut kernel = Kernel::load(LoadOptions::default());
    let tcp = |src, dst, sport, dport, flags| {
        Ipv4::new(src, dst, frames::TCP).frame(&frames::tcp(sport, dport, flags))
    };
    let ack = frames::TCP_ACK;
    assert!(kernel.xdp_passes(&tcp(A4, B4, 40000, 80, frames::TCP_SYN)));
    assert!(kernel.xdp_passes(&tcp(B4, A4, 80, 40000, frames::TCP_SYN | ack)));
    // What an earlier build left behind: the flow under the long key, in the table of every
    // family.
    let mut short = kernel.flow_table::<CtKey4>("CONNTRACK4");
    let flows: Vec<_> = short.iter().map(Result::unwrap).collect();
    assert_eq!(flows.len(), 1, "the connection is established: {flows:?}");
    let (key, entry) = flows[0];
    short.remove(&key).unwrap();
    let long_key = CtKey {
        addr_lo: v4_mapped(key.addr_lo.to_be_bytes()),
        addr_hi: v4_mapped(key.addr_hi.to_be_bytes()),
        port_lo: key.port_lo,
        port_hi: key.port_hi,
        proto: key.proto,
        _pad: [0; 3],
    };
    let mut long = kernel.flow_table::<CtKey>("CONNTRACK");
    long.insert(long_key, entry, 0).unwrap();
    assert!(
        !kernel.xdp_passes(&tcp(A4, B4, 40000, 80, ack)),
        "left there, the connection's next segment is refused as no connection's"
    );
    // Nor had that build a flow filter: this build's programs find only the flows stamped in
    // theirs.
    std::fs::remove_file(kernel.pins.maps().join("FLOW_STAMPS")).unwrap();
    // The upgrade: this build adopts the pinned maps.
    let (datapath, maps, ring) =
        Datapath::load_with(kernel.pins.clone(), &LoadOptions::default()).unwrap();
    (kernel.datapath, kernel.maps, kernel.ring) = (datapath, maps, ring);
    assert!(
        kernel.xdp_passes(&tcp(A4, B4, 40000, 80, ack))
            && kernel.xdp_passes(&tcp(B4, A4, 80, 40000, ack)),
        "the connection passes both ways once this build has adopted the pins"
    );
    assert_eq!(long.keys().count(), 0, "nothing is left under the long key");
    let moved = short.get(&key, 0).unwrap();
    assert_eq!(
        (
            moved.flags,
            moved.generation,
            moved.src_identity,
            moved.dst_identity
        ),
        (
            entry.flags,
            entry.generation,
            entry.src_identity,
            entry.dst_identity
        ),
        "the flow keeps what it was admitted with"
    );
}
