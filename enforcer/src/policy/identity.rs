//! Identity numbers derived without coordination: every host that loads the same policy computes
//! the same numbers (DESIGN §3).

use enforcer_common::identity::{CIDR_END, FIRST_SERVICE, SERVICE_END};
use ipnet::IpNet;

/// 32-bit FNV-1a: tiny, stable across versions and platforms, and good enough to spread names;
/// collisions are detected and reported, never resolved silently.
fn fnv1a(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in bytes {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// The identity of a service that does not declare one: a hash of its name into
/// `FIRST_SERVICE..SERVICE_END`.
pub fn of_service_name(name: &str) -> u32 {
    FIRST_SERVICE + fnv1a(name.as_bytes()) % (SERVICE_END - FIRST_SERVICE)
}

/// The identity of a CIDR peer: a hash of its canonical text into `SERVICE_END..CIDR_END`, a
/// range no service can take.
pub fn of_cidr(net: &IpNet) -> u32 {
    SERVICE_END + fnv1a(net.to_string().as_bytes()) % (CIDR_END - SERVICE_END)
}

/// The key of a rule's rate-limit bucket: stable across reloads while the rule id is.
pub fn of_rule_bucket(rule_id: &str) -> u32 {
    fnv1a(rule_id.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_identities_are_stable_and_in_range() {
        // Pinned values: changing the hash would renumber every fleet's services.
        assert_eq!(of_service_name("frontend"), of_service_name("frontend"));
        assert_eq!(fnv1a(b"a"), 0xe40c_292c);
        for name in [
            "frontend",
            "api",
            "db",
            "x",
            "a-very-long-service-name.with.dots",
        ] {
            let identity = of_service_name(name);
            assert!(
                (FIRST_SERVICE..SERVICE_END).contains(&identity),
                "{name} -> {identity}"
            );
        }
        let cidr = of_cidr(&"10.0.0.0/8".parse().unwrap());
        assert!((SERVICE_END..CIDR_END).contains(&cidr));
    }
}
