//! Loading the datapath, pinning it, attaching it to interfaces, adopting what a previous
//! controller left, and removing it.
//!
//! Everything lives under one pin directory (default `/sys/fs/bpf/enforcer`):
//! `maps/<NAME>`, `programs/<name>`, `links/<hook>-<interface>`. Pinned links keep the programs
//! attached when the controller exits or dies (fail closed); a new controller reuses the pinned
//! maps (so conntrack and the live generation survive) and swaps its freshly loaded programs
//! into the pinned links with `bpf_link_update`, which never leaves an interface unattached.
//!
//! Kernels before 6.6 have no TCX links: there the TC programs are `cls_bpf` filters on a
//! `clsact` qdisc ([`crate::datapath::tc_netlink`]), which outlive the controller by themselves and get
//! their program replaced in place; `tc-filters/<hook>-<interface>` pins the program a filter
//! was given, as the record of which interfaces this pin directory enforces.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, MapData, RingBuf},
    programs::{
        CgroupSkb, ProgramError, ProgramInfo, SchedClassifier, TcAttachType, TestRun as _,
        TestRunOptions, TestRunResult, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};

use enforcer_common::delivery;

use crate::{
    datapath::kernel::{Features, Unsupported},
    datapath::maps::{KernelMaps, MAP_NAMES, MapsError},
    datapath::tc_netlink,
    datapath::{
        hook::{Hook, HostRouting, IngressHook, TcAttach},
        pins::PinLayout,
        socket_hook::SocketHook,
    },
};

/// The eBPF object, built by `build.rs` from `enforcer-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer"));

