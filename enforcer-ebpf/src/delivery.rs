//! BPF host routing (`run --host-routing bpf`): a packet TC ingress passed as it entered the
//! host from a veth endpoint, whose route leads out through another veth endpoint of this
//! host, goes straight into that endpoint's namespace (`bpf_redirect_peer`), as the host's
//! forwarding would have delivered it (next-hop MACs from the kernel's FIB and neighbour
//! table, TTL or hop limit one lower), without the forward path: the host's IP stack, its
//! netfilter hooks and the destination veth's TC egress. That egress hook would judge the
//! packet again by the same identities (a forwarded packet's destination identity is its
//! address's at either hook), so nothing enforcer checks is skipped. Anything else — a
//! destination of this host, a route out of another interface, a neighbour not resolved yet,
//! a TTL that runs out, a packet too big for the route, VLAN tags, IPv4 options — takes the
//! kernel's path, which answers it as it always did.
//!
//! Which interfaces take part is the controller's to say (`PEER_DELIVERY`): only veths it
//! attached TC ingress to, and only under that option, so the first check costs a packet an
//! array read and nothing more when the option is off.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_UNSPEC, bpf_fib_lookup},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect_peer},
    programs::TcContext,
};
use enforcer_common::{delivery, policy::proto};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    maps::PEER_DELIVERY,
    packet::{ETH_P_IP, ETH_P_IPV6, Frame},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// IPv4 header without options: version 4, 5 words.
const PLAIN_IPV4_VERSION_AND_LENGTH: u8 = 0x45;
/// The flow label and traffic class of an IPv6 header's first word, as the FIB takes them.
const IPV6_FLOWINFO_MASK: u32 = 0x0FFF_FFFF;

/// What the TC ingress program returns for a packet it passed, having entered through
/// `ifindex`: `TC_ACT_REDIRECT` once the packet is on its way into the namespace of the veth
/// endpoint its route leads to, else `TC_ACT_UNSPEC` (the kernel's path). The first check is
/// inlined: with the option off it is all a packet pays (a call would cost it about 9 ns).
#[inline(always)]
pub fn pass(ctx: &TcContext, ifindex: u32) -> i32 {
    if takes_part(ifindex) {
        redirect(ctx, ifindex)
    } else {
        TC_ACT_UNSPEC
    }
}

/// [`pass`] for a packet from an interface that takes part.
#[inline(never)]
fn redirect(ctx: &TcContext, ifindex: u32) -> i32 {
    let Some(route) = route(ctx, ifindex) else {
        return TC_ACT_UNSPEC;
    };
    if route.ifindex == ifindex || !takes_part(route.ifindex) || !forward(ctx, &route) {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: a helper taking plain integers; the kernel checks the interface.
    unsafe { bpf_redirect_peer(route.ifindex, 0) as i32 }
}

/// Whether the controller marked `ifindex` a veth endpoint of this host's BPF host routing.
#[inline(always)]
fn takes_part(ifindex: u32) -> bool {
    matches!(PEER_DELIVERY.get(ifindex), Some(&marked) if marked != 0)
}

/// Where the host would send the packet next: out of `ifindex`, from MAC `source` to
/// `destination`; for a plain IPv4 or IPv6 packet only (see [`header`]).
struct Route {
    ifindex: u32,
    source: [u8; 6],
    destination: [u8; 6],
    family: u8,
    /// The TTL (IPv4) or hop limit (IPv6) the packet arrived with.
    hops: u8,
}

/// The kernel's route for the packet entering through `ifindex`, with its next hop resolved,
/// the packet's size checked against the route's MTU (`tot_len` 0 asks the kernel to check the
/// skb itself, segments included) and room left in its TTL; `None` where the kernel's path
/// must decide.
#[inline(always)]
fn route(ctx: &TcContext, ifindex: u32) -> Option<Route> {
    // SAFETY: a plain C struct of integers, valid all zero.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.ifindex = ifindex;
    let hops = header(ctx, &mut params)?;
    if hops <= 1 {
        return None;
    }
    // SAFETY: the context and a parameter block of the size passed.
    let looked_up = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if looked_up != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return None;
    }
    Some(Route {
        ifindex: params.ifindex,
        source: params.smac,
        destination: params.dmac,
        family: params.family,
        hops,
    })
}

