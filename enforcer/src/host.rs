//! Reading the parts of this host a policy names: its addresses, interface indexes, cgroup ids.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::{compile::HostView, policy::Policy};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The host as the policy sees it, in the current network namespace.
pub fn observe(policy: &Policy) -> HostView {
    let mut interfaces = BTreeMap::new();
    let mut cgroups = BTreeMap::new();
    for service in &policy.services {
        for name in &service.interfaces {
            if let Some(ifindex) = interface_index(name) {
                interfaces.insert(name.clone(), ifindex);
            }
        }
        for path in &service.cgroups {
            match cgroup_id(path) {
                Ok(id) => {
                    cgroups.insert(path.clone(), id);
                }
                Err(reason) => tracing::warn!(cgroup = %path.display(), service = %service.name, "{reason}"),
            }
        }
    }
    HostView { addresses: local_addresses(), interfaces, cgroups }
}

/// Every address configured on an interface of this network namespace.
pub fn local_addresses() -> Vec<IpAddr> {
    let mut addresses = Vec::new();
    match nix::ifaddrs::getifaddrs() {
        Ok(interfaces) => {
            for interface in interfaces {
                let Some(address) = interface.address else { continue };
                if let Some(v4) = address.as_sockaddr_in() {
                    addresses.push(IpAddr::V4(v4.ip()));
                } else if let Some(v6) = address.as_sockaddr_in6() {
                    addresses.push(IpAddr::V6(v6.ip()));
                }
            }
        }
        Err(error) => tracing::warn!("cannot list this host's addresses ({error}); traffic to them resolves to world"),
    }
    addresses.sort();
    addresses.dedup();
    addresses
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
    let end = buffer.iter().position(|byte| *byte == 0).unwrap_or(buffer.len());
    Some(String::from_utf8_lossy(&buffer[..end]).into_owned())
}

/// A cgroup v2 directory's id: its inode number, as `bpf_skb_cgroup_id` reports it.
pub fn cgroup_id(path: &Path) -> Result<u64, String> {
    let metadata = std::fs::metadata(path).map_err(|error| format!("cgroup {} is not usable: {error}", path.display()))?;
    if !metadata.is_dir() {
        return Err(format!("cgroup {} is not a directory", path.display()));
    }
    let stat = nix::sys::statfs::statfs(path).map_err(|error| format!("cannot statfs {}: {error}", path.display()))?;
    if stat.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
        return Err(format!("{} is not on a cgroup v2 filesystem; cgroup identity needs cgroup v2", path.display()));
    }
    Ok(metadata.ino())
}

/// Where cgroup v2 is mounted on this host (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` in hybrid mode).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, mount_point, fs_type) = (fields.next()?, fields.next()?, fields.next()?);
        (fs_type == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}
