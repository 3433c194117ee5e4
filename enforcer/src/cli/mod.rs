//! The command line (DESIGN §6) and the operator commands' output.

mod check;
mod endpoint;
mod explain;
mod fleet;
mod run;
mod status;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

pub use self::run::RunArgs;
use self::status::Status;
use crate::{
    compile::{self, Compiled, HostView, diff},
    datapath::{kernel::Features, loader, loader::DEFAULT_PIN_PATH, pins::PinLayout},
    outputs::{
        audit::{self, Verification},
        observe,
    },
    policy::{self, Policy},
    run::RunError,
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
    Run(Box<RunArgs>),
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
    /// Endpoints registered with the running controller, beside those the policy declares.
    Endpoint {
        #[command(subcommand)]
        command: endpoint::EndpointCommand,
    },
    /// The fleet's etcd: push the policy every host follows, see what each enforces.
    Fleet {
        #[command(subcommand)]
        command: fleet::FleetCommand,
    },
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

/// Runs one command.
pub fn execute(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Run(args) => run::execute(*args),
        Command::Check { path } => check(&path),
        Command::Explain {
            path,
            from,
            to,
            port,
            json,
        } => explain(&path, &from, &to, port.as_deref(), json),
        Command::Diff {
            old,
            new,
            replay,
            json,
        } => diff(&old, &new, replay.as_deref(), json),
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
            let filter = observe::Filter {
                service,
                from,
                to,
                verdict,
                port,
            };
            observe::watch(&socket, follow, &filter, json, std::io::stdout().lock())
                .map_err(|error| Failure::Runtime(error.to_string()))
        }
        Command::AuditVerify { paths } => audit_verify(&paths),
        Command::Status { pin_path } => status(&PinLayout::new(pin_path)),
        Command::Features => features(),
        Command::Unload { pin_path } => unload(&PinLayout::new(pin_path)),
        Command::Endpoint { command } => endpoint::execute(command),
        Command::Fleet { command } => fleet::execute(command),
    }
}

/// Loads and compiles a policy without looking at this host (for `check`, `explain`, `diff`).
fn load_offline(path: &Path) -> Result<(Policy, Compiled), Failure> {
    let policy = policy::load(path).map_err(|error| Failure::BadInput(error.to_string()))?;
    let compiled = compile::compile(&policy, &HostView::default(), None)
        .map_err(|error| Failure::BadInput(error.to_string()))?;
    Ok((policy, compiled))
}

fn check(path: &Path) -> Result<(), Failure> {
    let (policy, compiled) = load_offline(path)?;
    print!("{}", check::report(&policy, &compiled));
    Ok(())
}

fn explain(
    path: &Path,
    from: &str,
    to: &str,
    port: Option<&str>,
    json: bool,
) -> Result<(), Failure> {
    let (policy, compiled) = load_offline(path)?;
    let text = explain::explain(&policy, &compiled, from, to, port, json)
        .map_err(|error| Failure::BadInput(error.to_string()))?;
    print!("{text}");
    Ok(())
}

fn diff(old: &Path, new: &Path, replay: Option<&Path>, json: bool) -> Result<(), Failure> {
    let (_, old) = load_offline(old)?;
    let (_, new) = load_offline(new)?;
    let mut result = diff::diff(&old, &new);
    if let Some(log) = replay {
        diff::replay(&mut result, &old, &new, log)
            .map_err(|error| Failure::BadInput(format!("reading {}: {error}", log.display())))?;
    }
    if json {
        println!("{}", result.to_json());
    } else {
        print!("{}", result.to_text());
    }
    Ok(())
}

fn audit_verify(paths: &[PathBuf]) -> Result<(), Failure> {
    let named = paths
        .iter()
        .map(|path| path.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    match audit::verify(paths) {
        Ok(Verification::Intact { records, head }) => {
            println!("{named}: intact, {records} records, chain head {head}");
            Ok(())
        }
        Ok(Verification::Broken {
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

fn status(pins: &PinLayout) -> Result<(), Failure> {
    let status = Status::gather(pins)?;
    print!("{}", status.render());
    if status.enforced() == 0 {
        return Err(Failure::Runtime(
            "nothing is enforced: no interface has enforcer's programs attached".to_owned(),
        ));
    }
    Ok(())
}

fn features() -> Result<(), Failure> {
    let features = Features::current();
    for (ok, line) in features.report() {
        println!("{} {line}", if ok { "ok     " } else { "MISSING" });
    }
    features
        .check_minimum()
        .map_err(|error| Failure::Runtime(error.to_string()))
}

fn unload(pins: &PinLayout) -> Result<(), Failure> {
    let removed = loader::unload(pins)
        .map_err(|error| Failure::Runtime(format!("unloading {}: {error}", pins.root.display())))?;
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