/// Fills the FIB lookup's addresses, protocol, ports and flow information from the packet's
/// headers and returns its TTL or hop limit; `None` for anything but an Ethernet frame of
/// plain IPv4 (no options) or IPv6 (TCP, UDP or ICMPv6 right after the fixed header).
#[inline(always)]
fn header(ctx: &TcContext, params: &mut bpf_fib_lookup) -> Option<u8> {
    let eth = ctx.header::<EthHdr>(0)?;
    let transport = match eth.be16::<12>() {
        ETH_P_IP => {
            let ip = ctx.header::<Ipv4Hdr>(EthHdr::LEN)?;
            if ip.u8::<0>() != PLAIN_IPV4_VERSION_AND_LENGTH {
                return None;
            }
            params.family = AF_INET;
            params.__bindgen_anon_2.tos = ip.u8::<1>();
            params.__bindgen_anon_3.ipv4_src = ip.be32::<12>().to_be();
            params.__bindgen_anon_4.ipv4_dst = ip.be32::<16>().to_be();
            // Later fragments carry no ports; their route is the first's without them.
            let later_fragment = ip.be16::<6>() & 0x1FFF != 0;
            (
                ip.u8::<9>(),
                ip.u8::<8>(),
                EthHdr::LEN + Ipv4Hdr::LEN,
                later_fragment,
            )
        }
        ETH_P_IPV6 => {
            let ip = ctx.header::<Ipv6Hdr>(EthHdr::LEN)?;
            let next = ip.u8::<6>();
            if next != proto::TCP && next != proto::UDP && next != proto::ICMPV6 {
                return None;
            }
            params.family = AF_INET6;
            params.__bindgen_anon_2.flowinfo = (ip.be32::<0>() & IPV6_FLOWINFO_MASK).to_be();
            params.__bindgen_anon_3.ipv6_src = [
                ip.be32::<8>().to_be(),
                ip.be32::<12>().to_be(),
                ip.be32::<16>().to_be(),
                ip.be32::<20>().to_be(),
            ];
            params.__bindgen_anon_4.ipv6_dst = [
                ip.be32::<24>().to_be(),
                ip.be32::<28>().to_be(),
                ip.be32::<32>().to_be(),
                ip.be32::<36>().to_be(),
            ];
            (next, ip.u8::<7>(), EthHdr::LEN + Ipv6Hdr::LEN, false)
        }
        _ => return None,
    };
    let (protocol, hops, transport_offset, later_fragment) = transport;
    params.l4_protocol = protocol;
    if (protocol == proto::TCP || protocol == proto::UDP) && !later_fragment {
        let ports = ctx.header::<[u16; 2]>(transport_offset)?;
        params.sport = ports.be16::<0>().to_be();
        params.dport = ports.be16::<2>().to_be();
    }
    Some(hops)
}

/// Makes the packet what the host's forwarding would have sent out of the route's interface:
/// the next hop's MACs, the TTL (with the IPv4 checksum, RFC 1624) or hop limit one lower.
/// False if the skb would not take the writes. The MACs first: a packet whose TTL write then
/// failed goes the kernel's way, which sets the MACs again and lowers the TTL once.
#[inline(always)]
fn forward(ctx: &TcContext, route: &Route) -> bool {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&route.destination);
    macs[6..].copy_from_slice(&route.source);
    if ctx.store(0, &macs, 0).is_err() {
        return false;
    }
    let hops = route.hops - 1;
    if route.family == AF_INET6 {
        return ctx.store(EthHdr::LEN + 7, &hops, 0).is_ok();
    }
    let Some(ip) = ctx.header::<Ipv4Hdr>(EthHdr::LEN) else {
        return false;
    };
    // TTL, protocol and checksum, as one write.
    let checksum = delivery::checksum_after_ttl_decrement(ip.be16::<10>());
    let [high, low] = checksum.to_be_bytes();
    ctx.store(EthHdr::LEN + 8, &[hops, ip.u8::<9>(), high, low], 0)
        .is_ok()
}