pub const XDP_PROGRAM: &str = "enf_xdp_ingress";
pub const TC_INGRESS_PROGRAM: &str = "enf_tc_ingress";
pub const TC_EGRESS_PROGRAM: &str = "enf_tc_egress";
/// The socket hook (cgroup_skb ingress): judges what an interface hook handed over, and what a
/// cgroup service's socket receives.
pub const SOCKET_PROGRAM: &str = "enf_socket_ingress";
/// Every program of the object, as loaded and pinned.
pub const PROGRAMS: [&str; 4] = [
    XDP_PROGRAM,
    TC_INGRESS_PROGRAM,
    TC_EGRESS_PROGRAM,
    SOCKET_PROGRAM,
];
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/enforcer";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("pin directory {}: {source}", path.display())]
    PinDirectory { path: PathBuf, source: io::Error },
    #[error("{} is not on a BPF filesystem (bpffs); mount one with `mount -t bpf bpf {}`", path.display(), path.display())]
    NotBpffs { path: PathBuf },
    #[error("mounting bpffs at {}: {source}", path.display())]
    Mount { path: PathBuf, source: nix::Error },
    #[error(
        "pinned map {name} in {} was created by an incompatible build ({detail}); run `enforcer unload --pin-path {}` first",
        dir.display(),
        dir.display()
    )]
    IncompatiblePin {
        name: &'static str,
        dir: PathBuf,
        detail: String,
    },
    #[error("loading the eBPF object: {0}")]
    Object(#[from] EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("interface {interface}: {source}")]
    Attach {
        interface: String,
        source: ProgramError,
    },
    #[error("interface {interface}: TC filter through netlink: {source}")]
    TcFilter {
        interface: String,
        source: io::Error,
    },
    #[error(transparent)]
    Kernel(#[from] Unsupported),
    #[error("interface {interface} does not exist in this network namespace")]
    NoSuchInterface { interface: String },
    #[error("link {}: {source}", path.display())]
    Link { path: PathBuf, source: LinkError },
    #[error("pinning {}: {source}", path.display())]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("socket hook on the cgroup v2 root {}: {source}", cgroup.display())]
    SocketHook {
        cgroup: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Makes sure `root` can hold pins: on a bpffs, mounting one at `/sys/fs/bpf` if that is where
/// it should be and nothing is mounted (as cilium-agent does).
pub fn prepare_pin_root(root: &Path) -> Result<(), LoadError> {
    let bpffs_root = Path::new("/sys/fs/bpf");
    if root.starts_with(bpffs_root) && !is_bpffs(bpffs_root) {
        tracing::info!("mounting bpffs at {}", bpffs_root.display());
        nix::mount::mount(
            Some("bpf"),
            bpffs_root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| LoadError::Mount {
            path: bpffs_root.to_owned(),
            source,
        })?;
    }
    let existing_parent = root
        .ancestors()
        .find(|ancestor| ancestor.exists())
        .unwrap_or(Path::new("/"));
    if !is_bpffs(existing_parent) {
        return Err(LoadError::NotBpffs {
            path: root.to_owned(),
        });
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|stat| stat.filesystem_type().0 == BPF_FS_MAGIC)
}

fn create_dir(path: &Path) -> Result<(), LoadError> {
    fs::create_dir_all(path).map_err(|source| LoadError::PinDirectory {
        path: path.to_owned(),
        source,
    })
}

/// Sizes that differ from the object's defaults.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Bytes of the event ring buffer (a power of two, at least one page); default 4 MiB.
    pub event_buffer_bytes: Option<u32>,
    pub tc_attach: TcAttach,
    /// Programs that ask conntrack for every packet of an established flow, as they did before
    /// the flow cache: what the datapath benchmark measures the cache against.
    pub without_flow_cache: bool,
    pub host_routing: HostRouting,
}

/// The loaded datapath: the object with its programs, and where it is pinned.
pub struct Datapath {
    ebpf: Ebpf,
    pins: PinLayout,
    tc_netlink: bool,
    host_routing: HostRouting,
    /// The interfaces marked in `PEER_DELIVERY`, by name, at their index when marked (see
    /// [`HostRouting::Bpf`]).
    peer_delivery: BTreeMap<String, u32>,
}

impl Datapath {
    /// Loads the programs, reusing maps pinned under `pins` (adoption) or creating and pinning
    /// them. Nothing is attached yet.
    pub fn load(pins: PinLayout) -> Result<(Self, KernelMaps, RingBuf<MapData>), LoadError> {
        Self::load_with(pins, &LoadOptions::default())
    }

    pub fn load_with(
        pins: PinLayout,
        options: &LoadOptions,
    ) -> Result<(Self, KernelMaps, RingBuf<MapData>), LoadError> {
        Features::current().check_minimum()?;
        // A load that fails part way (a verifier refusing a program, a map the kernel will not
        // create) must not leave a half-pinned datapath behind, which the next start would
        // adopt. A datapath that was pinned before is enforcing through its links: left alone.
        let fresh = !pins.maps().join("POLICY_ACTIVE").exists();
        let loaded = Self::load_pinned(pins.clone(), options);
        if loaded.is_err() && fresh {
            let _ = unload(&pins);
        }
        loaded
    }

    fn load_pinned(
        pins: PinLayout,
        options: &LoadOptions,
    ) -> Result<(Self, KernelMaps, RingBuf<MapData>), LoadError> {
        prepare_pin_root(&pins.root)?;
        for dir in [
            pins.maps(),
            pins.programs(),
            pins.links(),
            pins.tc_filters(),
        ] {
            create_dir(&dir)?;
        }
        check_pinned_maps(&pins, options)?;
        raise_memlock_limit();
        let map_paths: Vec<(&str, PathBuf)> = MAP_NAMES
            .iter()
            .map(|name| (*name, pins.maps().join(name)))
            .collect();
        let mut loader = object_loader(options);
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        if let Some(bytes) = options.event_buffer_bytes {
            loader.map_max_entries("EVENTS", bytes);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for name in PROGRAMS {
            load_program(&mut ebpf, name)?;
            let program = ebpf.program_mut(name).ok_or(LoadError::Program {
                name,
                source: ProgramError::NotLoaded,
            })?;
            let path = pins.programs().join(name);
            // The pinned program is what `status` compares against the live links.
            let _ = fs::remove_file(&path);
            program.pin(&path).map_err(|source| LoadError::Pin {
                path: path.clone(),
                source,
            })?;
        }
        let (mut maps, events) = KernelMaps::open(|name| ebpf.take_map(name))?;
        // The bulk now, while an earlier build's programs still run; what they track until
        // these are attached is taken over once they are (see `KernelMaps::move_ipv4_flows`
        // and `KernelMaps::stamp_tracked_flows`).
        take_over_flows_of_earlier_builds(&mut maps);
        unpin_maps_of_earlier_builds(&pins);
        let tc_netlink = options.tc_attach.uses_netlink();
        Ok((
            Self {
                ebpf,
                pins,
                tc_netlink,
                host_routing: options.host_routing,
                peer_delivery: BTreeMap::new(),
            },
            maps,
            events,
        ))
    }

    pub fn pins(&self) -> &PinLayout {
        &self.pins
    }

    /// Attaches to `interface`: `ingress` (XDP or TC ingress) for what enters the host through
    /// it, TC egress for what leaves through it. An interface a previous controller attached
    /// gets the new programs swapped in atomically; if it used the other ingress hook, that link
    /// goes once the new one is in place. Returns the ingress hook used.
    pub fn attach(&mut self, interface: &str, ingress: IngressHook) -> Result<Hook, LoadError> {
        if crate::datapath::host::interface_index(interface).is_none() {
            return Err(LoadError::NoSuchInterface {
                interface: interface.to_owned(),
            });
        }
        let hook = ingress.for_interface(interface);
        match hook {
            Hook::Xdp => self.attach_xdp(interface)?,
            _ => self.attach_tc(interface, Hook::TcIngress)?,
        }
        self.attach_tc(interface, Hook::TcEgress)?;
        let other = if hook == Hook::Xdp {
            Hook::TcIngress
        } else {
            Hook::Xdp
        };
        let _ = fs::remove_file(self.pins.link(other, interface));
        remove_tc_filter(&self.pins, other, interface);
        if self.host_routing == HostRouting::Bpf
            && hook == Hook::TcIngress
            && crate::datapath::host::interface_driver(interface).as_deref() == Some("veth")
        {
            self.mark_peer_delivery(interface)?;
        }
        Ok(hook)
    }

    /// Marks `interface`, a veth with this datapath's TC ingress, as one of BPF host routing's
    /// (see `enforcer-ebpf/src/delivery.rs`). One numbered past the map's end is left to the
    /// kernel's path, said once here.
    fn mark_peer_delivery(&mut self, interface: &str) -> Result<(), LoadError> {
        let Some(ifindex) = crate::datapath::host::interface_index(interface) else {
            return Ok(());
        };
        if ifindex >= delivery::INTERFACES {
            tracing::warn!(
                interface,
                ifindex,
                "BPF host routing covers interface indexes below {}; this one's packets take the kernel's forwarding path",
                delivery::INTERFACES
            );
            return Ok(());
        }
        self.write_peer_delivery(ifindex, delivery::TAKES_PART)?;
        self.peer_delivery.insert(interface.to_owned(), ifindex);
        Ok(())
    }

    fn write_peer_delivery(&mut self, ifindex: u32, value: u32) -> Result<(), LoadError> {
        const NAME: &str = "PEER_DELIVERY";
        let failed = |source| MapsError::Map { name: NAME, source };
        let map = self
            .ebpf
            .map_mut(NAME)
            .ok_or(MapsError::Missing { name: NAME })?;
        let mut interfaces: Array<&mut MapData, u32> = Array::try_from(map).map_err(failed)?;
        interfaces.set(ifindex, value, 0).map_err(failed)?;
        Ok(())
    }

    /// The handle that attaches the socket hook to the cgroup v2 root while the live
    /// generation needs it (see [`SocketHook`]), from a duplicate of its program's descriptor.
    pub fn socket_hook(&mut self) -> Result<SocketHook, LoadError> {
        let failed = |source| LoadError::Program {
            name: SOCKET_PROGRAM,
            source,
        };
        let program: &mut CgroupSkb = self.program_mut(SOCKET_PROGRAM)?;
        let fd = program.fd().map_err(failed)?;
        let fd = fd
            .try_clone()
            .map_err(|error| failed(ProgramError::IOError(error)))?;
        Ok(SocketHook::new(fd, self.pins.sockets_link()))
    }

    fn attach_xdp(&mut self, interface: &str) -> Result<(), LoadError> {
        let path = self.pins.link(Hook::Xdp, interface);
        let program: &mut Xdp = self.program_mut(XDP_PROGRAM)?;
        let attach_error = |source| LoadError::Attach {
            interface: interface.to_owned(),
            source,
        };
        if let Some(pinned) = open_pinned_link(&path)? {
            let link =
                XdpLink::try_from(FdLink::from(pinned)).map_err(|source| LoadError::Link {
                    path: path.clone(),
                    source,
                })?;
            match program.attach_to_link(link) {
                Ok(_) => return Ok(()),
                Err(error) => {
                    // The interface the link was made for is gone (recreated since): start over.
                    tracing::warn!(
                        interface,
                        "pinned XDP link is stale ({error}); attaching afresh"
                    );
                    let _ = fs::remove_file(&path);
                }
            }
        }
        let id = program
            .attach(interface, XdpMode::Default)
            .map_err(attach_error)?;
        pin_link(program.take_link(id).map_err(attach_error)?, path)
    }

    fn attach_tc(&mut self, interface: &str, hook: Hook) -> Result<(), LoadError> {
        if self.tc_netlink {
            self.attach_tc_filter(interface, hook)?;
            let _ = fs::remove_file(self.pins.link(hook, interface));
            return Ok(());
        }
        self.attach_tcx(interface, hook)?;
        // A filter an earlier controller attached through netlink goes once the link is in.
        remove_tc_filter(&self.pins, hook, interface);
        Ok(())
    }

    /// Attaches (or replaces the program of) enforcer's netlink filter, creating the `clsact`
    /// qdisc if needed, and records it.
    fn attach_tc_filter(&mut self, interface: &str, hook: Hook) -> Result<(), LoadError> {
        let record = self.pins.tc_filter(hook, interface);
        let ifindex = crate::datapath::host::interface_index(interface).ok_or_else(|| {
            LoadError::NoSuchInterface {
                interface: interface.to_owned(),
            }
        })?;
        let netlink_error = |source| LoadError::TcFilter {
            interface: interface.to_owned(),
            source,
        };
        tc_netlink::add_clsact(ifindex).map_err(netlink_error)?;
        let name = hook.program();
        let program: &mut SchedClassifier = self.program_mut(name)?;
        let fd = program
            .fd()
            .map_err(|source| LoadError::Program { name, source })?;
        tc_netlink::set_filter(
            ifindex,
            hook.tc_direction(),
            std::os::fd::AsFd::as_fd(fd),
            name,
        )
        .map_err(netlink_error)?;
        let _ = fs::remove_file(&record);
        program.pin(&record).map_err(|source| LoadError::Pin {
            path: record.clone(),
            source,
        })
    }

    fn attach_tcx(&mut self, interface: &str, hook: Hook) -> Result<(), LoadError> {
        let path = self.pins.link(hook, interface);
        let program: &mut SchedClassifier = self.program_mut(hook.program())?;
        let attach_type = if hook == Hook::TcIngress {
            TcAttachType::Ingress
        } else {
            TcAttachType::Egress
        };
        let attach_error = |source| LoadError::Attach {
            interface: interface.to_owned(),
            source,
        };
        if let Some(pinned) = open_pinned_link(&path)? {
            let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|source| {
                LoadError::Link {
                    path: path.clone(),
                    source,
                }
            })?;
            match program.attach_to_link(link) {
                Ok(_) => return Ok(()),
                Err(error) => {
                    tracing::warn!(
                        interface,
                        "pinned TC link is stale ({error}); attaching afresh"
                    );
                    let _ = fs::remove_file(&path);
                }
            }
        }
        let id = program
            .attach_with_options(
                interface,
                attach_type,
                aya::programs::tc::TcAttachOptions::TcxOrder(Default::default()),
            )
            .map_err(attach_error)?;
        pin_link(program.take_link(id).map_err(attach_error)?, path)
    }

    fn program_mut<'a, P>(&'a mut self, name: &'static str) -> Result<&'a mut P, LoadError>
    where
        &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        let program = self.ebpf.program_mut(name).ok_or(LoadError::Program {
            name,
            source: ProgramError::NotLoaded,
        })?;
        program
            .try_into()
            .map_err(|source| LoadError::Program { name, source })
    }

    /// Detaches interfaces attached (by this or an earlier controller) that are not in `keep`.
    pub fn detach_others(&mut self, keep: &BTreeSet<String>) {
        for interface in self.pins.attached_interfaces().into_keys() {
            if !keep.contains(&interface) {
                tracing::info!(
                    interface,
                    "detaching: neither --attach nor the policy names it"
                );
                self.detach(&interface);
            }
        }
    }

    /// Removes `interface`'s links and filters (and their pins and records): detached if it is
    /// still there, forgotten if it went.
    pub fn detach(&mut self, interface: &str) {
        if let Some(ifindex) = self.peer_delivery.remove(interface) {
            // The index may go to another interface next; a write that fails leaves a mark the
            // next load drops (the map is not pinned).
            if let Err(error) = self.write_peer_delivery(ifindex, 0) {
                tracing::warn!(interface, "clearing its BPF host routing mark: {error}");
            }
        }
        for hook in Hook::ALL {
            let _ = fs::remove_file(self.pins.link(hook, interface));
            remove_tc_filter(&self.pins, hook, interface);
        }
    }

    /// Runs one hook's program on `frame` with `BPF_PROG_TEST_RUN`, `repeat` times; the maps
    /// see it like a real packet (conntrack, events, counters).
    pub fn test_run(
        &mut self,
        hook: Hook,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunResult, LoadError> {
        self.test_run_on(hook, frame, repeat, None)
    }

    /// [`Datapath::test_run`] as if the frame came through interface `ifindex` (of the calling
    /// thread's network namespace), or through the loopback device the kernel picks if `None`.
    pub fn test_run_on(
        &mut self,
        hook: Hook,
        frame: &[u8],
        repeat: u32,
        ifindex: Option<u32>,
    ) -> Result<TestRunResult, LoadError> {
        let context = ifindex.map(|ifindex| test_run_context(hook, frame.len(), ifindex));
        let options = TestRunOptions {
            data_in: Some(frame),
            ctx_in: context.as_deref(),
            repeat,
            ..Default::default()
        };
        let name = hook.program();
        match hook {
            Hook::Xdp => self.program_mut::<Xdp>(name)?.test_run(options),
            Hook::TcIngress | Hook::TcEgress => {
                self.program_mut::<SchedClassifier>(name)?.test_run(options)
            }
        }
        .map_err(|source| LoadError::Program { name, source })
    }

    /// Runs the socket hook's program on `frame` with `BPF_PROG_TEST_RUN`, `repeat` times, as
    /// a packet that came in through interface `ifindex` (of the calling thread's network
    /// namespace), or through the loopback device if `None`, delivered to a socket of the
    /// calling thread's cgroup.
    pub fn test_run_socket_hook(
        &mut self,
        frame: &[u8],
        repeat: u32,
        ifindex: Option<u32>,
    ) -> Result<TestRunResult, LoadError> {
        // Its context is a `__sk_buff`, as the TC programs' is.
        let context =
            ifindex.map(|ifindex| test_run_context(Hook::TcIngress, frame.len(), ifindex));
        let options = TestRunOptions {
            data_in: Some(frame),
            ctx_in: context.as_deref(),
            repeat,
            ..Default::default()
        };
        self.program_mut::<CgroupSkb>(SOCKET_PROGRAM)?
            .test_run(options)
            .map_err(|source| LoadError::Program {
                name: SOCKET_PROGRAM,
                source,
            })
    }

    /// Tags of the programs this build loaded.
    pub fn program_tags(&self) -> BTreeMap<&'static str, String> {
        let mut tags = BTreeMap::new();
        for name in PROGRAMS {
            if let Some(Ok(info)) = self.ebpf.program(name).map(|program| program.info()) {
                tags.insert(name, format!("{:016x}", info.tag()));
            }
        }
        tags
    }
}

/// The program context `BPF_PROG_TEST_RUN` takes to run a frame of `length` bytes as if it
/// came through `ifindex`: `struct xdp_md` with its `data_end` (offset 4: the frame is all
/// linear) and `ingress_ifindex` (offset 12), or the start of `struct __sk_buff` up to its
/// `ifindex` (offset 40). The kernel requires the rest zero.
fn test_run_context(hook: Hook, length: usize, ifindex: u32) -> Vec<u8> {
    let mut context = vec![0; if hook == Hook::Xdp { 24 } else { 44 }];
    let mut put = |offset: usize, value: u32| {
        context[offset..offset + 4].copy_from_slice(&value.to_ne_bytes())
    };
    match hook {
        Hook::Xdp => {
            put(4, length as u32);
            put(12, ifindex);
        }
        Hook::TcIngress | Hook::TcEgress => put(40, ifindex),
    }
    context
}

/// Removes the pins of maps an earlier build made and this one no longer uses (the shared
/// de-duplication table before `DENIALS`, for one): pinned, they would hold their kernel
/// memory until `enforcer unload`. The earlier build's programs keep the map alive for as long
/// as they run.
fn unpin_maps_of_earlier_builds(pins: &PinLayout) {
    let Ok(entries) = fs::read_dir(pins.maps()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let ours = name.to_str().is_some_and(|name| MAP_NAMES.contains(&name));
        if !ours && entry.file_type().is_ok_and(|kind| kind.is_file()) {
            match fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!(
                    "unpinned map {} of an earlier build, which this one does not use",
                    entry.path().display()
                ),
                Err(error) => tracing::warn!("unpinning {}: {error}", entry.path().display()),
            }
        }
    }
}

