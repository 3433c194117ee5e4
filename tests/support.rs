//! Helpers shared by the integration tests: starting `enforcer` inside a test topology and
//! reading what it reports.
#![allow(dead_code)]

use std::{
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

pub use enforcer_testbed::{Daemon, Topology, assert_conform, root_test};
use serde_json::Value;

pub const ENFORCER: &str = env!("CARGO_BIN_EXE_enforcer");
/// How long a client waits before calling a connection refused (dropped packets time out).
pub const TIMEOUT: Duration = Duration::from_millis(1500);
/// How long the controller gets to start, reload, or report.
pub const SETTLE: Duration = Duration::from_secs(20);

/// A running `enforcer run` in a topology's host namespace. Dropping it kills the controller
/// and unloads what it pinned.
pub struct Enforcer {
    pub daemon: Daemon,
    pub alerts: PathBuf,
    /// Every test controller keeps an audit log, as a production one would.
    pub audit_log: PathBuf,
    pub policy: PathBuf,
    pub pins: PathBuf,
    pub observe_socket: PathBuf,
}

impl Enforcer {
    /// Starts enforcer with `policy` (TOML text), attached to `attach`, plus `extra` arguments.
    pub fn start(
        topology: &Topology,
        policy: &str,
        attach: &[&str],
        extra: &[&str],
    ) -> io::Result<Self> {
        let policy_path = topology.write_file("policy.toml", policy)?;
        Self::start_with_policy_path(topology, &policy_path, attach, extra)
    }

    pub fn start_with_policy_path(
        topology: &Topology,
        policy: &Path,
        attach: &[&str],
        extra: &[&str],
    ) -> io::Result<Self> {
        Self::start_with_audit_log(topology, policy, attach, extra, None)
    }

    /// [`Enforcer::start_with_policy_path`] keeping its audit log at `audit_log` (else in the
    /// topology's directory).
    pub fn start_with_audit_log(
        topology: &Topology,
        policy: &Path,
        attach: &[&str],
        extra: &[&str],
        audit_log: Option<&Path>,
    ) -> io::Result<Self> {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let alerts = topology.dir.join(format!("alerts-{started}.jsonl"));
        let audit_log = audit_log.map_or_else(
            || topology.dir.join(format!("audit-{started}.jsonl")),
            Path::to_owned,
        );
        let pins = topology.pin_path();
        let observe_socket = topology.dir.join(format!("observe-{started}.sock"));
        let mut command = topology.host.command(ENFORCER)?;
        command
            .arg("run")
            .arg("--policy")
            .arg(policy)
            .arg("--pin-path")
            .arg(&pins)
            .arg("--alerts")
            .arg(&alerts)
            .arg("--audit-log")
            .arg(&audit_log)
            .arg("--observe-socket")
            .arg(&observe_socket);
        for interface in attach {
            command.args(["--attach", interface]);
        }
        command.args(extra).env("RUST_LOG", "info");
        let log = topology.dir.join(format!("enforcer-{started}.log"));
        let daemon = Daemon::spawn_enforcer(command, ENFORCER.as_ref(), &pins, log, SETTLE)?;
        Ok(Self {
            daemon,
            alerts,
            audit_log,
            policy: policy.to_owned(),
            pins,
            observe_socket,
        })
    }

    /// Every alert written so far.
    pub fn alerts(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.alerts)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Waits for an alert matching `predicate`.
    pub fn wait_for_alert(&self, predicate: impl Fn(&Value) -> bool) -> Option<Value> {
        let mut found = None;
        enforcer_testbed::eventually(SETTLE, || {
            found = self.alerts().into_iter().find(|alert| predicate(alert));
            found.is_some()
        });
        found
    }

    /// Runs an `enforcer` subcommand against this instance's pins, in the host namespace.
    pub fn command(&self, topology: &Topology, args: &[&str]) -> Output {
        let mut command = topology.host.command(ENFORCER).expect("host namespace");
        command.args(args).arg("--pin-path").arg(&self.pins);
        command.output().expect("enforcer runs")
    }

    /// `enforcer endpoint ARGS...`, talking to this controller.
    pub fn endpoint_command(&self, topology: &Topology, args: &[&str]) -> Output {
        let mut command = topology.host.command(ENFORCER).expect("host namespace");
        command
            .arg("endpoint")
            .args(args)
            .arg("--socket")
            .arg(&self.observe_socket);
        command.output().expect("enforcer runs")
    }

    /// What `status` says of `interface` in its `interfaces:` list (`enforced`, `missing`,
    /// `defunct`), or `None` if it does not list it.
    pub fn interface_state(&self, topology: &Topology, interface: &str) -> Option<String> {
        let output = self.command(topology, &["status"]);
        let report = String::from_utf8_lossy(&output.stdout).into_owned();
        let listed = report.split("\ninterfaces:\n").nth(1)?;
        listed
            .lines()
            .take_while(|line| line.starts_with("  "))
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                (fields.next() == Some(interface)).then(|| fields.next().unwrap_or("").to_owned())
            })
    }
}

