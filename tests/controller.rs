//! The controller (issue #4): the policy language's errors at the command line, explain and
//! diff against what the datapath really does, hot reload under traffic, refusal of a broken
//! policy, the ConfigMap symlink swap, kill -9 and adoption, metrics, observe, the audit chain,
//! a swapped program showing in status, the frozen live generation, incremental apply, unload.

mod support;

use std::{
    io::{BufRead as _, Write as _},
    os::unix::fs::symlink,
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use support::*;

fn run_enforcer(args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(ENFORCER)
        .args(args)
        .output()
        .expect("enforcer runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_names_file_line_and_column_for_each_kind_of_error() {
    let dir = std::env::temp_dir().join(format!("enforcer-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "syntax.toml",
            "[[service]]\nname = \"api\n",
            "syntax.toml:2:",
        ),
        (
            "unknown-field.toml",
            "[[allow]]\nfrom = \"world\"\nto = \"host\"\nprot = [\"80/tcp\"]\n",
            "unknown-field.toml:4:1: unknown field `prot`",
        ),
        (
            "unknown-service.toml",
            "[[allow]]\nfrom = \"payments\"\nto = \"host\"\n",
            "unknown-service.toml:2:8: unknown service \"payments\"",
        ),
        (
            "bad-cidr.toml",
            "[[service]]\nname = \"a\"\naddresses = [\"10.0.0.0/33\"]\n",
            "bad-cidr.toml:3:14: invalid address or CIDR \"10.0.0.0/33\"",
        ),
        (
            "port-range.toml",
            "[[allow]]\nfrom = \"world\"\nto = \"host\"\nports = [\"65536/tcp\"]\n",
            "port-range.toml:4:10: invalid port \"65536/tcp\": port 65536 out of range 1-65535",
        ),
        (
            "duplicate-identity.toml",
            "[[service]]\nname = \"a\"\nidentity = 4000\n[[service]]\nname = \"b\"\nidentity = 4000\n",
            "duplicate-identity.toml:4:1: duplicate identity 4000: service \"b\"",
        ),
        (
            "deny-limit.toml",
            "[[deny]]\nfrom = \"world\"\nto = \"host\"\nmax_new_per_sec = 1\n",
            "deny-limit.toml:1:1: max_new_per_sec applies to allow rules only",
        ),
    ];
    for (file, text, expected) in cases {
        let path = dir.join(file);
        std::fs::write(&path, text).unwrap();
        let (code, _, stderr) = run_enforcer(&["check", path.to_str().unwrap()]);
        assert_eq!(
            code,
            Some(1),
            "{file} must be refused as bad input; stderr: {stderr}"
        );
        assert!(
            stderr.contains(&format!("{}", dir.join(expected).display())),
            "{file}: expected `{expected}` in:\n{stderr}"
        );
    }
    // A directory of files: the error names the file it is in.
    let merged = dir.join("merged");
    std::fs::create_dir_all(&merged).unwrap();
    std::fs::write(merged.join("a.toml"), "[[service]]\nname = \"api\"\n").unwrap();
    std::fs::write(merged.join("b.toml"), "[[service]]\nname = \"api\"\n").unwrap();
    let (code, _, stderr) = run_enforcer(&["check", merged.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(&format!(
            "{}:1:1: service \"api\" is already declared at {}:1:1",
            merged.join("b.toml").display(),
            merged.join("a.toml").display()
        )),
        "{stderr}"
    );
    // And a valid policy prints what it holds.
    let (code, stdout, _) = run_enforcer(&[
        "check",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/demo.toml"),
    ]);
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("3 services:")
            && stdout.contains("4 rules: 3 allow (1 rate-limited), 1 deny"),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|line| line.contains("frontend")
            && line.contains("1001")
            && line.contains("declared")),
        "{stdout}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[root_test]
fn explain_and_diff_agree_with_what_the_datapath_does_as_root() {
    let topology = Topology::build(&["frontend", "api", "db"]).unwrap();
    let services = services(&topology, &["frontend", "api", "db"]);
    let old = format!(
        "{services}[[allow]]\nfrom = \"frontend\"\nto = \"api\"\nports = [\"8080/tcp\", \"9000-9001/tcp\"]\nid = \"fe-api\"\n[[allow]]\nfrom = \"api\"\nto = \"db\"\nports = [\"5432/tcp\"]\nid = \"api-db\"\n[[deny]]\nfrom = \"frontend\"\nto = \"api\"\nports = [\"9001/tcp\"]\nid = \"no-9001\"\n"
    );
    let new = format!(
        "{services}[[allow]]\nfrom = \"frontend\"\nto = \"api\"\nports = [\"8080/tcp\"]\nid = \"fe-api\"\n[[allow]]\nfrom = \"frontend\"\nto = \"db\"\nports = [\"5432/tcp\"]\nid = \"fe-db\"\n"
    );
    let old_path = topology.write_file("old.toml", &old).unwrap();
    let new_path = topology.write_file("new.toml", &new).unwrap();
    let enforcer = Enforcer::start_with_policy_path(
        &topology,
        &topology.write_file("live.toml", &old).unwrap(),
        &["v-frontend", "v-api", "v-db"],
        &[],
    )
    .unwrap();
    let _servers: Vec<_> = [
        ("api", 8080),
        ("api", 9000),
        ("api", 9001),
        ("db", 5432),
        ("frontend", 8080),
    ]
    .iter()
    .map(|(name, port)| topology.netns(name).tcp_echo_server(*port).unwrap())
    .collect();
    let probes = [
        ("frontend", "api", 8080),
        ("frontend", "api", 9000),
        ("frontend", "api", 9001),
        ("frontend", "db", 5432),
        ("api", "db", 5432),
        ("db", "frontend", 8080),
    ];
    let connects = |from: &str, to: &str, port: u16| {
        topology
            .netns(from)
            .tcp_connect(v4(&topology, to, port), TIMEOUT)
            .is_ok()
    };
    let explained = |policy: &Path, from: &str, to: &str, port: u16| -> bool {
        let (code, stdout, stderr) = run_enforcer(&[
            "explain",
            policy.to_str().unwrap(),
            "--from",
            from,
            "--to",
            to,
            "--port",
            &format!("{port}/tcp"),
            "--json",
        ]);
        assert_eq!(code, Some(0), "{stderr}");
        let answer: Value = serde_json::from_str(&stdout).unwrap();
        answer[0]["verdict"] == "allow"
    };
    for (from, to, port) in probes {
        assert_eq!(
            connects(from, to, port),
            explained(&old_path, from, to, port),
            "old policy: {from} -> {to} {port}/tcp"
        );
    }

    let (code, stdout, stderr) = run_enforcer(&[
        "diff",
        old_path.to_str().unwrap(),
        new_path.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let diff: Value = serde_json::from_str(&stdout).unwrap();
    let edge = |entry: &Value| {
        (
            entry["from"].as_str().unwrap().to_owned(),
            entry["to"].as_str().unwrap().to_owned(),
        )
    };
    assert_eq!(
        diff["added"]
            .as_array()
            .unwrap()
            .iter()
            .map(edge)
            .collect::<Vec<_>>(),
        vec![("frontend".to_owned(), "db".to_owned())]
    );
    assert_eq!(
        diff["removed"]
            .as_array()
            .unwrap()
            .iter()
            .map(edge)
            .collect::<Vec<_>>(),
        vec![("api".to_owned(), "db".to_owned())]
    );
    assert_eq!(
        diff["changed"][0]["after"]["allowed"][0]["traffic"], "8080/tcp",
        "fe -> api loses 9000"
    );

    enforcer.reload(&new, 2);
    assert!(
        connects("frontend", "db", 5432),
        "diff said frontend -> db was added"
    );
    assert!(
        !connects("api", "db", 5432),
        "diff said api -> db was removed"
    );
    assert!(
        !connects("frontend", "api", 9000),
        "diff said frontend -> api keeps only 8080"
    );
    for (from, to, port) in probes {
        assert_eq!(
            connects(from, to, port),
            explained(&new_path, from, to, port),
            "new policy: {from} -> {to} {port}/tcp"
        );
    }
}

#[root_test]
fn hundred_reloads_under_traffic_never_admit_what_both_forbid_nor_break_what_both_allow_as_root() {
    let topology = Topology::build(&["frontend", "api", "db"]).unwrap();
    let services = services(&topology, &["frontend", "api", "db"]);
    // Both allow frontend -> api 8080 and forbid frontend -> db; they differ on api -> db.
    let first = format!(
        "{services}{}{}",
        allow("frontend", "api", &["8080/tcp"], ""),
        allow("api", "db", &["5432/tcp"], "")
    );
    let second = format!(
        "{services}{}{}",
        allow("frontend", "api", &["8080/tcp", "8081/tcp"], ""),
        allow("api", "db", &["53/udp"], "")
    );
    let enforcer = enforce(&topology, &first);
    let api = topology.netns("api").tcp_echo_server(8080).unwrap();
    let forbidden = topology.netns("db").udp_echo_server(5432).unwrap();
    let frontend = topology.netns("frontend");

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let exchanges = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let probes = Arc::new(AtomicUsize::new(0));
    // A long-lived connection both policies allow, busy all along.
    let mut stream = frontend
        .tcp_connect(v4(&topology, "api", 8080), TIMEOUT)
        .unwrap();
    // Counts an echo of `sent` in `echoed`, anything else (said on stderr) as a failure.
    let tally = |what: &str, sent: &[u8], reply: std::io::Result<Vec<u8>>, echoed: &AtomicUsize| {
        match reply {
            Ok(reply) if reply == sent => echoed.fetch_add(1, Ordering::SeqCst),
            other => {
                eprintln!(
                    "{what} failed at {:?}: {other:?}",
                    std::time::SystemTime::now()
                );
                failures.fetch_add(1, Ordering::SeqCst)
            }
        };
    };
    std::thread::scope(|scope| {
        let _stop = RaiseOnDrop(&stop);
        scope.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let reply = enforcer_testbed::exchange(&mut stream, b"steady");
                tally("steady exchange", b"steady", reply, &exchanges);
            }
        });
        // New connections both policies allow.
        scope.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let reply = frontend.tcp_exchange(v4(&topology, "api", 8080), b"new", TIMEOUT);
                tally("new connection", b"new", reply, &connections);
            }
        });
        // Datagrams both policies forbid.
        scope.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let _ = frontend.udp_exchange(
                    v4(&topology, "db", 5432),
                    b"forbidden",
                    Duration::from_millis(20),
                );
                probes.fetch_add(1, Ordering::SeqCst);
            }
        });
        let counts =
            || [&exchanges, &connections, &probes].map(|count| count.load(Ordering::SeqCst));
        for generation in 2..=101 {
            let before = counts();
            enforcer.reload(
                if generation % 2 == 0 { &second } else { &first },
                generation,
            );
            // Each kind of traffic goes on under each generation, however fast the reloads.
            assert!(
                enforcer_testbed::eventually(TIMEOUT, || {
                    counts().iter().zip(before).all(|(now, then)| *now > then)
                }),
                "traffic stopped under generation {generation}: {:?} -> {:?}",
                before,
                counts()
            );
        }
    });
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "an allowed exchange or connection failed during the reloads; log:\n{}",
        enforcer.daemon.log_text()
    );
    assert_eq!(
        forbidden.hit_count(),
        0,
        "a forbidden datagram got through during the reloads"
    );
    assert!(
        exchanges.load(Ordering::SeqCst) > 100
            && connections.load(Ordering::SeqCst) > 100
            && probes.load(Ordering::SeqCst) > 100,
        "traffic really flowed"
    );
    assert!(
        enforcer_testbed::eventually(TIMEOUT, || api.hit_count()
            == connections.load(Ordering::SeqCst) + 1),
        "api accepted exactly the connections the client saw succeed, plus the long-lived one"
    );
}

