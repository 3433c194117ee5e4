//! Detection and reporting (DESIGN §7) against real traffic: the anomaly detectors' findings,
//! the heartbeat, syslog delivery, and the alerts file across log rotation.

mod support;

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::{Ipv4Addr, TcpListener},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::*;

fn is_finding(alert: &Value, detector: &str) -> bool {
    alert["class_uid"] == 2004 && alert["finding_info"]["analytic"]["name"] == detector
}

fn finding<'a>(alerts: &'a [Value], detector: &str) -> Option<&'a Value> {
    alerts.iter().find(|alert| is_finding(alert, detector))
}

fn wait_for_finding(enforcer: &Enforcer, detector: &str) -> Value {
    enforcer
        .wait_for_alert(|alert| is_finding(alert, detector))
        .unwrap_or_else(|| {
            panic!(
                "no {detector} finding; log:\n{}",
                enforcer.daemon.log_text()
            )
        })
}

#[root_test]
fn a_new_edge_and_a_call_rate_spike_are_found_as_root() {
    let (topology, enforcer) = frontend_and_api(
        &(allow("frontend", "api", &["8080/tcp"], "id = \"fe-api\"")
            + "[detection]\nwindow_secs = 1\nspike_warmup_windows = 3\nspike_min_calls = 10\nspike_z = 3.0\n"),
        &[],
    );
    let _server = topology.netns("api").tcp_echo_server(8080).unwrap();
    let frontend = topology.netns("frontend");
    let target = socket(topology.endpoint("api").ipv4, 8080);

    // A steady call or two a second for four windows...
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        frontend.tcp_exchange(target, b"steady", TIMEOUT).unwrap();
        std::thread::sleep(Duration::from_millis(600));
    }
    let new_edge = wait_for_finding(&enforcer, "new_edge");
    assert_eq!(
        (
            new_edge["evidences"][0]["src_endpoint"]["svc_name"].as_str(),
            new_edge["evidences"][0]["dst_endpoint"]["svc_name"].as_str()
        ),
        (Some("frontend"), Some("api"))
    );
    assert_eq!(new_edge["firewall_rule"]["uid"], "fe-api");
    assert!(
        finding(&enforcer.alerts(), "spike").is_none(),
        "a steady edge does not spike"
    );
    // ...then forty in a moment.
    for _ in 0..40 {
        frontend.tcp_exchange(target, b"burst", TIMEOUT).unwrap();
    }
    let spike = wait_for_finding(&enforcer, "spike");
    assert_eq!(spike["evidences"][0]["dst_endpoint"]["port"], 8080);
    assert!(spike["count"].as_u64().unwrap() >= 10, "{spike}");
    assert!(
        spike["end_time"].as_u64().unwrap() - spike["start_time"].as_u64().unwrap() == 1000,
        "one window: {spike}"
    );
    assert_eq!(spike["severity_id"], 3);
    assert!(
        spike["unmapped"]["enforcer"]["details"]["z"]
            .as_f64()
            .unwrap()
            >= 3.0
    );
}