/// Loads (verifies) the program of `hook` in `ebpf`.
fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), LoadError> {
    let program = ebpf.program_mut(name).ok_or(LoadError::Program {
        name,
        source: ProgramError::NotLoaded,
    })?;
    match name {
        XDP_PROGRAM => <&mut Xdp>::try_from(program).and_then(Xdp::load),
        SOCKET_PROGRAM => <&mut CgroupSkb>::try_from(program).and_then(CgroupSkb::load),
        _ => <&mut SchedClassifier>::try_from(program).and_then(SchedClassifier::load),
    }
    .map_err(|source| LoadError::Program { name, source })
}

/// The object loader, with the globals that adapt the programs to this kernel and `options`.
fn object_loader(options: &LoadOptions) -> EbpfLoader<'_> {
    let mut loader = EbpfLoader::new();
    // Static, because the loader borrows the value until it loads.
    static FLAGS: [u8; 2] = [0, 1];
    let coarse_clock = &FLAGS[usize::from(Features::current().coarse_clock)];
    loader.override_global("COARSE_CLOCK", coarse_clock, true);
    let flow_cache = &FLAGS[usize::from(!options.without_flow_cache)];
    loader.override_global("FLOW_CACHE_ON", flow_cache, true);
    // The programs know the ring buffer's size rather than ask for it with each record.
    if let Some(bytes) = &options.event_buffer_bytes {
        loader.override_global("RING_BYTES", bytes, true);
    }
    loader
}

