//! The complete datapath (issue #3) against the real kernel: real connections between network
//! namespaces, judged by the attached programs.

mod support;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use enforcer_testbed::{Cgroup, socat_exchange};
use support::*;

#[root_test]
fn tcp_udp_and_icmp_are_allowed_and_denied_per_rule_over_ipv4_and_ipv6_as_root() {
    allowed_and_denied_per_rule(&["--ingress-hook", "auto"], "tc-ingress");
}

#[root_test]
fn tcp_udp_and_icmp_are_allowed_and_denied_per_rule_with_xdp_ingress_as_root() {
    allowed_and_denied_per_rule(&["--ingress-hook", "xdp"], "xdp-ingress");
}

/// With BPF host routing, what the rules allow goes straight into the destination's namespace
/// (see `bpf_host_routing_skips_the_hosts_forward_path_as_root`) and everything else is still
/// judged as before.
#[root_test]
fn tcp_udp_and_icmp_are_allowed_and_denied_per_rule_with_bpf_host_routing_as_root() {
    allowed_and_denied_per_rule(&["--host-routing", "bpf"], "tc-ingress");
}

/// The rules' effect over IPv4 and IPv6, with enforcer run with `extra` arguments (`hook` is
/// how events name the program that judges what enters the host).
fn allowed_and_denied_per_rule(extra: &[&str], hook: &str) {
    let (topology, enforcer) = frontend_and_api(
        &allow(
            "frontend",
            "api",
            &["8080/tcp", "53/udp", "icmp"],
            "id = \"fe-api\"",
        ),
        extra,
    );
    let (frontend, api) = (topology.netns("frontend"), topology.netns("api"));
    let _tcp = [
        api.tcp_echo_server(8080).unwrap(),
        api.tcp_echo_server(8081).unwrap(),
        frontend.tcp_echo_server(8080).unwrap(),
    ];
    let _udp = [
        api.udp_echo_server(53).unwrap(),
        api.udp_echo_server(54).unwrap(),
        frontend.udp_echo_server(53).unwrap(),
    ];

    for (family, to_api, to_frontend) in [
        (
            "IPv4",
            v4 as fn(&Topology, &str, u16) -> SocketAddr,
            v4 as fn(&Topology, &str, u16) -> SocketAddr,
        ),
        ("IPv6", v6, v6),
    ] {
        // Allowed, and the replies come back although no rule allows api -> frontend.
        assert_eq!(
            frontend
                .tcp_exchange(to_api(&topology, "api", 8080), b"tcp", TIMEOUT)
                .expect(family),
            b"tcp",
            "{family} 8080/tcp"
        );
        assert_eq!(
            frontend
                .udp_exchange(to_api(&topology, "api", 53), b"udp", TIMEOUT)
                .expect(family),
            b"udp",
            "{family} 53/udp"
        );
        assert!(
            frontend
                .ping(to_api(&topology, "api", 0).ip(), TIMEOUT)
                .unwrap(),
            "{family} ping frontend -> api"
        );
        // Denied: another port, another protocol, the other direction.
        let refused = frontend.tcp_connect(to_api(&topology, "api", 8081), TIMEOUT);
        assert!(
            was_dropped(&refused),
            "{family} 8081/tcp must be dropped: {refused:?}"
        );
        let refused = frontend.udp_exchange(to_api(&topology, "api", 54), b"udp", TIMEOUT);
        assert!(
            was_dropped(&refused),
            "{family} 54/udp must be dropped: {refused:?}"
        );
        let refused = api.tcp_connect(to_frontend(&topology, "frontend", 8080), TIMEOUT);
        assert!(
            was_dropped(&refused),
            "{family} api -> frontend 8080/tcp must be dropped: {refused:?}"
        );
        let refused = api.udp_exchange(to_frontend(&topology, "frontend", 53), b"udp", TIMEOUT);
        assert!(
            was_dropped(&refused),
            "{family} api -> frontend 53/udp must be dropped: {refused:?}"
        );
        assert!(
            !api.ping(to_frontend(&topology, "frontend", 0).ip(), TIMEOUT)
                .unwrap(),
            "{family} ping api -> frontend must be dropped"
        );
    }

    // The event of an allowed flow names everything the issue lists.
    let opened = enforcer
        .wait_for_alert(|alert| {
            is_flow(alert, "frontend", "api", 8080)
                && alert["connection_info"]["protocol_ver_id"] == 6
        })
        .expect("IPv6 flow reported");
    let fields = &opened["unmapped"]["enforcer"];
    assert_eq!(opened["firewall_rule"]["uid"], "fe-api");
    assert_eq!(
        opened["dst_endpoint"]["ip"],
        topology.endpoint("api").ipv6.to_string()
    );
    assert_eq!(
        fields["interface"],
        topology.endpoint("frontend").host_interface,
        "seen entering the host from frontend"
    );
    assert_eq!(fields["hook"], hook);
    assert_eq!(fields["generation"], 1);
    assert_eq!(fields["reason"], "policy_allow");
    assert!(
        opened["time"].as_u64().unwrap() > 1_700_000_000_000,
        "wall-clock milliseconds"
    );
    assert!(opened["metadata"]["sequence"].as_u64().unwrap() >= 1);
    let denied = enforcer
        .wait_for_alert(|alert| is_flow(alert, "api", "frontend", 53) && alert["action_id"] == 2)
        .expect("denied UDP reported");
    assert_eq!(denied["firewall_rule"]["uid"], "default-deny");
}

/// BPF host routing takes an allowed packet from one endpoint past the host's forward path,
/// straight into the other's namespace: the destination's host-side veth never sends it, as it
/// does every one of them under the kernel's routing. Over IPv4 and IPv6, and as forwarded:
/// from the host's MAC to the endpoint's, with one hop fewer left.
#[root_test]
fn bpf_host_routing_skips_the_hosts_forward_path_as_root() {
    const DATAGRAMS: u64 = 100;
    for (routing, forwarded) in [("kernel", true), ("bpf", false)] {
        let (topology, _enforcer) = frontend_and_api(
            &allow("frontend", "api", &["53/udp"], ""),
            &["--host-routing", routing],
        );
        let (frontend, api) = (topology.netns("frontend"), topology.netns("api"));
        let _udp = api.udp_echo_server(53).unwrap();
        let api_interface = &topology.endpoint("api").host_interface;
        let sent_before = sent_packets(&topology, api_interface);
        for to in [v4(&topology, "api", 53), v6(&topology, "api", 53)] {
            for _ in 0..DATAGRAMS / 2 {
                assert_eq!(
                    frontend.udp_exchange(to, b"udp", TIMEOUT).expect("allowed"),
                    b"udp",
                    "{routing} routing, {to}"
                );
            }
        }
        let sent = sent_packets(&topology, api_interface) - sent_before;
        for to in [v4(&topology, "api", 53), v6(&topology, "api", 53)] {
            let arrived = datagram_as_it_arrived(&topology, to);
            assert_eq!(
                arrived,
                Arrival {
                    from_mac: mac(&topology.host, api_interface),
                    to_mac: mac(api, "eth0"),
                    hops_left: 63,
                },
                "{routing} routing to {to}"
            );
        }
        if forwarded {
            assert!(
                sent >= DATAGRAMS,
                "kernel routing forwards every datagram out of {api_interface}: {sent}"
            );
        } else {
            // Neighbour discovery and ARP of the host's own may still go out.
            assert!(
                sent < DATAGRAMS / 10,
                "BPF host routing delivers past {api_interface}: it sent {sent}"
            );
        }
    }
}