#[root_test]
fn a_scan_and_a_burst_of_denials_are_found_as_root() {
    let topology = Topology::build(&["frontend", "api", "client"]).unwrap();
    let policy = format!(
        "{}[detection]\nwindow_secs = 5\nfanout_distinct_peers = 10\ndeny_burst = 20\n",
        services(&topology, &["frontend", "api"])
    );
    let interfaces: Vec<&str> = topology
        .endpoints
        .iter()
        .map(|endpoint| endpoint.host_interface.as_str())
        .collect();
    let enforcer =
        Enforcer::start(&topology, &policy, &interfaces, &["--metrics", "9464"]).unwrap();
    let api = topology.endpoint("api");

    // frontend probes a dozen ports of api: all denied, each a distinct peer; a dozen denials
    // stay under the burst threshold, so the scan is a fan-out and nothing else.
    std::thread::scope(|scope| {
        for port in 2000..2012 {
            let frontend = topology.netns("frontend");
            scope.spawn(move || {
                frontend.tcp_connect(socket(api.ipv4, port), Duration::from_millis(300))
            });
        }
    });
    let fanout = wait_for_finding(&enforcer, "fanout");
    assert_eq!(
        fanout["evidences"][0]["src_endpoint"]["svc_name"],
        "frontend"
    );
    assert_eq!(
        fanout["evidences"][0]["src_endpoint"]["ip"],
        topology.endpoint("frontend").ipv4.to_string()
    );
    assert!(
        fanout["evidences"][0]["dst_endpoint"].is_null(),
        "about many destinations"
    );
    assert_eq!(fanout["count"], 10);
    assert_eq!(fanout["severity_id"], 4);

    // An outside client keeps knocking on one closed door: the kernel reports it once a second
    // with the count, and the counts add up to a burst.
    let client = topology.netns("client");
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(3500) {
        let _ = client.udp_exchange(socket(api.ipv4, 9999), b"knock", Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(40));
    }
    let burst = wait_for_finding(&enforcer, "deny_burst");
    assert_eq!(burst["evidences"][0]["src_endpoint"]["svc_name"], "world");
    assert_eq!(burst["firewall_rule"]["uid"], "default-deny");
    assert!(burst["count"].as_u64().unwrap() >= 20, "{burst}");
    assert!(
        finding(&enforcer.alerts(), "deny_burst")
            .is_some_and(|first| first["evidences"][0]["src_endpoint"]["svc_name"] == "world"),
        "the scan alone was no burst"
    );

    let metrics = http_get(&topology.host, 9464, "/metrics").unwrap();
    assert!(
        metrics.contains("enforcer_alerts_total{detector=\"fanout\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("enforcer_alerts_total{detector=\"deny_burst\"} 1"),
        "{metrics}"
    );
    let audited: Vec<Value> = std::fs::read_to_string(&enforcer.audit_log)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(
        audited
            .iter()
            .any(|record| record["kind"] == "finding" && record["detector"] == "fanout"),
        "findings go to the audit log"
    );
}

#[root_test]
fn alerts_continue_in_a_new_file_after_log_rotation_moves_the_old_one_as_root() {
    let (topology, enforcer) = frontend_and_api(&allow("frontend", "api", &["8080/tcp"], ""), &[]);
    let _server = topology.netns("api").tcp_echo_server(8080).unwrap();
    let frontend = topology.netns("frontend");
    frontend
        .tcp_exchange(v4(&topology, "api", 8080), b"before", TIMEOUT)
        .unwrap();
    enforcer
        .wait_for_alert(|alert| is_flow(alert, "frontend", "api", 8080))
        .expect("flow in the first file");

    // What logrotate does by default: move the file away; the writer must start a new one.
    let rotated = enforcer.alerts.with_extension("jsonl.1");
    std::fs::rename(&enforcer.alerts, &rotated).unwrap();
    let _ = frontend.tcp_connect(v4(&topology, "api", 9090), TIMEOUT);
    let denied = enforcer
        .wait_for_alert(|alert| is_flow(alert, "frontend", "api", 9090))
        .expect("a record written after the rotation lands in a new file at the same path");
    assert_eq!(denied["firewall_rule"]["uid"], "default-deny");
    let moved = std::fs::read_to_string(&rotated).unwrap();
    assert!(
        moved.contains("\"port\":8080"),
        "the records before the rotation stay in the moved file"
    );
    assert_conform(&rotated);
}

/// Collects syslog frames (octet counting) arriving on `listener`.
fn collect_syslog(listener: TcpListener) -> Arc<Mutex<Vec<String>>> {
    let frames = Arc::new(Mutex::new(Vec::new()));
    let received = frames.clone();
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let mut reader = BufReader::new(stream);
        loop {
            let mut length = Vec::new();
            if reader.read_until(b' ', &mut length).unwrap_or(0) == 0 {
                return;
            }
            let Ok(length) = String::from_utf8_lossy(&length).trim().parse::<usize>() else {
                return;
            };
            let mut message = vec![0u8; length];
            if reader.read_exact(&mut message).is_err() {
                return;
            }
            received
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&message).into_owned());
        }
    });
    frames
}

