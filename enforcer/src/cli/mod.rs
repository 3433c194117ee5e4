//! The command line (DESIGN §6) and the operator commands' output.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, UNIX_EPOCH},
};

use clap::{Args, Parser, Subcommand};
use enforcer_common::{
    identity::{HOST, IdentityInfo, WORLD},
    policy::{action, proto},
    verdict::{Verdict, reason_name},
};

use crate::{
    compile::{self, Compiled, HostView},
    datapath::host,
    datapath::maps::KernelMaps,
    datapath::{
        hook::{IngressHook, TcAttach},
        loader::{self, DEFAULT_PIN_PATH},
        pins::PinLayout,
    },
    outputs::alert::AlertFormat,
    policy::{self, Peer, Policy, PortMatch, Protocol},
    run::{self, RunError, RunOptions},
};

#[derive(Debug, Parser)]
#[command(
    name = "enforcer",
    version,
    about = "Zero-trust segmentation between services, enforced in the kernel with eBPF."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the policy, attach to interfaces and enforce until stopped; reload on SIGHUP.
    Run(RunArgs),
    /// Validate a policy; print its services, identities and rule counts.
    Check {
        /// A policy file or a directory of *.toml files.
        path: PathBuf,
    },
    /// Show the verdict for a flow and the rule that decides it.
    Explain {
        path: PathBuf,
        /// A service name, "world", "host", or an address/CIDR.
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        /// PORT/PROTO (e.g. 443/tcp) or a protocol (icmp); omitted: every rule on the edge.
        #[arg(long)]
        port: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// What changes between two policies: edges added, removed, changed; with --replay, the
    /// flows recorded in an audit log that the new policy would newly deny or allow.
    Diff {
        old: PathBuf,
        new: PathBuf,
        #[arg(long, value_name = "AUDIT_LOG")]
        replay: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Show the pinned datapath: programs, generation, attached interfaces, counters.
    Status {
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Live flow records from the running controller (the recent ones; with --follow, new ones
    /// as they come).
    Observe {
        #[arg(long)]
        follow: bool,
        /// Only flows from or to this service (or world, host, a CIDR).
        #[arg(long)]
        service: Option<String>,
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
        /// allow, deny or audit.
        #[arg(long)]
        verdict: Option<String>,
        /// Destination port.
        #[arg(long)]
        port: Option<u16>,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// The controller's socket (default: /run/enforcer/<pin directory name>.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Verify the hash chain of an audit log: one file, or the files of a rotated log, oldest
    /// first.
    AuditVerify {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Detach, unpin and remove everything under the pin path.
    Unload {
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// What this kernel gives the datapath (BPF features probed), and how enforcer uses it;
    /// exits 2 on a kernel enforcer cannot run on.
    Features,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A policy file or a directory of *.toml files.
    #[arg(long)]
    pub policy: PathBuf,
    /// Interface to enforce on (repeatable): judged entering and leaving the host.
    #[arg(long = "attach", value_name = "IFACE")]
    pub attach: Vec<String>,
    /// Program for packets entering the host: XDP, TC ingress, or auto (TC on veths, where XDP
    /// costs the peer its segmentation offload; XDP elsewhere).
    #[arg(long, value_enum, default_value_t = IngressHook::Auto)]
    pub ingress_hook: IngressHook,
    /// How TC programs are attached: TCX links (Linux 6.6 and later), netlink filters on a
    /// clsact qdisc (any kernel), or auto (TCX where the kernel has it).
    #[arg(long, value_enum, default_value_t = TcAttach::Auto)]
    pub tc_attach: TcAttach,
    /// Write alerts (JSON Lines) to PATH, or to stdout with "-".
    #[arg(long, value_name = "PATH|-")]
    pub alerts: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = AlertFormat::Ocsf)]
    pub alert_format: AlertFormat,
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// On SIGINT/SIGTERM detach and unpin everything, instead of leaving enforcement in place.
    #[arg(long)]
    pub ephemeral: bool,
    /// Serve Prometheus metrics on PORT or HOST:PORT (127.0.0.1 unless a host is given).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Append the hash-chained audit log to PATH.
    #[arg(long, value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
    /// Serve `enforcer observe` on this Unix socket (default: /run/enforcer/<pin directory name>.sock).
    #[arg(long, value_name = "PATH")]
    pub observe_socket: Option<PathBuf>,
    /// Send the alert records to a syslog collector too (RFC 5424 over TCP, or over TLS as in
    /// RFC 5425).
    #[arg(long, value_name = "tcp://HOST:PORT|tls://HOST:PORT")]
    pub syslog: Option<String>,
    /// CA certificates (PEM) a tls:// syslog collector's certificate must chain to.
    #[arg(long, value_name = "PATH", default_value = crate::outputs::syslog::SYSTEM_CA_BUNDLE)]
    pub syslog_ca: PathBuf,
    /// This host's certificate (PEM, with any intermediates) for a tls:// collector that asks
    /// for one (mutual TLS); needs --syslog-key.
    #[arg(long, value_name = "PATH", requires = "syslog_key")]
    pub syslog_cert: Option<PathBuf>,
    /// The private key (PEM) of --syslog-cert.
    #[arg(long, value_name = "PATH", requires = "syslog_cert")]
    pub syslog_key: Option<PathBuf>,
    /// Seconds between heartbeat records (policy hash, generation, program tags, audit chain head).
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_interval: u64,
    /// Keep the edges `new_edge` has reported in this file, so a restart does not report them again.
    #[arg(long, value_name = "PATH")]
    pub edge_baseline: Option<PathBuf>,
}

/// How a command failed: the operator's input (exit 1) or the system (exit 2).
#[derive(Debug)]
pub enum Failure {
    BadInput(String),
    Runtime(String),
}

impl From<RunError> for Failure {
    fn from(error: RunError) -> Self {
        if error.is_bad_input() {
            Self::BadInput(with_causes(&error))
        } else {
            Self::Runtime(with_causes(&error))
        }
    }
}

/// `error` followed by each cause its message does not already include: aya's errors name the
/// failed call and keep the errno (what says *why*) as their source.
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        let text = error.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        cause = error.source();
    }
    message
}

pub fn execute(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Run(args) => {
            let metrics = args
                .metrics
                .as_deref()
                .map(crate::outputs::metrics::parse_listen_address)
                .transpose()
                .map_err(Failure::BadInput)?;
            let observe_socket = args
                .observe_socket
                .unwrap_or_else(|| PinLayout::new(&args.pin_path).observe_socket());
            let syslog = args
                .syslog
                .as_deref()
                .map(|text| {
                    let (host, port, tls) = crate::outputs::syslog::parse_target(text)?;
                    let client = args.syslog_cert.clone().zip(args.syslog_key.clone()).map(
                        |(certificate_chain, key)| crate::outputs::syslog::ClientFiles {
                            certificate_chain,
                            key,
                        },
                    );
                    if !tls && client.is_some() {
                        return Err("--syslog-cert needs a tls:// --syslog".to_owned());
                    }
                    let tls = tls
                        .then(|| {
                            let files = crate::outputs::syslog::TlsFiles {
                                ca_bundle: args.syslog_ca.clone(),
                                client,
                            };
                            // Checked now, so that a wrong path stops `run` at start.
                            files.config().map(|_| files)
                        })
                        .transpose()?;
                    Ok(crate::outputs::syslog::SyslogTarget { host, port, tls })
                })
                .transpose()
                .map_err(Failure::BadInput)?;
            let options = RunOptions {
                policy: args.policy,
                attach: args.attach,
                ingress_hook: args.ingress_hook,
                tc_attach: args.tc_attach,
                pin_path: args.pin_path,
                alerts: args.alerts,
                alert_format: args.alert_format,
                ephemeral: args.ephemeral,
                metrics,
                audit_log: args.audit_log,
                observe_socket,
                syslog,
                heartbeat_interval: std::time::Duration::from_secs(args.heartbeat_interval),
                edge_baseline: args.edge_baseline,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|error| {
                    Failure::Runtime(format!("starting the async runtime: {error}"))
                })?;
            runtime.block_on(run::run(options)).map_err(Failure::from)
        }
        Command::Check { path } => {
            let (policy, compiled) = load_offline(&path)?;
            print!("{}", check_report(&policy, &compiled));
            Ok(())
        }
        Command::Explain {
            path,
            from,
            to,
            port,
            json,
        } => {
            let (policy, compiled) = load_offline(&path)?;
            let text = explain(&policy, &compiled, &from, &to, port.as_deref(), json)
                .map_err(Failure::BadInput)?;
            print!("{text}");
            Ok(())
        }
        Command::Diff {
            old,
            new,
            replay,
            json,
        } => {
            let (_, old) = load_offline(&old)?;
            let (_, new) = load_offline(&new)?;
            let mut result = crate::compile::diff::diff(&old, &new);
            if let Some(log) = replay {
                crate::compile::diff::replay(&mut result, &old, &new, &log).map_err(|error| {
                    Failure::BadInput(format!("reading {}: {error}", log.display()))
                })?;
            }
            if json {
                println!("{}", result.to_json());
            } else {
                print!("{}", result.to_text());
            }
            Ok(())
        }
        Command::Observe {
            follow,
            service,
            from,
            to,
            verdict,
            port,
            json,
            pin_path,
            socket,
        } => {
            let socket = socket.unwrap_or_else(|| PinLayout::new(&pin_path).observe_socket());
            let filter = crate::outputs::observe::Filter {
                service,
                from,
                to,
                verdict,
                port,
            };
            crate::outputs::observe::watch(&socket, follow, &filter, json, std::io::stdout().lock())
                .map_err(|error| Failure::Runtime(error.to_string()))
        }
        Command::AuditVerify { paths } => {
            let named = paths
                .iter()
                .map(|path| path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            match crate::outputs::audit::verify(&paths) {
                Ok(crate::outputs::audit::Verification::Intact { records, head }) => {
                    println!("{named}: intact, {records} records, chain head {head}");
                    Ok(())
                }
                Ok(crate::outputs::audit::Verification::Broken {
                    path,
                    line,
                    problem,
                }) => Err(Failure::BadInput(format!(
                    "{}:{line}: {problem}",
                    path.display()
                ))),
                Err(error) => Err(Failure::Runtime(format!("reading {named}: {error}"))),
            }
        }
        Command::Status { pin_path } => {
            let (report, enforced) = status(&PinLayout::new(pin_path))?;
            print!("{report}");
            if enforced == 0 {
                return Err(Failure::Runtime(
                    "nothing is enforced: no interface has enforcer's programs attached".to_owned(),
                ));
            }
            Ok(())
        }
        Command::Features => {
            let features = crate::datapath::kernel::Features::current();
            for (ok, line) in features.report() {
                println!("{} {line}", if ok { "ok     " } else { "MISSING" });
            }
            features
                .check_minimum()
                .map_err(|error| Failure::Runtime(error.to_string()))
        }
        Command::Unload { pin_path } => {
            let pins = PinLayout::new(pin_path);
            let removed = loader::unload(&pins).map_err(|error| {
                Failure::Runtime(format!("unloading {}: {error}", pins.root.display()))
            })?;
            if removed.is_empty() {
                println!("nothing pinned at {}", pins.root.display());
            } else {
                println!(
                    "removed {} pins under {}; enforcement is off",
                    removed.len(),
                    pins.root.display()
                );
            }
            Ok(())
        }
    }
}

/// Loads and compiles a policy without looking at this host (for `check`, `explain`).
fn load_offline(path: &Path) -> Result<(Policy, Compiled), Failure> {
    let policy = policy::load(path).map_err(|error| Failure::BadInput(error.to_string()))?;
    let compiled = compile::compile(&policy, &HostView::default(), None)
        .map_err(|error| Failure::BadInput(error.to_string()))?;
    Ok((policy, compiled))
}

pub fn check_report(policy: &Policy, compiled: &Compiled) -> String {
    let mut out = String::new();
    let files: Vec<String> = policy
        .files
        .iter()
        .map(|file| file.display().to_string())
        .collect();
    let _ = writeln!(out, "policy {} is valid", files.join(", "));
    let _ = writeln!(out, "sha256 {}", policy.hash_hex());
    let _ = writeln!(
        out,
        "mode {}, manage_host {}",
        policy.mode.as_str(),
        policy.manage_host
    );
    let _ = writeln!(out, "\n{} services:", policy.services.len());
    let _ = writeln!(
        out,
        "  {:<20} {:>10}  {:<8} {:<8} MEMBERS",
        "NAME", "IDENTITY", "FROM", "MODE"
    );
    for service in &policy.services {
        let mut members: Vec<String> = service.addresses.iter().map(ToString::to_string).collect();
        members.extend(
            service
                .interfaces
                .iter()
                .map(|name| format!("iface:{name}")),
        );
        members.extend(
            service
                .cgroups
                .iter()
                .map(|path| format!("cgroup:{}", path.display())),
        );
        let _ = writeln!(
            out,
            "  {:<20} {:>10}  {:<8} {:<8} {}",
            service.name,
            service.identity,
            if service.identity_declared {
                "declared"
            } else {
                "hashed"
            },
            policy.service_mode(service).as_str(),
            if members.is_empty() {
                "-".to_owned()
            } else {
                members.join(" ")
            }
        );
    }
    let allows = policy
        .rules
        .iter()
        .filter(|rule| rule.kind == policy::RuleKind::Allow)
        .count();
    let limited = policy
        .rules
        .iter()
        .filter(|rule| rule.max_new_per_sec.is_some())
        .count();
    let _ = writeln!(
        out,
        "\n{} rules: {allows} allow ({limited} rate-limited), {} deny",
        policy.rules.len(),
        policy.rules.len() - allows
    );
    let entries: Vec<String> = compiled
        .tables
        .entry_counts()
        .iter()
        .map(|(table, count)| format!("{table} {count}"))
        .collect();
    let _ = writeln!(
        out,
        "compiled entries: {} (interfaces and cgroups resolve when `run` starts)",
        entries.join(", ")
    );
    out
}

/// The identity a peer written on the command line resolves to.
fn resolve_peer(policy: &Policy, compiled: &Compiled, text: &str) -> Result<IdentityInfo, String> {
    match policy.parse_peer(text)? {
        Peer::Service(index) => Ok(compiled
            .names
            .identity_info(policy.services[index].identity)),
        Peer::World => Ok(compiled.names.identity_info(WORLD)),
        Peer::Host => Ok(compiled.names.identity_info(HOST)),
        Peer::Cidr(net) => {
            let by_name = compiled
                .names
                .identities
                .values()
                .find(|(name, _)| *name == net.to_string())
                .map(|(_, info)| *info);
            Ok(by_name.unwrap_or_else(|| compiled.resolve_address(net.network())))
        }
    }
}

fn explain(
    policy: &Policy,
    compiled: &Compiled,
    from: &str,
    to: &str,
    port: Option<&str>,
    json: bool,
) -> Result<String, String> {
    let src = resolve_peer(policy, compiled, from)?;
    let dst = resolve_peer(policy, compiled, to)?;
    let probes: Vec<(u8, u16, String)> = match port {
        Some(text) => match text.parse::<PortMatch>()? {
            PortMatch::Port(protocol, number) => vec![(
                protocol.number(),
                number,
                format!("{number}/{}", protocol.as_str()),
            )],
            PortMatch::AnyPort(Protocol::Icmp) => vec![(proto::ICMP, 0, "icmp".to_owned())],
            other => {
                return Err(format!(
                    "--port takes one port (e.g. 443/tcp) or icmp, not {other}"
                ));
            }
        },
        None => edge_probes(compiled, &src, &dst),
    };
    let mut out = String::new();
    let mut answers = Vec::new();
    for (protocol, number, label) in probes {
        let verdict = compiled.evaluate(&src, &dst, protocol, number);
        let allowed = verdict.action == action::ALLOW;
        let rule_id = compiled.names.rule_id(verdict.rule);
        let rule = compiled.names.rules.get(&verdict.rule);
        if json {
            answers.push(serde_json::json!({
                "from": compiled.names.identity_name(src.identity),
                "to": compiled.names.identity_name(dst.identity),
                "port": label,
                "verdict": if allowed { "allow" } else { "deny" },
                "rule": rule_id,
                "max_new_per_sec": verdict.max_new_per_sec,
            }));
            continue;
        }
        let _ = writeln!(
            out,
            "{} -> {} {label}: {} by {rule_id}",
            compiled.names.identity_name(src.identity),
            compiled.names.identity_name(dst.identity),
            if allowed { "allow" } else { "deny" },
        );
        match rule {
            Some(rule) => {
                let limit = rule
                    .max_new_per_sec
                    .map(|limit| format!(", at most {limit} new connections/s"))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {} {} -> {} ports {}{limit}",
                    rule.kind.as_str(),
                    rule.from,
                    rule.to,
                    rule.ports
                );
            }
            None if !allowed => {
                let _ = writeln!(
                    out,
                    "  no rule allows it and a declared service is involved (default-deny)"
                );
            }
            None => {
                let _ = writeln!(out, "  neither side is a declared service (default-allow)");
            }
        }
    }
    if json {
        out = serde_json::to_string_pretty(&answers).map_err(|error| error.to_string())? + "\n";
    }
    Ok(out)
}

/// One probe per distinct entry the compiled tables hold for this edge, plus a port no rule
/// names, so `explain` without `--port` shows everything that applies.
fn edge_probes(
    compiled: &Compiled,
    src: &IdentityInfo,
    dst: &IdentityInfo,
) -> Vec<(u8, u16, String)> {
    let mut probes = Vec::new();
    for key in compiled
        .tables
        .rules
        .keys()
        .filter(|key| key.src_identity == src.identity && key.dst_identity == dst.identity)
    {
        let label = match (key.proto, key.port) {
            (enforcer_common::policy::ANY_PROTO, _) => "any protocol".to_owned(),
            (protocol, 0) => compile::protocol_name(protocol),
            (protocol, port) => format!("{port}/{}", compile::protocol_name(protocol)),
        };
        probes.push((
            if key.proto == 0 {
                proto::UDP
            } else {
                key.proto
            },
            key.port,
            label,
        ));
    }
    for (key, ranges) in compiled
        .tables
        .ranges
        .iter()
        .filter(|(key, _)| key.src_identity == src.identity && key.dst_identity == dst.identity)
    {
        for range in &ranges.ranges[..ranges.count as usize] {
            probes.push((
                key.proto,
                range.lo,
                format!(
                    "{}-{}/{}",
                    range.lo,
                    range.hi,
                    compile::protocol_name(key.proto)
                ),
            ));
        }
    }
    probes.push((proto::TCP, 1, "other ports".to_owned()));
    probes
}

fn format_time(nanos: u64) -> String {
    let time = UNIX_EPOCH + Duration::from_nanos(nanos);
    crate::outputs::alert::rfc3339(time)
}

/// The report, and how many (interface, hook) attachments the kernel really runs.
fn status(pins: &PinLayout) -> Result<(String, usize), Failure> {
    if !pins.exists() {
        return Err(Failure::Runtime(format!(
            "no datapath is pinned at {} (is `enforcer run` using another --pin-path?)",
            pins.root.display()
        )));
    }
    let (maps, _) = KernelMaps::from_pins(&pins.maps())
        .map_err(|error| Failure::Runtime(with_causes(&error)))?;
    let mut out = String::new();
    let _ = writeln!(out, "pin path {}", pins.root.display());
    match maps
        .installed()
        .map_err(|error| Failure::Runtime(error.to_string()))?
    {
        Some(config) => {
            let mode = if config.flags & enforcer_common::config::flags::AUDIT != 0 {
                "audit"
            } else {
                "enforce"
            };
            let _ = writeln!(
                out,
                "generation {} (slot {}), mode {mode}, installed {}",
                config.generation,
                config.slot,
                format_time(config.installed_at_ns)
            );
            let _ = writeln!(out, "policy sha256 {}", hex::encode(config.policy_hash));
        }
        None => {
            let _ = writeln!(
                out,
                "no policy generation installed: attached interfaces drop all IP traffic"
            );
        }
    }
    let programs = loader::pinned_programs(pins);
    let build_tags = loader::build_tags().unwrap_or_default();
    let _ = writeln!(out, "\nattached:");
    let attached = pins.attached_interfaces();
    if attached.is_empty() {
        let _ = writeln!(out, "  (no interfaces)");
    }
    let mut enforced = 0;
    for (interface, hooks) in &attached {
        for hook in hooks {
            let link = hook.pin_name(interface);
            let (tag, verdict) = match programs.linked.get(&link) {
                Some(info) => {
                    let tag = format!("{:016x}", info.tag());
                    let expected = build_tags.get(hook.program());
                    let verdict = match expected {
                        Some(expected) if *expected == tag => "matches this build",
                        Some(_) => "DIFFERS from this build's program",
                        None => "build tag unknown",
                    };
                    (tag, verdict)
                }
                None => (
                    "-".to_owned(),
                    "NOT ENFORCED: no program attached (the interface is gone or was recreated, or the link or filter was removed)",
                ),
            };
            enforced += usize::from(programs.linked.contains_key(&link));
            let present = if host::interface_index(interface).is_some() {
                ""
            } else {
                " (interface not in this namespace)"
            };
            let _ = writeln!(
                out,
                "  {interface:<16} {:<4} {} tag {tag} {verdict}{present}",
                hook.as_str(),
                hook.program()
            );
        }
    }
    let _ = writeln!(out, "\npackets:");
    for (verdict, reason, counter) in maps
        .packet_counts()
        .map_err(|error| Failure::Runtime(error.to_string()))?
    {
        let verdict = Verdict::from_code(verdict).map_or("?", Verdict::as_str);
        let _ = writeln!(
            out,
            "  {verdict:<6} {:<20} {:>12} packets {:>14} bytes",
            reason_name(reason),
            counter.packets,
            counter.bytes
        );
    }
    let _ = writeln!(out, "\nmaps:");
    for (name, fill) in maps.fill() {
        let _ = writeln!(
            out,
            "  {name:<12} {:>8} / {:<8} entries",
            fill.entries, fill.capacity
        );
    }
    let _ = writeln!(out, "\nevents lost: {}", maps.events_lost());
    Ok((out, enforced))
}
