//! The datapath's packet parser, built for the host, against an independent one (etherparse):
//! for every frame the kernel would take in as IP, both must agree on the addresses, the
//! protocol, the ports and whether it is a fragment. A frame the datapath reads as something
//! else than the stack will is a way around the policy.
//!
//! Differences that are not findings, because the datapath refuses what it does not read whole
//! (documented in the README): frames it drops as malformed or unsupported (more VLAN tags or
//! IPv6 extension headers than it follows, headers past its reach, short transport headers), and
//! frames the stack would not take in as plain IP (MACsec, IPsec's AH, the pre-802.1ad QinQ
//! tags 0x9100-0x9300).
#![no_main]

use enforcer_common::{addr::v4_mapped, policy::proto};
use etherparse::{
    Ipv6ExtensionSlice, LinkExtSlice, NetSlice, SlicedPacket, TcpHeaderSlice, TransportSlice,
    UdpHeaderSlice,
};
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../enforcer-ebpf/src/packet.rs"]
mod packet;

use packet::{Frame, Packet, fragment};

/// A frame in host memory, as the programs see theirs.
struct HostFrame<'a>(&'a [u8]);

impl Frame for HostFrame<'_> {
    fn start(&self) -> usize {
        self.0.as_ptr() as usize
    }

    fn end(&self) -> usize {
        self.0.as_ptr() as usize + self.0.len()
    }
}

/// What the stack takes from an IP frame, by etherparse.
#[derive(Debug, PartialEq, Eq)]
struct Delivered {
    src: [u8; 16],
    dst: [u8; 16],
    proto: u8,
    fragment: u8,
    /// For a TCP or UDP packet whose header etherparse read.
    ports: Option<(u16, u16)>,
}

fuzz_target!(|frame: &[u8]| {
    let mut packet = Packet::EMPTY;
    let parsed = packet::parse(&HostFrame(frame), &mut packet);
    let Some(delivered) = delivered(frame) else {
        return;
    };
    match parsed {
        packet::PARSED_IP => {
            let read = Delivered {
                src: packet.src,
                dst: packet.dst,
                proto: packet.proto,
                fragment: packet.fragment,
                ports: delivered.ports.map(|_| (packet.src_port, packet.dst_port)),
            };
            assert_eq!(
                read, delivered,
                "the datapath reads another packet than the stack"
            );
        }
        packet::NOT_IP | packet::ARP => {
            panic!("an IP packet passes unjudged as not IP: {delivered:?}")
        }
        _refused => {}
    }
});

/// The IP packet the stack takes in from `frame`, or `None` if it takes in no plain IP.
fn delivered(frame: &[u8]) -> Option<Delivered> {
    let sliced = SlicedPacket::from_ethernet(frame).ok()?;
    // Linux takes in VLAN tags of 802.1Q and 802.1ad only; etherparse also reads the older
    // QinQ tags (0x9100, 0x9200, 0x9300), which the stack does not take in as IP.
    let mut tag_offset = 12;
    for ext in &sliced.link_exts {
        let LinkExtSlice::Vlan(_) = ext else {
            return None; // MACsec
        };
        if !matches!(
            frame[tag_offset..tag_offset + 2],
            [0x81, 0x00] | [0x88, 0xa8]
        ) {
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
            let fragment =
                fragment_kind(header.fragments_offset().value(), header.more_fragments());
            (
                v4_mapped(header.source()),
                v4_mapped(header.destination()),
                fragment,
                ipv4.payload(),
            )
        }
        NetSlice::Ipv6(ipv6) => {
            let mut fragment = fragment::NONE;
            for ext in ipv6.extensions().clone() {
                match ext {
                    Ipv6ExtensionSlice::Authentication(_) => return None,
                    Ipv6ExtensionSlice::Fragment(header) => {
                        fragment =
                            fragment_kind(header.fragment_offset().value(), header.more_fragments())
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
        (Some(TransportSlice::Tcp(tcp)), fragment::NONE) => {
            Some((tcp.source_port(), tcp.destination_port()))
        }
        (Some(TransportSlice::Udp(udp)), fragment::NONE) => {
            Some((udp.source_port(), udp.destination_port()))
        }
        // The first fragment carries the transport header; etherparse leaves it unread.
        (_, fragment::FIRST) if proto == proto::TCP => TcpHeaderSlice::from_slice(payload.payload)
            .ok()
            .map(|tcp| (tcp.source_port(), tcp.destination_port())),
        (_, fragment::FIRST) if proto == proto::UDP => UdpHeaderSlice::from_slice(payload.payload)
            .ok()
            .map(|udp| (udp.source_port(), udp.destination_port())),
        _ => None,
    };
    Some(Delivered {
        src,
        dst,
        proto,
        fragment,
        ports,
    })
}

fn fragment_kind(offset: u16, more: bool) -> u8 {
    match (offset, more) {
        (0, false) => fragment::NONE,
        (0, true) => fragment::FIRST,
        _ => fragment::LATER,
    }
}
