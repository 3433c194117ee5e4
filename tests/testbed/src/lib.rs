//! Test topologies in network namespaces, for enforcer's integration tests, demo and benchmarks.
//!
//! A [`Topology`] is one simulated host (a network namespace where enforcer runs and where the
//! host ends of the veths live) and endpoint namespaces, each behind its own veth. Everything is
//! created by the topology and removed when it is dropped, also when a test fails: the endpoint
//! and host namespaces (which takes their veths with them), the pin directory, the temp
//! directory. Names carry the process id, so parallel runs never collide, and a topology left by
//! a killed run is swept by the next one.
//!
//! Sockets are created inside a namespace by a thread that entered it (`setns` is per thread),
//! so listeners and clients are plain std sockets, no external tools.

use std::{
    fs::{self, File},
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Once,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};

pub mod bpf;
pub mod frames;
pub mod policies;

/// Prefix of every namespace, pin directory and temp directory the test bed creates.
pub const PREFIX: &str = "enft";
const NETNS_DIR: &str = "/var/run/netns";
const BPFFS: &str = "/sys/fs/bpf";

/// Whether a root-only test can run. Without root it prints why it skips, except under
/// `CI=true`, where a skip would hide untested kernel behaviour and so fails the test.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|value| value == "true") {
        panic!("{test} needs root (network namespaces, eBPF) and CI=true forbids skipping it");
    }
    eprintln!("skipping {test}: needs root (network namespaces, eBPF)");
    false
}

fn run_checked(command: &mut Command) -> io::Result<Output> {
    let output = command.output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(output)
}

/// `ip` with arguments, failing with its stderr.
pub fn ip(args: &[&str]) -> io::Result<()> {
    run_checked(Command::new("ip").args(args)).map(drop)
}

