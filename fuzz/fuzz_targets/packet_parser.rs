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
#![no_main]

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