/// Removes enforcer's netlink filter for `hook` from `interface` (if it still exists), the
/// `clsact` qdisc if nothing else uses it, and the record. Only a recorded filter is touched:
/// returns whether there was one.
fn remove_tc_filter(pins: &PinLayout, hook: Hook, interface: &str) -> bool {
    let record = pins.tc_filter(hook, interface);
    if !record.exists() {
        return false;
    }
    if let Some(ifindex) = crate::datapath::host::interface_index(interface) {
        if let Err(error) = tc_netlink::remove_filter(ifindex, hook.tc_direction()) {
            tracing::warn!(interface, "removing the TC filter: {error}");
        }
        if let Err(error) = tc_netlink::remove_clsact_if_unused(ifindex) {
            tracing::warn!(interface, "removing the clsact qdisc: {error}");
        }
    }
    let _ = fs::remove_file(record);
    true
}

/// Pins a link just made, so that it outlives the controller.
fn pin_link<L>(link: L, path: PathBuf) -> Result<(), LoadError>
where
    FdLink: TryFrom<L, Error = LinkError>,
{
    let link = FdLink::try_from(link).map_err(|source| LoadError::Link {
        path: path.clone(),
        source,
    })?;
    link.pin(&path)
        .map_err(|source| LoadError::Pin { path, source })?;
    Ok(())
}