#[derive(Debug, PartialEq)]
struct Arrival {
    from_mac: [u8; 6],
    to_mac: [u8; 6],
    /// The TTL (IPv4) or hop limit (IPv6) it arrived with; the client sends 64.
    hops_left: u8,
}

/// How a datagram from frontend to `to` arrived at api's interface.
fn datagram_as_it_arrived(topology: &Topology, to: SocketAddr) -> Arrival {
    let (frontend, api) = (topology.netns("frontend"), topology.netns("api"));
    let frames = api
        .frames_received(
            || {
                frontend
                    .udp_exchange(to, b"hops", TIMEOUT)
                    .expect("allowed");
            },
            Duration::from_millis(100),
        )
        .expect("a packet socket in api's namespace");
    let (ethertype, hops_at) = if to.is_ipv4() {
        (0x0800, 14 + 8)
    } else {
        (0x86dd, 14 + 7)
    };
    let frame = frames
        .iter()
        .find(|frame| {
            frame.len() > hops_at
                && u16::from_be_bytes([frame[12], frame[13]]) == ethertype
                && frame.windows(4).any(|payload| payload == b"hops")
        })
        .expect("the datagram arrived");
    Arrival {
        to_mac: frame[0..6].try_into().unwrap(),
        from_mac: frame[6..12].try_into().unwrap(),
        hops_left: frame[hops_at],
    }
}

/// The MAC address of interface `name` in `netns`.
fn mac(netns: &enforcer_testbed::Netns, name: &str) -> [u8; 6] {
    let link = link(netns, name);
    let address = link["address"].as_str().expect("a MAC address");
    let bytes: Vec<u8> = address
        .split(':')
        .map(|byte| u8::from_str_radix(byte, 16).expect("hex"))
        .collect();
    bytes.try_into().expect("six bytes")
}

/// Packets interface `name` of the topology's host has sent.
fn sent_packets(topology: &Topology, name: &str) -> u64 {
    link(&topology.host, name)["stats64"]["tx"]["packets"]
        .as_u64()
        .expect("transmitted packets")
}

/// Interface `name` of `netns` with its counters, as `ip -s -j link show` gives it.
fn link(netns: &enforcer_testbed::Netns, name: &str) -> serde_json::Value {
    let output = netns
        .command("ip")
        .unwrap()
        .args(["-s", "-j", "link", "show", "dev", name])
        .output()
        .expect("ip -s link");
    let links: serde_json::Value = serde_json::from_slice(&output.stdout).expect("ip's JSON");
    links[0].clone()
}

#[root_test]
fn port_range_admits_its_ends_and_refuses_one_past_them_as_root() {
    let (topology, _enforcer) = frontend_and_api(
        &allow("frontend", "api", &["8000-8100/tcp"], "id = \"range\""),
        &[],
    );
    let api = topology.netns("api");
    let _servers: Vec<_> = [7999, 8000, 8100, 8101]
        .iter()
        .map(|port| api.tcp_echo_server(*port).unwrap())
        .collect();
    let frontend = topology.netns("frontend");
    for port in [8000, 8100] {
        assert_eq!(
            frontend
                .tcp_exchange(v4(&topology, "api", port), b"in", TIMEOUT)
                .unwrap_or_default(),
            b"in",
            "port {port} is inside 8000-8100"
        );
    }
    for port in [7999, 8101] {
        let refused = frontend.tcp_connect(v4(&topology, "api", port), TIMEOUT);
        assert!(
            was_dropped(&refused),
            "port {port} is outside 8000-8100: {refused:?}"
        );
    }
}

#[root_test]
fn cidr_world_and_host_peers_and_the_default_rule_decide_as_documented_as_root() {
    // Only api is a declared service; office, partner and stranger are plain addresses.
    let topology = Topology::build(&["api", "office", "partner", "stranger"]).unwrap();
    let office = topology.endpoint("office").ipv4.octets();
    let office_cidr = format!("{}.{}.{}.0/24", office[0], office[1], office[2]);
    let rules = format!(
        "[[allow]]\nfrom = \"{office_cidr}\"\nto = \"api\"\nports = [\"8080/tcp\"]\n\
         [[allow]]\nfrom = \"world\"\nto = \"api\"\nports = [\"9090/tcp\"]\n\
         [[allow]]\nfrom = \"host\"\nto = \"api\"\nports = [\"7070/tcp\"]\n"
    );
    let policy = format!("{}{rules}", services(&topology, &["api"]));
    let enforcer = enforce(&topology, &policy);
    let api = topology.netns("api");
    let _servers = [
        api.tcp_echo_server(7070).unwrap(),
        api.tcp_echo_server(8080).unwrap(),
        api.tcp_echo_server(9090).unwrap(),
        topology.netns("partner").tcp_echo_server(8080).unwrap(),
    ];
    let client = |name: &str| match name {
        "host" => &topology.host,
        endpoint => topology.netns(endpoint),
    };
    let check = |from: &str, to: &str, port: u16, allowed: bool, why: &str| {
        let target = v4(&topology, to, port);
        if allowed {
            assert_eq!(
                client(from)
                    .tcp_exchange(target, b"hi", TIMEOUT)
                    .unwrap_or_default(),
                b"hi",
                "{from} -> {to}:{port} passes: {why}"
            );
        } else {
            let refused = client(from).tcp_connect(target, TIMEOUT);
            assert!(
                was_dropped(&refused),
                "{from} -> {to}:{port} is dropped: {why}: {refused:?}"
            );
        }
    };
    check(
        "office",
        "api",
        8080,
        true,
        "office is inside the CIDR peer",
    );
    check("stranger", "api", 8080, false, "stranger is outside it");
    check("stranger", "api", 9090, true, "stranger is world");
    check(
        "office",
        "api",
        9090,
        true,
        "world covers CIDR-peer addresses too",
    );
    check("host", "api", 7070, true, "the host peer");
    check("host", "api", 9090, false, "the host is not world");
    check(
        "api",
        "partner",
        8080,
        false,
        "a declared service is default-deny outbound",
    );
    check(
        "office",
        "partner",
        8080,
        true,
        "traffic between undeclared addresses passes",
    );
    check(
        "host",
        "partner",
        8080,
        true,
        "the host's own traffic passes by default",
    );

    enforcer.reload(&format!("[settings]\nmanage_host = true\n{policy}"), 2);
    check(
        "host",
        "partner",
        8080,
        false,
        "manage_host: the host is default-deny too",
    );
    check(
        "host",
        "api",
        7070,
        true,
        "manage_host keeps the host's allow rules",
    );
    check(
        "office",
        "partner",
        8080,
        true,
        "undeclared traffic not involving the host",
    );
}

