//! The enforcer datapath. Packets entering the host are judged by XDP (physical interfaces) or
//! TC ingress (veths, where an XDP program makes the driver give up segmentation offload);
//! packets leaving it by TC egress. All run the same decision (`verdict::judge`); the entry
//! points only describe where the packet was seen.
#![no_std]
#![no_main]
// `asm!` keeps bounds in a form every verifier follows (see `packet::opaque`).
#![feature(asm_experimental_arch)]

mod clock;
mod conclude;
mod conntrack;
mod cpu_state;
mod delivery;
mod flow;
mod flow_cache;
mod fragments;
mod identity;
mod maps;
mod packet;
mod report;
mod rules;
mod sockets;
mod subject;
mod verdict;

use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::{bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id},
    macros::{cgroup_skb, classifier, xdp},
    programs::{SkBuffContext, TcContext, XdpContext},
};
use enforcer_common::{event::hook, verdict::DENY};

use crate::{packet::Frame, report::Hook};

/// Bytes of an skb made linear before parsing: enough for two VLAN tags, IPv6 with extension
/// headers, and the packet an ICMP error quotes.
const TC_PARSE_BYTES: u32 = 256;

// The bounds come from volatile reads of the context: LLVM would otherwise hoist the loads into
// the caller and pass packet pointers into a BPF subprogram, which the verifier refuses (it only
// trusts packet pointers derived from the context in the same function).
impl Frame for XdpContext {
    #[inline(always)]
    fn context(&self) -> *mut core::ffi::c_void {
        self.ctx.cast()
    }

    #[inline(always)]
    fn start(&self) -> usize {
        // SAFETY: `ctx` is the context pointer the kernel passed in.
        unsafe { core::ptr::read_volatile(&(*self.ctx).data) as usize }
    }

    #[inline(always)]
    fn end(&self) -> usize {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&(*self.ctx).data_end) as usize }
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn context(&self) -> *mut core::ffi::c_void {
        self.skb.skb.cast()
    }

    #[inline(always)]
    fn start(&self) -> usize {
        skb_data(self.skb.skb)
    }

    #[inline(always)]
    fn end(&self) -> usize {
        skb_data_end(self.skb.skb)
    }

    #[inline(always)]
    fn socket_cgroup_ancestor(&self, level: i32) -> u64 {
        skb_socket_cgroup_ancestor(self.skb.skb, level)
    }
}

/// A cgroup_skb program's skb: it starts at the IP header, and its socket is the receiving one.
impl Frame for SkBuffContext {
    const AT_INTERFACE: bool = false;

    #[inline(always)]
    fn start(&self) -> usize {
        skb_data(self.skb.skb)
    }

    #[inline(always)]
    fn end(&self) -> usize {
        skb_data_end(self.skb.skb)
    }

    #[inline(always)]
    fn network_protocol(&self) -> Option<u16> {
        // SAFETY: `skb` is the context pointer the kernel passed in.
        Some(u16::from_be(unsafe { (*self.skb.skb).protocol } as u16))
    }

    #[inline(always)]
    fn socket_cgroup_ancestor(&self, level: i32) -> u64 {
        skb_socket_cgroup_ancestor(self.skb.skb, level)
    }
}

// What TC and cgroup_skb programs read alike from their `__sk_buff` context (`skb` is always
// the context pointer the kernel passed in).

#[inline(always)]
fn skb_data(skb: *mut __sk_buff) -> usize {
    // SAFETY: see above.
    unsafe { core::ptr::read_volatile(&(*skb).data) as usize }
}

#[inline(always)]
fn skb_data_end(skb: *mut __sk_buff) -> usize {
    // SAFETY: see above.
    unsafe { core::ptr::read_volatile(&(*skb).data_end) as usize }
}