fn open_pinned_link(path: &Path) -> Result<Option<PinnedLink>, LoadError> {
    if !path.exists() {
        return Ok(None);
    }
    PinnedLink::from_pin(path)
        .map(Some)
        .map_err(|source| LoadError::Link {
            path: path.to_owned(),
            source,
        })
}

/// Takes over the flows an earlier build tracked: moves the IPv4 ones it tracked under the
/// long key (see [`KernelMaps::move_ipv4_flows`]), and stamps every tracked flow in the flow
/// filter (see [`KernelMaps::stamp_tracked_flows`]). A failure leaves flows to be judged as
/// new, which is logged.
pub fn take_over_flows_of_earlier_builds(maps: &mut KernelMaps) {
    match maps.move_ipv4_flows() {
        Ok(0) => {}
        Ok(moved) => tracing::info!(
            moved,
            "IPv4 flows of an earlier build moved to this build's tables"
        ),
        Err(error) => tracing::warn!(
            "IPv4 flows of an earlier build stay where this build does not look: {error}"
        ),
    }
    if let Err(error) = maps.stamp_tracked_flows() {
        tracing::warn!("tracked flows are missing from the flow filter: {error}");
    }
}

/// A map pinned by another build must have the shape this build's programs expect.
fn check_pinned_maps(pins: &PinLayout, options: &LoadOptions) -> Result<(), LoadError> {
    let mut object = aya_object_maps();
    if let (Some(bytes), Some(events)) = (options.event_buffer_bytes, object.get_mut("EVENTS")) {
        events.2 = bytes;
    }
    for name in MAP_NAMES {
        let path = pins.maps().join(name);
        if !path.exists() {
            continue;
        }
        let Some(expected) = object.get(name) else {
            continue;
        };
        let info =
            aya::maps::MapInfo::from_pin(&path).map_err(|error| LoadError::IncompatiblePin {
                name,
                dir: pins.root.clone(),
                detail: format!("cannot read it: {error}"),
            })?;
        let found = (info.key_size(), info.value_size(), info.max_entries());
        if found != *expected {
            return Err(LoadError::IncompatiblePin {
                name,
                dir: pins.root.clone(),
                detail: format!("key/value/capacity {found:?}, this build needs {expected:?}"),
            });
        }
    }
    Ok(())
}