#[root_test]
fn explicit_deny_beats_an_overlapping_allow_as_root() {
    let (topology, enforcer) = frontend_and_api(
        &(allow("frontend", "api", &["tcp"], "id = \"all-tcp\"")
            + &deny("frontend", "api", &["9090/tcp"], "id = \"no-admin\"")),
        &[],
    );
    let api = topology.netns("api");
    let _servers = [
        api.tcp_echo_server(9090).unwrap(),
        api.tcp_echo_server(9091).unwrap(),
    ];
    let frontend = topology.netns("frontend");
    assert_eq!(
        frontend
            .tcp_exchange(v4(&topology, "api", 9091), b"ok", TIMEOUT)
            .unwrap_or_default(),
        b"ok",
        "the allow covers 9091"
    );
    let refused = frontend.tcp_connect(v4(&topology, "api", 9090), TIMEOUT);
    assert!(was_dropped(&refused), "the deny wins on 9090: {refused:?}");
    let denied = enforcer
        .wait_for_alert(|alert| is_flow(alert, "frontend", "api", 9090))
        .expect("denial reported");
    assert_eq!(denied["firewall_rule"]["uid"], "no-admin");
    assert_eq!(denied["unmapped"]["enforcer"]["reason"], "policy_deny");
}

#[root_test]
fn icmp_errors_about_an_allowed_flow_reach_the_client_as_root() {
    let (topology, _enforcer) = frontend_and_api(&allow("frontend", "api", &["53/udp"], ""), &[]);
    // Nothing listens on api:53: api answers with port unreachable, an ICMP packet from api to
    // frontend that no rule allows by itself. It is about an allowed flow, so it passes, and the
    // client learns at once instead of waiting for a timeout.
    let frontend = topology.netns("frontend");
    for target in [v6(&topology, "api", 53), v4(&topology, "api", 53)] {
        let answer = frontend.udp_exchange(target, b"anyone?", TIMEOUT);
        assert!(
            matches!(&answer, Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused),
            "{target}: expected port unreachable to arrive, got {answer:?}"
        );
    }
}

/// Sends one UDP datagram from source port `port` (reusing it) to `to`, with `command` (a
/// python3 in or out of a cgroup).
fn udp_from_port(mut command: std::process::Command, port: u16, to: SocketAddr) {
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {port}))\ns.sendto(b'x', ('{}', {}))\n",
        to.ip(),
        to.port()
    );
    let status = command.args(["-c", &script]).status().unwrap();
    assert!(status.success(), "python3 sends");
}

/// A process outside frontend's cgroup reuses the ports of frontend's tracked flow: it used to
/// pass as that flow, without its identity.
#[root_test]
fn a_tracked_flow_is_no_pass_for_another_cgroup_on_its_ports_as_root() {
    let topology = Topology::build(&["api"]).unwrap();
    let cgroup = Cgroup::create("frontend").unwrap();
    let policy = format!(
        "[[service]]\nname = \"frontend\"\ncgroups = [\"{}\"]\n{}{}",
        cgroup.path.display(),
        service(&topology, "api", ""),
        allow("frontend", "api", &["53/udp"], "")
    );
    let _enforcer = enforce(&topology, &policy);
    let server = topology.netns("api").udp_echo_server(53).unwrap();
    let target = v4(&topology, "api", 53);
    // On one CPU, whose flow cache then holds frontend's flow when the host sends on it.
    let on_one_cpu = |mut command: std::process::Command| {
        command.args(["-c", "0", "python3"]);
        command
    };
    let in_cgroup = || on_one_cpu(topology.host.command_in_cgroup("taskset", &cgroup).unwrap());
    let outside = || on_one_cpu(topology.host.command("taskset").unwrap());
    let arrived = |count: usize| {
        enforcer_testbed::eventually(Duration::from_secs(2), || server.hit_count() >= count)
    };
    // The host may not reach api...
    udp_from_port(outside(), 40001, target);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.hit_count(), 0, "the host alone is refused");
    // ...frontend may, and its flow is tracked...
    udp_from_port(in_cgroup(), 40002, target);
    assert!(arrived(1), "frontend reaches api");
    udp_from_port(in_cgroup(), 40002, target);
    assert!(arrived(2), "frontend's flow goes on");
    // ...and the host sending on frontend's ports is still the host.
    udp_from_port(outside(), 40002, target);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        server.hit_count(),
        2,
        "the host on frontend's ports is refused"
    );
    udp_from_port(in_cgroup(), 40002, target);
    assert!(arrived(3), "frontend's flow goes on");
}

#[root_test]
fn process_in_a_services_cgroup_is_judged_as_that_service_as_root() {
    let topology = Topology::build(&["api"]).unwrap();
    let cgroup = Cgroup::create("frontend").unwrap();
    let policy = format!(
        "[[service]]\nname = \"frontend\"\ncgroups = [\"{}\"]\n{}[[allow]]\nfrom = \"frontend\"\nto = \"api\"\nports = [\"8080/tcp\"]\nid = \"fe-api\"\n",
        cgroup.path.display(),
        service(&topology, "api", "")
    );
    let enforcer = enforce(&topology, &policy);
    let _server = topology.netns("api").tcp_echo_server(8080).unwrap();
    let target = v4(&topology, "api", 8080);

    let inside = socat_exchange(
        topology.host.command_in_cgroup("socat", &cgroup).unwrap(),
        None,
        target,
        b"from the frontend cgroup",
        TIMEOUT,
    );
    assert_eq!(
        inside.expect("a process in frontend's cgroup is frontend"),
        b"from the frontend cgroup"
    );
    let outside = socat_exchange(
        topology.host.command("socat").unwrap(),
        None,
        target,
        b"from elsewhere",
        TIMEOUT,
    );
    assert!(
        outside.is_err(),
        "the same command outside the cgroup is the host, which may not reach api: {outside:?}"
    );

    let opened = enforcer
        .wait_for_alert(|alert| is_flow(alert, "frontend", "api", 8080))
        .expect("flow reported");
    assert_eq!(
        opened["unmapped"]["enforcer"]["cgroup_id"],
        cgroup.id().unwrap()
    );
    assert_eq!(opened["unmapped"]["enforcer"]["hook"], "tc-egress");
    let refused = enforcer
        .wait_for_alert(|alert| is_flow(alert, "host", "api", 8080))
        .expect("refusal reported");
    assert_eq!(refused["firewall_rule"]["uid"], "default-deny");
}

/// A service's cgroup covers its subtree: a child made before `run` and a grandchild made
/// after it are the service (they used to be the host, default-denied); a sibling is not.
#[root_test]
fn processes_in_cgroups_below_a_services_cgroup_are_that_service_as_root() {
    let topology = Topology::build(&["api"]).unwrap();
    let cgroup = Cgroup::create("frontend").unwrap();
    let sibling = Cgroup::create("frontend-sibling").unwrap();
    let child = cgroup.child("worker").unwrap();
    let policy = format!(
        "[[service]]\nname = \"frontend\"\ncgroups = [\"{}\"]\n{}[[allow]]\nfrom = \"frontend\"\nto = \"api\"\nports = [\"8080/tcp\"]\n",
        cgroup.path.display(),
        service(&topology, "api", "")
    );
    let _enforcer = enforce(&topology, &policy);
    let grandchild = child.child("task-1").unwrap();
    let _server = topology.netns("api").tcp_echo_server(8080).unwrap();
    let target = v4(&topology, "api", 8080);
    let exchange_from = |cgroup: &Cgroup| {
        socat_exchange(
            topology.host.command_in_cgroup("socat", cgroup).unwrap(),
            None,
            target,
            b"hello",
            TIMEOUT,
        )
    };

    assert_eq!(
        exchange_from(&child).expect("a child cgroup made before run is frontend"),
        b"hello"
    );
    assert_eq!(
        exchange_from(&grandchild).expect("a grandchild made after run is frontend"),
        b"hello"
    );
    let from_sibling = exchange_from(&sibling);
    assert!(
        from_sibling.is_err(),
        "a cgroup beside frontend's is the host, which may not reach api: {from_sibling:?}"
    );
}