/// A name no other topology, cgroup or pin directory of any run uses (`enft-<pid>-<n>`).
pub fn unique_id() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{PREFIX}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes namespaces and pins that runs which no longer exist left behind.
fn sweep_stale() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        let dead = |name: &str| -> bool {
            let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else {
                return false;
            };
            let Some(pid) = rest
                .split('-')
                .next()
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                return false;
            };
            pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
        };
        for entry in fs::read_dir(NETNS_DIR).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = ip(&["netns", "delete", &name]);
            }
        }
        for entry in fs::read_dir(BPFFS).into_iter().flatten().flatten() {
            if dead(&entry.file_name().to_string_lossy()) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    });
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> io::Result<Self> {
        ip(&["netns", "add", name])?;
        let netns = Self {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        // Link-local IPv6 addresses are usable at once, not after a second of duplicate
        // address detection (during which neighbour discovery, and so IPv6, stalls).
        for scope in ["all", "default"] {
            netns.sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0")?;
        }
        Ok(netns)
    }

    fn handle(&self) -> io::Result<File> {
        File::open(Path::new(NETNS_DIR).join(&self.name))
    }

    /// `ip -n <this namespace> ...`
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        run_checked(Command::new("ip").arg("-n").arg(&self.name).args(args)).map(drop)
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        run_checked(Command::new("ip").args([
            "netns",
            "exec",
            &self.name,
            "sysctl",
            "-q",
            "-w",
            &format!("{key}={value}"),
        ]))
        .map(drop)
    }

    /// Runs `f` on a thread inside the namespace; sockets it creates belong to the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let handle = self.handle()?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    setns(&handle, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                    Ok(f())
                })
                .join()
                .map_err(|_| io::Error::other("thread in namespace panicked"))?
        })
    }

    /// Spawns a long-lived thread inside the namespace.
    fn spawn_thread(&self, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
        let handle = self.handle()?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let entered = setns(&handle, CloneFlags::CLONE_NEWNET).map_err(io::Error::from);
            let failed = entered.is_err();
            let _ = ready_tx.send(entered);
            if !failed {
                f();
            }
        });
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("namespace thread died"))??;
        Ok(thread)
    }

    /// A command that runs inside the namespace (entered after fork, so `/sys` stays the host's
    /// and bpffs pins are shared, unlike `ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> io::Result<Command> {
        let handle = self.handle()?;
        let mut command = Command::new(program);
        // SAFETY: setns is async-signal-safe; the handle stays open in the parent until spawn.
        unsafe {
            command.pre_exec(move || {
                setns(&handle, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
            });
        }
        Ok(command)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = ip(&["netns", "delete", &self.name]) {
            eprintln!("testbed: could not delete namespace {}: {error}", self.name);
        }
    }
}

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

    fn add_endpoint(&mut self, name: &str, subnet: u8) -> io::Result<()> {
        let netns = Netns::create(&format!("{}-{name}", self.id))?;
        let host_interface: String = format!("v-{name}").chars().take(15).collect();
        // Created inside the host namespace with its peer straight into the endpoint's, so the
        // name never exists in the machine's own namespace.
        self.host.ip(&[
            "link",
            "add",
            &host_interface,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns.name,
        ])?;
        let ipv4 = Ipv4Addr::new(10, 200, subnet, 2);
        let gateway_v4 = Ipv4Addr::new(10, 200, subnet, 1);
        let ipv6: Ipv6Addr = format!("fd00:200:{subnet}::2").parse().expect("valid");
        let gateway_v6: Ipv6Addr = format!("fd00:200:{subnet}::1").parse().expect("valid");
        self.host.ip(&[
            "addr",
            "add",
            &format!("{gateway_v4}/24"),
            "dev",
            &host_interface,
        ])?;
        self.host.ip(&[
            "addr",
            "add",
            &format!("{gateway_v6}/64"),
            "dev",
            &host_interface,
            "nodad",
        ])?;
        self.host.ip(&["link", "set", &host_interface, "up"])?;
        netns.ip(&["addr", "add", &format!("{ipv4}/24"), "dev", "eth0"])?;
        netns.ip(&["addr", "add", &format!("{ipv6}/64"), "dev", "eth0", "nodad"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["route", "add", "default", "via", &gateway_v4.to_string()])?;
        netns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &gateway_v6.to_string(),
        ])?;
        self.endpoints.push(Endpoint {
            name: name.to_owned(),
            netns,
            host_interface,
            ipv4,
            ipv6,
            gateway_v4,
            gateway_v6,
        });
        Ok(())
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

/// What a server thread shares with its [`Server`]: when to stop, and what it counted.
#[derive(Clone, Default)]
struct ServerTally {
    stop: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
}

/// A server thread in a namespace, stopped on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub port: u16,
    /// Connections accepted (TCP) or datagrams received (UDP) so far.
    pub hits: Arc<AtomicUsize>,
    /// Payload bytes received so far.
    pub bytes: Arc<AtomicUsize>,
}

