//! Reading the parts of this host a policy names: its addresses, interface indexes, cgroup ids.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::{
    compile::{Cgroup, HostView},
    endpoints::{Registration, Registry},
    policy::Policy,
};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The host as the policy sees it, in the current network namespace, with the endpoints
/// registered on it (those the policy accepts; the others are logged).
pub fn observe(policy: &Policy, registry: &Registry) -> HostView {
    let (registered, skipped) = registry.valid_under(policy);
    for reason in skipped {
        tracing::warn!("{reason}");
    }
    let registered: Vec<Registration> = registered.into_iter().cloned().collect();
    let present = interfaces();
    let interfaces = present
        .into_iter()
        .filter(|(name, _)| {
            policy
                .services
                .iter()
                .any(|service| service.selects_interface(name))
                || registered
                    .iter()
                    .any(|registration| registration.interface == *name)
        })
        .collect();
    let mut cgroups = BTreeMap::new();
    for service in &policy.services {
        for path in &service.cgroups {
            match cgroup(path) {
                Ok(found) => {
                    cgroups.insert(path.clone(), found);
                }
                Err(reason) => {
                    tracing::warn!(cgroup = %path.display(), service = %service.name, "{reason}")
                }
            }
        }
    }
    let routes = Routes::read();
    let declared = policy
        .services
        .iter()
        .flat_map(|service| &service.addresses)
        .filter(|net| net.prefix_len() == net.max_prefix_len())
        .map(|net| net.addr());
    let registered_addresses = registered
        .iter()
        .flat_map(|registration| registration.addresses.iter().copied());
    let routes = declared
        .chain(registered_addresses)
        .filter_map(|address| Some((address, routes.interface_of(address)?.to_owned())))
        .collect();
    HostView {
        addresses: local_addresses(),
        interfaces,
        cgroups,
        routes,
        registered,
        fleet: Vec::new(),
    }
}

/// The main routing table's routes of this network namespace, from `/proc/net/route` and
/// `/proc/net/ipv6_route` (which the namespace's `/proc/self/net` shows).
#[derive(Debug, Default)]
pub struct Routes(Vec<(ipnet::IpNet, String)>);

impl Routes {
    pub fn read() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        Self::parse(&read("/proc/net/route"), &read("/proc/net/ipv6_route"))
    }

    /// Parses the two files' text. Lines that do not parse are skipped.
    pub fn parse(ipv4: &str, ipv6: &str) -> Self {
        let mut routes = Vec::new();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...; addresses in hex, in
        // the byte order the kernel keeps them (network order read as a native integer).
        for line in ipv4.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(interface), Some(destination), Some(mask)) =
                (fields.first(), fields.get(1), fields.get(7))
            else {
                continue;
            };
            let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_le_bytes);
            let (Some(destination), Some(mask)) = (word(destination), word(mask)) else {
                continue;
            };
            let prefix = u32::from_be_bytes(mask).count_ones() as u8;
            if let Ok(net) = ipnet::Ipv4Net::new(destination.into(), prefix) {
                routes.push((net.into(), (*interface).to_owned()));
            }
        }
        // destination prefix_len source source_len next_hop metric refcnt use flags iface.
        for line in ipv6.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(destination), Some(prefix), Some(interface)) =
                (fields.first(), fields.get(1), fields.get(9))
            else {
                continue;
            };
            let (Ok(destination), Ok(prefix)) = (
                u128::from_str_radix(destination, 16),
                u8::from_str_radix(prefix, 16),
            ) else {
                continue;
            };
            if let Ok(net) = ipnet::Ipv6Net::new(destination.into(), prefix) {
                routes.push((net.into(), (*interface).to_owned()));
            }
        }
        Self(routes)
    }

    /// The interface of the most specific route to `address`.
    pub fn interface_of(&self, address: IpAddr) -> Option<&str> {
        self.0
            .iter()
            .filter(|(net, _)| net.contains(&address))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, interface)| interface.as_str())
    }
}

/// Every address configured on an interface of this network namespace.
pub fn local_addresses() -> Vec<IpAddr> {
    let mut addresses = Vec::new();
    match nix::ifaddrs::getifaddrs() {
        Ok(interfaces) => {
            for interface in interfaces {
                let Some(address) = interface.address else {
                    continue;
                };
                if let Some(v4) = address.as_sockaddr_in() {
                    addresses.push(IpAddr::V4(v4.ip()));
                } else if let Some(v6) = address.as_sockaddr_in6() {
                    addresses.push(IpAddr::V6(v6.ip()));
                }
            }
        }
        Err(error) => tracing::warn!(
            "cannot list this host's addresses ({error}); traffic to them resolves to world"
        ),
    }
    addresses.sort();
    addresses.dedup();
    addresses
}

/// Every interface of this network namespace, by name.
pub fn interfaces() -> BTreeMap<String, u32> {
    match nix::net::if_::if_nameindex() {
        Ok(list) => list
            .iter()
            .map(|interface| {
                (
                    interface.name().to_string_lossy().into_owned(),
                    interface.index(),
                )
            })
            .collect(),
        Err(error) => {
            tracing::warn!("cannot list this host's interfaces: {error}");
            BTreeMap::new()
        }
    }
}

