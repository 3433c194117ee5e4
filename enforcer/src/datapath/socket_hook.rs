//! The socket hook's link on the cgroup v2 root, there only while the live generation has
//! services identified by cgroup.
//!
//! On the cgroup v2 root, the socket hook runs for every packet any socket of the host
//! receives, and under a generation without cgroup services it judges none of them
//! (`socket_hook_may_judge` in the programs): a link there would only cost each packet the
//! hook's run. So the controller attaches it before switching in a generation that has cgroup
//! services (whose interface hooks hand packets over to it from their first packet on), and
//! removes it after switching in one that has none. Either way no packet the live generation
//! wants judged by it can miss it. The controller holds this handle rather than the whole
//! [`Datapath`](crate::datapath::loader::Datapath): a duplicate of the loaded program's
//! descriptor is all attaching needs.

use std::{fs, io, os::fd::AsFd as _, path::PathBuf};

use aya::programs::ProgramFd;

use crate::datapath::{bpf_sys, host, loader::LoadError};

pub struct SocketHook {
    /// This build's socket hook program.
    program: ProgramFd,
    /// Where its link is pinned (`links/sockets`).
    link: PathBuf,
    /// Whether the pinned link runs `program`: set once this controller attached it or swapped
    /// its program into the link an earlier controller left.
    runs_this_build: bool,
}

impl SocketHook {
    pub(crate) fn new(program: ProgramFd, link: PathBuf) -> Self {
        Self {
            program,
            link,
            runs_this_build: false,
        }
    }

    /// Makes sure the socket hook runs this build's program on the cgroup v2 root: attaches it,
    /// or swaps the program into the link an earlier controller pinned (atomically: no packet
    /// goes unjudged meanwhile). Without cgroup v2 there is nothing to attach to, and no
    /// service identified by cgroup either.
    pub fn attach(&mut self) -> Result<(), LoadError> {
        if self.runs_this_build && self.link.exists() {
            return Ok(());
        }
        let Some(root) = host::cgroup2_root() else {
            tracing::info!("no cgroup v2 hierarchy: the socket hook is not attached");
            return Ok(());
        };
        let failed = |source: io::Error| LoadError::SocketHook {
            cgroup: root.clone(),
            source: source.into(),
        };
        if self.link.exists() {
            match bpf_sys::update_link(&self.link, self.program.as_fd()) {
                Ok(()) => {
                    self.runs_this_build = true;
                    return Ok(());
                }
                Err(error) => {
                    tracing::warn!("pinned socket hook link unusable ({error}); attaching afresh");
                    let _ = fs::remove_file(&self.link);
                }
            }
        }
        let cgroup = fs::File::open(&root).map_err(failed)?;
        bpf_sys::link_cgroup_ingress(self.program.as_fd(), cgroup.as_fd(), &self.link)
            .map_err(failed)?;
        tracing::info!(
            "socket hook attached to the cgroup v2 root {}: the policy has services identified by cgroup",
            root.display()
        );
        self.runs_this_build = true;
        Ok(())
    }

    /// Removes the socket hook's link, if there is one: removing its pin, its last reference,
    /// detaches it.
    pub fn detach(&mut self) {
        self.runs_this_build = false;
        match fs::remove_file(&self.link) {
            Ok(()) => tracing::info!(
                "socket hook detached: the policy has no services identified by cgroup"
            ),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => tracing::warn!(
                "removing the socket hook's link {} failed ({error}): it keeps running, passing every packet",
                self.link.display()
            ),
        }
    }
}
