//! Endpoints that come and go (issue #14, DESIGN §13): interfaces the policy selects by
//! pattern are enforced when they appear, one that cannot be attached is reported as an
//! enforcement gap, and `status` tells which is which.

mod support;

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use support::*;

/// `api`'s endpoints are whatever interfaces match `v-api-*`, none of which exists when `run`
/// starts. One created later is attached, gets api's identity (its traffic passes as api, a
/// forged source from it is dropped) and shows as enforced.
#[root_test]
fn an_interface_matching_a_pattern_is_enforced_when_it_appears_as_root() {
    let mut topology = Topology::build(&["frontend"]).unwrap();
    let policy = format!(
        "{}[[service]]\nname = \"api\"\ninterfaces = [\"v-api-*\"]\naddresses = [\"10.200.2.0/24\"]\n{}",
        services(&topology, &["frontend"]),
        allow("api", "frontend", &["8080/tcp"], "")
    );
    let enforcer = enforce(&topology, &policy);
    let _server = topology.netns("frontend").tcp_echo_server(8080).unwrap();
    topology.add_endpoint("api-1", 2).unwrap();
    assert!(
        enforcer_testbed::eventually(SETTLE, || {
            enforcer.interface_state(&topology, "v-api-1").as_deref() == Some("enforced")
        }),
        "v-api-1 is enforced: {:?}",
        enforcer.interface_state(&topology, "v-api-1")
    );
    let api = topology.netns("api-1");
    let target = v4(&topology, "frontend", 8080);
    assert_eq!(
        api.tcp_exchange(target, b"as api", TIMEOUT)
            .expect("api-1 is api, which may reach frontend"),
        b"as api"
    );
    let forged = Ipv4Addr::new(10, 99, 0, 9);
    api.ip(&["addr", "add", &format!("{forged}/32"), "dev", "eth0"])
        .unwrap();
    let sent = api.tcp_connect_from(IpAddr::V4(forged), target, TIMEOUT);
    assert!(sent.is_err(), "a source that is not api's is dropped");
    enforcer
        .wait_for_alert(|alert| {
            alert["unmapped"]["enforcer"]["reason"] == "spoofed"
                && alert["src_endpoint"]["svc_name"] == "api"
        })
        .expect("and reported as spoofed, from api's interface");
}

/// An interface the policy selects that cannot be attached (another tool holds the first
/// filter priority enforcer needs) is retried, shown as defunct, counted in a metric and,
/// after a second, reported as an `enforcement_gap` finding.
#[root_test]
fn an_interface_that_cannot_be_enforced_is_a_finding_as_root() {
    let topology = Topology::build(&["frontend"]).unwrap();
    let policy = format!(
        "{}[[service]]\nname = \"api\"\ninterfaces = [\"v-api-*\"]\naddresses = [\"10.200.2.0/24\"]\n",
        services(&topology, &["frontend"]),
    );
    let enforcer = enforce_with(
        &topology,
        &policy,
        &["--tc-attach", "netlink", "--metrics", "9464"],
    );
    // Made under another name, taken by a filter of another kind at priority 1, then renamed
    // to one the pattern selects.
    let host = &topology.host;
    host.ip(&[
        "link",
        "add",
        "blocked",
        "type",
        "veth",
        "peer",
        "name",
        "blocked-peer",
    ])
    .unwrap();
    let tc = |args: &[&str]| {
        let status = host.command("tc").unwrap().args(args).status().unwrap();
        assert!(status.success(), "tc {args:?}");
    };
    tc(&["qdisc", "add", "dev", "blocked", "clsact"]);
    tc(&[
        "filter", "add", "dev", "blocked", "ingress", "pref", "1", "protocol", "all", "u32",
        "match", "u32", "0", "0",
    ]);
    host.ip(&["link", "set", "blocked", "name", "v-api-9"])
        .unwrap();

    let gap = enforcer
        .wait_for_alert(|alert| {
            alert["class_uid"] == 2004
                && alert["finding_info"]["analytic"]["name"] == "enforcement_gap"
        })
        .expect("an enforcement_gap finding");
    assert_eq!(gap["severity_id"], 4, "High");
    assert!(
        gap["message"].as_str().unwrap_or("").contains("v-api-9"),
        "{gap}"
    );
    assert_eq!(
        enforcer.interface_state(&topology, "v-api-9").as_deref(),
        Some("defunct")
    );
    let metrics = http_get(host, 9464, "/metrics").unwrap();
    assert!(
        metrics.contains("enforcer_interfaces_unenforced 1"),
        "{metrics}"
    );

    // Once the other tool's filter goes, the retry attaches.
    tc(&["filter", "del", "dev", "v-api-9", "ingress", "pref", "1"]);
    assert!(
        enforcer_testbed::eventually(Duration::from_secs(5), || {
            enforcer.interface_state(&topology, "v-api-9").as_deref() == Some("enforced")
        }),
        "enforced once it can be: {:?}",
        enforcer.interface_state(&topology, "v-api-9")
    );
}
