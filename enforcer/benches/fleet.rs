//! The fleet (DESIGN §12) on three simulated hosts sharing a three-member etcd cluster: how
//! long an endpoint registered on one host takes to be enforced on the others (p50/p99 over
//! 100 registrations), how long a `fleet push` takes to be enforced on every host, and what
//! applying 10 000 remote endpoint changes costs a controller (CPU time and wall time).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use enforcer_testbed::{
    Daemon, Topology,
    fleet::{EtcdCluster, Underlay},
    results,
};

const ENFORCER: &str = env!("CARGO_BIN_EXE_enforcer");
/// Endpoint adds timed one by one, and remote endpoint changes applied in bulk (`--quick`: 20
/// and 2 000).
fn sizes() -> (usize, usize) {
    if results::quick() {
        (20, 2_000)
    } else {
        (100, 10_000)
    }
}
const POLICY: &str = "[[service]]\nname = \"api\"\n\n[[service]]\nname = \"db\"\n\n\
    [[allow]]\nfrom = \"api\"\nto = \"db\"\nports = [\"5432/tcp\"]\n";

/// A simulated host and its controller. The controller is declared first, so that it is
/// stopped and unloaded before the host's namespace and pin directory go.
struct Host {
    daemon: Daemon,
    topology: Topology,
    socket: std::path::PathBuf,
}

impl Host {
    fn log_count(&self, text: &str) -> usize {
        self.daemon.log_text().matches(text).count()
    }