/// A process of the test's, killed (and waited for) when dropped.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[root_test]
fn what_a_cgroup_services_sockets_receive_is_judged_as_for_that_service_as_root() {
    traffic_to_a_cgroup_service("auto");
}

#[root_test]
fn what_a_cgroup_services_sockets_receive_is_judged_as_for_that_service_with_xdp_ingress_as_root() {
    traffic_to_a_cgroup_service("xdp");
}

/// payments is a process in a cgroup, listening on the host's addresses. The policy lets
/// frontend reach payments, and api reach the host's own ports 9090 and 9191 (an agent of the
/// host's, say). What payments received used to be judged as sent to `host`: api reached
/// payments through its rule for the host, and frontend's rule for payments never applied.
/// Now the receiving socket's cgroup names the destination; the host's other sockets stay the
/// host's.
fn traffic_to_a_cgroup_service(ingress: &str) {
    let topology = Topology::build(&["api", "frontend"]).unwrap();
    let cgroup = Cgroup::create("payments").unwrap();
    let listen = |command: &mut std::process::Command, port: u16| {
        let address = format!("TCP6-LISTEN:{port},reuseaddr,fork,ipv6only=0");
        Running(
            command
                .args([address.as_str(), "EXEC:cat"])
                .spawn()
                .unwrap(),
        )
    };
    let _payments = listen(
        &mut topology.host.command_in_cgroup("socat", &cgroup).unwrap(),
        9090,
    );
    let received = topology.dir.join("payments-received");
    let _payments_udp = Running(
        topology
            .host
            .command_in_cgroup("socat", &cgroup)
            .unwrap()
            .args([
                "-u",
                "UDP6-RECV:9053,ipv6only=0",
                &format!("OPEN:{},creat,append", received.display()),
            ])
            .spawn()
            .unwrap(),
    );
    let received_from = |sender: &str| {
        std::fs::read_to_string(&received).is_ok_and(|text| text.contains(&format!("<{sender}>")))
    };
    // From an endpoint (or the host itself) to the host's address on api's link; `padding`
    // bytes more than the link's MTU make it a datagram in fragments.
    let send_padded = |name: &str, padding: usize| {
        let host = topology.endpoint("api").gateway_v4;
        let script = format!(
            "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'<{name}>' + b'.' * {padding}, ('{host}', 9053))\n"
        );
        let netns = if name == "host" {
            &topology.host
        } else {
            topology.netns(name)
        };
        let status = netns
            .command("python3")
            .unwrap()
            .args(["-c", &script])
            .status();
        assert!(status.unwrap().success(), "python3 sends");
    };
    let send = |name: &str| send_padded(name, 0);
    let send_in_fragments = |name: &str| send_padded(name, 3000);
    let _other = listen(&mut topology.host.command("socat").unwrap(), 9191);
    let to_host = |name: &str, port: u16, v6: bool| {
        let endpoint = topology.endpoint(name);
        let host: IpAddr = if v6 {
            endpoint.gateway_v6.into()
        } else {
            endpoint.gateway_v4.into()
        };
        topology
            .netns(name)
            .tcp_exchange(SocketAddr::new(host, port), b"pay", TIMEOUT)
    };
    // The attack works without enforcer.
    assert!(
        enforcer_testbed::eventually(TIMEOUT * 4, || {
            send("api");
            received_from("api")
        }),
        "api's datagram reaches payments when nothing enforces"
    );
    assert!(
        enforcer_testbed::eventually(TIMEOUT * 4, || to_host("api", 9090, false).is_ok()),
        "api connects to payments when nothing enforces"
    );
    std::fs::write(&received, "").unwrap();
    let policy = format!(
        "[[service]]\nname = \"payments\"\ncgroups = [\"{}\"]\n{}{}{}{}",
        cgroup.path.display(),
        service(&topology, "api", ""),
        service(&topology, "frontend", ""),
        allow(
            "frontend",
            "payments",
            &["9090/tcp", "9053/udp"],
            "id = \"fe-pay\""
        ),
        allow("api", "host", &["9090/tcp", "9191/tcp", "9053/udp"], "")
    );
    let enforcer = enforce_with(&topology, &policy, &["--ingress-hook", ingress]);
    // A datagram needs no answer: the old judgement (api -> host, allowed) delivered it. The
    // host's own, sent next over loopback, is judged by no hook: once it is in, api's would be.
    // Whole or in fragments (whose first fragment used to be judged for the host).
    send("api");
    send_in_fragments("api");
    send("host");
    assert!(
        enforcer_testbed::eventually(TIMEOUT, || received_from("host")),
        "the host's datagram reaches payments"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !received_from("api"),
        "api's datagram reaches payments through its rule for the host"
    );
    send("frontend");
    assert!(
        enforcer_testbed::eventually(TIMEOUT, || received_from("frontend")),
        "frontend's datagram reaches payments"
    );
    for v6 in [false, true] {
        let attack = to_host("api", 9090, v6);
        assert!(
            attack.is_err(),
            "api reaches payments through its rule for the host (IPv6: {v6}): {attack:?}"
        );
        assert_eq!(
            to_host("frontend", 9090, v6).expect("frontend reaches payments"),
            b"pay"
        );
        assert_eq!(
            to_host("api", 9191, v6).expect("a socket of no service is the host's"),
            b"pay"
        );
    }
    let allowed = enforcer
        .wait_for_alert(|alert| is_flow(alert, "frontend", "payments", 9090))
        .expect("frontend's flow to payments reported");
    assert_eq!(allowed["unmapped"]["enforcer"]["hook"], "socket-ingress");
    assert_eq!(allowed["firewall_rule"]["uid"], "fe-pay");
    let refused = enforcer
        .wait_for_alert(|alert| is_flow(alert, "api", "payments", 9090))
        .expect("api's attempt reported");
    assert_eq!(refused["firewall_rule"]["uid"], "default-deny");
}