#[root_test]
fn syslog_gets_the_records_and_the_heartbeat_anchors_the_state_as_root() {
    let topology = Topology::build(&["frontend", "api"]).unwrap();
    let listener = topology
        .host
        .run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .unwrap()
        .unwrap();
    let syslog = format!("tcp://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let frames = collect_syslog(listener);
    let policy = services(&topology, &["frontend", "api"]);
    let enforcer = Enforcer::start(
        &topology,
        &policy,
        &["v-frontend", "v-api"],
        &["--syslog", &syslog, "--heartbeat-interval", "1"],
    )
    .unwrap();
    let _ = topology
        .netns("frontend")
        .tcp_connect(socket(topology.endpoint("api").ipv4, 8080), TIMEOUT);

    let heartbeat = enforcer
        .wait_for_alert(|alert| alert["activity_name"] == "Heartbeat")
        .expect("a heartbeat");
    let state = &heartbeat["unmapped"]["enforcer"];
    assert_eq!(state["generation"], 1);
    let status =
        String::from_utf8_lossy(&enforcer.command(&topology, &["status"]).stdout).into_owned();
    assert!(
        status.contains(state["policy_sha256"].as_str().unwrap()),
        "the heartbeat's policy hash is the live one:\n{status}"
    );
    let programs = state["programs"].as_object().unwrap();
    assert_eq!(
        programs.keys().collect::<Vec<_>>(),
        ["tc-v-api", "tc-v-frontend", "tci-v-api", "tci-v-frontend"],
        "two hooks on each of two interfaces; no socket hook, as no service is identified by cgroup"
    );
    for (link, tag) in programs {
        let program = if link.starts_with("tci-") {
            "enf_tc_ingress"
        } else {
            "enf_tc_egress"
        };
        assert_eq!(
            &state["expected_programs"][program], tag,
            "{link} runs this build's program"
        );
    }
    assert_eq!(state["audit_chain_head"].as_str().unwrap().len(), 64);

    let delivered = enforcer_testbed::eventually(SETTLE, || {
        let frames = frames.lock().unwrap();
        frames.iter().any(|frame| frame.contains(" flow - "))
            && frames.iter().any(|frame| frame.contains(" heartbeat - "))
    });
    assert!(
        delivered,
        "syslog got a flow record and a heartbeat: {:#?}",
        frames.lock().unwrap()
    );
    let frames = frames.lock().unwrap();
    let flow = frames
        .iter()
        .find(|frame| frame.contains(" flow - "))
        .unwrap();
    // RFC 5424: <PRI>VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA MSG
    let fields: Vec<&str> = flow.splitn(8, ' ').collect();
    assert_eq!(
        fields[0], "<133>1",
        "local0, notice (a denied flow is low severity): {flow}"
    );
    assert!(
        fields[1].ends_with('Z') && fields[1].contains('T'),
        "RFC 3339 timestamp: {flow}"
    );
    assert_eq!((fields[3], fields[5], fields[6]), ("enforcer", "flow", "-"));
    let record: Value = serde_json::from_str(fields[7]).unwrap();
    assert_eq!(
        (record["class_uid"].as_u64(), record["action_id"].as_u64()),
        (Some(4001), Some(2))
    );
    assert_eq!(record["dst_endpoint"]["svc_name"], "api");
}

#[root_test]
fn an_edge_baseline_keeps_known_edges_quiet_across_a_restart_as_root() {
    let topology = Topology::build(&["frontend", "api"]).unwrap();
    let baseline = topology.dir.join("edges.jsonl");
    let policy = format!(
        "{}{}",
        services(&topology, &["frontend", "api"]),
        allow("frontend", "api", &["8080/tcp", "9090/tcp"], "")
    );
    let _known = topology.netns("api").tcp_echo_server(8080).unwrap();
    let _unknown = topology.netns("api").tcp_echo_server(9090).unwrap();
    let frontend = topology.netns("frontend");
    let api = topology.endpoint("api").ipv4;
    let is_new_edge = |port: u16| {
        move |alert: &Value| {
            is_finding(alert, "new_edge") && alert["evidences"][0]["dst_endpoint"]["port"] == port
        }
    };
    // Two controllers, one after the other, keeping the same baseline.
    let start = || {
        enforce_with(
            &topology,
            &policy,
            &["--edge-baseline", baseline.to_str().unwrap()],
        )
    };

    let first = start();
    frontend
        .tcp_exchange(socket(api, 8080), b"first", TIMEOUT)
        .unwrap();
    first
        .wait_for_alert(is_new_edge(8080))
        .expect("the first controller reports the edge");
    drop(first);
    let kept = std::fs::read_to_string(&baseline).unwrap();
    assert_eq!(
        kept,
        "{\"src\":\"frontend\",\"dst\":\"api\",\"protocol\":\"tcp\",\"port\":8080}\n"
    );
    // A controller killed in the middle of an append leaves a torn line; the next one cuts it off.
    std::fs::write(&baseline, format!("{kept}{{\"src\":\"fron")).unwrap();

    let second = start();
    frontend
        .tcp_exchange(socket(api, 8080), b"again", TIMEOUT)
        .unwrap();
    frontend
        .tcp_exchange(socket(api, 9090), b"other", TIMEOUT)
        .unwrap();
    second
        .wait_for_alert(is_new_edge(9090))
        .expect("an edge the baseline lacks is new");
    let alerts = second.alerts();
    assert!(
        alerts
            .iter()
            .any(|alert| alert["class_uid"] == 4001 && is_flow(alert, "frontend", "api", 8080)),
        "the known edge was used again"
    );
    assert!(
        !alerts.iter().any(is_new_edge(8080)),
        "but it is not new: {alerts:#?}"
    );
    assert!(
        second
            .daemon
            .log_text()
            .contains("dropping a torn last line")
    );
    assert_eq!(
        std::fs::read_to_string(&baseline).unwrap().lines().count(),
        2
    );
}
