//! The event pipeline's per-record work on one core: a ring buffer record as the kernel hands
//! it over, decoded, described (names, rule, interface) and encoded as an OCSF alert line, as
//! the controller does for each record it reads, with the names of an installed generation.
//! The ring buffer read itself and the write to the alerts file are not in it (the `flood`
//! benchmark has the whole pipeline). Reported as records per second against the target of
//! 1 000 000 a second.

use std::time::{Duration, Instant};

use enforcer::{
    events::{self, Clock, Generations},
    outputs::alert::{AlertFormat, write_flow_alert},
};
use enforcer_common::{
    event::{FlowEvent, hook},
    verdict::{DENY, reason},
};
use enforcer_testbed::results;

const TARGET: f64 = 1_000_000.0;

/// The controller's allocator (see `src/main.rs`): the records' strings are its allocations.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `count` denied flows from a scanner to distinct ports, as the kernel sends them.
fn records(count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|index| {
            let event = FlowEvent {
                timestamp_ns: 1_000_000 + index as u64,
                seq: index as u64,
                src_addr: enforcer_common::addr::v4_mapped([10, 0, 0, 1]),
                dst_addr: enforcer_common::addr::v4_mapped([10, 0, 1, (index % 250) as u8]),
                src_identity: 1001,
                dst_identity: 1002 + (index % 8) as u32,
                addr_identity: 1001,
                rule: u32::MAX,
                generation: 1,
                ifindex: 1,
                count: 1,
                src_port: 40_000,
                dst_port: (index % 65_535) as u16 + 1,
                proto: 6,
                family: enforcer_common::addr::family::INET,
                verdict: DENY,
                reason: reason::DEFAULT_DENY,
                hook: hook::TC_INGRESS,
                ..FlowEvent::default()
            };
            // SAFETY: `FlowEvent` is plain `repr(C)` data with explicit padding.
            unsafe {
                std::slice::from_raw_parts(
                    (&event as *const FlowEvent).cast::<u8>(),
                    size_of::<FlowEvent>(),
                )
            }
            .to_vec()
        })
        .collect()
}

/// Generation 1: the services the records name (identities 1001 to 1009), as the controller
/// holds them once it installed the policy.
fn installed_generation() -> Generations {
    let mut text = String::new();
    for index in 0..9 {
        text.push_str(&format!(
            "[[service]]\nname = \"service-{index}\"\nidentity = {}\naddresses = [\"10.0.{index}.0/24\"]\n",
            1001 + index
        ));
    }
    text.push_str("[[allow]]\nfrom = \"service-0\"\nto = \"service-1\"\nports = [\"443/tcp\"]\n");
    let policy = enforcer::policy::parse_sources(vec![("policy.toml".into(), text)])
        .expect("the bench policy is valid");
    let compiled = enforcer::compile::compile(&policy, &Default::default(), None)
        .expect("the bench policy compiles");
    let mut generations = Generations::default();
    generations.insert(1, &compiled);
    generations
}

fn main() {
    let count = if results::quick() { 200_000 } else { 1_000_000 };
    let input = records(count);
    let generations = installed_generation();
    let clock = Clock::now();
    let mut line = String::with_capacity(1024);
    let mut rates = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let mut bytes = 0usize;
        for record in &input {
            let event = events::decode(record).expect("decodes");
            let described = events::describe(&event, &generations, &clock, |_| "v-api".to_owned())
                .expect("describes");
            line.clear();
            write_flow_alert(&mut line, &described, AlertFormat::Ocsf, "bench");
            line.push('\n');
            bytes += line.len();
        }
        let took: Duration = started.elapsed();
        rates.push(count as f64 / took.as_secs_f64());
        std::hint::black_box(bytes);
    }
    rates.sort_by(f64::total_cmp);
    let rate = rates[1];
    println!(
        "event pipeline, one core: {count} records decoded, described and encoded as OCSF lines, median of 3: {rate:.0} records/s ({:.2} of the 1 000 000/s target)",
        rate / TARGET
    );
    results::record(
        "pipeline",
        "ring record to OCSF line, one core",
        rate.round(),
        "records/s",
        Some(("target 1 000 000/s (anchor)", rate / TARGET)),
    );
}
