//! What a container runtime hands the CNI plugin: the network configuration on stdin and
//! `CNI_ARGS`. Any bytes give a configuration or a CNI error, never a panic.
#![no_main]

use enforcer::cni::config::{NetworkConfig, service_from_args};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let _ = NetworkConfig::parse(input);
    if let Ok(args) = std::str::from_utf8(input) {
        let _ = service_from_args(args);
    }
});
