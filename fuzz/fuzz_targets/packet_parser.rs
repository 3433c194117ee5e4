//! The datapath's packet parser, built for the host, against an independent one (etherparse,
//! through the test bed's `frames::taken_in`): for every frame the kernel would take in as IP,
//! both must agree on the addresses, the protocol, the ports and whether it is a fragment. A
//! frame the datapath reads as something else than the stack will is a way around the policy.
//!
//! Differences that are not findings, because the datapath refuses what it does not read whole
//! (documented in the README): frames it drops as malformed or unsupported (more VLAN tags or
//! IPv6 extension headers than it follows, headers past its reach, short transport headers).
//! Frames the stack does not take in as plain IP are none of the parser's business (see
//! `taken_in`).
//!
//! And the flow cache's reading of a plain frame (`packet::plain_ipv4`, `packet::plain_ipv6`)
//! against the parser's: each must take exactly the frames the parser reads as plain TCP or UDP
//! of its family, and read the same flow from them, or a frame the parser would refuse could
//! pass as a cached flow's.
#![no_main]

use enforcer_common::{addr::family, policy::proto};
use enforcer_testbed::frames::{Fragment, TakenIn, taken_in};
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

fuzz_target!(|frame: &[u8]| {
    let mut packet = Packet::EMPTY;
    let parsed = packet::parse(&HostFrame(frame), &mut packet);
    plain_reading_agrees(frame, parsed, &packet);
    let Some(taken_in) = taken_in(frame) else {
        return;
    };
    match parsed {
        packet::PARSED_IP => {
            let read = TakenIn {
                src: packet.src.0,
                dst: packet.dst.0,
                proto: packet.proto,
                fragment: match packet.fragment {
                    fragment::FIRST => Fragment::First,
                    fragment::LATER => Fragment::Later,
                    _ => Fragment::None,
                },
                ports: taken_in.ports.map(|_| (packet.src_port, packet.dst_port)),
            };
            assert_eq!(
                read, taken_in,
                "the datapath reads another packet than the stack"
            );
        }
        packet::NOT_IP | packet::ARP => {
            panic!("an IP packet passes unjudged as not IP: {taken_in:?}")
        }
        _refused => {}
    }
});

/// `packet::plain_ipv4` and `packet::plain_ipv6` each read a frame if and only if the parser
/// reads it as a plain TCP segment or UDP datagram of their family (not a fragment, the
/// transport header right after an IP header without options or extension headers), and then
/// the same flow.
fn plain_reading_agrees(frame: &[u8], parsed: packet::Parsed, packet: &Packet) {
    let frame = HostFrame(frame);
    let plain_tcp_or_udp = parsed == packet::PARSED_IP
        && packet.fragment == fragment::NONE
        && matches!(packet.proto, proto::TCP | proto::UDP);
    agree(
        packet::plain_ipv4(&frame),
        plain_tcp_or_udp
            && packet.family == family::INET
            && packet.l4_offset as usize == packet::PLAIN_IPV4_L4_OFFSET,
        (packet.src_v4, packet.dst_v4),
        parsed,
        packet,
    );
    agree(
        packet::plain_ipv6(&frame),
        plain_tcp_or_udp
            && packet.family == family::INET6
            && packet.l4_offset as usize == packet::PLAIN_IPV6_L4_OFFSET,
        (packet.src.0, packet.dst.0),
        parsed,
        packet,
    );
}

/// One family's plain reading, `plain`, against the parser's: `parser_says_plain`, and the
/// parser's addresses in the plain reading's form.
fn agree<Address: PartialEq + core::fmt::Debug>(
    plain: Option<packet::Plain<Address>>,
    parser_says_plain: bool,
    (src, dst): (Address, Address),
    parsed: packet::Parsed,
    packet: &Packet,
) {
    let Some(plain) = plain else {
        assert!(
            !parser_says_plain,
            "a plain frame the flow cache does not read"
        );
        return;
    };
    assert!(
        parser_says_plain,
        "the flow cache reads a frame the parser reads otherwise (parsed {parsed})"
    );
    assert_eq!(
        (
            plain.src,
            plain.dst,
            plain.proto,
            plain.src_port,
            plain.dst_port,
            plain.tcp_flags
        ),
        (
            src,
            dst,
            packet.proto,
            packet.src_port,
            packet.dst_port,
            packet.tcp_flags
        ),
        "the flow cache reads another flow than the parser"
    );
}
