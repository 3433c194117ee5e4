//! Generated policies: for benchmarks, many services and many rules, every rule a distinct
//! `(source, destination, port)` so each is one entry in the datapath's rule table; for tests
//! of precedence, small random policies whose rules overlap in every way.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
};

/// The address of generated service `index`: 10.100.(index / 256).(index % 256).
pub fn service_address(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, (index / 256) as u8, (index % 256) as u8)
}

/// The IPv6 address of generated service `index` in [`generated_dual_stack`]: fd00:100::`index`.
pub fn service_address6(index: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, index as u16)
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

/// [`generated`], each service with an IPv6 address as well ([`service_address6`]).
pub fn generated_dual_stack(services: usize, rules: usize) -> String {
    generate(services, rules, |_| None, true)
}

/// The rules of [`generated`]: (source service, destination service, TCP port) by index.
pub fn generated_rules(services: usize, rules: usize) -> impl Iterator<Item = (usize, usize, u16)> {
    (0..rules).map(move |rule| {
        let src = rule % services;
        (
            src,
            (src + 1 + rule / services) % services,
            rule_port(services, rule),
        )
    })
}

/// [`generated`], with rule `k`'s port replaced by `port(k)` where that returns one.
pub fn generated_with(
    services: usize,
    rules: usize,
    port: impl Fn(usize) -> Option<u16>,
) -> String {
    generate(services, rules, port, false)
}

fn generate(
    services: usize,
    rules: usize,
    port: impl Fn(usize) -> Option<u16>,
    dual_stack: bool,
) -> String {
    assert!(
        services >= 2 && rules / services < services - 1,
        "too many rules for {services} services"
    );
    let mut text = String::with_capacity(rules * 90 + services * 60);
    for index in 0..services {
        let ipv6 = if dual_stack {
            format!(", \"{}/128\"", service_address6(index))
        } else {
            String::new()
        };
        let _ = write!(
            text,
            "[[service]]\nname = \"s{index}\"\naddresses = [\"{}/32\"{ipv6}]\n",
            service_address(index)
        );
    }
    for (rule, (src, dst, default_port)) in generated_rules(services, rules).enumerate() {
        let port = port(rule).unwrap_or(default_port);
        let _ = write!(
            text,
            "[[allow]]\nfrom = \"s{src}\"\nto = \"s{dst}\"\nports = [\"{port}/tcp\"]\nid = \"r{rule}\"\n"
        );
    }
    text
}

/// The services of [`random`]: `a`, `b`, `c` at 10.0.0.1, .2, .3.
pub const RANDOM_SERVICES: [(&str, Ipv4Addr); 3] = [
    ("a", Ipv4Addr::new(10, 0, 0, 1)),
    ("b", Ipv4Addr::new(10, 0, 0, 2)),
    ("c", Ipv4Addr::new(10, 0, 0, 3)),
];

/// Numbers drawn from a seed: xorshift64, deterministic (the same policies and frames every
/// run) and no dependency for it.
pub struct Draw(u64);

impl Draw {
    pub fn from_seed(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// A number in `0..bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The ports [`random`] policies name lie in 78..=95: probing 76..96 covers each rule's ends
/// and the ports just past them.
pub const RANDOM_PORTS: std::ops::Range<u16> = 76..96;

/// A small policy drawn from `seed`: the three [`RANDOM_SERVICES`] and 1 to 12 allow and deny
/// rules (`r0`, `r1`, ...) between them, with exact ports, overlapping ranges, whole protocols,
/// ICMP and any-protocol rules, so that every precedence case of DESIGN §4 comes up.
pub fn random(seed: u64) -> String {
    let mut draw = Draw::from_seed(seed);
    let mut below = |bound: u64| draw.below(bound);
    let mut text = String::new();
    for (name, address) in RANDOM_SERVICES {
        let _ = write!(
            text,
            "[[service]]\nname = \"{name}\"\naddresses = [\"{address}/32\"]\n"
        );
    }
    for rule in 0..1 + below(12) {
        let kind = if below(10) < 3 { "deny" } else { "allow" };
        let from = RANDOM_SERVICES[below(3) as usize].0;
        let to = RANDOM_SERVICES[below(3) as usize].0;
        let mut ports = Vec::new();
        if below(7) > 0 {
            for _ in 0..1 + below(2) {
                let protocol = ["tcp", "udp"][below(2) as usize];
                ports.push(match below(5) {
                    0 | 1 => format!("\"{}/{protocol}\"", 80 + below(4)),
                    2 | 3 => {
                        let lo = 78 + below(12);
                        format!("\"{lo}-{}/{protocol}\"", lo + 1 + below(4))
                    }
                    _ if below(3) == 0 => "\"icmp\"".to_owned(),
                    _ => format!("\"{protocol}\""),
                });
            }
        }
        let ports = if ports.is_empty() {
            String::new()
        } else {
            format!("ports = [{}]\n", ports.join(", "))
        };
        let _ = write!(
            text,
            "[[{kind}]]\nfrom = \"{from}\"\nto = \"{to}\"\n{ports}id = \"r{rule}\"\n"
        );
    }
    text
}
