//! Packet access and header parsing.
//!
//! Every read of packet memory goes through [`Frame::bounds`], the one place that checks bounds
//! in a form the verifier can follow, by [`Frame::read`] (a whole header) or [`Frame::header`]
//! (its fields, one load each). Parsing never trusts a length field to stay inside the frame.
//!
//! What the parser does on purpose (the "no bypass" rules):
//! * up to two VLAN tags (802.1Q / 802.1ad) are followed and the inner packet is judged; a third
//!   tag is refused, so tag stacking cannot hide a packet from the policy;
//! * IPv4 options are skipped by the header length; a header length below 20 bytes, a total
//!   length shorter than the header, or a truncated transport header is malformed;
//! * IPv6 extension headers (hop-by-hop, routing, destination options, fragment) are followed up
//!   to [`MAX_IPV6_EXT_HEADERS`]; more, or AH/ESP-less unknown chains, are refused;
//! * headers are read only within the IP packet's own length (IPv4 total length, IPv6 payload
//!   length), never from bytes after it, which the receiving stack ignores: a header chain or a
//!   transport header that does not end inside the packet is malformed;
//! * a first fragment must carry the whole transport header (ports); a later fragment carries no
//!   ports and follows the verdict its first fragment got (see `verdict`), and a later fragment
//!   that overlaps the transport header (RFC 1858) is refused.
//! Non-IP frames (ARP and other ethertypes) are not the policy's business and pass: nothing else
//! delivers IP to a socket on a plain Ethernet interface.

use core::{
    marker::PhantomData,
    mem::{offset_of, size_of},
};

use enforcer_common::{
    addr::{Address16, v4_mapped},
    policy::proto,
    verdict::reason,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

/// Furthest offset the parser reads from; bounds every variable offset for the verifier.
const MAX_HEADER_OFFSET: usize = 256;
pub const MAX_IPV6_EXT_HEADERS: usize = 4;
const MAX_VLAN_TAGS: usize = 2;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;
const IPV6_NONXT: u8 = 59;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A contiguous packet buffer (XDP frame or the linear part of an skb).
pub trait Frame {
    /// Whether the frame is seen at an interface (XDP, TC) rather than at a socket: a
    /// constant, so that each program carries only its own steps (the socket hook's stack
    /// would not hold the interface hooks' socket lookup on older verifiers).
    const AT_INTERFACE: bool = true;

    fn start(&self) -> usize;
    fn end(&self) -> usize;

    /// The ethertype of the network header a frame without a link header starts with (a
    /// cgroup program's skb starts at its IP header); `None` for a frame that starts with its
    /// Ethernet header.
    #[inline(always)]
    fn network_protocol(&self) -> Option<u16> {
        None
    }

    /// The program's context, for the helpers that take it (socket lookups); null where there
    /// is none (a frame in host memory, as the fuzz targets build).
    #[inline(always)]
    fn context(&self) -> *mut core::ffi::c_void {
        core::ptr::null_mut()
    }

    /// The id of the sending socket's cgroup's ancestor at `level` of the cgroup v2 hierarchy
    /// (the cgroup itself at its own level); 0 when there is none: no socket (an XDP frame, a
    /// forwarded packet), or a cgroup shallower than `level`.
    #[inline(always)]
    fn socket_cgroup_ancestor(&self, _level: i32) -> u64 {
        0
    }

    /// The `T` at `offset`, or `None` if the frame is shorter.
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let at = self.bounds::<T>(offset)?;
        // SAFETY: the range [at, at + size_of::<T>()) was checked to lie inside the frame; `T`
        // is a plain header struct, valid for any bytes.
        Some(unsafe { core::ptr::read_unaligned(at as *const T) })
    }

    /// The header `T` at `offset`, for loading its fields one by one (see [`Header`]), or
    /// `None` if the frame is shorter.
    #[inline(always)]
    fn header<T>(&self, offset: usize) -> Option<Header<T>> {
        Some(Header {
            at: self.bounds::<T>(offset)?,
            header: PhantomData,
        })
    }

    /// Where the `T` at `offset` starts in memory, if it lies whole inside the frame.
    #[inline(always)]
    fn bounds<T>(&self, offset: usize) -> Option<usize> {
        if offset > MAX_HEADER_OFFSET {
            return None;
        }
        let at = opaque(self.start() + (opaque(offset) & OFFSET_MASK));
        if at + size_of::<T>() > self.end() {
            return None;
        }
        Some(at)
    }
}

