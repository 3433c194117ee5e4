//! Resolving addresses, endpoint interfaces and cgroups to identities, and reading the installed
//! generation's config.

use aya_ebpf::btf_maps::lpm_trie::Key;
use enforcer_common::{
    addr::{Address16, Ipcache4Key, IpcacheKey, family},
    config::{MAX_CGROUP_LEVEL, PolicyConfig, flags as config_flags},
    identity::{CgroupKey, EndpointKey, IdentityInfo},
    identity_table::{self, IdentityBucket, Probe, TableKey},
};

use crate::{
    maps::{
        CGROUPS, ENDPOINT_TABLE, ENDPOINTS, IPCACHE, IPCACHE_EXACT, IPCACHE_EXACT4, IPCACHE_TABLE4,
        IPCACHE_TABLE6, POLICY_ACTIVE,
    },
    packet::{Frame, Packet},
};

/// The installed generation's config, or `None` before the controller installed one. The
/// reference stays valid for the whole program run even if the controller swaps generations
/// meanwhile (the kernel frees the old config map only after running programs finish).
#[inline(always)]
pub fn active_config() -> Option<&'static PolicyConfig> {
    let bytes = POLICY_ACTIVE.get_value(0, &0)?;
    // SAFETY: the value is a `PolicyConfig` written by the controller (see `PolicyConfigBytes`);
    // map values are 8-byte aligned and `PolicyConfig` is plain data.
    Some(unsafe { &*(bytes as *const _ as *const PolicyConfig) })
}

/// The address tables of the generation a packet is judged under: their slot, and whether
/// any prefix covers IPv4 or IPv6 addresses but whole (see `config::flags::IPV4_HOSTS_ONLY`
/// and `IPV6_HOSTS_ONLY`). Three bytes, passed by value.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct AddressTables {
    pub slot: u8,
    pub ipv4_hosts_only: bool,
    pub ipv6_hosts_only: bool,
}

impl AddressTables {
    #[inline(always)]
    pub fn of(config: &PolicyConfig) -> Self {
        Self {
            slot: config.slot as u8,
            ipv4_hosts_only: config.flags & config_flags::IPV4_HOSTS_ONLY != 0,
            ipv6_hosts_only: config.flags & config_flags::IPV6_HOSTS_ONLY != 0,
        }
    }
}

/// The identity an address resolves to: the longest matching prefix, else world. A whole
/// address entry is the longest match there can be, so the exact tables answer first (in the
/// identity table of the address's family, see [`of_ipv4_address`] and [`of_ipv6_address`]),
/// and where no prefix but whole addresses covers the address's family, an address they do not
/// hold is world. A function of its own: the keys stay off its callers' frames (5.10's and
/// 6.1's verifiers count every frame of the deepest call chain against 512 bytes).
#[inline(never)]
pub fn of_address(tables: AddressTables, addr: &Address16) -> IdentityInfo {
    match addr.v4_of_mapped() {
        Some(v4) => of_ipv4_address(tables, v4, addr),
        None => of_ipv6_address(tables, addr),
    }
}

/// The identities of a packet's source and destination addresses (see [`of_address`]). An
/// IPv4 packet's are looked up by the numbers the parser took, not by their 16-byte forms:
/// the BPF target reads those a byte at a time, to test for the IPv4 mark and to copy them
/// into a key, which cost a denied new flow more than its two lookups.
#[inline(always)]
pub fn of_packet_addresses(tables: AddressTables, packet: &Packet) -> (IdentityInfo, IdentityInfo) {
    if packet.family == family::INET {
        (
            of_ipv4_address(tables, packet.src_v4, &packet.src),
            of_ipv4_address(tables, packet.dst_v4, &packet.dst),
        )
    } else {
        (
            of_address(tables, &packet.src),
            of_address(tables, &packet.dst),
        )
    }
}

/// [`of_address`] of an IPv4 address, given both as a number (`u32::from_be_bytes`) and in
/// its 16-byte form, which only the longest-prefix match reads. The identity table answers
/// first, the hash map only for a key its bucket could not hold; the trie only where a prefix
/// may cover the address. Inlined: a denied new flow resolves two addresses, and each call
/// cost it about 9 ns (see `clock`).
#[inline(always)]
fn of_ipv4_address(tables: AddressTables, v4: u32, addr: &[u8; 16]) -> IdentityInfo {
    let slot = tables.slot;
    match in_table(
        &IPCACHE_TABLE4,
        identity_table::ADDRESSES4.index(slot, &v4),
        &v4,
    ) {
        Probe::Found(info) => info,
        Probe::Absent if tables.ipv4_hosts_only => IdentityInfo::WORLD,
        Probe::Absent => of_longest_prefix(slot, addr),
        Probe::AskTheMap => of_ipv4_address_in_map(slot, v4, addr),
    }
}

/// [`of_ipv4_address`] for an address its bucket sent to the hash map.
#[inline(never)]
fn of_ipv4_address_in_map(slot: u8, v4: u32, addr: &[u8; 16]) -> IdentityInfo {
    let exact = Ipcache4Key {
        addr: v4,
        slot,
        _pad: [0; 3],
    };
    // SAFETY: the value is copied out at once.
    match unsafe { IPCACHE_EXACT4.get(&exact) } {
        Some(info) => *info,
        None => of_longest_prefix(slot, addr),
    }
}