/// The socket hook runs for every packet any socket of the host receives, and judges them only
/// for services identified by cgroup: it is attached while the policy has one (before that
/// policy's interface hooks hand it packets) and removed once a policy has none.
#[root_test]
fn the_socket_hook_is_attached_only_while_a_service_is_identified_by_cgroup_as_root() {
    let topology = Topology::build(&["api"]).unwrap();
    let cgroup = Cgroup::create("payments").unwrap();
    let _payments = Running(
        topology
            .host
            .command_in_cgroup("socat", &cgroup)
            .unwrap()
            .args(["TCP4-LISTEN:9090,reuseaddr,fork", "EXEC:cat"])
            .spawn()
            .unwrap(),
    );
    let payments = SocketAddr::new(topology.endpoint("api").gateway_v4.into(), 9090);
    let api_reaches_payments = || {
        topology
            .netns("api")
            .tcp_exchange(payments, b"pay", TIMEOUT)
            .is_ok()
    };
    let socket_link = topology.pin_path().join("links").join("sockets");
    let socket_hook_status = |enforcer: &Enforcer| {
        let status = enforcer.command(&topology, &["status"]);
        let status = String::from_utf8_lossy(&status.stdout).into_owned();
        status
            .lines()
            .find(|line| line.contains("socket hook"))
            .map(str::to_owned)
            .unwrap_or(status)
    };
    let without = format!(
        "{}{}",
        service(&topology, "api", ""),
        allow("api", "host", &["9090/tcp"], "")
    );
    let with = format!(
        "[[service]]\nname = \"payments\"\ncgroups = [\"{}\"]\n{without}",
        cgroup.path.display()
    );

    let enforcer = enforce(&topology, &without);
    assert!(
        enforcer_testbed::eventually(TIMEOUT * 4, api_reaches_payments),
        "api reaches the host's port 9090, where payments listens unnamed by the policy"
    );
    assert!(
        !socket_link.exists(),
        "no socket hook without a cgroup service"
    );
    let status = socket_hook_status(&enforcer);
    assert!(status.contains("not attached, as no service"), "{status}");

    enforcer.reload(&with, 2);
    assert!(
        socket_link.exists(),
        "the socket hook is attached for payments"
    );
    assert!(
        !api_reaches_payments(),
        "api reaches payments through its rule for the host"
    );
    let status = socket_hook_status(&enforcer);
    assert!(status.contains("this build's program"), "{status}");

    enforcer.reload(&without, 3);
    // Removed after the switch's grace period, which the controller waits out after it logs
    // the switch (the reload's cue), not on the switch's path.
    assert!(
        enforcer_testbed::eventually(SETTLE, || !socket_link.exists()),
        "the socket hook is removed with payments"
    );
    assert!(
        api_reaches_payments(),
        "api reaches the host's port 9090 again"
    );
}

#[root_test]
fn cgroup_and_source_address_naming_different_services_is_dropped_as_spoofed_as_root() {
    let topology = Topology::build(&["api"]).unwrap();
    let cgroup = Cgroup::create("frontend").unwrap();
    // The host also holds db's address; a frontend process sending from it claims to be db.
    let db_address = Ipv4Addr::new(10, 99, 0, 3);
    topology
        .host
        .ip(&["addr", "add", &format!("{db_address}/32"), "dev", "lo"])
        .unwrap();
    let policy = format!(
        "[[service]]\nname = \"frontend\"\ncgroups = [\"{}\"]\n[[service]]\nname = \"db\"\naddresses = [\"{db_address}/32\"]\n{}[[allow]]\nfrom = \"frontend\"\nto = \"api\"\nports = [\"8080/tcp\"]\n[[allow]]\nfrom = \"db\"\nto = \"api\"\nports = [\"8080/tcp\"]\n",
        cgroup.path.display(),
        service(&topology, "api", "")
    );
    let enforcer = enforce(&topology, &policy);
    let server = topology.netns("api").tcp_echo_server(8080).unwrap();
    let target = v4(&topology, "api", 8080);
    // Either identity alone may reach api: only the contradiction is refused.
    let honest = socat_exchange(
        topology.host.command_in_cgroup("socat", &cgroup).unwrap(),
        None,
        target,
        b"frontend",
        TIMEOUT,
    );
    assert_eq!(honest.expect("frontend from its cgroup"), b"frontend");
    let lying = socat_exchange(
        topology.host.command_in_cgroup("socat", &cgroup).unwrap(),
        Some(IpAddr::V4(db_address)),
        target,
        b"db?",
        TIMEOUT,
    );
    assert!(
        lying.is_err(),
        "frontend's process sending as db must be dropped: {lying:?}"
    );
    assert_eq!(
        server.hit_count(),
        1,
        "only the honest connection reached api"
    );
    let spoofed = enforcer
        .wait_for_alert(|alert| alert["unmapped"]["enforcer"]["reason"] == "identity_mismatch")
        .expect("spoof reported");
    assert_eq!(
        spoofed["src_endpoint"]["svc_name"], "frontend",
        "reported with the cgroup's service"
    );
    assert_eq!(
        spoofed["unmapped"]["enforcer"]["address_identity"],
        enforcer::policy::identity::of_service_name("db"),
        "and the address's"
    );
    assert_eq!(spoofed["firewall_rule"]["uid"], "anti-spoofing");
}

#[root_test]
fn spoofed_source_from_an_endpoint_never_reaches_its_target_as_root() {
    spoofed_source_is_dropped("auto");
}

#[root_test]
fn spoofed_source_from_an_endpoint_never_reaches_its_target_with_xdp_ingress_as_root() {
    spoofed_source_is_dropped("xdp");
}

/// The workload's made-up hardware address in the neighbour-claim attacks.
const FORGED_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x66];

/// Whether the host's neighbour table says `address` is at [`FORGED_MAC`] behind `interface`.
fn host_believes(topology: &Topology, interface: &str, address: IpAddr) -> bool {
    let family = if address.is_ipv4() { "-4" } else { "-6" };
    let output = topology
        .host
        .command("ip")
        .unwrap()
        .args([family, "neigh", "show", "dev", interface])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .any(|line| line.starts_with(&format!("{address} ")) && line.contains("02:00:00:00:00:66"))
}

/// Forgets what the host's neighbour table holds behind `interface`.
fn host_forgets(topology: &Topology, interface: &str) {
    for family in ["-4", "-6"] {
        topology
            .host
            .ip(&[family, "neigh", "flush", "dev", interface])
            .unwrap();
    }
}