/// (key size, value size, max entries) of every map in the embedded object.
fn aya_object_maps() -> BTreeMap<&'static str, (u32, u32, u32)> {
    let mut shapes = BTreeMap::new();
    if let Ok(object) = aya_obj::Object::parse(EBPF_OBJECT) {
        for name in MAP_NAMES {
            if let Some(map) = object.maps.get(name) {
                shapes.insert(name, (map.key_size(), map.value_size(), map.max_entries()));
            }
        }
    }
    shapes
}

/// Tags of the programs this build would load (the kernel's hash of the instructions, which
/// ignores map addresses), found by loading them without attaching anything.
pub fn build_tags() -> Result<BTreeMap<&'static str, String>, LoadError> {
    raise_memlock_limit();
    let options = LoadOptions::default();
    let mut loader = object_loader(&options);
    // Small maps: only the programs matter here.
    for name in MAP_NAMES {
        if name != "POLICY_ACTIVE" && name != "EVENT_STATE" && name != "PACKET_COUNTS" {
            loader.map_max_entries(name, if name == "EVENTS" { 4096 } else { 1 });
        }
    }
    let mut ebpf = loader.load(EBPF_OBJECT)?;
    let mut tags = BTreeMap::new();
    for name in PROGRAMS {
        load_program(&mut ebpf, name)?;
        let info = ebpf
            .program(name)
            .map(|program| program.info())
            .transpose()
            .map_err(|source| LoadError::Program { name, source })?;
        if let Some(info) = info {
            tags.insert(name, format!("{:016x}", info.tag()));
        }
    }
    Ok(tags)
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            io::Error::last_os_error()
        );
    }
}