#[root_test]
fn broken_policy_written_over_the_live_one_is_refused_and_the_old_one_keeps_enforcing_as_root() {
    let topology = Topology::build(&["frontend", "api"]).unwrap();
    let policy = format!(
        "{}{}",
        services(&topology, &["frontend", "api"]),
        allow("frontend", "api", &["8080/tcp"], "")
    );
    let enforcer = Enforcer::start(
        &topology,
        &policy,
        &["v-frontend", "v-api"],
        &["--metrics", "9464"],
    )
    .unwrap();
    let audit_log = &enforcer.audit_log;
    let _servers = [
        topology.netns("api").tcp_echo_server(8080).unwrap(),
        topology.netns("api").tcp_echo_server(9090).unwrap(),
    ];

    // Written over the live file: the watch sees it, no signal needed.
    std::fs::write(&enforcer.policy, policy.replace("8080/tcp", "80800/tcp")).unwrap();
    enforcer
        .daemon
        .wait_for_log("policy reload refused", SETTLE)
        .unwrap();
    assert!(
        enforcer
            .daemon
            .log_text()
            .contains("port 80800 out of range"),
        "the log says why"
    );
    let frontend = topology.netns("frontend");
    assert_eq!(
        frontend
            .tcp_exchange(v4(&topology, "api", 8080), b"still", TIMEOUT)
            .unwrap_or_default(),
        b"still",
        "the old policy still allows 8080"
    );
    assert!(
        was_dropped(&frontend.tcp_connect(v4(&topology, "api", 9090), TIMEOUT)),
        "and still denies 9090"
    );
    let status =
        String::from_utf8_lossy(&enforcer.command(&topology, &["status"]).stdout).into_owned();
    assert!(
        status.contains("generation 1 "),
        "nothing was installed:\n{status}"
    );
    let metrics = http_get(&topology.host, 9464, "/metrics").unwrap();
    assert!(
        metrics.contains("enforcer_policy_reloads_total{result=\"failure\"} 1"),
        "counted:\n{metrics}"
    );
    let records: Vec<Value> = std::fs::read_to_string(audit_log)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let refused = records
        .iter()
        .find(|record| record["kind"] == "policy_load" && record["result"] == "failure")
        .expect("audited");
    assert!(refused["error"].as_str().unwrap().contains("out of range"));
    assert_eq!(refused["trigger"], "file-change");
}

