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
//! And the flow cache's reading of a plain IPv4 frame (`packet::plain_ipv4`) against the
//! parser's: it must take exactly the frames the parser reads as plain IPv4 TCP or UDP, and read
//! the same flow from them, or a frame the parser would refuse could pass as a cached flow's.
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
                src: packet.src,
                dst: packet.dst,
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

/// `packet::plain_ipv4` reads a frame if and only if the parser reads it as a plain IPv4 TCP
/// segment or UDP datagram (not a fragment, the transport header right after an option-less IP
/// header), and then the same flow.
fn plain_reading_agrees(frame: &[u8], parsed: packet::Parsed, packet: &Packet) {
    let plain = packet::plain_ipv4(&HostFrame(frame));
    let parser_says_plain = parsed == packet::PARSED_IP
        && packet.family == family::INET
        && packet.fragment == fragment::NONE
        && packet.l4_offset as usize == packet::PLAIN_IPV4_L4_OFFSET
        && matches!(packet.proto, proto::TCP | proto::UDP);
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
            packet.src_v4,
            packet.dst_v4,
            packet.proto,
            packet.src_port,
            packet.dst_port,
            packet.tcp_flags
        ),
        "the flow cache reads another flow than the parser"
    );
}
