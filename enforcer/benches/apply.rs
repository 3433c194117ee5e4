//! Time from a policy file write to the kernel switching to it, measured end to end against a
//! running `enforcer run` (its file watch, parse, compile, map writes, generation switch): a full
//! 100 000-rule load, a one-rule change to that policy (reported as a ratio to the full load),
//! and a rule added in front of all the others.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use enforcer_testbed::{Daemon, Topology, policies, results};

const SERVICES: usize = 1_000;
const RULES: usize = 100_000;
const CHANGES: usize = 5;
/// Full loads of the 100 000-rule policy from a small one; the figure is their median.
const FULL_LOADS: usize = 3;
const ENFORCER: &str = env!("CARGO_BIN_EXE_enforcer");

/// Writes `text` as the new policy and waits for the controller to log generation `generation`;
/// returns the time from the end of the write to the switch and the controller's log line.
fn apply(daemon: &Daemon, policy: &Path, text: &str, generation: u32) -> (Duration, String) {
    // Written beside and renamed over: the controller sees one complete file, as from an editor
    // or a config-management tool.
    let staging = policy.with_extension("toml.new");
    std::fs::write(&staging, text).expect("policy written");
    let started = Instant::now();
    std::fs::rename(&staging, policy).expect("policy renamed into place");
    let marker = format!("generation={generation} ");
    loop {
        if let Some(line) = daemon
            .log_text()
            .lines()
            .find(|line| line.contains(&marker))
        {
            return (started.elapsed(), line.to_owned());
        }
        if started.elapsed() > Duration::from_secs(300) {
            panic!("generation {generation} never came:\n{}", daemon.log_text());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The controller's resident memory in KiB (`VmRSS`) and its peak (`VmHWM`).
fn memory_kib(daemon: &Daemon) -> (u64, u64) {
    let status = daemon
        .pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .unwrap_or_default();
    let read = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(0)
    };
    (read("VmRSS:"), read("VmHWM:"))
}

/// The maps that grow with the policy: rule and port-range entries, and the address tables.
const POLICY_MAPS: [&str; 5] = [
    "RULES",
    "PORT_RANGES",
    "IPCACHE",
    "IPCACHE_EXACT",
    "IPCACHE_EXACT4",
];
/// The policy's maps sized once, whatever the policy: the pair filter and the identity tables.
const FIXED_POLICY_MAPS: [&str; 4] = [
    "PAIR_FILTER",
    "IPCACHE_TABLE4",
    "IPCACHE_TABLE6",
    "ENDPOINT_TABLE",
];

/// The kernel memory the policy's maps use, in bytes, as bpftool reports it (`bytes_memlock`:
/// since 6.4 what the map's elements take, for maps that allocate them as they are added).
fn map_bytes(pins: &Path, maps: &[&str]) -> u64 {
    maps.iter()
        .map(|name| {
            let output = std::process::Command::new("bpftool")
                .args(["-j", "map", "show", "pinned"])
                .arg(pins.join("maps").join(name))
                .output()
                .expect("bpftool (cargo xtask setup installs it)");
            let info: serde_json::Value =
                serde_json::from_slice(&output.stdout).expect("bpftool's JSON");
            info["bytes_memlock"]
                .as_u64()
                .unwrap_or_else(|| panic!("no bytes_memlock for {name}: {info}"))
        })
        .sum()
}

fn field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split(&format!("{name}="))
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("?")
        .trim_matches('"')
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the apply benchmark runs enforcer: run it as root (cargo xtask bench)");
        std::process::exit(1);
    }
    let topology = Topology::build(&[]).expect("a namespace to run in");
    // The policy the controller starts with, and each later full load starts from.
    let small_text = policies::generated(2, 1);
    let policy = topology.write_file("policy.toml", &small_text).unwrap();
    let daemon = topology
        .run_enforcer(
            Path::new(ENFORCER),
            &["--policy".as_ref(), policy.as_os_str()],
            "enforcer.log",
        )
        .expect("enforcer starts");

    let before_bytes = map_bytes(&topology.pin_path(), &POLICY_MAPS);
    let full_text = policies::generated(SERVICES, RULES);
    let (full, full_line) = apply(&daemon, &policy, &full_text, 2);
    // What the controller holds once the reload is done (it brings the idle slot up to date
    // after the switch, and gives back what the reload freed).
    std::thread::sleep(Duration::from_secs(1));
    let (after_full, _) = memory_kib(&daemon);
    let policy_bytes = map_bytes(&topology.pin_path(), &POLICY_MAPS);
    let map_bytes_per_rule = policy_bytes.saturating_sub(before_bytes) as f64 / RULES as f64;
    let policy_mib = (policy_bytes + map_bytes(&topology.pin_path(), &FIXED_POLICY_MAPS)) as f64
        / (1 << 20) as f64;
    let mut changes = Vec::new();
    for change in 0..CHANGES {
        // Rule `change` moves to another port: one entry removed, one added.
        let text = policies::generated_with(SERVICES, RULES, |rule| {
            (rule == change).then_some(60_000 + change as u16)
        });
        changes.push(apply(&daemon, &policy, &text, 3 + change as u32));
        // Each change is made to a controller at rest, as an operator's would be: after a
        // switch it brings the idle slot up to date and writes the generation's names file
        // (100 000 rules' names), which on two cores would otherwise slow the next change.
        std::thread::sleep(Duration::from_secs(1));
    }
    for (took, line) in &changes {
        println!(
            "  change: {:>7.1} ms, {} map writes",
            took.as_secs_f64() * 1000.0,
            field(line, "writes")
        );
    }
    changes.sort_by_key(|(took, _)| *took);
    let (one_rule, one_rule_line) = &changes[changes.len() / 2];
    // A rule added in front of all the others: the others keep their rule numbers, so their
    // entries stay as they are.
    let added_text = format!(
        "[[allow]]\nfrom = \"s1\"\nto = \"s0\"\nports = [\"9/tcp\"]\nid = \"added\"\n{}",
        policies::generated(SERVICES, RULES)
    );
    let (added, added_line) = apply(&daemon, &policy, &added_text, 3 + CHANGES as u32);
    // At rest again, as after the full load.
    std::thread::sleep(Duration::from_secs(1));
    let (after_reloads, peak) = memory_kib(&daemon);
    // The full load once more from the small policy, twice, after the memory figures: one load
    // is one sample on a noisy machine, and the figure is their median.
    let mut full_loads = vec![(full, full_line)];
    let mut generation = 4 + CHANGES as u32;
    for _ in 1..FULL_LOADS {
        apply(&daemon, &policy, &small_text, generation);
        std::thread::sleep(Duration::from_secs(1));
        full_loads.push(apply(&daemon, &policy, &full_text, generation + 1));
        std::thread::sleep(Duration::from_secs(1));
        generation += 2;
    }
    for (took, _) in &full_loads {
        println!("  full load: {:>7.1} ms", took.as_secs_f64() * 1000.0);
    }
    full_loads.sort_by_key(|(took, _)| *took);
    let (full, full_line) = full_loads.swap_remove(FULL_LOADS / 2);

    println!(
        "policy apply, file write to kernel switch ({RULES} rules, {SERVICES} services, {} KiB of TOML)",
        full_text.len() / 1024
    );
    println!(
        "  full load:        {:>9.1} ms  (parse+compile {} ms, map writes+switch {} ms, {} map writes; median of {FULL_LOADS})",
        full.as_secs_f64() * 1000.0,
        field(&full_line, "compile_ms"),
        field(&full_line, "switch_ms"),
        field(&full_line, "writes")
    );
    println!(
        "  one-rule change:  {:>9.1} ms  (parse+compile {} ms, map writes+switch {} ms, {} map writes; median of {CHANGES})",
        one_rule.as_secs_f64() * 1000.0,
        field(one_rule_line, "compile_ms"),
        field(one_rule_line, "switch_ms"),
        field(one_rule_line, "writes")
    );
    println!(
        "  rule added first: {:>9.1} ms  (parse+compile {} ms, map writes+switch {} ms, {} map writes)",
        added.as_secs_f64() * 1000.0,
        field(&added_line, "compile_ms"),
        field(&added_line, "switch_ms"),
        field(&added_line, "writes")
    );
    let switch = |line: &str| field(line, "switch_ms").parse::<f64>().unwrap_or(f64::NAN);
    let ms = |took: &Duration| took.as_secs_f64() * 1000.0;
    results::record(
        "apply",
        &format!("full load, {RULES} rules"),
        ms(&full),
        "ms",
        Some(("target 500 ms (anchor)", ms(&full) / 500.0)),
    );
    results::record(
        "apply",
        &format!("one-rule change, {RULES} rules, file write to kernel switch"),
        ms(one_rule),
        "ms",
        Some(("target 20 ms (anchor)", ms(one_rule) / 20.0)),
    );
    results::record(
        "apply",
        &format!("one-rule change, {RULES} rules, map writes and switch"),
        switch(one_rule_line),
        "ms",
        Some(("full load's", switch(one_rule_line) / switch(&full_line))),
    );
    results::record(
        "apply",
        &format!("rule added first, {RULES} rules"),
        ms(&added),
        "ms",
        Some(("full load", added.as_secs_f64() / full.as_secs_f64())),
    );
    println!(
        "  one-rule change / full load, end to end:           {:.3}",
        one_rule.as_secs_f64() / full.as_secs_f64()
    );
    println!(
        "  one-rule change / full load, map writes + switch:  {:.3}",
        switch(one_rule_line) / switch(&full_line)
    );
    println!(
        "kernel map memory per rule: {map_bytes_per_rule:.0} bytes ({} together)",
        POLICY_MAPS.join(", ")
    );
    results::record(
        "apply",
        &format!("kernel map memory per rule, {RULES} rules"),
        map_bytes_per_rule.round(),
        "bytes",
        Some(("target 150 bytes (anchor)", map_bytes_per_rule / 150.0)),
    );
    println!(
        "kernel map memory of the policy's tables: {policy_mib:.1} MiB ({} with {})",
        POLICY_MAPS.join(", "),
        FIXED_POLICY_MAPS.join(", ")
    );
    results::record(
        "apply",
        &format!("kernel map memory of the policy's tables, sized ones included, {RULES} rules"),
        policy_mib.round(),
        "MiB",
        None,
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    results::record(
        "apply",
        &format!("controller memory after the full load, {RULES} rules"),
        mib(after_full).round(),
        "MiB",
        Some(("target 100 MiB (anchor)", mib(after_full) / 100.0)),
    );
    results::record(
        "apply",
        &format!("controller memory after {} more reloads", CHANGES + 1),
        mib(after_reloads).round(),
        "MiB",
        Some((
            "after the full load",
            after_reloads as f64 / after_full as f64,
        )),
    );
    results::record(
        "apply",
        "controller memory, peak",
        mib(peak).round(),
        "MiB",
        None,
    );
    println!(
        "controller memory: {:.0} MiB after the full load, {:.0} MiB after {} more reloads ({:.2}x), peak {:.0} MiB",
        mib(after_full),
        mib(after_reloads),
        CHANGES + 1,
        after_reloads as f64 / after_full as f64,
        mib(peak)
    );
    drop(daemon);
}
