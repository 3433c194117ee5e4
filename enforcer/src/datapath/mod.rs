//! The kernel side of the controller: which BPF features this kernel has, loading, attaching
//! and pinning the programs, the maps a compiled policy is written into, and what this host
//! has (interfaces, addresses, cgroups) for the compiler to refer to.

mod bpf_sys;
pub(crate) mod enforcement;
pub mod hook;
pub(crate) mod host;
pub(crate) mod host_events;
pub(crate) mod kernel;
pub mod loader;
pub mod maps;
pub mod pins;
pub mod socket_hook;
mod tc_netlink;
