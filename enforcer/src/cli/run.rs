//! `enforcer run`: its arguments, and their conversion to [`RunOptions`] in one place.

use std::{path::PathBuf, time::Duration};

use clap::Args;

use super::Failure;
use crate::{
    datapath::{
        hook::{HostRouting, IngressHook, TcAttach},
        loader::DEFAULT_PIN_PATH,
        pins::PinLayout,
    },
    fleet::{self, KvstoreOptions},
    outputs::{
        alert::AlertFormat,
        metrics::parse_listen_address,
        syslog::{self, ClientFiles, SyslogTarget, TlsFiles},
    },
    run::{self, PolicySource, RunOptions},
};

/// Where etcd is (`run` and `fleet`; DESIGN §12).
#[derive(Debug, Args, Clone)]
pub struct KvstoreArgs {
    /// etcd endpoints, comma-separated (http://HOST:PORT or https://HOST:PORT).
    #[arg(long, value_delimiter = ',', value_name = "URL[,URL...]")]
    pub kvstore: Vec<String>,
    /// CA certificate (PEM) etcd's certificates must chain to; turns TLS on.
    #[arg(long, value_name = "PATH")]
    pub kvstore_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd; needs --kvstore-key.
    #[arg(long, value_name = "PATH", requires = "kvstore_key")]
    pub kvstore_cert: Option<PathBuf>,
    /// The private key (PEM) of --kvstore-cert.
    #[arg(long, value_name = "PATH", requires = "kvstore_cert")]
    pub kvstore_key: Option<PathBuf>,
}

