//! A simulated host and its endpoints, each in a namespace behind a veth.

use std::{
    ffi::OsStr,
    fs::{self},
    io,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use crate::{BPFFS, Daemon, Netns, sweep_stale, unique_id};

/// An endpoint namespace behind a veth whose other end is on the simulated host.
pub struct Endpoint {
    pub name: String,
    pub netns: Netns,
    /// Name of the veth end on the host (the interface to attach enforcer to).
    pub host_interface: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The host's address on this endpoint's link (the endpoint's gateway).
    pub gateway_v4: Ipv4Addr,
    pub gateway_v6: Ipv6Addr,
}

/// A simulated host with endpoint namespaces routed through it.
pub struct Topology {
    pub id: String,
    // Endpoints are declared before `host`: they are dropped first.
    pub endpoints: Vec<Endpoint>,
    pub host: Netns,
    pub dir: PathBuf,
}

impl Topology {
    /// Builds a host and one endpoint per name. Endpoint `i` (from 1) gets 10.200.i.2/24 and
    /// fd00:200:i::2/64, its host-side interface `v-<name>` gets .1 / ::1.
    pub fn build(endpoints: &[&str]) -> io::Result<Self> {
        sweep_stale();
        let id = unique_id();
        let dir = std::env::temp_dir().join(&id);
        fs::create_dir_all(&dir)?;
        let host = Netns::create(&format!("{id}-host"))?;
        host.sysctl("net.ipv4.ip_forward", "1")?;
        host.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let mut topology = Self {
            id: id.clone(),
            endpoints: Vec::new(),
            host,
            dir,
        };
        for (index, name) in endpoints.iter().enumerate() {
            topology.add_endpoint(name, index as u8 + 1)?;
        }
        Ok(topology)
    }

    /// Adds an endpoint `name` on subnet 10.200.`subnet`.0/24 (see [`Self::build`]).
    pub fn add_endpoint(&mut self, name: &str, subnet: u8) -> io::Result<()> {
        let netns = Netns::create(&format!("{}-{name}", self.id))?;
        let host_interface: String = format!("v-{name}").chars().take(15).collect();
        let endpoint = Endpoint {
            name: name.to_owned(),
            netns,
            host_interface,
            ipv4: Ipv4Addr::new(10, 200, subnet, 2),
            ipv6: format!("fd00:200:{subnet}::2").parse().expect("valid"),
            gateway_v4: Ipv4Addr::new(10, 200, subnet, 1),
            gateway_v6: format!("fd00:200:{subnet}::1").parse().expect("valid"),
        };
        self.connect(&endpoint)?;
        self.endpoints.push(endpoint);
        Ok(())
    }

    /// Creates the endpoint's veth pair and configures both ends, as a container runtime does:
    /// addresses, up, default routes.
    fn connect(&self, endpoint: &Endpoint) -> io::Result<()> {
        let host_interface = endpoint.host_interface.as_str();
        // Created inside the host namespace with its peer straight into the endpoint's, so the
        // name never exists in the machine's own namespace.
        self.host.ip(&[
            "link",
            "add",
            host_interface,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &endpoint.netns.name,
        ])?;
        let (gateway_v4, gateway_v6) = (endpoint.gateway_v4, endpoint.gateway_v6);
        self.host.ip(&[
            "addr",
            "add",
            &format!("{gateway_v4}/24"),
            "dev",
            host_interface,
        ])?;
        self.host.ip(&[
            "addr",
            "add",
            &format!("{gateway_v6}/64"),
            "dev",
            host_interface,
            "nodad",
        ])?;
        self.host.ip(&["link", "set", host_interface, "up"])?;
        let netns = &endpoint.netns;
        netns.ip(&[
            "addr",
            "add",
            &format!("{}/24", endpoint.ipv4),
            "dev",
            "eth0",
        ])?;
        netns.ip(&[
            "addr",
            "add",
            &format!("{}/64", endpoint.ipv6),
            "dev",
            "eth0",
            "nodad",
        ])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["route", "add", "default", "via", &gateway_v4.to_string()])?;
        netns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &gateway_v6.to_string(),
        ])
    }

    /// Deletes the endpoint's veth pair (both ends go), as a container runtime does when a
    /// container stops.
    pub fn disconnect(&self, name: &str) -> io::Result<()> {
        self.host
            .ip(&["link", "del", &self.endpoint(name).host_interface])
    }

    /// Creates the endpoint's veth pair again, under the same names and addresses, as a
    /// container runtime does when a container restarts.
    pub fn reconnect(&self, name: &str) -> io::Result<()> {
        self.connect(self.endpoint(name))
    }

    pub fn endpoint(&self, name: &str) -> &Endpoint {
        self.endpoints
            .iter()
            .find(|endpoint| endpoint.name == name)
            .unwrap_or_else(|| panic!("no endpoint {name}"))
    }

    /// The named endpoint's namespace, where its servers listen and its clients run.
    pub fn netns(&self, name: &str) -> &Netns {
        &self.endpoint(name).netns
    }

    /// A pin directory for this topology's enforcer (removed on drop).
    pub fn pin_path(&self) -> PathBuf {
        Path::new(BPFFS).join(&self.id)
    }

    /// Starts `enforcer run` in the host namespace, pinning under [`Self::pin_path`], with its
    /// observe socket and its log (`log`) in the topology's directory and `args` after those
    /// (the policy, interfaces...); returns once it enforces. Dropping it stops and unloads it.
    pub fn run_enforcer(&self, enforcer: &Path, args: &[&OsStr], log: &str) -> io::Result<Daemon> {
        let pins = self.pin_path();
        let mut command = self.host.command(enforcer)?;
        command
            .arg("run")
            .arg("--pin-path")
            .arg(&pins)
            .arg("--observe-socket")
            .arg(self.dir.join("observe.sock"))
            .args(args)
            .env("RUST_LOG", "info");
        Daemon::spawn_enforcer(
            command,
            enforcer,
            &pins,
            self.dir.join(log),
            Duration::from_secs(60),
        )
    }

    /// Runs a one-shot iperf3 server in endpoint `server` and a client in endpoint `client`
    /// against its IPv4 address, with `args` (duration, UDP, ...); returns the client's JSON
    /// report.
    pub fn iperf3(&self, client: &str, server: &str, args: &[&str]) -> io::Result<Vec<u8>> {
        let mut listener = self
            .netns(server)
            .command("iperf3")?
            .args(["-s", "-1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(300));
        let output = self
            .netns(client)
            .command("iperf3")?
            .args(["-c", &self.endpoint(server).ipv4.to_string(), "-J"])
            .args(args)
            .output();
        let _ = listener.kill();
        let _ = listener.wait();
        Ok(output?.stdout)
    }

    /// Writes a file into the topology's temp directory.
    pub fn write_file(&self, name: &str, contents: &str) -> io::Result<PathBuf> {
        let path = self.dir.join(name);
        fs::write(&path, contents)?;
        Ok(path)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.endpoints.clear();
        let pins = self.pin_path();
        if pins.exists()
            && let Err(error) = fs::remove_dir_all(&pins)
        {
            eprintln!("testbed: could not remove {}: {error}", pins.display());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
