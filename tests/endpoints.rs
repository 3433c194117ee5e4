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

/// `api` declares no members: its endpoint comes from `enforcer endpoint add`. Registered, it
/// is enforced before the command returns, exactly like a declared one (its traffic is api's,
/// a forged source from it is dropped); a registration that contradicts the policy is refused
/// and changes nothing; a restarted controller adopts it; removed, its traffic is refused
/// again. Each change is in the audit log.
#[root_test]
fn a_registered_endpoint_is_enforced_like_a_declared_one_as_root() {
    let mut topology = Topology::build(&["frontend"]).unwrap();
    topology.add_endpoint("api-1", 2).unwrap();
    let policy = format!(
        "{}[[service]]\nname = \"api\"\n{}",
        services(&topology, &["frontend"]),
        allow("api", "frontend", &["8080/tcp"], "")
    );
    let enforcer = enforce_with(&topology, &policy, &[]);
    let _server = topology.netns("frontend").tcp_echo_server(8080).unwrap();
    let api = topology.netns("api-1");
    let target = v4(&topology, "frontend", 8080);
    let reaches = || api.tcp_exchange(target, b"hi", TIMEOUT).is_ok();
    assert!(!reaches(), "unregistered, api-1 is world: refused");

    let endpoint = |args: &[&str]| enforcer.endpoint_command(&topology, args);
    let (ipv4, ipv6) = (
        topology.endpoint("api-1").ipv4.to_string(),
        topology.endpoint("api-1").ipv6.to_string(),
    );
    let add = |service: &str, address: &str| {
        endpoint(&[
            "add",
            "--service",
            service,
            "--interface",
            "v-api-1",
            "--address",
            address,
        ])
    };
    for (service, address, reason) in [
        (
            "nosuch",
            ipv4.as_str(),
            "the policy has no service \"nosuch\"",
        ),
        ("api", "10.200.1.2", "belongs to service \"frontend\""),
    ] {
        let refused = add(service, address);
        assert_eq!(refused.status.code(), Some(1), "{refused:?}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains(reason), "{stderr}");
    }
    let listed = endpoint(&["list"]);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "no endpoints registered\n",
        "a refusal changes nothing"
    );

    let added = endpoint(&[
        "add",
        "--service",
        "api",
        "--interface",
        "v-api-1",
        "--address",
        &ipv4,
        "--address",
        &ipv6,
    ]);
    assert!(added.status.success(), "{added:?}");
    assert!(reaches(), "registered, api-1 is api at once");
    let forged = Ipv4Addr::new(10, 99, 0, 9);
    api.ip(&["addr", "add", &format!("{forged}/32"), "dev", "eth0"])
        .unwrap();
    assert!(
        api.tcp_connect_from(IpAddr::V4(forged), target, TIMEOUT)
            .is_err(),
        "a source that is not api-1's is dropped"
    );
    assert_eq!(
        enforcer.interface_state(&topology, "v-api-1").as_deref(),
        Some("enforced")
    );
    let listed = String::from_utf8_lossy(&endpoint(&["list"]).stdout).into_owned();
    assert!(listed.starts_with("v-api-1 "), "{listed}");
    assert!(listed.contains(&ipv6), "{listed}");

    enforcer
        .daemon
        .signal(nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let restarted =
        Enforcer::start_with_policy_path(&topology, &enforcer.policy, &["v-frontend"], &[])
            .unwrap();
    assert!(
        reaches(),
        "the restarted controller adopted the registration"
    );
    assert_eq!(
        restarted.interface_state(&topology, "v-api-1").as_deref(),
        Some("enforced")
    );

    let removed = restarted.endpoint_command(&topology, &["del", "--interface", "v-api-1"]);
    assert!(removed.status.success(), "{removed:?}");
    assert!(!reaches(), "unregistered again: refused");
    assert_eq!(
        restarted.interface_state(&topology, "v-api-1"),
        None,
        "and no longer enforced or named"
    );
    let audit = std::fs::read_to_string(&restarted.audit_log).unwrap();
    assert!(audit.contains("\"endpoint_del\""), "{audit}");
    let first_audit = std::fs::read_to_string(&enforcer.audit_log).unwrap();
    assert!(first_audit.contains("\"endpoint_add\""), "{first_audit}");
}

#[root_test]
fn a_container_added_through_the_cni_chain_is_enforced_and_deleted_forgotten_as_root() {
    let topology = Topology::build(&["frontend"]).unwrap();
    let policy = format!(
        "{}[[service]]\nname = \"api\"\n{}",
        services(&topology, &["frontend"]),
        allow("api", "frontend", &["8080/tcp"], "")
    );
    let enforcer = enforce(&topology, &policy);
    let _server = topology.netns("frontend").tcp_echo_server(8080).unwrap();
    let target = v4(&topology, "frontend", 8080);
    let runtime = Runtime::new(&topology, "10.201.0.0/24");
    let socket = enforcer.observe_socket.clone();
    let (ok, version) = runtime.invoke("enforcer-cni", "VERSION", &serde_json::json!({}));
    assert!(ok, "{version}");
    assert!(
        version["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&"1.0.0".into()),
        "{version}"
    );

    let (ok, bridged) = runtime.invoke("bridge", "ADD", &runtime.bridge_config());
    assert!(ok, "bridge ADD: {bridged}");
    let reaches = || {
        runtime
            .container
            .tcp_exchange(target, b"from the container", TIMEOUT)
            .is_ok()
    };
    assert!(
        !reaches(),
        "bridged but not registered, the container is world: refused"
    );

    // Errors are CNI error objects and register nothing.
    for (config, code, what) in [
        (
            runtime.enforcer_config("nosuch", &socket, Some(&bridged)),
            100,
            "a service the policy lacks",
        ),
        (
            runtime.enforcer_config("api", &socket, None),
            7,
            "no prevResult",
        ),
    ] {
        let (ok, error) = runtime.invoke("enforcer-cni", "ADD", &config);
        assert!(!ok, "{what}: non-zero exit");
        assert_eq!(error["code"], code, "{what}: {error}");
        assert_eq!(error["cniVersion"], "1.0.0");
        assert!(error["msg"].as_str().is_some_and(|msg| !msg.is_empty()));
    }
    let listed = enforcer.endpoint_command(&topology, &["list"]);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "no endpoints registered\n",
        "a failed ADD registers nothing"
    );

    let config = runtime.enforcer_config("api", &socket, Some(&bridged));
    let (ok, result) = runtime.invoke("enforcer-cni", "ADD", &config);
    assert!(ok, "enforcer-cni ADD: {result}");
    assert_eq!(result, bridged, "prevResult is passed on unchanged");
    assert!(reaches(), "registered, the container is api at once");
    let host_interface = bridged["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|interface| interface["name"].as_str())
        .find(|name| name.starts_with("veth"))
        .unwrap()
        .to_owned();
    assert_eq!(
        enforcer
            .interface_state(&topology, &host_interface)
            .as_deref(),
        Some("enforced")
    );
    let (ok, checked) = runtime.invoke("enforcer-cni", "CHECK", &config);
    assert!(ok, "CHECK: {checked}");

    // DEL runs the chain backwards, each plugin given the ADD's result.
    let (ok, deleted) = runtime.invoke("enforcer-cni", "DEL", &config);
    assert!(ok, "enforcer-cni DEL: {deleted}");
    assert!(!reaches(), "unregistered: refused again");
    let (ok, deleted) = runtime.invoke("bridge", "DEL", &runtime.bridge_config());
    assert!(ok, "bridge DEL: {deleted}");
    let listed = enforcer.endpoint_command(&topology, &["list"]);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "no endpoints registered\n"
    );
    assert_eq!(enforcer.interface_state(&topology, &host_interface), None);
    let (ok, _) = runtime.invoke("enforcer-cni", "DEL", &config);
    assert!(ok, "a second DEL finds nothing to remove, and succeeds");
}