/// Every record a test's controller wrote must conform to the schema of its format: checked
/// when the test is done with it (not while a failed test unwinds, which would abort).
impl Drop for Enforcer {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            // Stopped first, so that the controller has written and closed the file.
            let _ = self.daemon.signal(nix::sys::signal::Signal::SIGTERM);
            let _ = self.daemon.wait(SETTLE);
            assert_conform(&self.alerts);
        }
    }
}

/// Raises its flag when dropped, also while a failed assertion unwinds: loops on other threads
/// of a `std::thread::scope` that run until the flag is up then end, and the test fails rather
/// than waiting for them forever.
pub struct RaiseOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for RaiseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A flow alert's endpoints and port, for matching.
pub fn is_flow(alert: &Value, from: &str, to: &str, port: u16) -> bool {
    alert["src_endpoint"]["svc_name"] == from
        && alert["dst_endpoint"]["svc_name"] == to
        && alert["dst_endpoint"]["port"] == port
}

pub fn socket(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// The named endpoint's IPv4 address with `port`.
pub fn v4(topology: &Topology, name: &str, port: u16) -> SocketAddr {
    socket(topology.endpoint(name).ipv4, port)
}

/// The named endpoint's IPv6 address with `port`.
pub fn v6(topology: &Topology, name: &str, port: u16) -> SocketAddr {
    socket(topology.endpoint(name).ipv6, port)
}

/// Whether a connection attempt failed the way a dropped SYN fails (no answer at all), as
/// opposed to a closed port (RST) or an unreachable route.
pub fn was_dropped(result: &io::Result<impl std::fmt::Debug>) -> bool {
    matches!(result, Err(error) if matches!(error.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock))
}

/// A `[[service]]` block for a topology endpoint: its interface and both its addresses.
pub fn service(topology: &Topology, name: &str, extra: &str) -> String {
    let endpoint = topology.endpoint(name);
    format!(
        "[[service]]\nname = \"{name}\"\ninterfaces = [\"{}\"]\naddresses = [\"{}/32\", \"{}/128\"]\n{extra}\n",
        endpoint.host_interface, endpoint.ipv4, endpoint.ipv6
    )
}

/// The `[[service]]` declarations of the named endpoints, each by its interface and addresses.
pub fn services(topology: &Topology, names: &[&str]) -> String {
    names
        .iter()
        .map(|name| service(topology, name, ""))
        .collect()
}

/// An `[[allow]]` rule from `from` to `to` on `ports`, followed by `more` (lines such as an
/// `id` or a `max_new_per_sec`).
pub fn allow(from: &str, to: &str, ports: &[&str], more: &str) -> String {
    rule("allow", from, to, ports, more)
}

/// A `[[deny]]` rule, written like [`allow`].
pub fn deny(from: &str, to: &str, ports: &[&str], more: &str) -> String {
    rule("deny", from, to, ports, more)
}

fn rule(kind: &str, from: &str, to: &str, ports: &[&str], more: &str) -> String {
    let ports: Vec<String> = ports.iter().map(|port| format!("\"{port}\"")).collect();
    format!(
        "[[{kind}]]\nfrom = \"{from}\"\nto = \"{to}\"\nports = [{}]\n{more}\n",
        ports.join(", ")
    )
}

/// The test bed most tests need: a frontend and an api endpoint, declared as services by their
/// interfaces and addresses, then `rules`, enforced on both interfaces with `extra` arguments.
/// Bind the pair as `let (topology, enforcer)`: the enforcer then goes first on drop.
pub fn frontend_and_api(rules: &str, extra: &[&str]) -> (Topology, Enforcer) {
    let topology = Topology::build(&["frontend", "api"]).expect("topology");
    let policy = format!("{}{rules}", services(&topology, &["frontend", "api"]));
    let enforcer = enforce_with(&topology, &policy, extra);
    (topology, enforcer)
}

/// Starts enforcer on every endpoint interface of `topology` with `policy`.
pub fn enforce(topology: &Topology, policy: &str) -> Enforcer {
    enforce_with(topology, policy, &[])
}

/// [`enforce`] with extra `enforcer run` arguments.
pub fn enforce_with(topology: &Topology, policy: &str, extra: &[&str]) -> Enforcer {
    let interfaces: Vec<&str> = topology
        .endpoints
        .iter()
        .map(|endpoint| endpoint.host_interface.as_str())
        .collect();
    Enforcer::start(topology, policy, &interfaces, extra).expect("enforcer starts")
}

impl Enforcer {
    /// Replaces the policy file and reloads with SIGHUP; waits until generation `generation`
    /// is installed.
    pub fn reload(&self, policy: &str, generation: u32) {
        std::fs::write(&self.policy, policy).expect("policy written");
        self.daemon
            .signal(nix::sys::signal::Signal::SIGHUP)
            .expect("SIGHUP");
        self.daemon
            .wait_for_log(&format!("generation={generation} "), SETTLE)
            .expect("reloaded");
    }
}

/// Fetches `http://127.0.0.1:{port}{path}` from inside `netns`; returns the body.
pub fn http_get(netns: &enforcer_testbed::Netns, port: u16, path: &str) -> io::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = netns.tcp_connect(socket(std::net::Ipv4Addr::LOCALHOST, port), TIMEOUT)?;
    stream.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other("no HTTP body"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(io::Error::other(format!("HTTP error: {head}")));
    }
    Ok(body.to_owned())
}