    /// The controller's CPU time so far (user + system).
    fn cpu(&self) -> Duration {
        let stat = self
            .daemon
            .pid()
            .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
            .unwrap_or_default();
        // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let ticks = |index: usize| {
            fields
                .get(index)
                .and_then(|field| field.parse::<u64>().ok())
        };
        let total = ticks(11).unwrap_or(0) + ticks(12).unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_secs_f64(total as f64 / per_second as f64)
    }

    /// IPCACHE entries, as `status` reports them.
    fn ipcache_entries(&self) -> usize {
        let output = self
            .topology
            .host
            .command(ENFORCER)
            .unwrap()
            .args(["status", "--pin-path"])
            .arg(self.topology.pin_path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .find(|line| line.trim_start().starts_with("IPCACHE"))
            .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    }
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * fraction).round() as usize]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the fleet benchmark runs enforcer and etcd: run it as root (cargo xtask bench)");
        std::process::exit(1);
    }
    let underlay = Underlay::create().expect("underlay");
    let topologies: Vec<Topology> = (0..3).map(|_| Topology::build(&[]).unwrap()).collect();
    underlay
        .connect(&topologies.iter().collect::<Vec<_>>())
        .unwrap();
    let etcd = EtcdCluster::start(&underlay, &topologies[0].dir.join("etcd")).expect("etcd");
    let urls = etcd.client_urls();
    let policy = topologies[0].write_file("fleet.toml", POLICY).unwrap();
    let push = |from: &Topology, file: &Path| {
        let pushed = from
            .host
            .command(ENFORCER)
            .unwrap()
            .args(["fleet", "push"])
            .arg(file)
            .args(["--kvstore", &urls])
            .output()
            .unwrap();
        assert!(pushed.status.success(), "{pushed:?}");
    };
    push(&topologies[0], &policy);
    let hosts: Vec<Host> = topologies
        .into_iter()
        .enumerate()
        .map(|(index, topology)| {
            let socket = topology.dir.join("controller.sock");
            let mut command = topology.host.command(ENFORCER).unwrap();
            command
                .args(["run", "--policy", "etcd:", "--kvstore", &urls])
                .args(["--node", &format!("host-{index}")])
                .arg("--pin-path")
                .arg(topology.pin_path())
                .arg("--observe-socket")
                .arg(&socket)
                .env("RUST_LOG", "info");
            let daemon = Daemon::spawn_enforcer(
                command,
                ENFORCER.as_ref(),
                &topology.pin_path(),
                topology.dir.join("enforcer.log"),
                Duration::from_secs(60),
            )
            .expect("enforcer starts");
            Host {
                topology,
                daemon,
                socket,
            }
        })
        .collect();

    // Endpoint add on host 0 -> enforced on hosts 1 and 2.
    let origin = &hosts[0];
    let mut latencies = Vec::new();
    let (adds, remote_changes) = sizes();
    for index in 0..adds {
        let interface = format!("bench{index}");
        origin
            .topology
            .host
            .ip(&[
                "link",
                "add",
                &interface,
                "type",
                "veth",
                "peer",
                "name",
                &format!("{interface}p"),
            ])
            .unwrap();
        let before: Vec<usize> = hosts[1..]
            .iter()
            .map(|host| host.log_count("trigger=\"fleet\""))
            .collect();
        let started = Instant::now();
        let added = origin
            .topology
            .host
            .command(ENFORCER)
            .unwrap()
            .args([
                "endpoint",
                "add",
                "--service",
                "api",
                "--interface",
                &interface,
            ])
            .args([
                "--address",
                &format!("10.200.{}.{}", 16 + index / 200, 10 + index % 200),
            ])
            .arg("--socket")
            .arg(&origin.socket)
            .output()
            .unwrap();
        assert!(added.status.success(), "{added:?}");
        wait_until(
            "the add reaches every host",
            Duration::from_secs(30),
            || {
                hosts[1..]
                    .iter()
                    .zip(&before)
                    .all(|(host, before)| host.log_count("trigger=\"fleet\"") > *before)
            },
        );
        latencies.push(started.elapsed());
    }
    latencies.sort();
    println!(
        "fleet: endpoint add on one host -> enforced on the two others ({adds} adds, sequential)"
    );
    println!(
        "  p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().unwrap())
    );
    for (figure, fraction) in [("p50", 0.5), ("p99", 0.99)] {
        results::record(
            "fleet",
            &format!("endpoint add on one host, enforced on the others, {figure}"),
            ms(percentile(&latencies, fraction)),
            "ms",
            None,
        );
    }

    // Policy push -> every host on the new hash.
    let wider = POLICY.replace("\"5432/tcp\"", "\"5432/tcp\", \"6379/tcp\"");
    let wider_file = hosts[0].topology.write_file("wider.toml", &wider).unwrap();
    let new_hash = hex::encode(
        enforcer::policy::parse_sources(vec![(
            enforcer::fleet::policy_source_name(enforcer::fleet::POLICY_KEY),
            wider.clone(),
        )])
        .unwrap()
        .hash,
    );
    let started = Instant::now();
    push(&hosts[0].topology, &wider_file);
    wait_until(
        "every host on the pushed policy",
        Duration::from_secs(30),
        || {
            hosts.iter().all(|host| {
                host.daemon
                    .log_text()
                    .contains(&format!("policy={new_hash}"))
            })
        },
    );
    let pushed = ms(started.elapsed());
    println!(
        "fleet: policy push -> all three hosts on the new hash: {pushed:.1} ms (fleet push's own validation and CAS included)"
    );
    results::record(
        "fleet",
        "policy push, all three hosts on the new hash",
        pushed,
        "ms",
        None,
    );

    // 10 000 remote endpoint changes, as one host sees them.
    let observer = &hosts[2];
    let entries_before = observer.ipcache_entries();
    let cpu_before = observer.cpu();
    let started = Instant::now();
    observer
        .topology
        .host
        .run(|| put_remote_endpoints(&urls, remote_changes))
        .expect("in the observer's namespace");
    let written = started.elapsed();
    wait_until(
        "the remote endpoints in the observer's table",
        Duration::from_secs(300),
        || observer.ipcache_entries() >= entries_before + remote_changes,
    );
    let applied = started.elapsed();
    let cpu = observer.cpu() - cpu_before;
    println!("fleet: {remote_changes} remote endpoint changes, as one controller applies them");
    println!(
        "  written to etcd in {:.2} s; in the kernel's table {:.2} s after the first write; controller CPU {:.2} s ({:.0} us per change)",
        written.as_secs_f64(),
        applied.as_secs_f64(),
        cpu.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / remote_changes as f64
    );
    results::record(
        "fleet",
        &format!("{remote_changes} remote endpoint changes, in the kernel's table"),
        (applied.as_secs_f64() * 1000.0).round(),
        "ms",
        None,
    );
    results::record(
        "fleet",
        "controller CPU per remote endpoint change",
        (cpu.as_secs_f64() * 1e6 / remote_changes as f64).round(),
        "us",
        None,
    );
    drop(hosts);
    drop(etcd);
}

/// Writes `count` endpoint keys of a node "bench-remote" into etcd, 100 puts per
/// transaction (etcd allows 128 operations in one).
fn put_remote_endpoints(urls: &str, count: usize) {
    use etcd_client::{Client, Txn, TxnOp};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let endpoints: Vec<&str> = urls.split(',').collect();
        let mut client = Client::connect(endpoints, None).await.expect("etcd");
        let keys: Vec<(String, String)> = (0..count)
            .map(|index| {
                let address = format!("10.{}.{}.{}", 100 + index / 65536, (index / 256) % 256, index % 256);
                let value = format!(
                    "{{\"service\":\"api\",\"identity\":0,\"addresses\":[\"{address}\"],\"interface\":\"x\"}}"
                );
                (format!("/enforcer/v1/endpoints/bench-remote/{address}"), value)
            })
            .collect();
        for batch in keys.chunks(100) {
            let puts: Vec<TxnOp> = batch
                .iter()
                .map(|(key, value)| TxnOp::put(key.as_str(), value.as_str(), None))
                .collect();
            client.txn(Txn::new().and_then(puts)).await.expect("put");
        }
    });
}