impl Server {
    pub fn hit_count(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn byte_count(&self) -> usize {
        self.bytes.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

const POLL: Duration = Duration::from_millis(20);

impl Netns {
    /// A TCP server on every address (IPv4 and IPv6) that echoes what it receives.
    pub fn tcp_echo_server(&self, port: u16) -> io::Result<Server> {
        let listener = self.run(move || TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)))??;
        listener.set_nonblocking(true)?;
        self.serve(port, move |tally| {
            let mut connections = Vec::new();
            while !tally.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        tally.hits.fetch_add(1, Ordering::SeqCst);
                        let _ = stream.set_nonblocking(false);
                        let tally = tally.clone();
                        connections.push(std::thread::spawn(move || {
                            echo_stream(stream, &tally.stop, &tally.bytes)
                        }));
                    }
                    Err(_) => std::thread::sleep(POLL),
                }
            }
            for connection in connections {
                let _ = connection.join();
            }
        })
    }

    /// A UDP server on every address that echoes each datagram to its sender.
    pub fn udp_echo_server(&self, port: u16) -> io::Result<Server> {
        let socket = self.run(move || UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)))??;
        socket.set_read_timeout(Some(POLL))?;
        self.serve(port, move |tally| {
            let mut buffer = [0u8; 65536];
            while !tally.stop.load(Ordering::Relaxed) {
                if let Ok((len, from)) = socket.recv_from(&mut buffer) {
                    tally.hits.fetch_add(1, Ordering::SeqCst);
                    tally.bytes.fetch_add(len, Ordering::SeqCst);
                    let _ = socket.send_to(&buffer[..len], from);
                }
            }
        })
    }

    /// Runs `serve` on a thread in this namespace until the returned [`Server`] is dropped.
    fn serve(
        &self,
        port: u16,
        serve: impl FnOnce(ServerTally) + Send + 'static,
    ) -> io::Result<Server> {
        let tally = ServerTally::default();
        let shared = tally.clone();
        let thread = self.spawn_thread(move || serve(shared))?;
        Ok(Server {
            stop: tally.stop,
            thread: Some(thread),
            port,
            hits: tally.hits,
            bytes: tally.bytes,
        })
    }

    /// Connects from inside this namespace.
    pub fn tcp_connect(&self, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        let stream = self.run(move || TcpStream::connect_timeout(&to, timeout))??;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(stream)
    }

    /// Connects, sends `payload`, and returns what the peer sends back (an echo server returns
    /// `payload`).
    pub fn tcp_exchange(
        &self,
        to: SocketAddr,
        payload: &[u8],
        timeout: Duration,
    ) -> io::Result<Vec<u8>> {
        let mut stream = self.tcp_connect(to, timeout)?;
        exchange(&mut stream, payload)
    }

    /// Sends one datagram and waits for one back. The socket is connected, so an ICMP error
    /// about the datagram (port unreachable) comes back as `ConnectionRefused`.
    pub fn udp_exchange(
        &self,
        to: SocketAddr,
        payload: &[u8],
        timeout: Duration,
    ) -> io::Result<Vec<u8>> {
        self.udp_exchange_from(None, to, payload, timeout)
    }

    /// [`Self::udp_exchange`] from a chosen source address (which must be on an interface of
    /// this namespace).
    pub fn udp_exchange_from(
        &self,
        from: Option<IpAddr>,
        to: SocketAddr,
        payload: &[u8],
        timeout: Duration,
    ) -> io::Result<Vec<u8>> {
        let any: IpAddr = if to.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        let local = SocketAddr::new(from.unwrap_or(any), 0);
        let socket = self.run(move || UdpSocket::bind(local))??;
        socket.connect(to)?;
        socket.set_read_timeout(Some(timeout))?;
        socket.send(payload)?;
        let mut buffer = vec![0u8; 65536];
        let len = socket.recv(&mut buffer)?;
        buffer.truncate(len);
        Ok(buffer)
    }

    /// Connects from a chosen source address.
    pub fn tcp_connect_from(
        &self,
        from: IpAddr,
        to: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        use socket2::{Domain, Socket, Type};
        let domain = if to.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let socket = self.run(move || -> io::Result<Socket> {
            let socket = Socket::new(domain, Type::STREAM, None)?;
            socket.bind(&SocketAddr::new(from, 0).into())?;
            Ok(socket)
        })??;
        socket.connect_timeout(&to.into(), timeout)?;
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(stream)
    }

    /// Sends one ICMP echo request and says whether its reply arrived within `timeout`.
    pub fn ping(&self, to: IpAddr, timeout: Duration) -> io::Result<bool> {
        use socket2::{Domain, Protocol, Socket, Type};
        let (domain, protocol, request_type, reply_type) = match to {
            IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8),
            IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128u8, 129u8),
        };
        let socket = self.run(move || Socket::new(domain, Type::RAW, Some(protocol)))??;
        let id =
            (std::process::id() as u16) ^ (PING_SEQUENCE.fetch_add(1, Ordering::Relaxed) as u16);
        let mut request = [
            request_type,
            0,
            0,
            0,
            (id >> 8) as u8,
            id as u8,
            0,
            1,
            b'e',
            b'n',
            b'f',
            b't',
        ];
        if to.is_ipv4() {
            let checksum = internet_checksum(&request);
            request[2..4].copy_from_slice(&checksum.to_be_bytes());
        }
        socket.send_to(&request, &SocketAddr::new(to, 0).into())?;
        let deadline = Instant::now() + timeout;
        let mut buffer = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            socket.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            let (len, from) = match socket.recv_from(&mut buffer) {
                Ok(received) => received,
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(false);
                }
                Err(error) => return Err(error),
            };
            // SAFETY: recv_from initialised the first `len` bytes.
            let packet: Vec<u8> = buffer[..len]
                .iter()
                .map(|byte| unsafe { byte.assume_init() })
                .collect();
            // Raw IPv4 sockets deliver the IP header too; IPv6 ones do not.
            let icmp = if to.is_ipv4() {
                &packet[((packet[0] & 0x0f) as usize * 4).min(packet.len())..]
            } else {
                &packet[..]
            };
            let from_target = from.as_socket().is_some_and(|from| from.ip() == to);
            if from_target
                && icmp.len() >= 8
                && icmp[0] == reply_type
                && icmp[4..6] == [(id >> 8) as u8, id as u8]
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

