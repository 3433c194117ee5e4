//! Where programs are attached, and how.

use super::{
    kernel::Features,
    loader::{TC_EGRESS_PROGRAM, TC_INGRESS_PROGRAM, XDP_PROGRAM},
    tc_netlink,
};

/// Where a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    /// XDP: packets entering the host, before the stack sees them.
    Xdp,
    /// TC ingress: packets entering the host, as the stack's skbs.
    TcIngress,
    /// TC egress: packets leaving the host.
    TcEgress,
}

impl Hook {
    pub const ALL: [Self; 3] = [Self::Xdp, Self::TcIngress, Self::TcEgress];

    /// The pin name of its link (or TC filter record) on `interface`.
    pub fn pin_name(self, interface: &str) -> String {
        format!("{}-{interface}", self.as_str())
    }

    /// Its link's pin name prefix.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Xdp => "xdp",
            Self::TcIngress => "tci",
            Self::TcEgress => "tc",
        }
    }

    /// The TC direction of a TC hook (XDP has none: it is never a filter, so never recorded as
    /// one).
    pub(crate) fn tc_direction(self) -> tc_netlink::Direction {
        match self {
            Self::TcEgress => tc_netlink::Direction::Egress,
            Self::Xdp | Self::TcIngress => tc_netlink::Direction::Ingress,
        }
    }

    pub fn program(self) -> &'static str {
        match self {
            Self::Xdp => XDP_PROGRAM,
            Self::TcIngress => TC_INGRESS_PROGRAM,
            Self::TcEgress => TC_EGRESS_PROGRAM,
        }
    }
}

/// How TC programs are attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// TCX links where the kernel has them (6.6 and later), netlink filters before.
    #[default]
    Auto,
    /// TCX links (Linux 6.6 and later).
    Tcx,
    /// `cls_bpf` filters on a `clsact` qdisc, through netlink (any kernel).
    Netlink,
}

impl TcAttach {
    /// Whether TC programs go in as netlink filters on this kernel.
    pub fn uses_netlink(self) -> bool {
        match self {
            Self::Auto => !Features::current().tcx,
            Self::Tcx => false,
            Self::Netlink => true,
        }
    }
}

/// Which program judges packets entering the host through an interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum IngressHook {
    /// TC ingress on veths, XDP on everything else.
    #[default]
    Auto,
    /// XDP everywhere. On a veth it makes the driver drop segmentation offload on the peer,
    /// which costs most of the bandwidth between namespaces.
    Xdp,
    /// TC ingress everywhere.
    Tc,
}

impl IngressHook {
    /// The ingress hook for `interface`.
    pub fn for_interface(self, interface: &str) -> Hook {
        match self {
            Self::Xdp => Hook::Xdp,
            Self::Tc => Hook::TcIngress,
            Self::Auto if super::host::interface_driver(interface).as_deref() == Some("veth") => {
                Hook::TcIngress
            }
            Self::Auto => Hook::Xdp,
        }
    }
}

/// How a packet the TC ingress program passed, entering from one veth endpoint and routed to
/// another of this host, gets there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum HostRouting {
    /// Through the host's IP stack, as forwarded traffic: its netfilter hooks, routing and
    /// the destination veth's TC egress, where enforcer judges it a second time.
    #[default]
    Kernel,
    /// Straight into the destination endpoint's namespace (`bpf_redirect_peer`), with the
    /// next-hop MACs and TTL the kernel's forwarding would give it; netfilter's forward and
    /// postrouting hooks and qdiscs on the destination veth do not see it (as in Cilium's BPF
    /// host routing). Anything the FIB does not resolve to another enforced veth takes the
    /// kernel's path.
    Bpf,
}