/// What a pinned datapath looks like from outside: for `status`.
pub struct PinnedPrograms {
    /// Program loaded by the controller, by name.
    pub pinned: BTreeMap<String, ProgramInfo>,
    /// Program each link runs, by link pin name.
    pub linked: BTreeMap<String, ProgramInfo>,
}

pub fn pinned_programs(pins: &PinLayout) -> PinnedPrograms {
    let mut pinned = BTreeMap::new();
    for name in PROGRAMS {
        if let Ok(info) = ProgramInfo::from_pin(pins.programs().join(name)) {
            pinned.insert(name.to_owned(), info);
        }
    }
    let mut linked = BTreeMap::new();
    if let Some(program) =
        crate::datapath::bpf_sys::link_program(&pins.sockets_link()).and_then(loaded_program)
    {
        linked.insert(SOCKETS_LINK.to_owned(), program);
    }
    for (interface, hooks) in pins.attached_interfaces() {
        for hook in hooks {
            let Some(program_id) = attached_program(pins, hook, &interface) else {
                continue;
            };
            if let Some(program) = loaded_program(program_id) {
                linked.insert(hook.pin_name(&interface), program);
            }
        }
    }
    PinnedPrograms { pinned, linked }
}

/// The name [`pinned_programs`] gives the socket hook's link among the interfaces' links.
pub const SOCKETS_LINK: &str = "sockets";