impl KvstoreArgs {
    /// The options, or `None` without `--kvstore`.
    pub fn options(&self) -> Option<KvstoreOptions> {
        (!self.kvstore.is_empty()).then(|| KvstoreOptions {
            endpoints: self.kvstore.clone(),
            ca: self.kvstore_ca.clone(),
            cert: self.kvstore_cert.clone(),
            key: self.kvstore_key.clone(),
        })
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A policy file, a directory of *.toml files, or etcd:KEY (the policy in etcd, followed
    /// with a watch; needs --kvstore).
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
    /// How a packet passed entering from one veth endpoint reaches another of this host: the
    /// host's IP stack (kernel), or straight into the destination's namespace (bpf), skipping
    /// netfilter's forward path and the destination veth's qdiscs, as Cilium's BPF host
    /// routing does.
    #[arg(long, value_enum, default_value_t = HostRouting::Kernel)]
    pub host_routing: HostRouting,
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
    #[command(flatten)]
    pub kvstore: KvstoreArgs,
    /// This host's name in the fleet (default: the hostname).
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
}

impl RunArgs {
    /// The options these arguments stand for. Every file and address they name is checked
    /// here, so that a wrong one stops `run` before it touches the kernel.
    pub fn options(self) -> Result<RunOptions, Failure> {
        let bad_input = |error: &dyn std::error::Error| Failure::BadInput(error.to_string());
        let metrics = self
            .metrics
            .as_deref()
            .map(parse_listen_address)
            .transpose()
            .map_err(|error| bad_input(&error))?;
        let observe_socket = self
            .observe_socket
            .clone()
            .unwrap_or_else(|| PinLayout::new(&self.pin_path).observe_socket());
        let syslog = self.syslog_target()?;
        let kvstore = self.kvstore.options();
        if kvstore.is_none() && PolicySource::of(&self.policy).is_kvstore() {
            return Err(Failure::BadInput(
                "--policy etcd:KEY needs --kvstore".to_owned(),
            ));
        }
        Ok(RunOptions {
            policy: self.policy,
            attach: self.attach,
            ingress_hook: self.ingress_hook,
            tc_attach: self.tc_attach,
            host_routing: self.host_routing,
            pin_path: self.pin_path,
            alerts: self.alerts,
            alert_format: self.alert_format,
            ephemeral: self.ephemeral,
            metrics,
            audit_log: self.audit_log,
            observe_socket,
            syslog,
            heartbeat_interval: Duration::from_secs(self.heartbeat_interval),
            edge_baseline: self.edge_baseline,
            kvstore,
            node: self.node.unwrap_or_else(fleet::default_node_name),
        })
    }

    fn syslog_target(&self) -> Result<Option<SyslogTarget>, Failure> {
        let Some(text) = self.syslog.as_deref() else {
            return Ok(None);
        };
        let bad_input = |error: syslog::SyslogError| Failure::BadInput(error.to_string());
        let (host, port, tls) = syslog::parse_target(text).map_err(bad_input)?;
        let client = self.syslog_cert.clone().zip(self.syslog_key.clone()).map(
            |(certificate_chain, key)| ClientFiles {
                certificate_chain,
                key,
            },
        );
        if !tls && client.is_some() {
            return Err(Failure::BadInput(
                "--syslog-cert needs a tls:// --syslog".to_owned(),
            ));
        }
        let tls = if tls {
            let files = TlsFiles {
                ca_bundle: self.syslog_ca.clone(),
                client,
            };
            files.config().map_err(bad_input)?;
            Some(files)
        } else {
            None
        };
        Ok(Some(SyslogTarget { host, port, tls }))
    }
}

pub(super) fn execute(args: RunArgs) -> Result<(), Failure> {
    let options = args.options()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|error| Failure::Runtime(format!("starting the async runtime: {error}")))?;
    runtime.block_on(run::run(options)).map_err(Failure::from)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn options(arguments: &[&str]) -> Result<RunOptions, Failure> {
        let mut command_line = vec!["enforcer", "run", "--policy", "p.toml"];
        command_line.extend_from_slice(arguments);
        match Cli::try_parse_from(command_line)
            .expect("arguments parse")
            .command
        {
            Command::Run(args) => args.options(),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn refusal(arguments: &[&str]) -> String {
        match options(arguments) {
            Err(Failure::BadInput(message)) => message,
            Err(Failure::Runtime(message)) => panic!("a runtime failure: {message}"),
            Ok(options) => panic!("accepted: {options:?}"),
        }
    }

    #[test]
    fn defaults_follow_the_pin_path() {
        let options = options(&["--pin-path", "/sys/fs/bpf/t1", "--attach", "veth0"]).unwrap();
        assert_eq!(
            options.observe_socket,
            PathBuf::from("/run/enforcer/t1.sock")
        );
        assert_eq!(options.attach, vec!["veth0".to_owned()]);
        assert_eq!(options.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(options.metrics, None);
        assert!(options.syslog.is_none());
        assert!(!options.ephemeral);
    }

    #[test]
    fn a_metrics_port_alone_binds_loopback() {
        let options = options(&["--metrics", "9100", "--heartbeat-interval", "3"]).unwrap();
        assert_eq!(options.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(options.heartbeat_interval, Duration::from_secs(3));
    }

    #[test]
    fn a_plain_tcp_collector_needs_no_certificates() {
        let options = options(&["--syslog", "tcp://[::1]:6514"]).unwrap();
        let target = options.syslog.unwrap();
        assert_eq!((target.host.as_str(), target.port), ("::1", 6514));
        assert!(target.tls.is_none());
    }

    #[test]
    fn wrong_arguments_are_the_operators_fault_and_say_which() {
        assert_eq!(
            refusal(&["--metrics", "nine"]),
            "invalid --metrics address \"nine\": expected PORT or HOST:PORT"
        );
        assert_eq!(
            refusal(&["--syslog", "udp://h:1"]),
            "invalid --syslog \"udp://h:1\": expected tcp://HOST:PORT or tls://HOST:PORT"
        );
        assert_eq!(
            refusal(&[
                "--syslog",
                "tcp://h:1",
                "--syslog-cert",
                "c.pem",
                "--syslog-key",
                "k.pem"
            ]),
            "--syslog-cert needs a tls:// --syslog"
        );
        assert!(
            refusal(&[
                "--syslog",
                "tls://h:1",
                "--syslog-ca",
                "/nonexistent/ca.pem"
            ])
            .starts_with("reading CA certificates from /nonexistent/ca.pem: "),
        );
    }
}
