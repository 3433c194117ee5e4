//! Debian's rsyslog as a syslog collector for tests: its own configuration, listening on
//! 127.0.0.1 in a namespace over TCP or TLS (RFC 5425, octet-counted framing), writing each
//! message's MSG part (the record) to a file of its own, one per line. Stopped on drop.

use std::{
    fs, io,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{Daemon, Netns, TestCa, eventually};

/// A running rsyslogd and where it writes.
pub struct Rsyslog {
    daemon: Option<Daemon>,
    config: PathBuf,
    /// The records received, one per line.
    pub received: PathBuf,
    pub port: u16,
    dir: PathBuf,
}

impl Rsyslog {
    /// Starts rsyslogd in `netns` on 127.0.0.1:`port`; over TLS with `ca`'s server certificate
    /// when given. Its configuration, work directory and files go under `dir`.
    pub fn start(netns: &Netns, dir: &Path, port: u16, tls: Option<&TestCa>) -> io::Result<Self> {
        let dir = dir.join(format!("rsyslog-{port}"));
        fs::create_dir_all(dir.join("work"))?;
        let received = dir.join("received.jsonl");
        let config = dir.join("rsyslog.conf");
        fs::write(&config, configuration(&dir, &received, port, tls))?;
        let mut rsyslog = Self {
            daemon: None,
            config,
            received,
            port,
            dir,
        };
        rsyslog.start_again(netns)?;
        Ok(rsyslog)
    }

    /// Starts it again after [`stop`](Self::stop), with the same configuration and files.
    pub fn start_again(&mut self, netns: &Netns) -> io::Result<()> {
        let mut command = netns.command("rsyslogd")?;
        command
            .args(["-n", "-f"])
            .arg(&self.config)
            .arg("-i")
            .arg(self.dir.join("rsyslogd.pid"));
        // rsyslogd says nothing on stderr when it starts: ready is when it accepts.
        let daemon = Daemon::spawn(command, self.dir.join("stderr.log"), "", Duration::ZERO)?;
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let listening = eventually(Duration::from_secs(10), || {
            netns
                .tcp_connect(address, Duration::from_millis(200))
                .is_ok()
        });
        if !listening {
            return Err(io::Error::other(format!(
                "rsyslogd does not listen on {address}: {}",
                fs::read_to_string(self.dir.join("rsyslogd.log")).unwrap_or_default()
            )));
        }
        self.daemon = Some(daemon);
        Ok(())
    }

    /// Stops rsyslogd (SIGTERM) and waits until it has exited.
    pub fn stop(&mut self) -> io::Result<()> {
        if let Some(mut daemon) = self.daemon.take() {
            daemon.signal(nix::sys::signal::Signal::SIGTERM)?;
            daemon.wait(Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// The records written so far, one per line.
    pub fn records(&self) -> Vec<String> {
        fs::read_to_string(&self.received)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// What rsyslogd said about itself (its own messages: TLS failures, config errors).
    pub fn own_log(&self) -> String {
        fs::read_to_string(self.dir.join("rsyslogd.log")).unwrap_or_default()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// rsyslog's configuration: one TCP (or TLS) input whose messages go, MSG only, to `received`;
/// rsyslogd's own messages to `rsyslogd.log`.
fn configuration(dir: &Path, received: &Path, port: u16, tls: Option<&TestCa>) -> String {
    let work = dir.join("work");
    let own_log = dir.join("rsyslogd.log");
    let (driver, module) = match tls {
        Some(ca) => {
            let (certificate, key) = ca.server();
            (
                format!(
                    "global(defaultNetstreamDriver=\"gtls\" defaultNetstreamDriverCAFile=\"{}\" defaultNetstreamDriverCertFile=\"{}\" defaultNetstreamDriverKeyFile=\"{}\")\n",
                    ca.ca().display(),
                    certificate.display(),
                    key.display()
                ),
                "module(load=\"imtcp\" streamDriver.name=\"gtls\" streamDriver.mode=\"1\" streamDriver.authMode=\"anon\")\n",
            )
        }
        None => (String::new(), "module(load=\"imtcp\")\n"),
    };
    format!(
        "global(workDirectory=\"{}\" maxMessageSize=\"64k\")\n{driver}{module}\
         input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{port}\" ruleset=\"records\")\n\
         template(name=\"record\" type=\"string\" string=\"%msg%\\n\")\n\
         ruleset(name=\"records\") {{\n  action(type=\"omfile\" file=\"{}\" template=\"record\")\n}}\n\
         *.* action(type=\"omfile\" file=\"{}\")\n",
        work.display(),
        received.display(),
        own_log.display()
    )
}