static PING_SEQUENCE: AtomicUsize = AtomicUsize::new(0);

fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn echo_stream(mut stream: TcpStream, stop: &AtomicBool, received: &AtomicUsize) {
    let _ = stream.set_read_timeout(Some(POLL));
    let mut buffer = [0u8; 16384];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(len) => {
                received.fetch_add(len, Ordering::SeqCst);
                if stream.write_all(&buffer[..len]).is_err() {
                    break;
                }
            }
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
}

/// Writes `payload` on an open stream and reads the same number of bytes back.
pub fn exchange(stream: &mut TcpStream, payload: &[u8]) -> io::Result<Vec<u8>> {
    stream.write_all(payload)?;
    let mut reply = vec![0u8; payload.len()];
    stream.read_exact(&mut reply)?;
    Ok(reply)
}

/// Closes the write half and waits for the peer to close: a clean TCP shutdown.
pub fn finish(stream: &mut TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
}

/// A cgroup v2 directory made for a test, removed on drop (after its processes exited).
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 root>/<test bed id>-<name>`.
    pub fn create(name: &str) -> io::Result<Self> {
        let root = cgroup2_root().ok_or_else(|| io::Error::other("cgroup v2 is not mounted"))?;
        let path = root.join(format!("{}-{name}", unique_id()));
        fs::create_dir(&path)?;
        Ok(Self { path })
    }

    /// The cgroup's id, as `bpf_skb_cgroup_id` reports it: its directory's inode number.
    pub fn id(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt as _;
        Ok(fs::metadata(&self.path)?.ino())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The directory can only go once empty: wait briefly for exiting processes.
        let removed = eventually(Duration::from_secs(5), || {
            fs::remove_dir(&self.path).is_ok()
        });
        if !removed {
            eprintln!("testbed: could not remove cgroup {}", self.path.display());
        }
    }
}

/// Where cgroup v2 is mounted.
pub fn cgroup2_root() -> Option<PathBuf> {
    fs::read_to_string("/proc/self/mounts")
        .ok()?
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        })
}

impl Netns {
    /// A command that runs inside the namespace and inside `cgroup` (joined after fork, so every
    /// socket it opens belongs to the cgroup).
    pub fn command_in_cgroup(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        cgroup: &Cgroup,
    ) -> io::Result<Command> {
        let handle = self.handle()?;
        let procs = File::options()
            .write(true)
            .open(cgroup.path.join("cgroup.procs"))?;
        let mut command = Command::new(program);
        // SAFETY: write and setns are async-signal-safe; both files stay open in the parent.
        unsafe {
            command.pre_exec(move || {
                use std::os::fd::AsRawFd as _;
                // Writing 0 moves the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
                setns(&handle, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
            });
        }
        Ok(command)
    }
}

/// Runs `socat` to connect to `to` (optionally from `from`), send `payload` and read the reply;
/// returns the reply, or an error describing the failure. For tests whose client must be a
/// separate process (one placed in a cgroup).
pub fn socat_exchange(
    mut command: Command,
    from: Option<IpAddr>,
    to: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    let family = if to.is_ipv4() { "TCP4" } else { "TCP6" };
    let host = match to.ip() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    let mut address = format!(
        "{family}:{host}:{},connect-timeout={}",
        to.port(),
        timeout.as_secs_f64()
    );
    if let Some(from) = from {
        address.push_str(&format!(",bind={from}"));
    }
    let mut child = command
        .args([
            "-T",
            &format!("{}", timeout.as_secs_f64()),
            "STDIO",
            &address,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().expect("piped").write_all(payload)?;
    let output = child.wait_with_output()?;
    if !output.status.success() || output.stdout.is_empty() {
        return Err(io::Error::other(format!(
            "socat {address}: {} {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(output.stdout)
}

/// A daemon process in a namespace, with its stderr kept in a file. Killed on drop; `on_drop`
/// runs after that (for example to unload what it pinned).
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
    on_drop: Option<Box<dyn FnOnce() + Send>>,
}

impl Daemon {
    /// Spawns `command` with stderr to `log` and waits until the log contains `ready` (an error
    /// carrying the log if the process exits first or `timeout` passes).
    pub fn spawn(
        mut command: Command,
        log: PathBuf,
        ready: &str,
        timeout: Duration,
    ) -> io::Result<Self> {
        let log_file = File::create(&log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()?;
        let mut daemon = Self {
            child: Some(child),
            log,
            on_drop: None,
        };
        let deadline = Instant::now() + timeout;
        loop {
            if daemon.log_text().contains(ready) {
                return Ok(daemon);
            }
            if let Some(status) = daemon
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten())
            {
                return Err(io::Error::other(format!(
                    "exited ({status}) before \"{ready}\":\n{}",
                    daemon.log_text()
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "no \"{ready}\" after {timeout:?}:\n{}",
                    daemon.log_text()
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Starts `command`, an `enforcer run` pinning under `pins`, and waits until it enforces.
    /// Dropping it kills the controller, then `enforcer unload` (the `enforcer` binary) removes
    /// what it left in the kernel.
    pub fn spawn_enforcer(
        command: Command,
        enforcer: &Path,
        pins: &Path,
        log: PathBuf,
        timeout: Duration,
    ) -> io::Result<Self> {
        let (enforcer, pins) = (enforcer.to_owned(), pins.to_owned());
        Ok(
            Self::spawn(command, log, "enforcing", timeout)?.on_drop(move || {
                let _ = Command::new(enforcer)
                    .args(["unload", "--pin-path"])
                    .arg(pins)
                    .output();
            }),
        )
    }

    pub fn on_drop(mut self, cleanup: impl FnOnce() + Send + 'static) -> Self {
        self.on_drop = Some(Box::new(cleanup));
        self
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> io::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| io::Error::other("daemon already reaped"))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
            .map_err(io::Error::from)
    }

    /// Waits for the daemon to exit, up to `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<std::process::ExitStatus> {
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| io::Error::other("daemon already reaped"))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!("still running after {timeout:?}")));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the log contains `text`.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.log_text().contains(text) {
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "no \"{text}\" after {timeout:?}:\n{}",
                    self.log_text()
                )));
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Asked to stop first, so it can clean up after itself; killed if it does not.
        if self.signal(nix::sys::signal::Signal::SIGTERM).is_ok()
            && self.wait(Duration::from_secs(3)).is_ok()
        {
            self.child = None;
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(cleanup) = self.on_drop.take() {
            cleanup();
        }
    }
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
pub fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}