/// A container made the way a runtime makes it: Debian's reference `bridge` plugin (with
/// `host-local` addresses) creates its interface, then `enforcer-cni` — the enforcer binary
/// under that name, chained after them — registers it. Each plugin is invoked as a runtime
/// invokes it: the CNI environment, the configuration on stdin with the previous plugin's
/// result as `prevResult`, a real network namespace.
pub struct Runtime<'a> {
    topology: &'a Topology,
    bin: std::path::PathBuf,
    pub container: enforcer_testbed::Netns,
    ipam_dir: std::path::PathBuf,
    subnet: String,
}

impl<'a> Runtime<'a> {
    /// A runtime on `topology`'s host whose bridge network hands out addresses of `subnet`.
    pub fn new(topology: &'a Topology, subnet: &str) -> Self {
        let bin = topology.dir.join("cni-bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(ENFORCER, bin.join("enforcer-cni")).unwrap();
        let container =
            enforcer_testbed::Netns::create(&format!("{}-container", topology.id)).unwrap();
        Self {
            topology,
            bin,
            container,
            ipam_dir: topology.dir.join("ipam"),
            subnet: subnet.to_owned(),
        }
    }

    pub fn bridge_config(&self) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": "1.0.0", "name": "shop", "type": "bridge", "bridge": "cni-shop",
            "isGateway": true, "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": self.subnet }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": self.ipam_dir,
            }
        })
    }

    pub fn enforcer_config(
        &self,
        service: &str,
        socket: &std::path::Path,
        prev_result: Option<&serde_json::Value>,
    ) -> serde_json::Value {
        let mut config = serde_json::json!({
            "cniVersion": "1.0.0", "name": "shop", "type": "enforcer-cni",
            "service": service, "socket": socket,
        });
        if let Some(prev_result) = prev_result {
            config["prevResult"] = prev_result.clone();
        }
        config
    }

    /// Runs plugin `plugin` for `command`; returns whether it succeeded and what it printed.
    pub fn invoke(
        &self,
        plugin: &str,
        command: &str,
        config: &serde_json::Value,
    ) -> (bool, serde_json::Value) {
        use std::io::Write as _;
        let path = if plugin == "enforcer-cni" {
            self.bin.join(plugin)
        } else {
            std::path::Path::new("/usr/lib/cni").join(plugin)
        };
        let mut child = self
            .topology
            .host
            .command(&path)
            .unwrap()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", "c0ffee")
            .env("CNI_NETNS", format!("/run/netns/{}", self.container.name))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", format!("/usr/lib/cni:{}", self.bin.display()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(config.to_string().as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        let printed = serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
        (output.status.success(), printed)
    }
}
