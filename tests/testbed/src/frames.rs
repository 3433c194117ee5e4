//! Hand-made Ethernet frames for `BPF_PROG_TEST_RUN`: well-formed ones, and the malformed,
//! truncated, fragmented and tagged ones a datapath must not be fooled by. Checksums are left
//! zero: the programs never look at them.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

/// An Ethernet frame with `tags` (TPID, VLAN id) between the addresses and the ethertype.
pub fn ethernet(tags: &[(u16, u16)], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + 4 * tags.len() + payload.len());
    frame.extend_from_slice(&DST_MAC);
    frame.extend_from_slice(&SRC_MAC);
    for (tpid, vid) in tags {
        frame.extend_from_slice(&tpid.to_be_bytes());
        frame.extend_from_slice(&vid.to_be_bytes());
    }
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An IPv4 header, with knobs for what attackers vary.
#[derive(Clone, Debug)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    /// Header length in 32-bit words (5 without options).
    pub ihl: u8,
    pub id: u16,
    pub more_fragments: bool,
    /// Fragment offset in 8-byte units.
    pub fragment_offset: u16,
    /// Overrides the total length field.
    pub total_len: Option<u16>,
    pub ttl: u8,
}

impl Ipv4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Self {
        Self {
            src,
            dst,
            proto,
            ihl: 5,
            id: 1,
            more_fragments: false,
            fragment_offset: 0,
            total_len: None,
            ttl: 64,
        }
    }

    /// The packet: header (options, if `ihl` > 5, are NOPs) and `payload`.
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let header_len = usize::from(self.ihl.max(1)) * 4;
        let mut packet = vec![0u8; header_len.max(20)];
        packet[0] = 0x40 | (self.ihl & 0x0f);
        let total = self
            .total_len
            .unwrap_or((header_len + payload.len()) as u16);
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        packet[4..6].copy_from_slice(&self.id.to_be_bytes());
        let frags = (u16::from(self.more_fragments) << 13) | (self.fragment_offset & 0x1fff);
        packet[6..8].copy_from_slice(&frags.to_be_bytes());
        packet[8] = self.ttl;
        packet[9] = self.proto;
        packet[12..16].copy_from_slice(&self.src.octets());
        packet[16..20].copy_from_slice(&self.dst.octets());
        for option in packet.iter_mut().skip(20) {
            *option = 1; // NOP
        }
        packet.truncate(header_len.max(20));
        packet.extend_from_slice(payload);
        packet
    }

    /// The packet in an untagged Ethernet frame.
    pub fn frame(&self, payload: &[u8]) -> Vec<u8> {
        ethernet(&[], ETH_P_IP, &self.packet(payload))
    }
}

/// An IPv6 packet; `headers` are extension headers `(type, body)` placed before `payload`, in
/// order, each chaining to the next (the last to `proto`).
pub fn ipv6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    proto: u8,
    hop_limit: u8,
    headers: &[(u8, Vec<u8>)],
    payload: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    for (index, (_, ext)) in headers.iter().enumerate() {
        let next = headers.get(index + 1).map_or(proto, |(kind, _)| *kind);
        body.push(next);
        body.extend_from_slice(ext);
    }
    body.extend_from_slice(payload);
    let first = headers.first().map_or(proto, |(kind, _)| *kind);
    let mut packet = vec![0x60, 0, 0, 0];
    packet.extend_from_slice(&(body.len() as u16).to_be_bytes());
    packet.push(first);
    packet.push(hop_limit);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    packet.extend_from_slice(&body);
    packet
}

/// An Ethernet frame (untagged) carrying [`ipv6`]`(src, dst, proto, hop_limit, headers, payload)`.
pub fn ipv6_frame(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    proto: u8,
    hop_limit: u8,
    headers: &[(u8, Vec<u8>)],
    payload: &[u8],
) -> Vec<u8> {
    ethernet(
        &[],
        ETH_P_IPV6,
        &ipv6(src, dst, proto, hop_limit, headers, payload),
    )
}

/// Hop-by-hop options header type, and a body (after the next-header byte) of 8 bytes.
pub const IPV6_HOPOPTS: u8 = 0;
pub fn hop_by_hop() -> (u8, Vec<u8>) {
    // Length 0 (8 bytes in all), PadN filling the rest.
    (IPV6_HOPOPTS, vec![0, 1, 4, 0, 0, 0, 0])
}

/// Fragment header type and body for a fragment at `offset_units` (8-byte units).
pub const IPV6_FRAGMENT: u8 = 44;
pub fn fragment_header(offset_units: u16, more: bool, id: u32) -> (u8, Vec<u8>) {
    let mut body = vec![0];
    body.extend_from_slice(&((offset_units << 3) | u16::from(more)).to_be_bytes());
    body.extend_from_slice(&id.to_be_bytes());
    (IPV6_FRAGMENT, body)
}