/// A header of type `T` that lies whole inside the frame, its fields loaded one load each.
/// [`Frame::read`] copies a header through loads of unknown alignment, which the BPF target
/// makes a byte at a time, and a header may sit at any offset (IPv4's addresses at 26): on the
/// IPv4 path that took more instructions than anything else it does. A packet may be loaded
/// unaligned: the verifier checks a packet access's alignment only on architectures without
/// efficient unaligned access (x86-64 and arm64 have it).
pub struct Header<T> {
    at: usize,
    header: PhantomData<T>,
}

impl<T> Header<T> {
    /// The byte at `OFFSET` in the header.
    #[inline(always)]
    pub fn u8<const OFFSET: usize>(&self) -> u8 {
        const { assert!(OFFSET < size_of::<T>()) };
        // SAFETY: inside the header, which lies inside the frame.
        unsafe { core::ptr::read((self.at + OFFSET) as *const u8) }
    }

    /// The big-endian 16-bit field at `OFFSET` in the header.
    #[inline(always)]
    pub fn be16<const OFFSET: usize>(&self) -> u16 {
        const { assert!(OFFSET + 2 <= size_of::<T>()) };
        u16::from_be(load_u16(self.at + OFFSET))
    }

    /// The big-endian 32-bit field at `OFFSET` in the header.
    #[inline(always)]
    pub fn be32<const OFFSET: usize>(&self) -> u32 {
        const { assert!(OFFSET + 4 <= size_of::<T>()) };
        u32::from_be(load_u32(self.at + OFFSET))
    }

    /// The 16 bytes at `OFFSET` in the header (an IPv6 address), as they lie there, in four
    /// loads.
    #[inline(always)]
    pub fn bytes16<const OFFSET: usize>(&self) -> [u8; 16] {
        const { assert!(OFFSET + 16 <= size_of::<T>()) };
        let words = [
            load_u32(self.at + OFFSET),
            load_u32(self.at + OFFSET + 4),
            load_u32(self.at + OFFSET + 8),
            load_u32(self.at + OFFSET + 12),
        ];
        // SAFETY: four words as they lay in memory are those sixteen bytes, in order.
        unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) }
    }
}