/// The ancestor at `level` of the skb's socket's cgroup: the sending socket's at TC egress, the
/// receiving one's in a cgroup_skb ingress program; 0 without a socket.
#[inline(always)]
fn skb_socket_cgroup_ancestor(skb: *mut __sk_buff, level: i32) -> u64 {
    // SAFETY: see above.
    unsafe { bpf_skb_ancestor_cgroup_id(skb, level) }
}

#[xdp]
pub fn enf_xdp_ingress(ctx: XdpContext) -> u32 {
    let mut hook = Hook {
        kind: hook::XDP_INGRESS,
        ifindex: ctx.ingress_ifindex() as u32,
        arrived_on: ctx.ingress_ifindex() as u32,
        cgroup_id: 0,
        receiving_cgroup: 0,
        len: (ctx.end() - ctx.start()) as u32,
        now: clock::now(),
    };
    match verdict::judge(&ctx, &mut hook, identity::active_config()) {
        DENY => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

#[classifier]
pub fn enf_tc_ingress(ctx: TcContext) -> i32 {
    judge_skb(&ctx, hook::TC_INGRESS)
}

#[classifier]
pub fn enf_tc_egress(ctx: TcContext) -> i32 {
    judge_skb(&ctx, hook::TC_EGRESS)
}

/// Packets as they are delivered to a socket of this host; judges those an interface hook
/// handed over and those a cgroup service's socket receives (see `sockets`). Attached to the
/// cgroup v2 root, so it runs for every socket.
#[cgroup_skb(ingress)]
pub fn enf_socket_ingress(ctx: SkBuffContext) -> i32 {
    const PASS: i32 = 1;
    let skb = ctx.skb.skb;
    // SAFETY: `skb` is the context pointer the kernel passed in.
    let ifindex = unsafe { (*skb).ifindex };
    let config = identity::active_config();
    if !verdict::socket_hook_may_judge(ifindex, config) {
        return PASS;
    }
    let mut hook = Hook {
        kind: hook::SOCKET_INGRESS,
        ifindex,
        // The interface hook that handed the packet over checked where it came from.
        arrived_on: 0,
        cgroup_id: 0,
        // SAFETY: as above; the skb's socket is the receiving one here.
        receiving_cgroup: unsafe { bpf_skb_cgroup_id(skb) },
        len: ctx.len(),
        now: clock::now(),
    };
    match verdict::judge(&ctx, &mut hook, config) {
        DENY => 0,
        _ => PASS,
    }
}

/// The TC programs' shared body: make the headers readable, describe the hook, judge.
#[inline(always)]
fn judge_skb(ctx: &TcContext, kind: u8) -> i32 {
    let wanted = core::cmp::min(ctx.len(), TC_PARSE_BYTES);
    if ctx.end() - ctx.start() < wanted as usize {
        // Headers in paged data would be invisible to direct access; a failure leaves the frame
        // as it was and the parser then refuses what it cannot read.
        let _ = ctx.pull_data(wanted);
    }
    let skb = ctx.skb.skb;
    let mut hook = Hook {
        kind,
        // SAFETY: `skb` is the context pointer the kernel passed in.
        ifindex: unsafe { (*skb).ifindex },
        arrived_on: if kind == hook::TC_EGRESS {
            // SAFETY: as above.
            unsafe { (*skb).ingress_ifindex }
        } else {
            // SAFETY: as above.
            unsafe { (*skb).ifindex }
        },
        // Only a locally sent packet has a socket (and so a cgroup); it leaves through egress.
        cgroup_id: if kind == hook::TC_EGRESS {
            unsafe { bpf_skb_cgroup_id(skb) }
        } else {
            0
        },
        receiving_cgroup: 0,
        len: ctx.len(),
        now: clock::now(),
    };
    match verdict::judge(ctx, &mut hook, identity::active_config()) {
        DENY => TC_ACT_SHOT as i32,
        _ if kind == hook::TC_INGRESS => delivery::pass(ctx, hook.ifindex),
        // Let any later TCX program have its say (TCX_NEXT).
        _ => TC_ACT_UNSPEC,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program with a reachable panic path, so this is never linked in
    // a loadable object.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