/// A 20-byte TCP header.
pub fn tcp(src_port: u16, dst_port: u16, flags: u8) -> Vec<u8> {
    let mut header = vec![0u8; 20];
    header[0..2].copy_from_slice(&src_port.to_be_bytes());
    header[2..4].copy_from_slice(&dst_port.to_be_bytes());
    header[12] = 5 << 4;
    header[13] = flags;
    header[14..16].copy_from_slice(&64240u16.to_be_bytes());
    header
}

/// A UDP header and payload.
pub fn udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut datagram = Vec::with_capacity(8 + payload.len());
    datagram.extend_from_slice(&src_port.to_be_bytes());
    datagram.extend_from_slice(&dst_port.to_be_bytes());
    datagram.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(payload);
    datagram
}

/// An ICMP or ICMPv6 message: type, code, and 4 bytes of "rest of header" then `body`.
pub fn icmp(icmp_type: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut message = vec![icmp_type, code, 0, 0];
    message.extend_from_slice(&rest);
    message.extend_from_slice(body);
    message
}

/// Where a packet lies in its datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram.
    None,
    /// Offset 0, more to come: it carries the transport header.
    First,
    /// Offset above 0.
    Later,
}

impl Fragment {
    pub fn of(offset: u16, more: bool) -> Self {
        match (offset, more) {
            (0, false) => Self::None,
            (0, true) => Self::First,
            _ => Self::Later,
        }
    }
}

/// What the stack takes in from an IP frame, as an independent parser (etherparse) reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TakenIn {
    /// IPv4 addresses v4-mapped, as the datapath keeps them.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The transport protocol, after any IPv6 extension headers.
    pub proto: u8,
    pub fragment: Fragment,
    /// Source and destination port of a TCP or UDP packet whose header could be read.
    pub ports: Option<(u16, u16)>,
}

/// The IP packet Linux takes in from `frame` by etherparse's reading, or `None` if it takes in
/// no plain IP: not IP, malformed by etherparse, or inside what the stack does not read as
/// plain IP on an Ethernet interface (MACsec; IPsec's AH; the pre-802.1ad QinQ tags 0x9100 to
/// 0x9300, which etherparse reads and Linux does not).
pub fn taken_in(frame: &[u8]) -> Option<TakenIn> {
    use etherparse::{Ipv6ExtensionSlice, LinkExtSlice, NetSlice, SlicedPacket, TransportSlice};
    let sliced = SlicedPacket::from_ethernet(frame).ok()?;
    let mut tag_offset = 12;
    for ext in &sliced.link_exts {
        let LinkExtSlice::Vlan(_) = ext else {
            return None;
        };
        let tpid = u16::from_be_bytes([frame[tag_offset], frame[tag_offset + 1]]);
        if tpid != ETH_P_8021Q && tpid != ETH_P_8021AD {
            return None;
        }
        tag_offset += 4;
    }
    let (src, dst, fragment, payload) = match sliced.net.as_ref()? {
        NetSlice::Ipv4(ipv4) => {
            if ipv4.extensions().auth.is_some() {
                return None;
            }
            let header = ipv4.header();
            (
                header.source_addr().to_ipv6_mapped().octets(),
                header.destination_addr().to_ipv6_mapped().octets(),
                Fragment::of(header.fragments_offset().value(), header.more_fragments()),
                ipv4.payload(),
            )
        }
        NetSlice::Ipv6(ipv6) => {
            let mut fragment = Fragment::None;
            for ext in ipv6.extensions().clone() {
                match ext {
                    Ipv6ExtensionSlice::Authentication(_) => return None,
                    Ipv6ExtensionSlice::Fragment(header) => {
                        fragment =
                            Fragment::of(header.fragment_offset().value(), header.more_fragments())
                    }
                    _ => {}
                }
            }
            let header = ipv6.header();
            (
                header.source(),
                header.destination(),
                fragment,
                ipv6.payload(),
            )
        }
        NetSlice::Arp(_) => return None,
    };
    let proto = payload.ip_number.0;
    let ports = match (&sliced.transport, fragment) {
        (Some(TransportSlice::Tcp(tcp)), Fragment::None) => {
            Some((tcp.source_port(), tcp.destination_port()))
        }
        (Some(TransportSlice::Udp(udp)), Fragment::None) => {
            Some((udp.source_port(), udp.destination_port()))
        }
        // The first fragment carries the transport header; etherparse leaves it unread.
        (_, Fragment::First) if proto == TCP => {
            etherparse::TcpHeaderSlice::from_slice(payload.payload)
                .ok()
                .map(|tcp| (tcp.source_port(), tcp.destination_port()))
        }
        (_, Fragment::First) if proto == UDP => {
            etherparse::UdpHeaderSlice::from_slice(payload.payload)
                .ok()
                .map(|udp| (udp.source_port(), udp.destination_port()))
        }
        _ => None,
    };
    Some(TakenIn {
        src,
        dst,
        proto,
        fragment,
        ports,
    })
}
