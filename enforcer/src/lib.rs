//! The enforcer controller: policy language, compilation to the datapath's maps, loading and
//! pinning the eBPF programs, and the event pipeline. The `enforcer` binary is a thin CLI over
//! this library; integration tests use it directly too.

pub mod alert;
pub mod audit;
pub mod cli;
pub mod compile;
pub mod detect;
pub mod diff;
pub mod events;
pub mod host;
pub mod identity;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod observe;
pub mod policy;
pub mod run;
pub mod syslog;
pub mod watch;
