//! Generated policies for benchmarks: many services, many rules, every rule a distinct
//! `(source, destination, port)` so each is one entry in the datapath's rule table.

use std::{fmt::Write as _, net::Ipv4Addr};

/// The address of generated service `index`: 10.100.(index / 256).(index % 256).
pub fn service_address(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, (index / 256) as u8, (index % 256) as u8)
}

/// The port of rule `rule` in a policy of `services` services.
pub fn rule_port(services: usize, rule: usize) -> u16 {
    10_000 + (rule / services) as u16
}

/// `services` services `s0..` and `rules` allow rules; rule `k` allows `s(k % services)` to
/// reach `s((k % services) + 1 + k / services)` on port `10000 + k / services`. So `s0 -> s1`
/// on 10000/tcp is allowed and `s1 -> s0` is not, whatever the size.
pub fn generated(services: usize, rules: usize) -> String {
    generated_with(services, rules, |_| None)
}

/// [`generated`], with rule `k`'s port replaced by `port(k)` where that returns one.
pub fn generated_with(
    services: usize,
    rules: usize,
    port: impl Fn(usize) -> Option<u16>,
) -> String {
    assert!(
        services >= 2 && rules / services < services - 1,
        "too many rules for {services} services"
    );
    let mut text = String::with_capacity(rules * 90 + services * 60);
    for index in 0..services {
        let _ = write!(
            text,
            "[[service]]\nname = \"s{index}\"\naddresses = [\"{}/32\"]\n",
            service_address(index)
        );
    }
    for rule in 0..rules {
        let src = rule % services;
        let dst = (src + 1 + rule / services) % services;
        let port = port(rule).unwrap_or_else(|| rule_port(services, rule));
        let _ = write!(
            text,
            "[[allow]]\nfrom = \"s{src}\"\nto = \"s{dst}\"\nports = [\"{port}/tcp\"]\nid = \"r{rule}\"\n"
        );
    }
    text
}