#[root_test]
fn a_policy_caught_half_written_is_never_installed_as_root() {
    // The deny comes last: the file cut before it lets frontend reach api's admin port.
    let (topology, enforcer) = frontend_and_api(
        &(allow("frontend", "api", &["tcp"], "") + &deny("frontend", "api", &["9090/tcp"], "")),
        &[],
    );
    let policy = std::fs::read_to_string(&enforcer.policy).unwrap();
    let _admin = topology.netns("api").tcp_echo_server(9090).unwrap();
    let frontend = topology.netns("frontend");
    let probe = || frontend.tcp_connect(v4(&topology, "api", 9090), Duration::from_millis(200));
    assert!(was_dropped(&probe()));

    // An editor saving in place: truncate, write part, stall, write the rest, close.
    let cut = policy.find("[[deny]]").unwrap();
    let mut file = std::fs::File::create(&enforcer.policy).unwrap();
    let stalled = Instant::now();
    let mut leaks = 0;
    for (index, part) in ["", &policy[..cut], &policy[cut..]].iter().enumerate() {
        file.write_all(part.as_bytes()).unwrap();
        while stalled.elapsed() < Duration::from_millis(600 * (index as u64 + 1)) {
            leaks += usize::from(probe().is_ok());
        }
    }
    drop(file);
    enforcer
        .daemon
        .wait_for_log("policy unchanged", SETTLE)
        .expect("the finished file is read");
    let log = enforcer.daemon.log_text();
    assert_eq!(
        leaks, 0,
        "frontend reached the denied port while the file was half written:\n{log}"
    );
    assert!(
        !log.contains("generation=2 "),
        "nothing installed from a partial file:\n{log}"
    );
    assert!(
        !log.contains("reload refused"),
        "nor was a partial file even read:\n{log}"
    );
}

/// An editor's save, a new file renamed over the policy, reloads it: the watch asks the kernel
/// only for the events that end a change, and a rename is one (it failed when the watch did
/// not ask for `IN_MOVED_TO`).
#[root_test]
fn a_policy_saved_by_rename_over_it_is_reloaded_as_root() {
    let topology = Topology::build(&["frontend", "api"]).unwrap();
    let services = services(&topology, &["frontend", "api"]);
    let enforcer = Enforcer::start(
        &topology,
        &format!("{services}{}", allow("frontend", "api", &["8080/tcp"], "")),
        &["v-frontend", "v-api"],
        &[],
    )
    .unwrap();
    let _server = topology.netns("api").tcp_echo_server(9090).unwrap();
    let frontend = topology.netns("frontend");
    assert!(was_dropped(
        &frontend.tcp_connect(v4(&topology, "api", 9090), TIMEOUT)
    ));

    let saved = enforcer.policy.with_file_name(".policy.toml.swp");
    std::fs::write(
        &saved,
        format!("{services}{}", allow("frontend", "api", &["9090/tcp"], "")),
    )
    .unwrap();
    std::fs::rename(&saved, &enforcer.policy).unwrap();

    enforcer
        .daemon
        .wait_for_log("generation=2 ", SETTLE)
        .unwrap();
    assert_eq!(
        frontend
            .tcp_exchange(v4(&topology, "api", 9090), b"saved", TIMEOUT)
            .unwrap_or_default(),
        b"saved",
        "the saved policy allows 9090"
    );
}

