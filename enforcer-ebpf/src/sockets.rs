//! Packets for this host's own sockets, where services are identified by cgroup.
//!
//! Which service receives a packet sent to one of the host's addresses depends on the cgroup of
//! the socket that takes it, and the interface hooks cannot learn that: the helpers that give a
//! socket's cgroup are refused to XDP and TC programs. So when the policy has cgroup
//! services, the interface hook hands a new flow's packet for a local socket over: it passes it
//! unjudged and notes its flow in `HANDED_OVER`, and the socket hook (a cgroup_skb ingress
//! program, run as the packet is delivered) judges it in full, with the receiving socket's
//! service as its destination. It also judges anything else a service's socket receives from
//! an interface (a flow an interface hook admitted for the host, such as a datagram whose first
//! fragment was judged there), and passes the rest untouched: judged where they entered, or
//! entered where this datapath is not attached, or sent over loopback by the host itself.

use aya_ebpf::{
    bindings::bpf_sock_tuple,
    helpers::{bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release},
};
use enforcer_common::{addr::family, policy::proto};

use crate::{
    conntrack::FlowKey,
    maps::{HANDED_OVER, HANDED_OVER4},
    packet::Frame,
    subject::Subject,
};

/// Whether a socket of this host's network namespace would receive the subject's packet: a
/// TCP or UDP socket bound to its destination (or listening for it).
#[inline(never)]
pub fn has_receiver<F: Frame>(frame: &F, subject: &Subject) -> bool {
    let packet = &subject.packet;
    // SAFETY: plain integers; every field the lookup reads is written below.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if packet.family == family::INET {
        // SAFETY: writing plain fields of the union's IPv4 member.
        unsafe {
            let ipv4 = &mut tuple.__bindgen_anon_1.ipv4;
            ipv4.saddr = u32::from_ne_bytes([
                packet.src[12],
                packet.src[13],
                packet.src[14],
                packet.src[15],
            ]);
            ipv4.daddr = u32::from_ne_bytes([
                packet.dst[12],
                packet.dst[13],
                packet.dst[14],
                packet.dst[15],
            ]);
            ipv4.sport = packet.src_port.to_be();
            ipv4.dport = packet.dst_port.to_be();
            core::mem::size_of_val(ipv4)
        }
    } else {
        // SAFETY: as above, the IPv6 member; the addresses are copied byte for byte.
        unsafe {
            let ipv6 = &mut tuple.__bindgen_anon_1.ipv6;
            ipv6.saddr = core::mem::transmute::<[u8; 16], [u32; 4]>(packet.src.0);
            ipv6.daddr = core::mem::transmute::<[u8; 16], [u32; 4]>(packet.dst.0);
            ipv6.sport = packet.src_port.to_be();
            ipv6.dport = packet.dst_port.to_be();
            core::mem::size_of_val(ipv6)
        }
    } as u32;
    // BPF_F_CURRENT_NETNS: the namespace the packet is in.
    let current_netns = u32::MAX as u64;
    let context = frame.context();
    // SAFETY: the context pointer the kernel passed in and a tuple of the size given.
    let socket = unsafe {
        match packet.proto {
            proto::TCP => bpf_sk_lookup_tcp(context, &mut tuple, size, current_netns, 0),
            proto::UDP => bpf_sk_lookup_udp(context, &mut tuple, size, current_netns, 0),
            _ => return false,
        }
    };
    if socket.is_null() {
        return false;
    }
    // SAFETY: the lookup's reference, released once.
    unsafe { bpf_sk_release(socket.cast()) };
    true
}

/// Notes that the flow's packet was handed over to the socket hook. False if it could not be
/// noted: the packet must then be judged where it is.
#[inline(always)]
pub fn hand_over(key: &FlowKey) -> bool {
    if key.ipv4 != 0 {
        HANDED_OVER4.insert(&key.short, 0u8, 0)
    } else {
        HANDED_OVER.insert(&key.long, 0u8, 0)
    }
    .is_ok()
}

/// Whether the flow's packet was handed over by an interface hook (and takes the note): only
/// those are the socket hook's to judge.
#[inline(always)]
pub fn take_handed_over(key: &FlowKey) -> bool {
    if key.ipv4 != 0 {
        HANDED_OVER4.remove(&key.short)
    } else {
        HANDED_OVER.remove(&key.long)
    }
    .is_ok()
}