/// The two bytes at `at` in packet memory, as they lie there, in one load. Inline assembly
/// because LLVM would make two loads of a word it cannot prove aligned (see [`Header`]); not
/// `pure`, so that it is never moved ahead of the bounds check before it.
#[inline(always)]
fn load_u16(at: usize) -> u16 {
    #[cfg(target_arch = "bpf")]
    {
        let value: u64;
        // SAFETY: a 2-byte load from `at`, which the caller checked to lie inside the frame.
        unsafe {
            core::arch::asm!(
                "{0} = *(u16 *)({1} + 0)",
                out(reg) value,
                in(reg) at,
                options(readonly, nostack),
            );
        }
        value as u16
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: as above.
    unsafe {
        core::ptr::read_unaligned(at as *const u16)
    }
}

/// The four bytes at `at` in packet memory, as they lie there, in one load (see [`load_u16`]).
#[inline(always)]
fn load_u32(at: usize) -> u32 {
    #[cfg(target_arch = "bpf")]
    {
        let value: u64;
        // SAFETY: a 4-byte load from `at`, which the caller checked to lie inside the frame.
        unsafe {
            core::arch::asm!(
                "{0} = *(u32 *)({1} + 0)",
                out(reg) value,
                in(reg) at,
                options(readonly, nostack),
            );
        }
        value as u32
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: as above.
    unsafe {
        core::ptr::read_unaligned(at as *const u32)
    }
}

/// Covers every offset up to [`MAX_HEADER_OFFSET`].
const OFFSET_MASK: usize = (MAX_HEADER_OFFSET << 1) - 1;
const _: () = assert!(MAX_HEADER_OFFSET & OFFSET_MASK == MAX_HEADER_OFFSET);

/// `value`, unchanged, but opaque to LLVM, so that [`Frame::read`]'s bounds stay in the form
/// every verifier can follow (6.1's refused both of the following; 6.12's accepts them):
/// * the mask on the offset: LLVM drops it as redundant after the comparison with
///   [`MAX_HEADER_OFFSET`], and may then compare `x` but build the pointer from `x + 8`; older
///   verifiers carry no bound across such linked registers and saw an offset of up to 2^32. A
///   mask on the register the pointer is built from is understood by every kernel.
/// * the pointer: LLVM rewrites `at + 1 > end` as `at >= end`, and older verifiers draw no
///   packet range from a strict comparison of a pointer at offset 0.
///
/// One register move each. (Built for the host, by the fuzz targets, it is the identity.)
#[inline(always)]
fn opaque(value: usize) -> usize {
    #[cfg(target_arch = "bpf")]
    {
        let mut value = value;
        // SAFETY: a register move onto itself: nothing changes but what LLVM can assume.
        unsafe { core::arch::asm!("{0} = {0}", inout(reg) value, options(pure, nomem, nostack)) };
        value
    }
    #[cfg(not(target_arch = "bpf"))]
    value
}

/// Fragment position of a packet (a `u8` because the packet lives in a map value).
pub mod fragment {
    /// A whole datagram.
    pub const NONE: u8 = 0;
    /// Offset 0, more fragments follow: carries the transport header.
    pub const FIRST: u8 = 1;
    /// Offset > 0: no transport header.
    pub const LATER: u8 = 2;
}

/// The fields of an IP packet the policy looks at.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Packet {
    pub src: Address16,
    pub dst: Address16,
    /// An IPv4 packet's addresses as numbers (`u32::from_be_bytes`), for its conntrack key;
    /// 0 for IPv6.
    pub src_v4: u32,
    pub dst_v4: u32,
    /// Protocol as on the wire.
    pub proto: u8,
    pub family: u8,
    /// Host order. For ICMP echo both carry the echo identifier, so a request and its reply
    /// make one flow; 0 for other ICMP.
    pub src_port: u16,
    pub dst_port: u16,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub hop_limit: u8,
    /// A [`fragment`] position.
    pub fragment: u8,
    pub fragment_id: u32,
    /// Offset of the transport header (ICMP errors quote the packet they are about after it).
    pub l4_offset: u32,
    /// Length of the IP packet by its own header (IPv4 total length, IPv6 header and payload).
    pub ip_len: u32,
    /// The target address of a neighbour solicitation or advertisement, or of a redirect;
    /// zero for other packets.
    pub nd_target: Address16,
}

impl Packet {
    /// Nothing read yet: what the parser starts each packet from.
    pub const EMPTY: Self = Self {
        src: Address16([0; 16]),
        dst: Address16([0; 16]),
        src_v4: 0,
        dst_v4: 0,
        proto: 0,
        family: 0,
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        icmp_type: 0,
        hop_limit: 0,
        fragment: fragment::NONE,
        fragment_id: 0,
        l4_offset: 0,
        ip_len: 0,
        nd_target: Address16([0; 16]),
    };

    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.proto == proto::TCP
    }

    /// A TCP SYN without ACK: the first packet of a connection (or its retransmission).
    #[inline(always)]
    pub fn opens_connection(&self) -> bool {
        self.is_tcp() && self.tcp_syn_only()
    }

    #[inline(always)]
    pub fn tcp_syn_only(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    #[inline(always)]
    pub fn tcp_fin(&self) -> bool {
        self.tcp_flags & TCP_FIN != 0
    }

    #[inline(always)]
    pub fn tcp_rst(&self) -> bool {
        self.tcp_flags & TCP_RST != 0
    }

    /// ICMPv6 neighbour discovery and multicast listener messages that never left the link
    /// (hop limit 255 for ND per RFC 4861, 1 for MLD): the link does not work without them.
    /// IPv6 only: an IPv4 packet of protocol 58 is nobody's neighbour discovery.
    #[inline(always)]
    pub fn is_link_infrastructure(&self) -> bool {
        if self.family != enforcer_common::addr::family::INET6
            || self.proto != proto::ICMPV6
            || self.fragment != fragment::NONE
        {
            return false;
        }
        match self.icmp_type {
            133..=137 => self.hop_limit == 255,
            130..=132 | 143 => self.hop_limit == 1,
            _ => false,
        }
    }

    /// Whether an ICMP error is no larger than errors are: RFC 1812 (576 bytes, IPv4) and RFC
    /// 4443 (the IPv6 minimum MTU, 1280).
    #[inline(always)]
    pub fn is_error_sized(&self) -> bool {
        let most = if self.family == enforcer_common::addr::family::INET6 {
            1280
        } else {
            576
        };
        self.ip_len <= most
    }

    /// An ICMP message reporting an error about another packet (which it quotes).
    #[inline(always)]
    pub fn is_icmp_error(&self) -> bool {
        match self.proto {
            proto::ICMP => matches!(self.icmp_type, 3 | 11 | 12),
            proto::ICMPV6 => matches!(self.icmp_type, 1..=4),
            _ => false,
        }
    }
}

/// What the parser made of a frame: [`PARSED_IP`], [`NOT_IP`], or the reason code the frame is
/// refused for. A plain `u8` because a BPF function cannot hand an aggregate back to its caller.
pub type Parsed = u8;
/// An IP packet, written to the `Packet` passed in.
pub const PARSED_IP: Parsed = 0;
/// Not IPv4/IPv6: passes without judgement.
pub const NOT_IP: Parsed = 0xff;
/// An ARP message for IPv4 over Ethernet: its sender's address in `src`, its target's in
/// `dst`, written to the `Packet` passed in.
pub const ARP: Parsed = 0xfe;

/// An ARP message for IPv4 over Ethernet (RFC 826), after the Ethernet header.
#[derive(Clone, Copy)]
#[repr(C)]
struct ArpIpv4 {
    hardware: [u8; 2],
    protocol: [u8; 2],
    hardware_len: u8,
    protocol_len: u8,
    operation: [u8; 2],
    sender_hardware: [u8; 6],
    sender: [u8; 4],
    target_hardware: [u8; 6],
    target: [u8; 4],
}

#[derive(Clone, Copy)]
#[repr(C)]
struct VlanTag {
    tci: [u8; 2],
    ether_type: [u8; 2],
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Ipv6ExtHeader {
    next_header: u8,
    len_8_octets: u8,
    fragment_offset_flags: [u8; 2],
    fragment_id: [u8; 4],
}

#[derive(Clone, Copy)]
#[repr(C)]
struct IcmpHeader {
    icmp_type: u8,
    code: u8,
    checksum: [u8; 2],
    /// Echo identifier for echo request/reply.
    id: [u8; 2],
    seq: [u8; 2],
}

#[inline(always)]
fn be16(bytes: [u8; 2]) -> u16 {
    u16::from_be_bytes(bytes)
}

/// Parses the Ethernet frame (or the bare IP packet, see [`Frame::network_protocol`]) in
/// `frame` into `packet`.
#[inline(never)]
pub fn parse<F: Frame>(frame: &F, packet: &mut Packet) -> Parsed {
    if let Some(ether_type) = frame.network_protocol() {
        return match ether_type {
            ETH_P_IP => parse_ipv4(frame, 0, packet),
            ETH_P_IPV6 => parse_ipv6(frame, 0, packet),
            _ => NOT_IP,
        };
    }
    let Some(eth) = frame.read::<EthHdr>(0) else {
        return NOT_IP;
    };
    let mut ether_type = u16::from_be(eth.ether_type);
    let mut offset = EthHdr::LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let Some(tag) = frame.read::<VlanTag>(offset) else {
            return reason::MALFORMED;
        };
        ether_type = be16(tag.ether_type);
        offset += size_of::<VlanTag>();
    }
    match ether_type {
        ETH_P_IP => parse_ipv4(frame, offset, packet),
        ETH_P_IPV6 => parse_ipv6(frame, offset, packet),
        ETH_P_ARP => parse_arp(frame, offset, packet),
        ETH_P_8021Q | ETH_P_8021AD => reason::UNSUPPORTED_HEADERS,
        _ => NOT_IP,
    }
}

/// The transport header's offset in a plain IPv4 frame (see [`plain_ipv4`]): an Ethernet header
/// without VLAN tags, an IPv4 header without options.
pub const PLAIN_IPV4_L4_OFFSET: usize = EthHdr::LEN + Ipv4Hdr::LEN;

/// The transport header's offset in a plain IPv6 frame (see [`plain_ipv6`]): an Ethernet header
/// without VLAN tags, an IPv6 header without extension headers.
pub const PLAIN_IPV6_L4_OFFSET: usize = EthHdr::LEN + Ipv6Hdr::LEN;

/// What the flow cache needs of a plain frame (see [`plain_ipv4`] and [`plain_ipv6`]):
/// addresses (IPv4's as numbers, as in [`Packet`]), ports, protocol and TCP flags.
pub struct Plain<Address> {
    pub src: Address,
    pub dst: Address,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub tcp_flags: u8,
}

/// The frame as a plain IPv4 TCP segment or UDP datagram: no VLAN tag, no IP options, not a
/// fragment, the whole transport header inside the frame and inside the IP packet's own
/// length. Exactly the frames [`parse`] reads as such, with the transport header at
/// [`PLAIN_IPV4_L4_OFFSET`], and it reads the same fields from them; `None` for anything else,
/// which [`parse`] then reads. The bulk of packets, an established flow's, are plain: the flow
/// cache asks this instead of the whole parser, one bounds check and a few loads.
#[inline(always)]
pub fn plain_ipv4<F: Frame>(frame: &F) -> Option<Plain<u32>> {
    const IP: usize = EthHdr::LEN;
    const L4: usize = PLAIN_IPV4_L4_OFFSET;
    let head = frame.header::<[u8; L4 + UdpHdr::LEN]>(0)?;
    if head.be16::<12>() != ETH_P_IP || head.u8::<IP>() != 0x45 {
        return None;
    }
    if head.be16::<{ IP + offset_of!(Ipv4Hdr, frags) }>() & 0x3fff != 0 {
        return None;
    }
    let proto = head.u8::<{ IP + offset_of!(Ipv4Hdr, proto) }>();
    let total_len = head.be16::<{ IP + offset_of!(Ipv4Hdr, tot_len) }>() as usize;
    if total_len < Ipv4Hdr::LEN + plain_transport_len(proto)? {
        return None;
    }
    let tcp_flags = if proto == proto::TCP {
        // Byte 13 of the TCP header holds the flags, CWR..FIN.
        frame
            .header::<[u8; L4 + TcpHdr::LEN]>(0)?
            .u8::<{ L4 + 13 }>()
    } else {
        0
    };
    Some(Plain {
        src: head.be32::<{ IP + offset_of!(Ipv4Hdr, src_addr) }>(),
        dst: head.be32::<{ IP + offset_of!(Ipv4Hdr, dst_addr) }>(),
        src_port: head.be16::<L4>(),
        dst_port: head.be16::<{ L4 + 2 }>(),
        proto,
        tcp_flags,
    })
}

/// The frame as a plain IPv6 TCP segment or UDP datagram: no VLAN tag, no extension header,
/// the whole transport header inside the frame and inside the IP packet's own (payload)
/// length. Exactly the frames [`parse`] reads as such, with the transport header at
/// [`PLAIN_IPV6_L4_OFFSET`], as [`plain_ipv4`] is for IPv4.
#[inline(always)]
pub fn plain_ipv6<F: Frame>(frame: &F) -> Option<Plain<[u8; 16]>> {
    const IP: usize = EthHdr::LEN;
    const L4: usize = PLAIN_IPV6_L4_OFFSET;
    let head = frame.header::<[u8; L4 + UdpHdr::LEN]>(0)?;
    if head.be16::<12>() != ETH_P_IPV6 || head.u8::<IP>() >> 4 != 6 {
        return None;
    }
    let proto = head.u8::<{ IP + offset_of!(Ipv6Hdr, next_hdr) }>();
    // A payload length of 0 (a jumbogram) holds no transport header: not plain.
    let payload_len = head.be16::<{ IP + offset_of!(Ipv6Hdr, payload_len) }>() as usize;
    if payload_len < plain_transport_len(proto)? {
        return None;
    }
    let tcp_flags = if proto == proto::TCP {
        frame
            .header::<[u8; L4 + TcpHdr::LEN]>(0)?
            .u8::<{ L4 + 13 }>()
    } else {
        0
    };
    Some(Plain {
        src: head.bytes16::<{ IP + offset_of!(Ipv6Hdr, src_addr) }>(),
        dst: head.bytes16::<{ IP + offset_of!(Ipv6Hdr, dst_addr) }>(),
        src_port: head.be16::<L4>(),
        dst_port: head.be16::<{ L4 + 2 }>(),
        proto,
        tcp_flags,
    })
}

/// Whether the frame's Ethernet header says IPv6 follows it (no VLAN tag): the frames
/// [`plain_ipv6`] may read.
#[inline(always)]
pub fn carries_ipv6<F: Frame>(frame: &F) -> bool {
    matches!(frame.header::<EthHdr>(0), Some(eth) if eth.be16::<12>() == ETH_P_IPV6)
}

/// The transport header's length in a plain frame: TCP's or UDP's; `None` for any other
/// protocol, which is never plain.
#[inline(always)]
fn plain_transport_len(protocol: u8) -> Option<usize> {
    match protocol {
        proto::TCP => Some(TcpHdr::LEN),
        proto::UDP => Some(UdpHdr::LEN),
        _ => None,
    }
}

/// ARP for IPv4 over Ethernet, which says which hardware address has an IPv4 address; any
/// other ARP (or one too short to be one, which the kernel ignores too) is not IP.
#[inline(always)]
fn parse_arp<F: Frame>(frame: &F, offset: usize, packet: &mut Packet) -> Parsed {
    let Some(arp) = frame.read::<ArpIpv4>(offset) else {
        return NOT_IP;
    };
    if be16(arp.hardware) != 1
        || be16(arp.protocol) != ETH_P_IP
        || arp.hardware_len != 6
        || arp.protocol_len != 4
    {
        return NOT_IP;
    }
    *packet = Packet {
        src: Address16(v4_mapped(arp.sender)),
        dst: Address16(v4_mapped(arp.target)),
        family: enforcer_common::addr::family::INET,
        ..Packet::EMPTY
    };
    ARP
}

#[inline(always)]
fn parse_ipv4<F: Frame>(frame: &F, offset: usize, packet: &mut Packet) -> Parsed {
    let Some(ip) = frame.header::<Ipv4Hdr>(offset) else {
        return reason::MALFORMED;
    };
    let vihl = ip.u8::<{ offset_of!(Ipv4Hdr, vihl) }>();
    let header_len = ((vihl & 0x0f) as usize) * 4;
    let total_len = ip.be16::<{ offset_of!(Ipv4Hdr, tot_len) }>() as usize;
    if vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN || total_len < header_len {
        return reason::MALFORMED;
    }
    let frags = ip.be16::<{ offset_of!(Ipv4Hdr, frags) }>();
    let more_fragments = frags & 0x2000 != 0;
    let fragment_offset = (frags & 0x1fff) as usize * 8;
    let fragment = if fragment_offset != 0 {
        fragment::LATER
    } else if more_fragments {
        fragment::FIRST
    } else {
        fragment::NONE
    };
    let src = ip.be32::<{ offset_of!(Ipv4Hdr, src_addr) }>();
    let dst = ip.be32::<{ offset_of!(Ipv4Hdr, dst_addr) }>();
    *packet = Packet {
        src: Address16(v4_mapped(src.to_be_bytes())),
        dst: Address16(v4_mapped(dst.to_be_bytes())),
        src_v4: src,
        dst_v4: dst,
        proto: ip.u8::<{ offset_of!(Ipv4Hdr, proto) }>(),
        family: enforcer_common::addr::family::INET,
        hop_limit: ip.u8::<{ offset_of!(Ipv4Hdr, ttl) }>(),
        fragment,
        fragment_id: ip.be16::<{ offset_of!(Ipv4Hdr, id) }>() as u32,
        l4_offset: (offset + header_len) as u32,
        ip_len: total_len as u32,
        ..Packet::EMPTY
    };
    parse_transport(frame, packet, fragment_offset, offset + total_len)
}

#[inline(always)]
fn parse_ipv6<F: Frame>(frame: &F, offset: usize, packet: &mut Packet) -> Parsed {
    let Some(ip) = frame.header::<Ipv6Hdr>(offset) else {
        return reason::MALFORMED;
    };
    if ip.u8::<{ offset_of!(Ipv6Hdr, vcf) }>() >> 4 != 6 {
        return reason::MALFORMED;
    }
    // A payload length of 0 (a jumbogram, or BIG TCP at egress) bounds nothing: refused, as
    // headers could then lie anywhere in what follows.
    let ip_end = offset + Ipv6Hdr::LEN + ip.be16::<{ offset_of!(Ipv6Hdr, payload_len) }>() as usize;
    let mut next = ip.u8::<{ offset_of!(Ipv6Hdr, next_hdr) }>();
    let mut l4_offset = offset + Ipv6Hdr::LEN;
    let mut fragment = fragment::NONE;
    let mut fragment_id = 0u32;
    let mut fragment_offset = 0usize;
    let mut ext_headers = 0usize;
    while ext_headers < MAX_IPV6_EXT_HEADERS {
        if next != IPV6_HOPOPTS
            && next != IPV6_ROUTING
            && next != IPV6_DSTOPTS
            && next != IPV6_FRAGMENT
        {
            break;
        }
        let Some(ext) = frame.read::<Ipv6ExtHeader>(l4_offset) else {
            return reason::MALFORMED;
        };
        let ext_len = if next == IPV6_FRAGMENT {
            8
        } else {
            (ext.len_8_octets as usize + 1) * 8
        };
        if l4_offset + ext_len > ip_end {
            return reason::MALFORMED;
        }
        if next == IPV6_FRAGMENT {
            let offset_flags = be16(ext.fragment_offset_flags);
            fragment_offset = (offset_flags & 0xfff8) as usize;
            fragment = if fragment_offset != 0 {
                fragment::LATER
            } else if offset_flags & 1 != 0 {
                fragment::FIRST
            } else {
                // An atomic fragment (RFC 6946): a whole datagram in a fragment header.
                fragment::NONE
            };
            fragment_id = u32::from_be_bytes(ext.fragment_id);
        }
        l4_offset += ext_len;
        next = ext.next_header;
        ext_headers += 1;
    }
    if matches!(
        next,
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_FRAGMENT
    ) {
        return reason::UNSUPPORTED_HEADERS;
    }
    *packet = Packet {
        src: Address16(ip.bytes16::<{ offset_of!(Ipv6Hdr, src_addr) }>()),
        dst: Address16(ip.bytes16::<{ offset_of!(Ipv6Hdr, dst_addr) }>()),
        proto: next,
        family: enforcer_common::addr::family::INET6,
        hop_limit: ip.u8::<{ offset_of!(Ipv6Hdr, hop_limit) }>(),
        fragment,
        fragment_id,
        l4_offset: l4_offset as u32,
        ip_len: (ip_end - offset) as u32,
        ..Packet::EMPTY
    };
    if next == IPV6_NONXT {
        return PARSED_IP;
    }
    parse_transport(frame, packet, fragment_offset, ip_end)
}

/// Reads ports, TCP flags or ICMP type. `fragment_offset` is in bytes; `ip_end`, where the IP
/// packet ends by its own length field.
#[inline(always)]
fn parse_transport<F: Frame>(
    frame: &F,
    packet: &mut Packet,
    fragment_offset: usize,
    ip_end: usize,
) -> Parsed {
    let header_len = match packet.proto {
        proto::TCP => TcpHdr::LEN,
        proto::UDP => UdpHdr::LEN,
        proto::ICMP | proto::ICMPV6 => size_of::<IcmpHeader>(),
        _ => 0,
    };
    if packet.fragment == fragment::LATER {
        // RFC 1858: a later fragment must not reach back into the transport header, or it could
        // rewrite the ports the first fragment was judged on.
        if fragment_offset < header_len {
            return reason::BAD_FRAGMENT;
        }
        return PARSED_IP;
    }
    let offset = packet.l4_offset as usize;
    if offset + header_len > ip_end {
        return reason::MALFORMED;
    }
    match packet.proto {
        proto::TCP => {
            let Some(tcp) = frame.header::<TcpHdr>(offset) else {
                return reason::MALFORMED;
            };
            packet.src_port = tcp.be16::<{ offset_of!(TcpHdr, source) }>();
            packet.dst_port = tcp.be16::<{ offset_of!(TcpHdr, dest) }>();
            // Byte 13 of the TCP header holds the flags, CWR..FIN.
            packet.tcp_flags = tcp.u8::<13>();
        }
        proto::UDP => {
            let Some(udp) = frame.header::<UdpHdr>(offset) else {
                return reason::MALFORMED;
            };
            packet.src_port = udp.be16::<{ offset_of!(UdpHdr, src) }>();
            packet.dst_port = udp.be16::<{ offset_of!(UdpHdr, dst) }>();
        }
        proto::ICMP | proto::ICMPV6 => {
            let Some(icmp) = frame.read::<IcmpHeader>(offset) else {
                return reason::MALFORMED;
            };
            packet.icmp_type = icmp.icmp_type;
            if packet.proto == proto::ICMPV6 && matches!(icmp.icmp_type, 135..=137) {
                // The target follows the 4-byte header and 4 reserved bytes; a message too
                // short to name one is nobody's neighbour discovery.
                let Some(target) = frame.read::<[u8; 16]>(offset + 8) else {
                    return reason::MALFORMED;
                };
                packet.nd_target = Address16(target);
            }
            if is_echo(packet.proto, icmp.icmp_type) {
                let id = be16(icmp.id);
                packet.src_port = id;
                packet.dst_port = id;
            }
        }
        _ => {}
    }
    PARSED_IP
}

#[inline(always)]
fn is_echo(protocol: u8, icmp_type: u8) -> bool {
    match protocol {
        proto::ICMP => icmp_type == 8 || icmp_type == 0,
        _ => icmp_type == 128 || icmp_type == 129,
    }
}

/// The flow an ICMP error is about: the quoted packet's addresses, protocol and ports, as the
/// quoted packet travelled (from the error's receiver to its sender).
pub struct QuotedFlow {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// As in [`Packet`].
    pub src_v4: u32,
    pub dst_v4: u32,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
}

/// Reads the packet quoted by the ICMP error `packet` into `quoted`; false if it is cut short.
#[inline(never)]
pub fn quoted_flow<F: Frame>(frame: &F, packet: &Packet, quoted: &mut QuotedFlow) -> bool {
    let inner = packet.l4_offset as usize + 8;
    let inner_l4 = if packet.proto == proto::ICMP {
        let Some(ip) = frame.read::<Ipv4Hdr>(inner) else {
            return false;
        };
        let header_len = ((ip.vihl & 0x0f) as usize) * 4;
        if header_len < Ipv4Hdr::LEN {
            return false;
        }
        quoted.src = v4_mapped(ip.src_addr);
        quoted.dst = v4_mapped(ip.dst_addr);
        quoted.src_v4 = u32::from_be_bytes(ip.src_addr);
        quoted.dst_v4 = u32::from_be_bytes(ip.dst_addr);
        quoted.proto = ip.proto;
        inner + header_len
    } else {
        let Some(ip) = frame.read::<Ipv6Hdr>(inner) else {
            return false;
        };
        quoted.src = ip.src_addr;
        quoted.dst = ip.dst_addr;
        quoted.proto = ip.next_hdr;
        inner + Ipv6Hdr::LEN
    };
    // Errors quote at least 8 bytes of the transport header: enough for ports and the echo id.
    let Some(head) = frame.read::<IcmpHeader>(inner_l4) else {
        return false;
    };
    (quoted.src_port, quoted.dst_port) = match quoted.proto {
        proto::TCP | proto::UDP => (be16([head.icmp_type, head.code]), be16(head.checksum)),
        proto::ICMP | proto::ICMPV6 if is_echo(quoted.proto, head.icmp_type) => {
            let id = be16(head.id);
            (id, id)
        }
        _ => (0, 0),
    };
    true
}