#[root_test]
fn configmap_style_symlink_swap_reloads_the_policy_as_root() {
    let topology = Topology::build(&["frontend", "api"]).unwrap();
    let services = services(&topology, &["frontend", "api"]);
    // The layout kubelet keeps for a ConfigMap volume: policy.toml -> ..data/policy.toml,
    // ..data -> ..<version>; an update writes a new version directory and renames a new
    // ..data symlink over the old one.
    let mount = topology.dir.join("configmap");
    let version_one = mount.join("..2026_11_22_v1");
    std::fs::create_dir_all(&version_one).unwrap();
    std::fs::write(
        version_one.join("policy.toml"),
        format!("{services}{}", allow("frontend", "api", &["8080/tcp"], "")),
    )
    .unwrap();
    symlink("..2026_11_22_v1", mount.join("..data")).unwrap();
    symlink("..data/policy.toml", mount.join("policy.toml")).unwrap();
    let enforcer =
        Enforcer::start_with_policy_path(&topology, &mount, &["v-frontend", "v-api"], &[]).unwrap();
    let _servers = [
        topology.netns("api").tcp_echo_server(8080).unwrap(),
        topology.netns("api").tcp_echo_server(9090).unwrap(),
    ];
    let frontend = topology.netns("frontend");
    assert!(was_dropped(
        &frontend.tcp_connect(v4(&topology, "api", 9090), TIMEOUT)
    ));

    let version_two = mount.join("..2026_11_22_v2");
    std::fs::create_dir_all(&version_two).unwrap();
    std::fs::write(
        version_two.join("policy.toml"),
        format!("{services}{}", allow("frontend", "api", &["9090/tcp"], "")),
    )
    .unwrap();
    symlink("..2026_11_22_v2", mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    std::fs::remove_dir_all(&version_one).unwrap();

    enforcer
        .daemon
        .wait_for_log("generation=2 ", SETTLE)
        .unwrap();
    assert!(
        enforcer
            .daemon
            .log_text()
            .contains("trigger=\"file-change\"")
            || enforcer.daemon.log_text().contains("trigger=file-change")
    );
    assert_eq!(
        frontend
            .tcp_exchange(v4(&topology, "api", 9090), b"v2", TIMEOUT)
            .unwrap_or_default(),
        b"v2",
        "the new version allows 9090"
    );
    assert!(
        was_dropped(&frontend.tcp_connect(v4(&topology, "api", 8080), TIMEOUT)),
        "and no longer 8080"
    );
}

#[root_test]
fn killed_controller_leaves_enforcement_in_place_and_a_new_one_adopts_it_as_root() {
    killed_controller_is_adopted(&[]);
}

/// The same with the TC programs attached as netlink filters on clsact, as on kernels before
/// 6.6 (the kernel matrix runs this path on real 5.10 and 6.1 kernels).
#[root_test]
fn killed_controller_with_netlink_tc_filters_is_adopted_as_root() {
    killed_controller_is_adopted(&["--tc-attach", "netlink"]);
}

fn killed_controller_is_adopted(tc_attach: &[&str]) {
    let topology = Topology::build(&["frontend", "api", "db"]).unwrap();
    let policy = format!(
        "{}{}",
        services(&topology, &["frontend", "api", "db"]),
        allow("frontend", "api", &["8080/tcp"], "id = \"fe-api\"")
    );
    let first = enforce_with(&topology, &policy, tc_attach);
    let _api = topology.netns("api").tcp_echo_server(8080).unwrap();
    let forbidden = topology.netns("db").udp_echo_server(5432).unwrap();
    let frontend = topology.netns("frontend");
    let mut established = frontend
        .tcp_connect(v4(&topology, "api", 8080), TIMEOUT)
        .unwrap();
    assert_eq!(
        enforcer_testbed::exchange(&mut established, b"before").unwrap(),
        b"before"
    );

    // The controller keeps its rule names for a successor once reloads pause (half a second).
    let names_file = enforcer::datapath::pins::PinLayout::new(&first.pins).names_file();
    assert!(
        enforcer_testbed::eventually(SETTLE, || names_file.exists()),
        "{} written",
        names_file.display()
    );

    let stop = AtomicBool::new(false);
    let probes = AtomicUsize::new(0);
    let second = std::thread::scope(|scope| {
        let _stop = RaiseOnDrop(&stop);
        // A continuous probe of a denied flow, through the kill and the restart.
        scope.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let _ = frontend.udp_exchange(
                    v4(&topology, "db", 5432),
                    b"probe",
                    Duration::from_millis(10),
                );
                probes.fetch_add(1, Ordering::SeqCst);
            }
        });
        first
            .daemon
            .signal(nix::sys::signal::Signal::SIGKILL)
            .unwrap();
        let at_kill = probes.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            enforcer_testbed::exchange(&mut established, b"orphaned").unwrap(),
            b"orphaned",
            "the connection survives the controller"
        );
        assert!(
            frontend
                .tcp_exchange(v4(&topology, "api", 8080), b"new", TIMEOUT)
                .is_ok(),
            "new allowed connections still work"
        );

        let without_controller = probes.load(Ordering::SeqCst) - at_kill;
        let second = Enforcer::start_with_policy_path(
            &topology,
            &first.policy,
            &["v-frontend", "v-api", "v-db"],
            tc_attach,
        )
        .unwrap();
        assert!(
            without_controller >= 5,
            "the probe ran while no controller did ({without_controller} datagrams)"
        );
        assert!(
            second.daemon.log_text().contains("adopting the datapath"),
            "the new controller adopted the pinned state"
        );
        assert!(
            second.daemon.log_text().contains("generation=2 "),
            "and continued the generations"
        );
        assert_eq!(
            enforcer_testbed::exchange(&mut established, b"adopted").unwrap(),
            b"adopted",
            "the connection survives the adoption"
        );
        // The record of the connection made while no controller ran was queued under the
        // first controller's generation; the second names its rule as the first did.
        let queued = second
            .wait_for_alert(|alert| {
                is_flow(alert, "frontend", "api", 8080)
                    && alert["unmapped"]["enforcer"]["generation"] == 1
            })
            .expect("the record queued while no controller ran is reported");
        assert_eq!(queued["firewall_rule"]["uid"], "fe-api");
        std::thread::sleep(Duration::from_millis(300));
        second
    });
    assert_eq!(
        forbidden.hit_count(),
        0,
        "no denied datagram passed while no controller ran, nor during the adoption"
    );
    let status = second.command(&topology, &["status"]);
    let report = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{report}");
    assert_eq!(
        report.matches("matches this build").count(),
        6,
        "three interfaces, two hooks each, run the adopting controller's programs:\n{report}"
    );
    drop(second);
}

