//! What the benchmarks measure enforcer against, in the same run: other programs doing the
//! same job. (The empty XDP program, the floor, is `bpf::load_pass_all_xdp`.)

use std::{io, os::fd::OwnedFd, path::PathBuf, process::Command};

use crate::{Netns, bpf, run_checked, unique_id};

/// `xdp-filter` from xdp-tools — the simplest XDP packet filter there is, written in C —
/// loaded on a veth in a namespace of its own with no rules (it passes everything, looking at
/// each packet's ports, addresses and MAC as it would to filter). libxdp's files go to a
/// private bpffs; everything is unloaded and removed on drop.
pub struct XdpFilter {
    netns: Netns,
    bpffs: PathBuf,
    interface: &'static str,
}

impl XdpFilter {
    pub fn load() -> io::Result<Self> {
        let name = unique_id();
        let bpffs = std::env::temp_dir().join(format!("{name}-bpffs"));
        std::fs::create_dir_all(&bpffs)?;
        nix::mount::mount(
            Some("bpf"),
            &bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(io::Error::from)?;
        let netns = Netns::create(&name)?;
        let filter = Self {
            netns,
            bpffs,
            interface: "xf0",
        };
        filter.netns.ip(&[
            "link",
            "add",
            filter.interface,
            "type",
            "veth",
            "peer",
            "name",
            "xf1",
        ])?;
        filter.netns.ip(&["link", "set", filter.interface, "up"])?;
        run_checked(
            filter
                .xdp_filter()
                .args(["load", "--mode", "skb", filter.interface]),
        )?;
        Ok(filter)
    }

    /// The program `xdp-filter` attached, to time with `bpf::test_run`.
    pub fn program(&self) -> io::Result<OwnedFd> {
        let output = run_checked(self.netns.command("ip")?.args([
            "-j",
            "link",
            "show",
            "dev",
            self.interface,
        ]))?;
        let listing = String::from_utf8_lossy(&output.stdout);
        let id = listing
            .split("\"prog\":{\"id\":")
            .nth(1)
            .or_else(|| listing.split("\"prog_id\":").nth(1))
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|id| id.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no XDP program on xf0: {listing}")))?;
        bpf::program_by_id(id)
    }

    fn xdp_filter(&self) -> Command {
        let mut command = self
            .netns
            .command("xdp-filter")
            .expect("the namespace exists");
        command.env("LIBXDP_BPFFS", &self.bpffs);
        command
    }
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        let _ = run_checked(self.xdp_filter().args(["unload", self.interface]));
        let _ = nix::mount::umount2(&self.bpffs, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.bpffs);
    }
}
