//! `cargo xtask demo --fleet`: three simulated hosts sharing a three-member etcd cluster. A
//! replica of `api` appears on host A; host C, where `db` runs, lets it in once A has
//! registered it, without anyone editing the policy; `web` on host B stays refused;
//! `fleet status` shows every host on one policy.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use enforcer_testbed::{
    Daemon, Topology,
    fleet::{EtcdCluster, Underlay},
};

use crate::demo::{check_interrupt, footprint_unchanged};

const POLICY: &str = "# The fleet's policy, in etcd: no service lists its members here.\n\
    [[service]]\nname = \"api\"\n\n[[service]]\nname = \"db\"\n\n[[service]]\nname = \"web\"\n\n\
    [[allow]]\nfrom = \"api\"\nto = \"db\"\nports = [\"5432/tcp\"]\nid = \"api-to-db\"\n";
const TIMEOUT: Duration = Duration::from_millis(1500);

pub fn run(enforcer: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    footprint_unchanged(|| show(enforcer))
}

/// `enforcer ARGS` on `host`, its output shown indented; fails if it does.
fn enforcer_on(enforcer: &Path, host: &Topology, args: &[&str]) -> Result<String> {
    let output = host.host.command(enforcer)?.args(args).output()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    for line in text.lines() {
        println!("    {line}");
    }
    if !output.status.success() {
        bail!(
            "enforcer {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(text)
}

fn show(enforcer: &Path) -> Result<()> {
    println!(
        "fleet demo: three hosts (network namespaces) on an underlay bridge, and a three-member etcd cluster"
    );
    let underlay = Underlay::create()?;
    let mut hosts = [
        Topology::build(&[])?,
        Topology::build(&[])?,
        Topology::build(&[])?,
    ];
    hosts[0].add_endpoint("api-1", 16)?;
    hosts[1].add_endpoint("web", 32)?;
    hosts[2].add_endpoint("db", 48)?;
    underlay.connect(&[&hosts[0], &hosts[1], &hosts[2]])?;
    let etcd = EtcdCluster::start(&underlay, &hosts[0].dir.join("etcd")).context("etcd")?;
    let urls = etcd.client_urls();
    check_interrupt()?;

    let policy = hosts[0].write_file("fleet.toml", POLICY)?;
    println!("\n$ enforcer fleet push fleet.toml --kvstore {urls}");
    enforcer_on(
        enforcer,
        &hosts[0],
        &[
            "fleet",
            "push",
            policy.to_str().unwrap_or_default(),
            "--kvstore",
            &urls,
        ],
    )?;
    let names = ["host-a", "host-b", "host-c"];
    let mut daemons = Vec::new();
    for (host, name) in hosts.iter().zip(names) {
        let mut command = host.host.command(enforcer)?;
        command
            .args([
                "run",
                "--ephemeral",
                "--policy",
                "etcd:",
                "--kvstore",
                &urls,
                "--node",
                name,
            ])
            .arg("--pin-path")
            .arg(host.pin_path())
            .arg("--observe-socket")
            .arg(host.dir.join("controller.sock"));
        daemons.push(
            Daemon::spawn_enforcer(
                command,
                enforcer,
                &host.pin_path(),
                host.dir.join("enforcer.log"),
                Duration::from_secs(30),
            )
            .with_context(|| format!("starting enforcer on {name}"))?,
        );
        println!("{name}: enforcer run --policy etcd: --kvstore ... --node {name}");
    }
    check_interrupt()?;

    let register = |index: usize, service: &str, endpoint: &str| -> Result<()> {
        let host = &hosts[index];
        let address = host.endpoint(endpoint).ipv4.to_string();
        let interface = host.endpoint(endpoint).host_interface.clone();
        println!(
            "\n{}$ enforcer endpoint add --service {service} --interface {interface} --address {address}",
            names[index]
        );
        let socket = host.dir.join("controller.sock");
        enforcer_on(
            enforcer,
            host,
            &[
                "endpoint",
                "add",
                "--service",
                service,
                "--interface",
                &interface,
                "--address",
                &address,
                "--socket",
                socket.to_str().unwrap_or_default(),
            ],
        )?;
        Ok(())
    };
    register(2, "db", "db")?;
    let _postgres = hosts[2].netns("db").tcp_echo_server(5432)?;
    let db = SocketAddr::new(hosts[2].endpoint("db").ipv4.into(), 5432);
    let try_within = |host: usize, endpoint: &str, timeout: Duration| {
        hosts[host]
            .netns(endpoint)
            .tcp_exchange(db, b"hello", timeout)
            .is_ok()
    };
    let try_from = |host: usize, endpoint: &str| try_within(host, endpoint, TIMEOUT);
    let say = |who: &str, allowed: bool| {
        println!(
            "  {who} -> db:5432 on host-c: {}",
            if allowed { "ALLOWED" } else { "refused" }
        );
    };
    println!("\nbefore the replica is registered:");
    say(
        "api-1 (host-a, not registered: world)",
        try_from(0, "api-1"),
    );
    say("web (host-b)", try_from(1, "web"));

    let started = Instant::now();
    register(0, "api", "api-1")?;
    let mut allowed = false;
    // Short attempts: a refused SYN is dropped, and TCP would retry it only a second later.
    while !allowed && started.elapsed() < Duration::from_secs(10) {
        allowed = try_within(0, "api-1", Duration::from_millis(50));
    }
    println!(
        "\nafter host-a registered it ({} ms until host-c let it in):",
        started.elapsed().as_millis()
    );
    say("api-1 (host-a, api)", allowed);
    say("web (host-b)", try_from(1, "web"));
    if !allowed || try_from(1, "web") {
        bail!("the fleet did not enforce as the policy says");
    }
    println!("\n$ enforcer fleet status --kvstore {urls}");
    // Every host has written its status once its first generation was in.
    std::thread::sleep(Duration::from_millis(500));
    enforcer_on(
        enforcer,
        &hosts[0],
        &["fleet", "status", "--kvstore", &urls],
    )?;
    println!(
        "\nfleet demo: a replica on one host was known by its identity on another, with no policy edit"
    );
    drop(daemons);
    drop(etcd);
    Ok(())
}