/// A workload claims another service's IPv6 address to the host by neighbour discovery: a
/// solicitation from that address (the host learns the address is behind the workload's
/// interface) and an unsolicited advertisement of it. Without enforcer the host's neighbour
/// table takes both; with it neither arrives (they are spoofed), while the workload's honest
/// neighbour discovery still does.
#[root_test]
fn neighbour_discovery_from_an_endpoint_speaks_only_for_its_own_addresses_as_root() {
    let topology = Topology::build(&["frontend", "api"]).unwrap();
    let policy = services(&topology, &["frontend", "api"]);
    for scope in ["all", "v-api"] {
        topology
            .host
            .sysctl(&format!("net.ipv6.conf.{scope}.accept_untracked_na"), "1")
            .unwrap();
    }
    let api = topology.netns("api");
    let (frontend_address, api_address, gateway) = (
        topology.endpoint("frontend").ipv6,
        topology.endpoint("api").ipv6,
        topology.endpoint("api").gateway_v6,
    );
    api.ip(&[
        "addr",
        "add",
        &format!("{frontend_address}/128"),
        "dev",
        "eth0",
        "nodad",
    ])
    .unwrap();
    let send = |from: std::net::Ipv6Addr, to: std::net::Ipv6Addr, message: Vec<u8>| {
        api.send_icmpv6(from, to, "eth0", &message).unwrap();
    };
    // Type, flags (override, for an advertisement), target, and the link-layer address
    // option (1: the sender's, 2: the target's) with the workload's made-up MAC.
    let message = |kind: u8, flags: u8, target: std::net::Ipv6Addr| {
        let mut message = vec![kind, 0, 0, 0, flags, 0, 0, 0];
        message.extend(target.octets());
        message.extend([if kind == 135 { 1 } else { 2 }, 1]);
        message.extend(FORGED_MAC);
        message
    };
    let solicitation = |target| message(135, 0, target);
    let advertisement = |target| message(136, 0x20, target);
    let all_nodes: std::net::Ipv6Addr = "ff02::1".parse().unwrap();
    let attacks = [
        (
            "a solicitation from frontend's address",
            frontend_address,
            gateway,
            solicitation(gateway),
        ),
        (
            "an advertisement of frontend's address",
            api_address,
            all_nodes,
            advertisement(frontend_address),
        ),
    ];
    for (what, from, to, forged) in &attacks {
        host_forgets(&topology, "v-api");
        send(*from, *to, forged.clone());
        assert!(
            enforcer_testbed::eventually(Duration::from_secs(2), || host_believes(
                &topology,
                "v-api",
                frontend_address.into()
            )),
            "without enforcer the host believes {what}"
        );
    }
    let enforcer = enforce(&topology, &policy);
    for (what, from, to, forged) in &attacks {
        host_forgets(&topology, "v-api");
        send(*from, *to, forged.clone());
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !host_believes(&topology, "v-api", frontend_address.into()),
            "enforced: {what} is dropped"
        );
    }
    host_forgets(&topology, "v-api");
    send(api_address, gateway, solicitation(gateway));
    assert!(
        enforcer_testbed::eventually(Duration::from_secs(2), || host_believes(
            &topology,
            "v-api",
            api_address.into()
        )),
        "api's neighbour discovery for its own address still works"
    );
    let spoofed = enforcer
        .wait_for_alert(|alert| {
            alert["unmapped"]["enforcer"]["reason"] == "spoofed"
                && alert["src_endpoint"]["ip"] == frontend_address.to_string()
        })
        .expect("the forged solicitation is reported");
    assert_eq!(spoofed["src_endpoint"]["svc_name"], "api");
}

