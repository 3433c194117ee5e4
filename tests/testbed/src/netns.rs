//! Network namespaces: created, entered by a thread to run code in them, deleted on drop.

use std::{
    fs::File,
    io::{self},
    os::unix::process::CommandExt as _,
    path::Path,
    process::Command,
    thread::JoinHandle,
};

use nix::sched::{CloneFlags, setns};

use crate::{NETNS_DIR, ip, run_checked};

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> io::Result<Self> {
        ip(&["netns", "add", name])?;
        let netns = Self {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        // Link-local IPv6 addresses are usable at once, not after a second of duplicate
        // address detection (during which neighbour discovery, and so IPv6, stalls).
        for scope in ["all", "default"] {
            netns.sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0")?;
        }
        Ok(netns)
    }

    pub(crate) fn handle(&self) -> io::Result<File> {
        File::open(Path::new(NETNS_DIR).join(&self.name))
    }

    /// `ip -n <this namespace> ...`
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        run_checked(Command::new("ip").arg("-n").arg(&self.name).args(args)).map(drop)
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        run_checked(Command::new("ip").args([
            "netns",
            "exec",
            &self.name,
            "sysctl",
            "-q",
            "-w",
            &format!("{key}={value}"),
        ]))
        .map(drop)
    }

    /// Runs `f` on a thread inside the namespace; sockets it creates belong to the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let handle = self.handle()?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    setns(&handle, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                    Ok(f())
                })
                .join()
                .map_err(|_| io::Error::other("thread in namespace panicked"))?
        })
    }

    /// Spawns a long-lived thread inside the namespace.
    pub(crate) fn spawn_thread(
        &self,
        f: impl FnOnce() + Send + 'static,
    ) -> io::Result<JoinHandle<()>> {
        let handle = self.handle()?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let entered = setns(&handle, CloneFlags::CLONE_NEWNET).map_err(io::Error::from);
            let failed = entered.is_err();
            let _ = ready_tx.send(entered);
            if !failed {
                f();
            }
        });
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("namespace thread died"))??;
        Ok(thread)
    }

    /// A command that runs inside the namespace (entered after fork, so `/sys` stays the host's
    /// and bpffs pins are shared, unlike `ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> io::Result<Command> {
        command_in(&self.name, program)
    }
}

/// [`Netns::command`] for the namespace called `name`.
pub(crate) fn command_in(name: &str, program: impl AsRef<std::ffi::OsStr>) -> io::Result<Command> {
    let handle = File::open(Path::new(NETNS_DIR).join(name))?;
    let mut command = Command::new(program);
    // SAFETY: setns is async-signal-safe; the handle stays open in the parent until spawn.
    unsafe {
        command.pre_exec(move || setns(&handle, CloneFlags::CLONE_NEWNET).map_err(io::Error::from));
    }
    Ok(command)
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = ip(&["netns", "delete", &self.name]) {
            eprintln!("testbed: could not delete namespace {}: {error}", self.name);
        }
    }
}

impl Netns {
    /// Every BPF program attached to `interface` in this namespace, however it was attached:
    /// XDP (`ip link`), TC filters on a clsact qdisc (`tc filter`), TCX links
    /// (`BPF_PROG_QUERY`). Empty when nothing is; an error if the interface does not exist.
    pub fn attached_programs(&self, interface: &str) -> io::Result<Vec<String>> {
        let mut attached = Vec::new();
        let link = run_checked(
            Command::new("ip").args(["-n", &self.name, "-d", "link", "show", interface]),
        )?;
        if String::from_utf8_lossy(&link.stdout).contains("prog/xdp") {
            attached.push("xdp".to_owned());
        }
        for direction in ["ingress", "egress"] {
            let filters = Command::new("tc")
                .args([
                    "-n", &self.name, "filter", "show", "dev", interface, direction,
                ])
                .output()?;
            if filters
                .stdout
                .iter()
                .any(|byte| !byte.is_ascii_whitespace())
            {
                attached.push(format!("tc {direction} filter"));
            }
        }
        let name = interface.to_owned();
        let (ingress, egress) = self.run(move || {
            let ifindex = nix::net::if_::if_nametoindex(name.as_str()).map_err(io::Error::from)?;
            crate::bpf::tcx_program_counts(ifindex)
        })??;
        attached.extend((0..ingress).map(|_| "tcx ingress".to_owned()));
        attached.extend((0..egress).map(|_| "tcx egress".to_owned()));
        Ok(attached)
    }
}