fn loaded_program(id: u32) -> Option<ProgramInfo> {
    aya::programs::loaded_programs()
        .flatten()
        .find(|program| program.id() == id)
}

/// The program the kernel runs for `hook` on `interface` as it exists now, through the pinned
/// link or the recorded filter: `None` if the interface is gone or was recreated (a link to a
/// vanished interface is defunct, a filter vanishes with it) or nothing is attached.
fn attached_program(pins: &PinLayout, hook: Hook, interface: &str) -> Option<u32> {
    let ifindex = crate::datapath::host::interface_index(interface)?;
    let record = pins.tc_filter(hook, interface);
    if record.exists() {
        return tc_netlink::enforcer_filter(ifindex, hook.tc_direction())
            .ok()
            .flatten()
            .map(|filter| filter.program_id);
    }
    let target = crate::datapath::bpf_sys::link_target(&pins.link(hook, interface))?;
    (target.ifindex == ifindex).then_some(target.program_id)
}

/// Detaches and removes everything pinned under `pins`, and the controller's files beside
/// them (also when the pins are gone already). Returns what was removed.
pub fn unload(pins: &PinLayout) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if pins.root.exists() {
        unpin(pins, &mut removed)?;
    }
    for file in pins.state_files() {
        if fs::remove_file(&file).is_ok() {
            removed.push(file);
        }
    }
    Ok(removed)
}

/// Detaches every link and filter, then removes the pins and their directories.
fn unpin(pins: &PinLayout, removed: &mut Vec<PathBuf>) -> io::Result<()> {
    // Links and filters first: removing a link's last reference detaches it; a filter is
    // removed from its interface.
    for (interface, hooks) in pins.attached_interfaces() {
        for hook in hooks {
            if remove_tc_filter(pins, hook, &interface) {
                removed.push(pins.tc_filter(hook, &interface));
            }
        }
    }
    for dir in [
        pins.links(),
        pins.tc_filters(),
        pins.programs(),
        pins.maps(),
    ] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            // Pins are files; a directory here is no pin, but in the way all the same.
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                fs::remove_dir(entry.path())?;
            } else {
                fs::remove_file(entry.path())?;
            }
            removed.push(entry.path());
        }
        fs::remove_dir(&dir)?;
    }
    fs::remove_dir(&pins.root)
}

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

    /// A memory intrinsic LLVM does not expand stays a call to the byte-at-a-time builtin
    /// bpf-linker exports; on the hot path those calls were a third of an established flow's
    /// instructions (see `enforcer-ebpf/build.rs`).
    #[test]
    fn the_programs_call_no_memory_builtins() {
        let file = object::File::parse(super::EBPF_OBJECT).expect("the embedded object is ELF");
        let called: Vec<String> = file
            .sections()
            .flat_map(|section| section.relocations().collect::<Vec<_>>())
            .filter_map(|(_, relocation)| match relocation.target() {
                RelocationTarget::Symbol(index) => {
                    Some(file.symbol_by_index(index).ok()?.name().ok()?.to_owned())
                }
                _ => None,
            })
            .filter(|name| {
                ["memset", "memcpy", "memmove", "memcmp", "bcmp"].contains(&name.as_str())
            })
            .collect();
        assert!(
            called.is_empty(),
            "the datapath calls memory builtins (byte loops): {called:?}"
        );
    }

    /// The build's stack check reads every program and follows its calls (a check that found
    /// no program, or no call, would pass anything).
    #[test]
    fn the_stack_check_follows_every_programs_calls() {
        let chains = crate::stack_depth::deepest_chains(super::EBPF_OBJECT).unwrap();
        let mut programs: Vec<&str> = chains.iter().map(|chain| chain.program()).collect();
        programs.sort_unstable();
        assert_eq!(
            programs,
            [
                "enf_socket_ingress",
                "enf_tc_egress",
                "enf_tc_ingress",
                "enf_xdp_ingress"
            ]
        );
        for chain in &chains {
            assert!(
                chain.frames.len() > 3 && chain.frames.iter().all(|(_, frame)| *frame > 0),
                "{chain}"
            );
            assert!(chain.bytes <= crate::stack_depth::STACK_LIMIT, "{chain}");
        }
    }
}
