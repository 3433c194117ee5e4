//! What reaches a SIEM. Debian's rsyslog, started by the test with its own configuration,
//! receives over TCP and over TLS (RFC 5425) record for record what the alerts file holds, also
//! across a restart of the collector; a collector whose certificate another CA signed receives
//! nothing. Every alerts file is checked against the official schemas when its test ends (see
//! `support::assert_conform`), ECS ones included.

mod support;

use enforcer_testbed::{Rsyslog, TestCa, eventually};
use serde_json::Value;
use support::*;

/// The collector's port in the test's host namespace (a namespace of its own: always free).
const SYSLOG_PORT: u16 = 6514;

fn parsed(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|line| serde_json::from_str(line).expect("rsyslog wrote a whole record"))
        .collect()
}

/// frontend may call api on 8080/tcp; the controller reports to `syslog`.
fn shop_reporting_to(topology: &Topology, syslog: &[&str]) -> Enforcer {
    let policy = format!(
        "{}{}",
        services(topology, &["frontend", "api"]),
        allow("frontend", "api", &["8080/tcp"], "id = \"fe-api\"")
    );
    enforce_with(topology, &policy, syslog)
}

/// A denied connection attempt from frontend to api `port`, and its record in the alerts file.
fn denied_attempt(topology: &Topology, enforcer: &Enforcer, port: u16) {
    let _ = topology
        .netns("frontend")
        .tcp_connect(v4(topology, "api", port), TIMEOUT);
    enforcer
        .wait_for_alert(|alert| is_flow(alert, "frontend", "api", port))
        .expect("the attempt is in the alerts file");
}

fn rsyslog_receives_every_record_across_a_restart(tls: bool) {
    let topology = Topology::build(&["frontend", "api"]).unwrap();
    let ca = tls.then(|| TestCa::create(&topology.dir, "collector-ca").expect("test CA"));
    let mut rsyslog =
        Rsyslog::start(&topology.host, &topology.dir, SYSLOG_PORT, ca.as_ref()).unwrap();
    let target = format!(
        "{}://localhost:{SYSLOG_PORT}",
        if tls { "tls" } else { "tcp" }
    );
    let ca_bundle = ca.as_ref().map(|ca| ca.ca().display().to_string());
    let mut arguments = vec!["--syslog", target.as_str()];
    if let Some(bundle) = &ca_bundle {
        arguments.extend(["--syslog-ca", bundle.as_str()]);
    }
    let enforcer = shop_reporting_to(&topology, &arguments);
    let _server = topology.netns("api").tcp_echo_server(8080).unwrap();
    topology
        .netns("frontend")
        .tcp_exchange(v4(&topology, "api", 8080), b"allowed", TIMEOUT)
        .unwrap();
    denied_attempt(&topology, &enforcer, 9090);
    let arrived = eventually(SETTLE, || {
        parsed(&rsyslog.records())
            .iter()
            .any(|record| is_flow(record, "frontend", "api", 9090))
    });
    assert!(
        arrived,
        "rsyslog wrote: {:?}\n{}",
        rsyslog.records(),
        rsyslog.own_log()
    );

    // The collector goes away; what happens meanwhile waits in the controller's queue.
    rsyslog.stop().unwrap();
    denied_attempt(&topology, &enforcer, 9091);
    denied_attempt(&topology, &enforcer, 9092);
    rsyslog.start_again(&topology.host).unwrap();

    // Everything the alerts file holds arrives, once each, in the same order.
    let same = eventually(SETTLE, || parsed(&rsyslog.records()) == enforcer.alerts());
    assert!(
        same,
        "rsyslog's file and the alerts file differ:\nrsyslog: {:#?}\nalerts: {:#?}\n{}",
        rsyslog.records(),
        enforcer.alerts(),
        rsyslog.own_log()
    );
}

#[root_test]
fn rsyslog_over_tcp_receives_what_the_alerts_file_holds_across_its_restart_as_root() {
    rsyslog_receives_every_record_across_a_restart(false);
}

#[root_test]
fn rsyslog_over_tls_receives_what_the_alerts_file_holds_across_its_restart_as_root() {
    rsyslog_receives_every_record_across_a_restart(true);
}

#[root_test]
fn rsyslog_with_a_certificate_of_another_ca_receives_nothing_as_root() {
    let topology = Topology::build(&["frontend", "api"]).unwrap();
    let trusted = TestCa::create(&topology.dir, "trusted-ca").expect("test CA");
    let other = TestCa::create(&topology.dir, "other-ca").expect("test CA");
    let rsyslog = Rsyslog::start(&topology.host, &topology.dir, SYSLOG_PORT, Some(&other)).unwrap();
    let target = format!("tls://localhost:{SYSLOG_PORT}");
    let bundle = trusted.ca().display().to_string();
    let enforcer = shop_reporting_to(&topology, &["--syslog", &target, "--syslog-ca", &bundle]);
    denied_attempt(&topology, &enforcer, 9090);
    // The controller has tried, and says why it sent nothing.
    enforcer
        .daemon
        .wait_for_log(
            &format!("syslog collector localhost:{SYSLOG_PORT}: TLS"),
            SETTLE,
        )
        .expect("the refused collector is logged");
    assert_eq!(
        rsyslog.records(),
        Vec::<String>::new(),
        "nothing reached it"
    );
}

#[root_test]
fn ecs_records_of_a_real_run_carry_flows_findings_and_heartbeats_as_root() {
    let (topology, enforcer) = frontend_and_api(
        &allow("frontend", "api", &["8080/tcp"], "id = \"fe-api\""),
        &["--alert-format", "ecs", "--heartbeat-interval", "1"],
    );
    let _server = topology.netns("api").tcp_echo_server(8080).unwrap();
    topology
        .netns("frontend")
        .tcp_exchange(v4(&topology, "api", 8080), b"allowed", TIMEOUT)
        .unwrap();
    let _ = topology
        .netns("frontend")
        .tcp_connect(v4(&topology, "api", 9090), TIMEOUT);
    for (what, wanted) in [
        ("the allowed flow", ("enforcer.flow", "flow-allow")),
        ("the denied flow", ("enforcer.flow", "flow-deny")),
        ("the new edge", ("enforcer.finding", "new_edge")),
        ("a heartbeat", ("enforcer.heartbeat", "heartbeat")),
    ] {
        let found = enforcer.wait_for_alert(|alert| {
            (
                alert["event"]["dataset"].as_str(),
                alert["event"]["action"].as_str(),
            ) == (Some(wanted.0), Some(wanted.1))
        });
        assert!(found.is_some(), "{what} in ECS: {:#?}", enforcer.alerts());
    }
    let denied = enforcer
        .wait_for_alert(|alert| alert["destination"]["port"] == 9090)
        .unwrap();
    assert_eq!(
        (
            denied["rule"]["id"].as_str(),
            denied["event"]["outcome"].as_str(),
            denied["network"]["transport"].as_str()
        ),
        (Some("default-deny"), Some("failure"), Some("tcp"))
    );
    // Dropping the controller validates the whole file against ECS 8.11.
}
