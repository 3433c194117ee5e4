//! A fleet on one machine (DESIGN §12): simulated hosts (each a [`Topology`]) joined by an
//! underlay bridge in a namespace of its own, routes between their endpoint subnets, and a
//! real three-member etcd cluster from the Debian package, listening only on the underlay.

use std::{
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{Daemon, Netns, Topology, netns::command_in, unique_id};

/// The underlay: a bridge the hosts' uplinks join, 10.250.0.0/24, the bridge at .1.
pub struct Underlay {
    pub netns: Netns,
}

/// The underlay bridge's address, where the etcd members listen.
pub const UNDERLAY_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);

impl Underlay {
    pub fn create() -> io::Result<Self> {
        let netns = Netns::create(&format!("{}-underlay", unique_id()))?;
        netns.ip(&["link", "add", "br0", "type", "bridge"])?;
        netns.ip(&[
            "addr",
            "add",
            &format!("{UNDERLAY_GATEWAY}/24"),
            "dev",
            "br0",
        ])?;
        netns.ip(&["link", "set", "br0", "up"])?;
        Ok(Self { netns })
    }

    /// Joins `hosts` to the underlay, host `n` (from 1) at 10.250.0.(10 + n), and routes each
    /// host's traffic for the others' endpoints through their uplinks. Host `n`'s endpoints
    /// are on 10.200.(16n).0/20: [`Topology::add_endpoint`] subnets 16n to 16n + 15.
    pub fn connect(&self, hosts: &[&Topology]) -> io::Result<()> {
        for (index, host) in hosts.iter().enumerate() {
            self.join(host, index as u8 + 1)?;
        }
        for (index, host) in hosts.iter().enumerate() {
            route_to_others(host, index as u8 + 1, hosts.len() as u8)?;
        }
        Ok(())
    }

    fn join(&self, host: &Topology, number: u8) -> io::Result<()> {
        let port = format!("up-{number}");
        self.netns.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "uplink",
            "netns",
            &host.host.name,
        ])?;
        self.netns.ip(&["link", "set", &port, "master", "br0"])?;
        self.netns.ip(&["link", "set", &port, "up"])?;
        host.host.ip(&[
            "addr",
            "add",
            &format!("{}/24", uplink_address(number)),
            "dev",
            "uplink",
        ])?;
        host.host.ip(&["link", "set", "uplink", "up"])
    }
}

/// Host `number`'s address on the underlay.
fn uplink_address(number: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 250, 0, 10 + number)
}

/// Routes host `number`'s traffic for the endpoints of the other hosts (1 to `hosts`) through
/// their uplinks; also after its uplink went down, which took the routes with it.
pub fn route_to_others(host: &Topology, number: u8, hosts: u8) -> io::Result<()> {
    for other in (1..=hosts).filter(|other| *other != number) {
        host.host.ip(&[
            "route",
            "add",
            &format!("10.200.{}.0/20", 16 * u16::from(other)),
            "via",
            &uplink_address(other).to_string(),
        ])?;
    }
    Ok(())
}

/// One member's command line.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
}

/// A three-member etcd cluster in the underlay namespace. Members are killed on drop.
pub struct EtcdCluster {
    netns_name: String,
    dir: PathBuf,
    members: Vec<Member>,
    running: Vec<Option<Daemon>>,
}

impl EtcdCluster {
    /// Starts three members (client ports 2379, 12379, 22379) and waits until all serve.
    pub fn start(underlay: &Underlay, dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let members: Vec<Member> = (0..3)
            .map(|index| Member {
                name: format!("m{index}"),
                client_port: 2379 + 10000 * index as u16,
                peer_port: 2380 + 10000 * index as u16,
            })
            .collect();
        let mut cluster = Self {
            netns_name: underlay.netns.name.clone(),
            dir: dir.to_owned(),
            members,
            running: Vec::new(),
        };
        let daemons = (0..3)
            .map(|index| cluster.spawn(index))
            .collect::<io::Result<Vec<_>>>()?;
        for daemon in &daemons {
            daemon.wait_for_log("ready to serve client requests", Duration::from_secs(30))?;
        }
        cluster.running = daemons.into_iter().map(Some).collect();
        Ok(cluster)
    }

    fn spawn(&self, index: usize) -> io::Result<Daemon> {
        let member = &self.members[index];
        let url = |port: u16| format!("http://{UNDERLAY_GATEWAY}:{port}");
        let initial_cluster: Vec<String> = self
            .members
            .iter()
            .map(|member| format!("{}={}", member.name, url(member.peer_port)))
            .collect();
        let mut command = command_in(&self.netns_name, "etcd")?;
        command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(self.dir.join(&member.name))
            .args(["--listen-client-urls", &url(member.client_port)])
            .args(["--advertise-client-urls", &url(member.client_port)])
            .args(["--listen-peer-urls", &url(member.peer_port)])
            .args(["--initial-advertise-peer-urls", &url(member.peer_port)])
            .args(["--initial-cluster", &initial_cluster.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "enforcer-test"]);
        Daemon::spawn(
            command,
            self.dir.join(format!("{}.log", member.name)),
            "",
            Duration::from_secs(1),
        )
    }

    /// The client URLs, comma-separated, as `--kvstore` takes them.
    pub fn client_urls(&self) -> String {
        self.members
            .iter()
            .map(|member| format!("http://{UNDERLAY_GATEWAY}:{}", member.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kills member `index` (its data stays).
    pub fn stop(&mut self, index: usize) {
        self.running[index] = None;
    }

    /// Starts the stopped members again on their data; waits until they serve (a member
    /// serves only once a quorum is up, so they are started together).
    pub fn restart_stopped(&mut self) -> io::Result<()> {
        let stopped: Vec<usize> = (0..self.members.len())
            .filter(|index| self.running[*index].is_none())
            .collect();
        for index in &stopped {
            self.running[*index] = Some(self.spawn(*index)?);
        }
        for index in stopped {
            if let Some(daemon) = &self.running[index] {
                daemon.wait_for_log("ready to serve client requests", Duration::from_secs(30))?;
            }
        }
        Ok(())
    }

    /// `etcdctl ARGS...` against the cluster, from the underlay namespace.
    pub fn etcdctl(&self, args: &[&str]) -> io::Result<std::process::Output> {
        let mut command = command_in(&self.netns_name, "etcdctl")?;
        command
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.client_urls())
            .args(args);
        command.output()
    }
}

/// A one-member etcd in `netns` serving TLS on https://127.0.0.1:2379 with `ca`'s server
/// certificate, and requiring client certificates `ca` signed.
pub fn start_tls_member(netns: &Netns, dir: &Path, ca: &crate::TestCa) -> io::Result<Daemon> {
    std::fs::create_dir_all(dir)?;
    let (certificate, key) = ca.server();
    let mut command = netns.command("etcd")?;
    command
        .args(["--name", "tls"])
        .arg("--data-dir")
        .arg(dir.join("tls"))
        .args(["--listen-client-urls", "https://127.0.0.1:2379"])
        .args(["--advertise-client-urls", "https://127.0.0.1:2379"])
        .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
        .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
        .args(["--initial-cluster", "tls=http://127.0.0.1:2380"])
        .arg("--cert-file")
        .arg(certificate)
        .arg("--key-file")
        .arg(key)
        .arg("--trusted-ca-file")
        .arg(ca.ca())
        .arg("--client-cert-auth");
    Daemon::spawn(
        command,
        dir.join("tls.log"),
        "ready to serve client requests",
        Duration::from_secs(30),
    )
}