pub fn interface_index(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

/// The name of interface `ifindex` in this namespace, if it exists.
pub fn interface_name(ifindex: u32) -> Option<String> {
    let mut buffer = [0u8; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(ifindex, buffer.as_mut_ptr().cast()) };
    if name.is_null() {
        return None;
    }
    let end = buffer
        .iter()
        .position(|byte| *byte == 0)
        .unwrap_or(buffer.len());
    Some(String::from_utf8_lossy(&buffer[..end]).into_owned())
}

/// Why a cgroup the policy names cannot give its processes an identity.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {} is not usable: {source}", path.display())]
    Unusable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("cannot statfs {}: {source}", path.display())]
    Statfs { path: PathBuf, source: nix::Error },
    #[error("{} is not on a cgroup v2 filesystem; cgroup identity needs cgroup v2", .0.display())]
    NotCgroup2(PathBuf),
}

/// A cgroup v2 directory's id and level.
pub fn cgroup(path: &Path) -> Result<Cgroup, CgroupError> {
    Ok(Cgroup {
        id: cgroup_id(path)?,
        level: cgroup_level(path)?,
    })
}

/// A cgroup's depth below the root of the cgroup v2 mount it is on: the kernel's level when
/// that mount shows the whole hierarchy, as it does outside a cgroup namespace (the controller
/// runs in the host's, as a privileged DaemonSet or a systemd service does).
fn cgroup_level(path: &Path) -> Result<u32, CgroupError> {
    let unusable = |source| CgroupError::Unusable {
        path: path.to_owned(),
        source,
    };
    let path = path.canonicalize().map_err(unusable)?;
    let device = std::fs::metadata(&path).map_err(unusable)?.dev();
    let level = path
        .ancestors()
        .skip(1)
        .take_while(|ancestor| {
            std::fs::metadata(ancestor).is_ok_and(|metadata| metadata.dev() == device)
        })
        .count();
    Ok(level as u32)
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on
/// a hybrid host), if it is.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
    })
}

/// A cgroup v2 directory's id: its inode number, as `bpf_skb_cgroup_id` reports it.
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    let metadata = std::fs::metadata(path).map_err(|source| CgroupError::Unusable {
        path: path.to_owned(),
        source,
    })?;
    if !metadata.is_dir() {
        return Err(CgroupError::NotADirectory(path.to_owned()));
    }
    let stat = nix::sys::statfs::statfs(path).map_err(|source| CgroupError::Statfs {
        path: path.to_owned(),
        source,
    })?;
    if stat.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
        return Err(CgroupError::NotCgroup2(path.to_owned()));
    }
    Ok(metadata.ino())
}

/// The kernel driver of interface `name` (`veth`, `mlx5_core`, ...), from the ethtool ioctl,
/// which answers for the current network namespace (unlike a `/sys` that may be another's).
pub fn interface_driver(name: &str) -> Option<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    #[repr(C)]
    struct DriverInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    #[repr(C)]
    struct InterfaceRequest {
        name: [u8; libc::IF_NAMESIZE],
        data: *mut DriverInfo,
        _union_rest: [u8; 16],
    }
    if name.len() >= libc::IF_NAMESIZE {
        return None;
    }
    // SAFETY: plain-old-data structs, zero is a valid value for every field.
    let mut info: DriverInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut request = InterfaceRequest {
        name: [0; libc::IF_NAMESIZE],
        data: &mut info,
        _union_rest: [0; 16],
    };
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: socket/ioctl/close with valid arguments; `request` and `info` outlive the call.
    let ok = unsafe {
        let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if socket < 0 {
            return None;
        }
        let result = libc::ioctl(socket, SIOCETHTOOL, &mut request);
        libc::close(socket);
        result == 0
    };
    if !ok {
        return None;
    }
    let end = info
        .driver
        .iter()
        .position(|byte| *byte == 0)
        .unwrap_or(info.driver.len());
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_by_name_index_and_address() {
        let index = interface_index("lo").expect("every namespace has lo");
        assert_eq!(interface_name(index).as_deref(), Some("lo"));
        assert_eq!(interface_index("no-such-if0"), None);
        let addresses = local_addresses();
        assert!(
            addresses.contains(&IpAddr::from([127, 0, 0, 1])),
            "{addresses:?}"
        );
        assert!(
            addresses.windows(2).all(|pair| pair[0] < pair[1]),
            "sorted, no duplicates"
        );
    }

    #[test]
    fn routes_are_read_from_the_kernels_tables_and_the_most_specific_wins() {
        let ipv4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                    v-api\t050200C0\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
                    garbage line\n";
        let ipv6 = "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n\
                    fd000000000000000000000000000005 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001    v-api\n";
        let routes = Routes::parse(ipv4, ipv6);
        let interface = |address: &str| routes.interface_of(address.parse().unwrap());
        assert_eq!(
            interface("192.0.2.5"),
            Some("v-api"),
            "the /32 beats the /24"
        );
        assert_eq!(interface("192.0.2.6"), Some("eth0"));
        assert_eq!(interface("198.51.100.1"), Some("eth0"), "the default route");
        assert_eq!(interface("fd00::5"), Some("v-api"));
        assert_eq!(interface("fd00::6"), Some("eth0"));
        assert_eq!(interface("2001:db8::1"), None, "no IPv6 default route");
    }

    #[test]
    fn a_cgroup_that_cannot_give_an_identity_says_why() {
        let scratch = crate::ScratchFile::new("not-a-cgroup");
        std::fs::write(&scratch.0, "").unwrap();
        assert!(matches!(
            cgroup_id(&scratch.0),
            Err(CgroupError::NotADirectory(path)) if path == scratch.0
        ));
        assert!(matches!(
            cgroup_id(Path::new("/nonexistent/cgroup")),
            Err(CgroupError::Unusable { .. })
        ));
        assert!(matches!(
            cgroup_id(Path::new("/proc")),
            Err(CgroupError::NotCgroup2(_))
        ));
    }
}
