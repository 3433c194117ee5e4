//! A fleet (issue #14, DESIGN §12): three simulated hosts, each its own `enforcer run` with its
//! own pins, joined by an underlay, sharing a real three-member etcd cluster. Endpoints
//! registered on one host are known by their identity on the others; the policy lives in etcd;
//! etcd failing leaves enforcement as it was, and the fleet converges when it is back.

mod support;

use std::{
    net::SocketAddr,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use enforcer_testbed::fleet::{EtcdCluster, Underlay, route_to_others};
use support::*;

/// How long a change in one host may take to be enforced on the others.
const PROPAGATION: Duration = Duration::from_secs(10);

const POLICY: &str = "[[service]]\nname = \"api\"\n\n[[service]]\nname = \"db\"\n\n\
    [[service]]\nname = \"web\"\ninterfaces = [\"v-web\"]\naddresses = [\"10.200.32.2/32\"]\n\n\
    [[allow]]\nfrom = \"api\"\nto = \"db\"\nports = [\"5432/tcp\"]\n";

/// The fleet's command line to etcd, for `enforcer fleet ...`.
fn fleet(etcd: &EtcdCluster, topology: &Topology, args: &[&str]) -> std::process::Output {
    topology
        .host
        .command(ENFORCER)
        .unwrap()
        .arg("fleet")
        .args(args)
        .args(["--kvstore", &etcd.client_urls()])
        .output()
        .unwrap()
}

fn metric(topology: &Topology, name: &str) -> Option<String> {
    let metrics = http_get(&topology.host, 9464, "/metrics").ok()?;
    metrics
        .lines()
        .find(|line| line.starts_with(name))
        .map(|line| line.rsplit(' ').next().unwrap_or("").to_owned())
}

#[root_test]
fn three_hosts_share_endpoints_and_policy_through_etcd_and_survive_its_failures_as_root() {
    let underlay = Underlay::create().unwrap();
    let a = Topology::build(&[]).unwrap();
    let mut b = Topology::build(&[]).unwrap();
    let mut c = Topology::build(&[]).unwrap();
    b.add_endpoint("web", 32).unwrap();
    c.add_endpoint("db", 48).unwrap();
    underlay.connect(&[&a, &b, &c]).unwrap();
    let mut etcd = EtcdCluster::start(&underlay, &a.dir.join("etcd")).unwrap();

    // The policy goes to etcd first; every host follows it there.
    let policy_file = a.write_file("fleet.toml", POLICY).unwrap();
    let pushed = fleet(&etcd, &a, &["push", policy_file.to_str().unwrap()]);
    assert!(pushed.status.success(), "{pushed:?}");
    let urls = etcd.client_urls();
    let start = |topology: &Topology, node: &str, attach: &[&str]| {
        Enforcer::start_with_policy_path(
            topology,
            Path::new("etcd:"),
            attach,
            &["--kvstore", &urls, "--node", node, "--metrics", "9464"],
        )
        .unwrap()
    };
    let on_a = start(&a, "host-a", &[]);
    let _on_b = start(&b, "host-b", &["v-web"]);
    let on_c = start(&c, "host-c", &["v-db"]);
    let db = c.endpoint("db").ipv4;
    let registered = on_c.endpoint_command(
        &c,
        &[
            "add",
            "--service",
            "db",
            "--interface",
            "v-db",
            "--address",
            &db.to_string(),
        ],
    );
    assert!(registered.status.success(), "{registered:?}");
    let _postgres = c.netns("db").tcp_echo_server(5432).unwrap();
    let _redis = c.netns("db").tcp_echo_server(6379).unwrap();
    let to_db = |port: u16| SocketAddr::new(db.into(), port);

    // A container on host A, made through the CNI chain.
    let runtime = Runtime::new(&a, "10.200.16.0/24");
    let (ok, bridged) = runtime.invoke("bridge", "ADD", &runtime.bridge_config());
    assert!(ok, "{bridged}");
    let reaches = |port: u16| {
        runtime
            .container
            .tcp_exchange(to_db(port), b"hello", TIMEOUT)
            .is_ok()
    };
    assert!(
        !reaches(5432),
        "unregistered, the container is world on host C"
    );
    let cni = runtime.enforcer_config("api", &on_a.observe_socket, Some(&bridged));
    let added_at = Instant::now();
    let (ok, result) = runtime.invoke("enforcer-cni", "ADD", &cni);
    assert!(ok, "{result}");
    assert!(
        enforcer_testbed::eventually(PROPAGATION, || reaches(5432)),
        "registered on A, the container is api on C: it reaches db"
    );
    eprintln!(
        "endpoint add on A enforced on C after {:?}",
        added_at.elapsed()
    );
    assert!(!reaches(6379), "api may reach db on 5432 only");
    let web = b.netns("web");
    assert!(
        web.tcp_exchange(to_db(5432), b"hello", TIMEOUT).is_err(),
        "web (on B) may not reach db"
    );

    // One member down changes nothing.
    etcd.stop(1);
    assert!(reaches(5432) && !reaches(6379));
    // All members down: enforcement as it was, and the hosts say they lost etcd.
    etcd.stop(0);
    etcd.stop(2);
    assert!(
        enforcer_testbed::eventually(PROPAGATION, || metric(&a, "enforcer_kvstore_connected")
            .as_deref()
            == Some("0")),
        "host A says etcd is gone"
    );
    assert!(reaches(5432) && !reaches(6379), "fail static");
    // A change while etcd is away reaches the others once it is back.
    let (ok, deleted) = runtime.invoke("enforcer-cni", "DEL", &cni);
    assert!(ok, "{deleted}");
    etcd.restart_stopped().unwrap();
    assert!(
        enforcer_testbed::eventually(PROPAGATION, || !reaches(5432)),
        "removed on A while etcd was away, the container is refused on C after it is back"
    );
    for host in [&a, &b, &c] {
        assert!(
            enforcer_testbed::eventually(PROPAGATION, || metric(
                host,
                "enforcer_kvstore_connected"
            )
            .as_deref()
                == Some("1")),
            "reconnected"
        );
    }

    // A new policy through `fleet push`: every host on it, and `fleet status` says so.
    let (ok, result) = runtime.invoke("enforcer-cni", "ADD", &cni);
    assert!(ok, "{result}");
    let wider = POLICY.replace("\"5432/tcp\"", "\"5432/tcp\", \"6379/tcp\"");
    let wider_file = a.write_file("wider.toml", &wider).unwrap();
    let pushed = fleet(&etcd, &a, &["push", wider_file.to_str().unwrap()]);
    assert!(pushed.status.success(), "{pushed:?}");
    assert!(
        enforcer_testbed::eventually(PROPAGATION, || reaches(6379)),
        "the pushed policy is enforced"
    );
    let all_on_it = || {
        let status = fleet(&etcd, &a, &["status"]);
        let text = String::from_utf8_lossy(&status.stdout).into_owned();
        (
            status.status.success() && text.matches(" ok\n").count() == 3,
            text,
        )
    };
    assert!(
        enforcer_testbed::eventually(PROPAGATION, || all_on_it().0),
        "fleet status: {}",
        all_on_it().1
    );

    // A controller restart opens no denial between hosts: C's new controller starts from its
    // pinned datapath, its registrations and the fleet view it kept, before etcd answers.
    on_c.daemon
        .signal(nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let killed_c = on_c;
    let stop = AtomicBool::new(false);
    // (It used to: the new controller's session withdrew the host's endpoints from etcd
    // before the controller had said what they were, and the other hosts denied for a second.)
    let (on_c, probes, refused) = std::thread::scope(|scope| {
        let _stop = RaiseOnDrop(&stop);
        let probe = scope.spawn(|| {
            let (mut probes, mut refused) = (0, 0);
            while !stop.load(Ordering::SeqCst) {
                probes += 1;
                if !reaches(5432) {
                    refused += 1;
                }
            }
            (probes, refused)
        });
        let restarted = start(&c, "host-c", &["v-db"]);
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::SeqCst);
        let (probes, refused) = probe.join().unwrap();
        (restarted, probes, refused)
    });
    assert!(probes >= 3, "the probe ran through the restart ({probes})");
    assert_eq!(
        refused, 0,
        "no allowed connection refused while C's controller restarted"
    );
    assert!(on_c.daemon.log_text().contains("adopting the datapath"));

    // A bad policy: refused by `fleet push`, and by every host when written straight in.
    let bad_file = a
        .write_file("bad.toml", "[[allow]]\nfrom = \"nosuch\"\nto = \"db\"\n")
        .unwrap();
    let refused = fleet(&etcd, &a, &["push", bad_file.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let written = etcd
        .etcdctl(&[
            "put",
            "/enforcer/v1/policy",
            "[[allow]]\nfrom = \"nosuch\"\n",
        ])
        .unwrap();
    assert!(written.status.success(), "{written:?}");
    for enforcer in [&on_a, &_on_b, &on_c] {
        enforcer
            .daemon
            .wait_for_log("policy reload refused", PROPAGATION)
            .expect("the host refuses the bad policy");
    }
    assert!(
        reaches(6379) && reaches(5432),
        "the good policy stays in force"
    );
    let status = fleet(&etcd, &a, &["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert_eq!(status.status.code(), Some(1), "{text}");
    assert!(text.contains("is INVALID"), "{text}");
    assert_eq!(
        text.matches(" ok\n").count(),
        3,
        "every host still enforces the last good policy, the same one:\n{text}"
    );

    // A partition longer than etcd keeps history: host A is cut off while C removes db and
    // etcd compacts its history; back, A cannot resume from its revision, lists everything
    // again, and learns that db is gone.
    a.host.ip(&["link", "set", "uplink", "down"]).unwrap();
    assert!(
        enforcer_testbed::eventually(Duration::from_secs(30), || metric(
            &a,
            "enforcer_kvstore_connected"
        )
        .as_deref()
            == Some("0")),
        "host A notices the partition"
    );
    let removed = on_c.endpoint_command(&c, &["del", "--interface", "v-db"]);
    assert!(removed.status.success(), "{removed:?}");
    let revision = etcd.etcdctl(&["get", "/", "-w", "json"]).unwrap();
    let revision: serde_json::Value = serde_json::from_slice(&revision.stdout).unwrap();
    let revision = revision["header"]["revision"].as_i64().unwrap().to_string();
    let compacted = etcd.etcdctl(&["compact", &revision]).unwrap();
    assert!(compacted.status.success(), "{compacted:?}");
    a.host.ip(&["link", "set", "uplink", "up"]).unwrap();
    // (Taking the link down took its routes with it.)
    route_to_others(&a, 1, 3).unwrap();
    assert!(
        enforcer_testbed::eventually(Duration::from_secs(30), || metric(
            &a,
            "enforcer_kvstore_connected"
        )
        .as_deref()
            == Some("1")),
        "host A reconnects"
    );
    assert!(
        enforcer_testbed::eventually(Duration::from_secs(30), || !reaches(5432)),
        "host A learns that db is gone (C no longer enforces db's interface: A must refuse)"
    );
    assert!(
        on_a.daemon.log_text().contains("is compacted"),
        "A listed again because its revision was compacted"
    );
    drop(on_c);
    drop(killed_c);
}

/// etcd over TLS (`--kvstore-ca`, `--kvstore-cert`, `--kvstore-key`): with the CA and a client
/// certificate it signed, the controller connects and publishes its endpoint; a client that
/// trusts another CA, or brings no certificate, gets nothing.
#[root_test]
fn the_fleet_talks_to_etcd_over_mutual_tls_as_root() {
    let topology = Topology::build(&["db"]).unwrap();
    let ca = enforcer_testbed::TestCa::create(&topology.dir, "etcd-ca").unwrap();
    let other = enforcer_testbed::TestCa::create(&topology.dir, "other-ca").unwrap();
    let _etcd =
        enforcer_testbed::fleet::start_tls_member(&topology.host, &topology.dir.join("etcd"), &ca)
            .unwrap();
    let (cert, key) = ca.client();
    let tls_args = |ca_file: &Path| {
        vec![
            "--kvstore".to_owned(),
            "https://127.0.0.1:2379".to_owned(),
            "--kvstore-ca".to_owned(),
            ca_file.display().to_string(),
            "--kvstore-cert".to_owned(),
            cert.display().to_string(),
            "--kvstore-key".to_owned(),
            key.display().to_string(),
        ]
    };
    let mut extra = tls_args(&ca.ca());
    extra.extend(["--node", "tls-host", "--metrics", "9464"].map(str::to_owned));
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let _enforcer = enforce_with(&topology, &services(&topology, &["db"]), &extra);
    assert!(
        enforcer_testbed::eventually(PROPAGATION, || metric(
            &topology,
            "enforcer_kvstore_connected"
        )
        .as_deref()
            == Some("1")),
        "connected over TLS"
    );
    let status = |ca_file: &Path, with_certificate: bool| {
        let mut args = vec!["fleet".to_owned(), "status".to_owned()];
        let mut tls = tls_args(ca_file);
        if !with_certificate {
            tls.truncate(4);
        }
        args.extend(tls);
        topology
            .host
            .command(ENFORCER)
            .unwrap()
            .args(&args)
            .output()
            .unwrap()
    };
    let trusted = status(&ca.ca(), true);
    let text = String::from_utf8_lossy(&trusted.stdout);
    assert!(
        text.contains("tls-host"),
        "the node's status is in etcd: {text} {trusted:?}"
    );
    for (ca_file, with_certificate, what) in [
        (other.ca(), true, "a client trusting another CA"),
        (ca.ca(), false, "a client without a certificate"),
    ] {
        let refused = status(&ca_file, with_certificate);
        assert_eq!(refused.status.code(), Some(2), "{what}: {refused:?}");
        assert!(
            !String::from_utf8_lossy(&refused.stdout).contains("tls-host"),
            "{what}"
        );
    }
}