#[root_test]
fn metrics_are_valid_for_promtool_and_carry_the_contract_names_as_root() {
    let (topology, enforcer) = frontend_and_api(
        &allow("frontend", "api", &["8080/tcp"], ""),
        &["--metrics", "9464"],
    );
    let policy = std::fs::read_to_string(&enforcer.policy).unwrap();
    let _server = topology.netns("api").tcp_echo_server(8080).unwrap();
    let frontend = topology.netns("frontend");
    frontend
        .tcp_exchange(v4(&topology, "api", 8080), b"x", TIMEOUT)
        .unwrap();
    let _ = frontend.tcp_connect(v4(&topology, "api", 9999), TIMEOUT);
    enforcer.reload(&policy.replace("8080/tcp", "8080/tcp\", \"8081/tcp"), 2);
    enforcer
        .wait_for_alert(|alert| is_flow(alert, "frontend", "api", 9999))
        .unwrap();

    let metrics = http_get(&topology.host, 9464, "/metrics").unwrap();
    for name in [
        "enforcer_packets_total{verdict=\"deny\",reason=\"default_deny\"}",
        "enforcer_flows_total{src=\"frontend\",dst=\"api\",verdict=\"allow\"} 1",
        "enforcer_flows_total{src=\"frontend\",dst=\"api\",verdict=\"deny\"}",
        "enforcer_policy_generation 2",
        "enforcer_policy_reloads_total{result=\"success\"} 2",
        "enforcer_policy_apply_seconds_bucket",
        "enforcer_events_lost_total 0",
        "enforcer_events_lost_packets_total 0",
        "enforcer_denied_packets_unreported ",
        "enforcer_alerts_total{detector=\"flow\"}",
        "enforcer_map_entries{map=\"RULES\"}",
        "enforcer_map_capacity{map=\"RULES\"} 524288",
    ] {
        assert!(metrics.contains(name), "missing {name} in:\n{metrics}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs prometheus)");
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), metrics.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool refused the metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    // Bound to the host's loopback only.
    let endpoint = topology.endpoint("frontend");
    assert!(
        endpoint
            .netns
            .tcp_connect(
                socket(endpoint.gateway_v4, 9464),
                Duration::from_millis(300)
            )
            .is_err(),
        "not reachable from outside the host"
    );
}

#[root_test]
fn observe_streams_live_flow_records_with_filters_as_root() {
    let (topology, enforcer) = frontend_and_api(&allow("frontend", "api", &["8080/tcp"], ""), &[]);
    let socket_path = enforcer.observe_socket.clone();
    let _server = topology.netns("api").tcp_echo_server(8080).unwrap();
    let frontend = topology.netns("frontend");
    frontend
        .tcp_exchange(v4(&topology, "api", 8080), b"x", TIMEOUT)
        .unwrap();

    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&socket_path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600,
        "root only"
    );
    // Follow, filtered to denials on port 7777; then cause one allowed flow and one denial.
    let mut follower = Command::new(ENFORCER)
        .args([
            "observe",
            "--follow",
            "--json",
            "--verdict",
            "deny",
            "--port",
            "7777",
            "--socket",
            socket_path.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufReader::new(follower.stdout.take().unwrap()).lines();
    std::thread::sleep(Duration::from_millis(300));
    frontend
        .tcp_exchange(v4(&topology, "api", 8080), b"y", TIMEOUT)
        .unwrap();
    let _ = frontend.tcp_connect(v4(&topology, "api", 7777), TIMEOUT);
    let first: Value = serde_json::from_str(&lines.into_iter().next().unwrap().unwrap()).unwrap();
    follower.kill().unwrap();
    let _ = follower.wait();
    assert_eq!(
        (
            first["verdict"].as_str(),
            first["dst"]["port"].as_u64(),
            first["src"]["name"].as_str()
        ),
        (Some("deny"), Some(7777), Some("frontend"))
    );
    assert_eq!(first["rule"], "default-deny");

    // Without --follow: the recent records, as text.
    let (code, stdout, stderr) = run_enforcer(&[
        "observe",
        "--service",
        "api",
        "--socket",
        socket_path.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.lines().any(|line| line.contains("frontend [")
            && line.contains("-> api [")
            && line.contains("allow")
            && line.contains(":8080")),
        "{stdout}"
    );
    drop(enforcer);
}

#[root_test]
fn a_rotated_audit_log_goes_on_in_a_new_file_that_verifies_after_the_old_as_root() {
    let (topology, enforcer) = frontend_and_api("", &[]);
    let policy = services(&topology, &["frontend", "api"]);
    let audit_log = enforcer.audit_log.clone();
    let rotated = audit_log.with_extension("jsonl.1");
    // logrotate's default: move the log away and let the writer start a new one.
    std::fs::rename(&audit_log, &rotated).unwrap();
    enforcer.reload(
        &format!("{policy}{}", allow("frontend", "api", &["8080/tcp"], "")),
        2,
    );
    drop(enforcer);

    let generations = |path: &Path| -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap())
            .filter(|record| record["kind"] == "policy_load")
            .map(|record| record["generation"].clone())
            .collect()
    };
    assert_eq!(generations(&rotated), [1], "the load before the rotation");
    assert_eq!(
        generations(&audit_log),
        [2],
        "the load after it, in a new file"
    );
    let (old, new) = (rotated.to_str().unwrap(), audit_log.to_str().unwrap());
    let (code, stdout, stderr) = run_enforcer(&["audit-verify", old, new]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("intact"), "{stdout}");
    let (code, _, stderr) = run_enforcer(&["audit-verify", new]);
    assert_eq!(code, Some(1), "the new file alone does not start the chain");
    assert!(
        stderr.contains(&format!(
            "{new}:1: the first record does not start the chain"
        )),
        "{stderr}"
    );
}

