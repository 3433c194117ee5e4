//! The first enforcing slice (issue #2), end to end against the real kernel: a policy compiled
//! into maps, programs attached in a namespace topology, real connections.

mod support;

use support::*;

/// frontend may call api on 8080/tcp and 53/udp; nothing else is allowed.
fn shop() -> (Topology, Enforcer) {
    frontend_and_api(
        &allow(
            "frontend",
            "api",
            &["8080/tcp", "53/udp"],
            "id = \"frontend-to-api\"",
        ),
        &[],
    )
}

#[root_test]
fn allowed_tcp_connection_carries_data_both_ways_as_root() {
    let (topology, enforcer) = shop();
    let api = topology.endpoint("api");
    let _server = api.netns.tcp_echo_server(8080).unwrap();
    // Large enough to take many segments each way.
    let payload: Vec<u8> = (0..512 * 1024).map(|i| (i % 251) as u8).collect();
    let reply = topology
        .netns("frontend")
        .tcp_exchange(socket(api.ipv4, 8080), &payload, TIMEOUT * 4)
        .expect("allowed connection works");
    assert_eq!(reply, payload, "the echo came back intact");
    let opened = enforcer
        .wait_for_alert(|alert| is_flow(alert, "frontend", "api", 8080) && alert["action_id"] == 1);
    let opened = opened.unwrap_or_else(|| {
        panic!(
            "the kernel reported the new flow; alerts: {:#?}",
            enforcer.alerts()
        )
    });
    assert_eq!(opened["firewall_rule"]["uid"], "frontend-to-api");
}

#[root_test]
fn connection_not_in_policy_is_refused_as_root() {
    let (topology, enforcer) = shop();
    let frontend = topology.endpoint("frontend");
    let api = topology.endpoint("api");
    let _api_9090 = api.netns.tcp_echo_server(9090).unwrap();
    let _frontend_8080 = frontend.netns.tcp_echo_server(8080).unwrap();
    // Both servers listen, so only the policy can make these fail.
    let wrong_port = frontend.netns.tcp_connect(socket(api.ipv4, 9090), TIMEOUT);
    assert!(
        was_dropped(&wrong_port),
        "frontend -> api:9090 must be dropped, got {wrong_port:?}"
    );
    let wrong_direction = api.netns.tcp_connect(socket(frontend.ipv4, 8080), TIMEOUT);
    assert!(
        was_dropped(&wrong_direction),
        "api -> frontend:8080 must be dropped, got {wrong_direction:?}"
    );
    let denied = enforcer
        .wait_for_alert(|alert| is_flow(alert, "frontend", "api", 9090) && alert["action_id"] == 2)
        .expect("denial reported");
    assert_eq!(denied["firewall_rule"]["uid"], "default-deny");
    assert_eq!(denied["class_uid"], 4001);
}

#[root_test]
fn allowed_udp_exchange_gets_its_reply_as_root() {
    let (topology, _enforcer) = shop();
    let api = topology.endpoint("api");
    let frontend = topology.endpoint("frontend");
    let _dns = api.netns.udp_echo_server(53).unwrap();
    let _other = api.netns.udp_echo_server(54).unwrap();
    let reply = frontend
        .netns
        .udp_exchange(socket(api.ipv4, 53), b"query", TIMEOUT)
        .expect("reply to an allowed datagram");
    assert_eq!(reply, b"query");
    let refused = frontend
        .netns
        .udp_exchange(socket(api.ipv4, 54), b"query", TIMEOUT);
    assert!(
        was_dropped(&refused),
        "54/udp is not allowed, got {refused:?}"
    );
}

#[root_test]
fn policy_that_does_not_parse_is_refused_and_nothing_is_attached_as_root() {
    let topology = Topology::build(&["frontend", "api"]).expect("topology");
    let api = topology.endpoint("api");
    let policy = topology
        .write_file(
            "broken.toml",
            "[[service]]\nname = \"api\"\naddresses = [\"10.200.2.300/32\"]\n",
        )
        .unwrap();
    let output = topology
        .host
        .command(ENFORCER)
        .unwrap()
        .args(["run", "--policy"])
        .arg(&policy)
        .args(["--attach", &api.host_interface, "--pin-path"])
        .arg(topology.pin_path())
        .output()
        .expect("enforcer runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "bad input exits 1; stderr: {stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{}:3:14: invalid address or CIDR \"10.200.2.300/32\"",
            policy.display()
        )),
        "stderr: {stderr}"
    );
    assert!(!topology.pin_path().exists(), "nothing was pinned");
    assert_eq!(
        topology
            .host
            .attached_programs(&api.host_interface)
            .unwrap(),
        Vec::<String>::new(),
        "no program on the interface"
    );
    let _server = api.netns.tcp_echo_server(8080).unwrap();
    let reply =
        topology
            .netns("frontend")
            .tcp_exchange(socket(api.ipv4, 8080), b"still open", TIMEOUT);
    assert_eq!(reply.expect("traffic is untouched"), b"still open");
}