/// [`of_address`] of an IPv6 address that is not IPv4-mapped: as [`of_ipv4_address`], with
/// the IPv6 identity table in front of `IPCACHE_EXACT`.
#[inline(always)]
fn of_ipv6_address(tables: AddressTables, addr: &Address16) -> IdentityInfo {
    let slot = tables.slot;
    let key = addr.words();
    match in_table(
        &IPCACHE_TABLE6,
        identity_table::ADDRESSES6.index(slot, &key),
        &key,
    ) {
        Probe::Found(info) => info,
        Probe::Absent if tables.ipv6_hosts_only => IdentityInfo::WORLD,
        Probe::Absent => of_longest_prefix(slot, addr),
        Probe::AskTheMap => of_ipv6_address_in_map(tables, addr),
    }
}

/// [`of_ipv6_address`] for an address its bucket sent to the hash map.
#[inline(never)]
fn of_ipv6_address_in_map(tables: AddressTables, addr: &Address16) -> IdentityInfo {
    let exact = IpcacheKey {
        slot: tables.slot,
        _pad: [0; 3],
        addr: addr.0,
    };
    // SAFETY: the value is copied out at once.
    match unsafe { IPCACHE_EXACT.get(&exact) } {
        Some(info) => *info,
        None if tables.ipv6_hosts_only => IdentityInfo::WORLD,
        None => of_longest_prefix(tables.slot, addr),
    }
}

/// What the bucket at `index` of an identity table says about `key`. A bucket the array does
/// not have (it always has every one) holds nothing, and sends the key to the hash map.
#[inline(always)]
fn in_table<K: TableKey, const WAYS: usize, const N: usize>(
    table: &aya_ebpf::btf_maps::Array<IdentityBucket<K, WAYS>, N>,
    index: u32,
    key: &K,
) -> Probe {
    match table.get(index) {
        Some(bucket) => bucket.probe(key),
        None => Probe::AskTheMap,
    }
}

/// The identity of the longest prefix that matches `addr`, else world.
#[inline(never)]
fn of_longest_prefix(slot: u8, addr: &[u8; 16]) -> IdentityInfo {
    let key = Key::new(
        128 + enforcer_common::addr::IPCACHE_KEY_HEADER_BITS,
        IpcacheKey {
            slot,
            _pad: [0; 3],
            addr: *addr,
        },
    );
    match IPCACHE.get(&key) {
        Some(info) => *info,
        None => IdentityInfo::WORLD,
    }
}

/// The service whose endpoint namespace sits behind interface `ifindex`, if any: the identity
/// table answers first, the hash map only for an interface its bucket could not hold.
#[inline(always)]
pub fn of_endpoint(slot: u8, ifindex: u32) -> Option<IdentityInfo> {
    match in_table(
        &ENDPOINT_TABLE,
        identity_table::ENDPOINTS.index(slot, &ifindex),
        &ifindex,
    ) {
        Probe::Found(info) => Some(info),
        Probe::Absent => None,
        Probe::AskTheMap => of_endpoint_in_map(slot, ifindex),
    }
}

/// [`of_endpoint`] for an interface its bucket sent to the hash map.
#[inline(never)]
fn of_endpoint_in_map(slot: u8, ifindex: u32) -> Option<IdentityInfo> {
    let key = EndpointKey {
        ifindex,
        slot: slot as u32,
    };
    // SAFETY: the value is copied out at once; no reference outlives the lookup.
    unsafe { ENDPOINTS.get(&key) }.copied()
}

/// The cgroup a packet from a socket in cgroup `sender` (0: no sending socket) is bound to
/// under `config`: a service's cgroup covers its subtree, so flows are bound to the service's
/// (and re-judged by it) when the policy has services identified by cgroup; else `sender`.
#[inline(always)]
pub fn sending_cgroup<F: Frame>(frame: &F, config: &PolicyConfig, sender: u64) -> u64 {
    if config.cgroup_levels != 0 && sender != 0 {
        service_cgroup(frame, config.slot as u8, config.cgroup_levels, sender)
    } else {
        sender
    }
}

/// The cgroup that gives a socket in cgroup `leaf` its identity: its deepest ancestor (or
/// itself) at one of the `levels` the services' cgroups sit at that is a service's, else
/// `leaf` (whose lookup then finds no service).
#[inline(always)]
pub fn service_cgroup<F: Frame>(frame: &F, slot: u8, levels: u32, leaf: u64) -> u64 {
    let mut level = MAX_CGROUP_LEVEL as i32;
    while level >= 0 {
        if levels & (1 << level) != 0 {
            let ancestor = frame.socket_cgroup_ancestor(level);
            if of_cgroup(slot, ancestor).is_some() {
                return ancestor;
            }
        }
        level -= 1;
    }
    leaf
}

/// The service a cgroup v2 id belongs to, if any.
#[inline(always)]
pub fn of_cgroup(slot: u8, cgroup_id: u64) -> Option<IdentityInfo> {
    if cgroup_id == 0 {
        return None;
    }
    let key = CgroupKey {
        cgroup_id,
        slot: slot as u32,
        _pad: 0,
    };
    // SAFETY: as above.
    unsafe { CGROUPS.get(&key) }.copied()
}