/// The IPv4 form of the same attack: an ARP request from api's link that says frontend's
/// address is at the workload's hardware address. Without enforcer the host's neighbour
/// table takes it; with it, it is dropped as spoofed, while api's own ARP still works.
#[root_test]
fn arp_from_an_endpoint_speaks_only_for_its_own_addresses_as_root() {
    let topology = Topology::build(&["frontend", "api"]).unwrap();
    let policy = services(&topology, &["frontend", "api"]);
    let api = topology.netns("api");
    let (frontend_address, api_address, gateway) = (
        topology.endpoint("frontend").ipv4,
        topology.endpoint("api").ipv4,
        topology.endpoint("api").gateway_v4,
    );
    // Who has the gateway? Tell `sender`, at FORGED_MAC.
    let request = |sender: Ipv4Addr| {
        let mut frame = vec![0xff; 6];
        frame.extend(FORGED_MAC);
        frame.extend([0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
        frame.extend(FORGED_MAC);
        frame.extend(sender.octets());
        frame.extend([0; 6]);
        frame.extend(gateway.octets());
        frame
    };
    api.send_frame("eth0", &request(frontend_address)).unwrap();
    assert!(
        enforcer_testbed::eventually(Duration::from_secs(2), || host_believes(
            &topology,
            "v-api",
            frontend_address.into()
        )),
        "without enforcer the host believes frontend's address is behind v-api"
    );
    let enforcer = enforce(&topology, &policy);
    host_forgets(&topology, "v-api");
    api.send_frame("eth0", &request(frontend_address)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !host_believes(&topology, "v-api", frontend_address.into()),
        "enforced: the forged ARP is dropped"
    );
    api.send_frame("eth0", &request(api_address)).unwrap();
    assert!(
        enforcer_testbed::eventually(Duration::from_secs(2), || host_believes(
            &topology,
            "v-api",
            api_address.into()
        )),
        "api's ARP for its own address still works"
    );
    let spoofed = enforcer
        .wait_for_alert(|alert| {
            alert["unmapped"]["enforcer"]["reason"] == "spoofed"
                && alert["src_endpoint"]["ip"] == frontend_address.to_string()
        })
        .expect("the forged ARP is reported");
    assert_eq!(spoofed["src_endpoint"]["svc_name"], "api");
}

/// A workload behind another interface forges frontend's address: before, only frontend's own
/// interface checked it, so the datagram passed wherever else it came in.
#[root_test]
fn a_local_endpoints_address_from_any_other_interface_is_dropped_as_root() {
    let topology = Topology::build(&["frontend", "api", "mallory"]).unwrap();
    let policy = format!(
        "{}{}",
        services(&topology, &["frontend", "api"]),
        allow("frontend", "api", &["53/udp"], "")
    );
    let server = topology.netns("api").udp_echo_server(53).unwrap();
    let mallory = topology.netns("mallory");
    let frontend_address = topology.endpoint("frontend").ipv4;
    mallory
        .ip(&[
            "addr",
            "add",
            &format!("{frontend_address}/32"),
            "dev",
            "eth0",
        ])
        .unwrap();
    let target = v4(&topology, "api", 53);
    // (The answer goes to the real frontend: only what reaches api counts.)
    let forge = || {
        mallory.udp_exchange_from(
            Some(IpAddr::V4(frontend_address)),
            target,
            b"forged",
            TIMEOUT,
        )
    };
    let _ = forge();
    assert!(
        enforcer_testbed::eventually(Duration::from_secs(2), || server.hit_count() == 1),
        "without enforcer the forged datagram reaches api"
    );
    let interface = |name: &str| topology.endpoint(name).host_interface.clone();
    for (attached, how) in [
        (
            vec![
                interface("frontend"),
                interface("api"),
                interface("mallory"),
            ],
            "mallory's interface attached, no service's",
        ),
        (
            vec![interface("frontend"), interface("api")],
            "mallory's interface not attached",
        ),
    ] {
        let attach: Vec<&str> = attached.iter().map(String::as_str).collect();
        let enforcer = Enforcer::start(&topology, &policy, &attach, &[]).unwrap();
        let before = server.hit_count();
        assert!(was_dropped(&forge()), "{how}");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            server.hit_count(),
            before,
            "{how}: nothing forged reached api"
        );
        assert_eq!(
            topology
                .netns("frontend")
                .udp_exchange(target, b"honest", TIMEOUT)
                .expect("frontend itself"),
            b"honest"
        );
        let spoofed = enforcer
            .wait_for_alert(|alert| alert["unmapped"]["enforcer"]["reason"] == "spoofed")
            .unwrap_or_else(|| panic!("{how}: the spoof is reported"));
        assert_eq!(spoofed["src_endpoint"]["ip"], frontend_address.to_string());
    }
}

fn spoofed_source_is_dropped(ingress: &str) {
    let db_address = Ipv4Addr::new(10, 99, 0, 3);
    let db = format!("[[service]]\nname = \"db\"\naddresses = [\"{db_address}/32\"]\n");
    let rules: String = ["frontend", "db", "world"]
        .iter()
        .map(|from| allow(from, "api", &["53/udp"], ""))
        .collect();
    let (topology, enforcer) = frontend_and_api(&(db + &rules), &["--ingress-hook", ingress]);
    let server = topology.netns("api").udp_echo_server(53).unwrap();
    let frontend = topology.netns("frontend");
    let unclaimed = Ipv4Addr::new(10, 200, 1, 77);
    frontend
        .ip(&["addr", "add", &format!("{unclaimed}/32"), "dev", "eth0"])
        .unwrap();
    frontend
        .ip(&["addr", "add", &format!("{db_address}/32"), "dev", "eth0"])
        .unwrap();
    let target = v4(&topology, "api", 53);

    assert_eq!(
        frontend
            .udp_exchange(target, b"honest", TIMEOUT)
            .expect("frontend's own address"),
        b"honest"
    );
    assert_eq!(server.hit_count(), 1);
    // Every rule would allow these sources, but they did not come from where those sources are.
    for forged in [unclaimed, db_address] {
        let sent = frontend.udp_exchange_from(Some(IpAddr::V4(forged)), target, b"forged", TIMEOUT);
        assert!(
            was_dropped(&sent),
            "datagram from {forged} must be dropped: {sent:?}"
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(server.hit_count(), 1, "no forged datagram reached api");
    let spoofed = enforcer
        .wait_for_alert(|alert| {
            alert["unmapped"]["enforcer"]["reason"] == "spoofed"
                && alert["src_endpoint"]["ip"] == db_address.to_string()
        })
        .expect("spoof reported");
    assert_eq!(
        spoofed["src_endpoint"]["svc_name"], "frontend",
        "the interface's service"
    );
    assert_eq!(
        spoofed["unmapped"]["enforcer"]["address_identity"],
        enforcer::policy::identity::of_service_name("db")
    );
    assert_eq!(spoofed["severity_id"], 4);
}

#[root_test]
fn live_connection_dies_at_its_next_packet_when_its_rule_is_removed_as_root() {
    let (topology, enforcer) = frontend_and_api(
        &allow("frontend", "api", &["8080/tcp"], "id = \"fe-api\""),
        &[],
    );
    let server = topology.netns("api").tcp_echo_server(8080).unwrap();
    let frontend = topology.netns("frontend");
    let mut stream = frontend
        .tcp_connect(v4(&topology, "api", 8080), TIMEOUT)
        .unwrap();
    assert_eq!(
        enforcer_testbed::exchange(&mut stream, b"before").unwrap(),
        b"before"
    );
    let received_before = server.byte_count();

    enforcer.reload(&services(&topology, &["frontend", "api"]), 2);
    let after = enforcer_testbed::exchange(&mut stream, b"after");
    assert!(
        after.is_err(),
        "the established connection must be cut: {after:?}"
    );
    assert_eq!(
        server.byte_count(),
        received_before,
        "not one byte sent after the revocation reached api"
    );
    let cut = enforcer
        .wait_for_alert(|alert| alert["unmapped"]["enforcer"]["rejudged"] == true)
        .expect("cut reported");
    assert_eq!(cut["activity_name"], "Reset");
    assert_eq!(cut["disposition_id"], 24);
    assert_eq!(cut["unmapped"]["enforcer"]["generation"], 2);
}

#[root_test]
fn rate_limit_admits_about_the_configured_new_connections_per_second_as_root() {
    let (topology, enforcer) = frontend_and_api(
        &allow(
            "frontend",
            "api",
            &["8080/tcp"],
            "max_new_per_sec = 10\nid = \"limited\"",
        ),
        &[],
    );
    let server = topology.netns("api").tcp_echo_server(8080).unwrap();
    let target = v4(&topology, "api", 8080);

    // 200 attempts spread over 2 seconds. A refused attempt gives up before TCP would retry its
    // SYN (1 s), so each attempt is one new connection for the limiter.
    const ATTEMPTS: usize = 200;
    const SPREAD: Duration = Duration::from_secs(2);
    let admitted = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    // Enough workers that a refused attempt's wait never delays the next one's start.
    const WORKERS: usize = 100;
    std::thread::scope(|scope| {
        for worker in 0..WORKERS {
            let admitted = admitted.clone();
            let netns = topology.netns("frontend");
            scope.spawn(move || {
                for attempt in (worker..ATTEMPTS).step_by(WORKERS) {
                    let due = started + SPREAD.mul_f64(attempt as f64 / ATTEMPTS as f64);
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    if netns
                        .tcp_connect(target, Duration::from_millis(800))
                        .is_ok()
                    {
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let admitted = admitted.load(Ordering::SeqCst);
    eprintln!(
        "rate limit 10/s: {admitted} of {ATTEMPTS} new connections admitted in {elapsed:.2} s ({:.1}/s)",
        admitted as f64 / elapsed
    );
    // 10 may go at once, then 10 per second; CPUs racing on the bucket may add one each.
    let most = 10.0 + 10.0 * elapsed + 4.0;
    let least = 10.0 * elapsed * 0.7;
    assert!(
        (least..=most).contains(&(admitted as f64)),
        "{admitted} of {ATTEMPTS} admitted in {elapsed:.2} s; expected about 10 per second ({least:.0}..={most:.0})"
    );
    assert!(
        enforcer_testbed::eventually(TIMEOUT, || server.hit_count() == admitted),
        "every admitted connection reached api, no refused one did: {} accepted, {admitted} admitted",
        server.hit_count()
    );
    let limited = enforcer
        .wait_for_alert(|alert| alert["unmapped"]["enforcer"]["reason"] == "rate_limited")
        .expect("rate limit reported");
    assert_eq!(limited["firewall_rule"]["uid"], "limited");
    assert_eq!(limited["disposition_id"], 6);
}

#[root_test]
fn audit_mode_passes_what_it_would_drop_and_reports_it_as_root() {
    // Global audit: nothing is dropped.
    let topology = Topology::build(&["frontend", "api", "client"]).unwrap();
    let services = services(&topology, &["frontend", "api"]);
    let policy = format!("[settings]\nmode = \"audit\"\n{services}");
    let enforcer = enforce(&topology, &policy);
    let _servers = [
        topology.netns("api").tcp_echo_server(9090).unwrap(),
        topology.netns("frontend").tcp_echo_server(80).unwrap(),
    ];
    let frontend = topology.netns("frontend");
    assert_eq!(
        frontend
            .tcp_exchange(v4(&topology, "api", 9090), b"audited", TIMEOUT)
            .expect("audit mode drops nothing"),
        b"audited"
    );
    let audited = enforcer
        .wait_for_alert(|alert| is_flow(alert, "frontend", "api", 9090))
        .expect("would-be drop reported");
    assert_eq!(audited["unmapped"]["enforcer"]["verdict"], "audit");
    assert_eq!(audited["action_id"], 1);
    assert_eq!(audited["disposition_id"], 15);
    assert_eq!(
        audited["firewall_rule"]["uid"], "default-deny",
        "with the rule that would have dropped it"
    );
    drop(enforcer);

    // Per service: frontend rolls out in audit mode while api enforces.
    let policy = format!(
        "{}{}",
        service(&topology, "frontend", "mode = \"audit\""),
        service(&topology, "api", "")
    );
    let enforcer = enforce(&topology, &policy);
    let client = topology.netns("client");
    assert_eq!(
        client
            .tcp_exchange(v4(&topology, "frontend", 80), b"to frontend", TIMEOUT)
            .expect("only frontend, in audit, is involved"),
        b"to frontend"
    );
    let refused = frontend.tcp_connect(v4(&topology, "api", 9090), TIMEOUT);
    assert!(
        was_dropped(&refused),
        "api enforces, so frontend -> api is still dropped: {refused:?}"
    );
    let audited = enforcer
        .wait_for_alert(|alert| is_flow(alert, "world", "frontend", 80))
        .expect("audit reported");
    assert_eq!(audited["unmapped"]["enforcer"]["verdict"], "audit");
    let denied = enforcer
        .wait_for_alert(|alert| is_flow(alert, "frontend", "api", 9090))
        .expect("drop reported");
    assert_eq!(denied["unmapped"]["enforcer"]["verdict"], "deny");
}

#[root_test]
fn status_shows_the_pinned_datapath_as_root() {
    let (topology, enforcer) = frontend_and_api("", &[]);
    let _ = topology
        .netns("frontend")
        .tcp_connect(v4(&topology, "api", 1), TIMEOUT);
    let output = enforcer.command(&topology, &["status"]);
    let status = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        status.contains("generation 1 (slot 0), mode enforce"),
        "{status}"
    );
    for interface in ["v-frontend", "v-api"] {
        assert!(
            status.lines().any(|line| line.contains(interface)
                && line.contains("enf_tc_ingress")
                && line.contains("matches this build")),
            "veths get TC ingress: {status}"
        );
        assert!(
            status.lines().any(|line| line.contains(interface)
                && line.contains("enf_tc_egress")
                && line.contains("matches this build")),
            "{status}"
        );
    }
    assert!(
        status
            .lines()
            .any(|line| line.contains("deny") && line.contains("default_deny")),
        "the refused SYNs are counted:\n{status}"
    );
}

/// A container restart deletes its veth pair and creates it again under the same names (it
/// used to stay without programs, and a workload behind it could forge any address the host
/// does not route to it). Now the controller attaches to the new interface within 100 ms of
/// its creation; a workload forging a remote replica's address from it all through the
/// recreation gets nothing through; `status` says at each step what the kernel runs.
#[root_test]
fn a_recreated_endpoint_interface_is_enforced_again_at_once_as_root() {
    let topology = Topology::build(&["frontend", "api"]).unwrap();
    let replica = Ipv4Addr::new(10, 99, 0, 3);
    let policy = format!(
        "{}[[service]]\nname = \"db\"\naddresses = [\"{replica}/32\"]\n{}",
        services(&topology, &["frontend", "api"]),
        allow("db", "frontend", &["53/udp"], "")
    );
    let server = topology.netns("frontend").udp_echo_server(53).unwrap();
    let api = topology.netns("api");
    let target = v4(&topology, "frontend", 53);
    let claim_replica_address = || {
        api.ip(&["addr", "add", &format!("{replica}/32"), "dev", "eth0"])
            .unwrap()
    };
    let forge = || {
        api.udp_exchange_from(
            Some(IpAddr::V4(replica)),
            target,
            b"forged",
            Duration::from_millis(20),
        )
    };
    claim_replica_address();
    let _ = forge();
    assert!(
        enforcer_testbed::eventually(Duration::from_secs(2), || server.hit_count() == 1),
        "without enforcer the forged datagram reaches frontend"
    );
    let enforcer = enforce(&topology, &policy);
    assert!(was_dropped(&forge()), "enforced: the forgery is dropped");
    let state = || enforcer.interface_state(&topology, "v-api");
    assert_eq!(state().as_deref(), Some("enforced"));

    topology.disconnect("api").unwrap();
    assert_ne!(state().as_deref(), Some("enforced"), "gone: never enforced");
    assert!(
        enforcer_testbed::eventually(SETTLE, || state().as_deref() == Some("missing")),
        "the controller forgets a link whose interface went: {:?}",
        state()
    );

    let stop = AtomicBool::new(false);
    let latency = std::thread::scope(|scope| {
        let _stop = RaiseOnDrop(&stop);
        // Forges from the moment the address exists again (until then the bind fails).
        scope.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let _ = forge();
            }
        });
        let attached = scope.spawn(|| {
            let deadline = Instant::now() + SETTLE;
            while Instant::now() < deadline {
                let counts = topology.host.run(|| {
                    let ifindex = nix::net::if_::if_nametoindex("v-api").ok()?;
                    enforcer_testbed::bpf::tcx_program_counts(ifindex).ok()
                });
                if let Ok(Some((1, 1))) = counts {
                    return Some(Instant::now());
                }
            }
            None
        });
        let created = Instant::now();
        topology.reconnect("api").unwrap();
        claim_replica_address();
        let attached = attached.join().unwrap().expect("the new v-api is attached");
        std::thread::sleep(Duration::from_millis(300));
        attached.saturating_duration_since(created)
    });
    eprintln!("v-api attached {latency:?} after its recreation began");
    assert!(
        latency < Duration::from_millis(100),
        "attached within 100 ms: {latency:?}"
    );
    assert_eq!(
        server.hit_count(),
        1,
        "no datagram forged from the recreated interface reached frontend"
    );
    assert_eq!(state().as_deref(), Some("enforced"));
    enforcer
        .wait_for_alert(|alert| {
            alert["unmapped"]["enforcer"]["reason"] == "spoofed"
                && alert["src_endpoint"]["ip"] == replica.to_string()
        })
        .expect("the forgeries are reported");
}

/// `status` reports what the kernel runs, not what the pins remember: an interface that is gone
/// is not shown as enforced, and with none left it says so and exits non-zero. Both ways of
/// attaching TC programs (TCX links, netlink filters as before 6.6).
#[root_test]
fn status_never_claims_an_interface_that_is_gone_as_root() {
    for tc_attach in ["tcx", "netlink"] {
        let (topology, enforcer) = frontend_and_api("", &["--tc-attach", tc_attach]);
        let delete = |interface: &str| {
            let deleted = topology
                .host
                .command("ip")
                .unwrap()
                .args(["link", "del", interface])
                .status()
                .unwrap();
            assert!(deleted.success(), "ip link del {interface}");
        };
        delete("v-api");
        let output = enforcer.command(&topology, &["status"]);
        let status = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "v-frontend is still enforced ({tc_attach}): {status}"
        );
        // Until the controller has forgotten its links, they are listed, as not enforced.
        assert!(
            status
                .lines()
                .filter(|line| line.contains("v-api"))
                .all(|line| !line.contains("matches this build") && !line.contains("enforced ")),
            "a deleted interface is not enforced ({tc_attach}):\n{status}"
        );
        assert_ne!(
            enforcer.interface_state(&topology, "v-api").as_deref(),
            Some("enforced")
        );
        assert!(
            enforcer_testbed::eventually(SETTLE, || {
                enforcer.interface_state(&topology, "v-api").as_deref() == Some("missing")
            }),
            "then the policy's interface is missing ({tc_attach})"
        );
        let output = enforcer.command(&topology, &["status"]);
        let status = String::from_utf8_lossy(&output.stdout);
        assert_eq!(status.matches("matches this build").count(), 2, "{status}");

        delete("v-frontend");
        let output = enforcer.command(&topology, &["status"]);
        assert!(
            !output.status.success(),
            "nothing is enforced ({tc_attach})"
        );
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("nothing is enforced"),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