/// A small tmpfs mounted for a test; unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: std::path::PathBuf, size: &str) -> Self {
        std::fs::create_dir(&at).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &at,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size},mode=0700").as_str()),
        )
        .unwrap();
        Self(at)
    }

    /// Writes a file until the disk is full.
    fn fill(&self, name: &str) {
        let mut filler = std::fs::File::create(self.0.join(name)).unwrap();
        while filler.write_all(&[0; 512]).is_ok() {}
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[root_test]
fn a_full_disk_never_leaves_half_an_audit_record_as_root() {
    let topology = Topology::build(&["frontend", "api"]).expect("topology");
    let disk = SmallDisk::mount(topology.dir.join("small-disk"), "64k");
    let audit_log = disk.0.join("audit.jsonl");
    let policy = services(&topology, &["frontend", "api"]);
    let policy_path = topology.write_file("policy.toml", &policy).unwrap();
    let interfaces = ["v-frontend", "v-api"];
    let enforcer =
        Enforcer::start_with_audit_log(&topology, &policy_path, &interfaces, &[], Some(&audit_log))
            .unwrap();
    let verify = || {
        let (code, stdout, stderr) = run_enforcer(&["audit-verify", audit_log.to_str().unwrap()]);
        assert_eq!(code, Some(0), "{stdout}{stderr}");
        assert!(stdout.contains("intact"), "{stdout}");
    };
    disk.fill("filler");
    let with_port = |generation: u32| {
        let port = format!("{}/tcp", 8000 + generation);
        format!("{policy}{}", allow("frontend", "api", &[port.as_str()], ""))
    };
    // Reloads until an audit record no longer fits: the write fails part way through a line.
    let mut generation = 1;
    while !enforcer.daemon.log_text().contains("writing the audit log") {
        assert!(generation < 40, "the disk never filled up");
        generation += 1;
        enforcer.reload(&with_port(generation), generation);
    }
    let log = std::fs::read_to_string(&audit_log).unwrap();
    assert!(log.ends_with('\n'), "a partial line was left behind");
    verify();

    // Room again: the chain goes on from the last whole record.
    std::fs::remove_file(disk.0.join("filler")).unwrap();
    generation += 1;
    enforcer.reload(&with_port(generation), generation);
    drop(enforcer);
    verify();
    let last: Value = serde_json::from_str(
        std::fs::read_to_string(&audit_log)
            .unwrap()
            .lines()
            .rfind(|line| line.contains("policy_load"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(last["generation"], generation);
}

#[root_test]
fn audit_log_chains_policy_loads_and_verification_finds_tampering_as_root() {
    let (topology, enforcer) = frontend_and_api("", &[]);
    let policy = services(&topology, &["frontend", "api"]);
    let audit_log = enforcer.audit_log.clone();
    let _ = topology
        .netns("frontend")
        .tcp_connect(v4(&topology, "api", 9), TIMEOUT);
    enforcer.reload(
        &format!("{policy}[[allow]]\nfrom = \"frontend\"\nto = \"api\"\n"),
        2,
    );
    drop(enforcer);

    let (code, stdout, stderr) = run_enforcer(&["audit-verify", audit_log.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("intact"), "{stdout}");
    let lines: Vec<String> = std::fs::read_to_string(&audit_log)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let loads: Vec<Value> = lines
        .iter()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|record| record["kind"] == "policy_load")
        .collect();
    assert_eq!(loads.len(), 2);
    assert_eq!(loads[0]["trigger"], "start");
    // The rewrite is seen by the file watch and signalled with SIGHUP: whichever comes first
    // installs it, the other finds it unchanged.
    assert!(
        matches!(loads[1]["trigger"].as_str(), Some("sighup" | "file-change")),
        "{}",
        loads[1]
    );
    assert_eq!(loads[1]["generation"], 2);
    assert_eq!(loads[1]["policy_sha256"].as_str().unwrap().len(), 64);
    let summary = lines
        .iter()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .find(|record| record["kind"] == "flow_summary")
        .expect("the denied flow is summarised");
    assert_eq!(
        (summary["src"].as_str(), summary["verdict"].as_str()),
        (Some("frontend"), Some("deny"))
    );

    let mut tampered = lines.clone();
    tampered[0] = tampered[0].replace("\"result\":\"success\"", "\"result\":\"failure\"");
    std::fs::write(
        &audit_log,
        tampered
            .iter()
            .map(|line| format!("{line}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let (code, _, stderr) = run_enforcer(&["audit-verify", audit_log.to_str().unwrap()]);
    assert_eq!(code, Some(1), "tampering is a failed verification");
    assert!(
        stderr.contains(&format!(
            "{}:2: prev_hash does not match line 1",
            audit_log.display()
        )),
        "{stderr}"
    );
}

/// frontend and api declared with nothing allowed between them, api serving 8080/tcp, and the
/// controller started with `extra` arguments and seen dropping frontend's connection to it.
fn nothing_allowed(extra: &[&str]) -> (Topology, Enforcer, enforcer_testbed::Server) {
    let (topology, enforcer) = frontend_and_api("", extra);
    let server = topology.netns("api").tcp_echo_server(8080).unwrap();
    assert!(
        was_dropped(
            &topology
                .netns("frontend")
                .tcp_connect(v4(&topology, "api", 8080), TIMEOUT)
        ),
        "enforcing"
    );
    (topology, enforcer, server)
}

#[root_test]
fn a_program_swapped_behind_the_controllers_back_shows_in_status_as_root() {
    let (topology, enforcer, _server) = nothing_allowed(&["--ingress-hook", "xdp"]);

    let evil = enforcer_testbed::bpf::load_pass_all_xdp().unwrap();
    enforcer_testbed::bpf::swap_link_program(&enforcer.pins.join("links/xdp-v-frontend"), &evil)
        .unwrap();
    let status =
        String::from_utf8_lossy(&enforcer.command(&topology, &["status"]).stdout).into_owned();
    let line = status
        .lines()
        .find(|line| line.contains("v-frontend") && line.contains("xdp"))
        .unwrap();
    assert!(
        line.contains("DIFFERS from this build's program"),
        "{status}"
    );
    assert!(
        status.lines().any(|line| line.contains("v-api")
            && line.contains("xdp")
            && line.contains("matches this build")),
        "{status}"
    );
}

/// `bpftool -j ARGS`, parsed; panics with bpftool's message when it fails.
fn bpftool_json(args: &[&str]) -> Value {
    let output = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn json_bytes(value: &Value) -> Vec<u8> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|byte| {
            u8::from_str_radix(byte.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
        })
        .collect()
}

#[root_test]
fn the_live_policy_generation_cannot_be_rewritten_from_userspace_as_root() {
    let (topology, enforcer, _server) = nothing_allowed(&[]);
    let frontend = topology.netns("frontend");

    let active = enforcer.pins.join("maps/POLICY_ACTIVE");
    let outer = bpftool_json(&[
        "map",
        "lookup",
        "pinned",
        active.to_str().unwrap(),
        "key",
        "0",
        "0",
        "0",
        "0",
    ]);
    let id = u32::from_le_bytes(json_bytes(&outer["value"]).try_into().unwrap()).to_string();
    let shown = Command::new("bpftool")
        .args(["map", "show", "id", &id])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains("frozen"),
        "the live generation's config map is frozen: {}",
        String::from_utf8_lossy(&shown.stdout)
    );
    // Someone with root flips the live generation to audit mode, to switch dropping off.
    let live = bpftool_json(&["map", "lookup", "id", &id, "key", "0", "0", "0", "0"]);
    let mut config = json_bytes(&live["value"]);
    config[8] |= enforcer_common::config::flags::AUDIT as u8;
    let mut update = Command::new("bpftool");
    update.args([
        "map", "update", "id", &id, "key", "0", "0", "0", "0", "value",
    ]);
    update.args(config.iter().map(u8::to_string));
    let refused = update.output().unwrap();
    assert!(!refused.status.success(), "the kernel refuses the write");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Operation not permitted"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        was_dropped(&frontend.tcp_connect(v4(&topology, "api", 8080), TIMEOUT)),
        "the policy still drops what it denies"
    );
}

#[root_test]
fn a_one_rule_change_to_a_large_policy_is_a_handful_of_map_writes_as_root() {
    let topology = Topology::build(&["frontend", "api"]).unwrap();
    let services = services(&topology, &["frontend", "api"]);
    let rules: String = (1..=5000)
        .map(|port| {
            allow(
                "frontend",
                "api",
                &[&format!("{port}/tcp")],
                &format!("id = \"r{port}\""),
            )
        })
        .collect();
    let enforcer = enforce(&topology, &format!("{services}{rules}"));
    let writes = |generation: u32| -> usize {
        let log = enforcer.daemon.log_text();
        let line = log
            .lines()
            .find(|line| line.contains(&format!("generation={generation} ")))
            .unwrap_or_else(|| panic!("no generation {generation}:\n{log}"));
        line.split("writes=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|number| number.parse().ok())
            .unwrap()
    };
    assert!(writes(1) >= 5000, "the first load writes every entry");
    // One rule moves to another port: its old entry goes, its new one comes.
    let one_changed = rules.replace("ports = [\"4999/tcp\"]", "ports = [\"64999/tcp\"]");
    enforcer.reload(&format!("{services}{one_changed}"), 2);
    assert_eq!(
        writes(2),
        2,
        "a one-rule change writes its difference, not 5000 entries"
    );
    // The idle slot was brought up to generation 2 after the switch: the next one-rule change
    // is again two writes, not two plus the previous change's.
    let two_changed = one_changed.replace("ports = [\"17/tcp\"]", "ports = [\"64017/tcp\"]");
    enforcer.reload(&format!("{services}{two_changed}"), 3);
    assert_eq!(
        writes(3),
        2,
        "one more rule changed relative to the live generation"
    );
    // Adding a rule in front of all others, or removing one from the middle, leaves the other
    // rules' entries alone: their rule numbers do not shift with their position.
    let new_rule = allow("api", "frontend", &["22/tcp"], "");
    enforcer.reload(&format!("{services}{new_rule}{two_changed}"), 4);
    assert_eq!(
        writes(4),
        2,
        "a rule added before 5000 others: its entry and its pair's summary (a new pair)"
    );
    let one_removed = two_changed.replace(
        &allow("frontend", "api", &["2500/tcp"], "id = \"r2500\""),
        "",
    );
    assert_ne!(one_removed, two_changed);
    enforcer.reload(&format!("{services}{new_rule}{one_removed}"), 5);
    assert_eq!(writes(5), 1, "a rule removed from the middle");
}

#[root_test]
fn unload_removes_every_pin_and_program_as_root() {
    let (topology, enforcer, _server) = nothing_allowed(&[]);
    let frontend = topology.netns("frontend");
    enforcer
        .daemon
        .signal(nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let mut enforcer = enforcer;
    enforcer.daemon.wait(SETTLE).unwrap();
    assert!(
        was_dropped(&frontend.tcp_connect(v4(&topology, "api", 8080), TIMEOUT)),
        "a stopped controller leaves enforcement in place"
    );
    let attached = topology.host.attached_programs("v-frontend").unwrap();
    assert_eq!(
        attached.len(),
        2,
        "an ingress and an egress program are attached before the unload: {attached:?}"
    );

    let output = enforcer.command(&topology, &["unload"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!enforcer.pins.exists(), "the pin directory is gone");
    assert_eq!(
        topology.host.attached_programs("v-frontend").unwrap(),
        Vec::<String>::new(),
        "no program left on the interface"
    );
    assert_eq!(
        frontend
            .tcp_exchange(v4(&topology, "api", 8080), b"free", TIMEOUT)
            .unwrap_or_default(),
        b"free",
        "traffic flows unjudged again"
    );
}

#[root_test]
fn a_policy_other_users_can_change_is_refused_at_start_and_at_reload_as_root() {
    use std::os::unix::fs::PermissionsExt as _;
    let topology = Topology::build(&["frontend", "api"]).unwrap();
    let text = services(&topology, &["frontend", "api"]);
    let open = topology.write_file("open.toml", &text).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o666)).unwrap();
    let output = topology
        .host
        .command(ENFORCER)
        .unwrap()
        .args(["run", "--policy"])
        .arg(&open)
        .arg("--pin-path")
        .arg(topology.pin_path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "bad input exits 1: {stderr}");
    assert!(
        stderr.contains("can be changed by every user (owner uid 0, mode 0666)"),
        "{stderr}"
    );
    assert!(!topology.pin_path().exists(), "nothing was pinned");

    // Made writable while enforcing: the reload is refused and the policy in force stays.
    let enforcer = enforce(&topology, &text);
    std::fs::set_permissions(&enforcer.policy, std::fs::Permissions::from_mode(0o664)).unwrap();
    enforcer
        .daemon
        .signal(nix::sys::signal::Signal::SIGHUP)
        .unwrap();
    enforcer
        .daemon
        .wait_for_log("can be changed by its group", SETTLE)
        .expect("the reload is refused, saying why");
    assert!(
        enforcer
            .daemon
            .log_text()
            .contains("the previous policy stays in force")
    );
}

/// Adds `each` to every CPU's count of records the ring buffer could not take, as the kernel
/// does when it is full; returns what was added in all.
fn lose_records(pins: &Path, each: u64) -> u64 {
    use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
    use enforcer_common::event::EventCpuState;
    let data = MapData::from_pin(pins.join("maps/EVENT_STATE")).unwrap();
    let mut state: PerCpuArray<MapData, EventCpuState> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).unwrap();
    let per_cpu: Vec<EventCpuState> = state
        .get(&0, 0)
        .unwrap()
        .iter()
        .map(|cpu| EventCpuState {
            lost: cpu.lost + each,
            ..*cpu
        })
        .collect();
    let cpus = per_cpu.len() as u64;
    state
        .set(0, PerCpuValues::try_from(per_cpu).unwrap(), 0)
        .unwrap();
    each * cpus
}

/// Losses are reported from the kernel's count, once a second at most, as one record with the
/// total: records lost while no controller ran are reported by the next one, and a burst is
/// one record, not one per gap (before, only gaps were reported, each as its own record, and
/// a loss with no later record to show a gap was never reported).
#[root_test]
fn lost_records_are_reported_in_one_record_a_second_also_while_no_controller_ran_as_root() {
    let topology = Topology::build(&["frontend", "api"]).unwrap();
    let policy = services(&topology, &["frontend", "api"]);
    let mut first = enforce(&topology, &policy);
    first
        .daemon
        .signal(nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    first.daemon.wait(SETTLE).unwrap();
    let pins = first.pins.clone();
    let while_down = lose_records(&pins, 5);
    let second =
        Enforcer::start_with_policy_path(&topology, &first.policy, &["v-frontend", "v-api"], &[])
            .unwrap();
    let is_loss = |alert: &Value| alert["class_uid"] == 1008;
    let reported = second
        .wait_for_alert(is_loss)
        .expect("the loss while no controller ran is reported");
    assert_eq!(reported["count"], while_down);

    let started = Instant::now();
    let burst: u64 = (0..50).map(|_| lose_records(&pins, 1)).sum();
    let total = |alerts: &[Value]| -> u64 {
        alerts
            .iter()
            .filter(|alert| is_loss(alert))
            .filter_map(|alert| alert["count"].as_u64())
            .sum()
    };
    assert!(
        enforcer_testbed::eventually(SETTLE, || total(&second.alerts()) == while_down + burst),
        "the burst is reported, once: {:?}",
        second
            .alerts()
            .iter()
            .filter(|alert| is_loss(alert))
            .collect::<Vec<_>>()
    );
    let records = second
        .alerts()
        .iter()
        .filter(|alert| is_loss(alert))
        .count();
    let seconds = started.elapsed().as_secs() as usize + 1;
    assert!(
        records - 1 <= seconds,
        "{records} loss records for 50 losses over {seconds} s: one a second at most"
    );
    drop(second);
    drop(first);
}
