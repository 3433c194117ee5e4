//! Traffic: echo servers in a namespace, and clients that connect, exchange and ping from
//! one.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{Netns, POLL};

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

/// What a server thread shares with its [`Server`]: when to stop, and what it counted.
#[derive(Clone, Default)]
struct ServerTally {
    stop: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
}

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
        while let Some((packet, from)) = receive_before(&socket, deadline)? {
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

/// The next packet `socket` receives before `deadline`, with where it came from; `None` once
/// the deadline has passed.
fn receive_before(
    socket: &socket2::Socket,
    deadline: Instant,
) -> io::Result<Option<(Vec<u8>, socket2::SockAddr)>> {
    let Some(left) = deadline.checked_duration_since(Instant::now()) else {
        return Ok(None);
    };
    socket.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
    let mut buffer = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    match socket.recv_from(&mut buffer) {
        Ok((len, from)) => {
            // SAFETY: recv_from initialised the first `len` bytes.
            let packet = buffer[..len]
                .iter()
                .map(|byte| unsafe { byte.assume_init() })
                .collect();
            Ok(Some((packet, from)))
        }
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

impl Netns {
    /// Every frame the namespace's interfaces received while `traffic` ran, as a packet socket
    /// sees it (Ethernet header first), and those of the next `linger` after it.
    pub fn frames_received(
        &self,
        traffic: impl FnOnce(),
        linger: Duration,
    ) -> io::Result<Vec<Vec<u8>>> {
        use socket2::{Domain, Protocol, Socket, Type};
        let all = Protocol::from(i32::from((libc::ETH_P_ALL as u16).to_be()));
        let socket = self.run(move || Socket::new(Domain::PACKET, Type::RAW, Some(all)))??;
        traffic();
        let deadline = Instant::now() + linger;
        let mut frames = Vec::new();
        while let Some((frame, from)) = receive_before(&socket, deadline)? {
            // PACKET_OUTGOING: what the namespace sent, not received.
            // SAFETY: a packet socket's source address is a `sockaddr_ll`.
            let outgoing = unsafe { (*from.as_ptr().cast::<libc::sockaddr_ll>()).sll_pkttype }
                == libc::PACKET_OUTGOING;
            if !outgoing {
                frames.push(frame);
            }
        }
        Ok(frames)
    }
}

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

impl Netns {
    /// Sends `message` as one ICMPv6 packet from `from` (an address of this namespace) to `to`
    /// through `interface`, with hop limit 255 (as neighbour discovery must be); the kernel
    /// fills in the checksum.
    pub fn send_icmpv6(
        &self,
        from: Ipv6Addr,
        to: Ipv6Addr,
        interface: &str,
        message: &[u8],
    ) -> io::Result<()> {
        use socket2::{Domain, Protocol, SockAddr, Socket, Type};
        let interface = interface.to_owned();
        let message = message.to_vec();
        self.run(move || {
            let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
            socket.set_unicast_hops_v6(255)?;
            socket.set_multicast_hops_v6(255)?;
            socket.bind(&SockAddr::from(SocketAddr::new(IpAddr::V6(from), 0)))?;
            let scope =
                nix::net::if_::if_nametoindex(interface.as_str()).map_err(io::Error::from)?;
            let to = std::net::SocketAddrV6::new(to, 0, 0, scope);
            socket.send_to(&message, &SockAddr::from(to)).map(drop)
        })?
    }
}

impl Netns {
    /// Sends `frame` (a whole Ethernet frame) as it is out of `interface`, through a packet
    /// socket: what a workload with CAP_NET_RAW can put on its link.
    pub fn send_frame(&self, interface: &str, frame: &[u8]) -> io::Result<()> {
        let interface = interface.to_owned();
        let frame = frame.to_vec();
        self.run(move || {
            let ifindex =
                nix::net::if_::if_nametoindex(interface.as_str()).map_err(io::Error::from)?;
            // SAFETY: plain socket(2); the descriptor is closed below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set.
            let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            address.sll_family = libc::AF_PACKET as u16;
            address.sll_ifindex = ifindex as i32;
            address.sll_halen = 6;
            address.sll_addr[..6].copy_from_slice(&frame[..6]);
            // SAFETY: `frame` and `address` are valid for the lengths given.
            let sent = unsafe {
                libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const address).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            let error = io::Error::last_os_error();
            // SAFETY: `fd` is ours.
            unsafe { libc::close(fd) };
            if sent < 0 { Err(error) } else { Ok(()) }
        })?
    }
}
