//! The compiled tables, and the view of this host they are compiled for.

use std::{collections::BTreeMap, fmt, net::IpAddr, path::PathBuf};

use enforcer_common::{
    addr::{IpcacheKey, v4_of_mapped},
    identity::{CgroupKey, EndpointKey, IdentityInfo},
    policy::{
        ANY_PORT, ANY_PROTO, PolicyKey, PortRanges, RangeKey, RuleVerdict, layer, pair_filter,
    },
};
use imbl::OrdMap;
use ipnet::IpNet;

/// The parts of this host a policy refers to by name: its own addresses, interface indexes,
/// cgroup ids. Compiling is pure given this view; `host::observe` reads it from the system.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostView {
    pub addresses: Vec<IpAddr>,
    pub interfaces: BTreeMap<String, u32>,
    pub cgroups: BTreeMap<PathBuf, Cgroup>,
    /// The interface this host routes each single-address service address through: where an
    /// address routed through its service's endpoint interface lives, so packets from it must
    /// come in there (a replica's address on another host is routed elsewhere).
    pub routes: BTreeMap<IpAddr, String>,
    /// Endpoints registered with the controller (DESIGN §13) that the policy accepts.
    pub registered: Vec<crate::endpoints::Registration>,
    /// The other hosts' endpoints, from the fleet's etcd (DESIGN §12).
    pub fleet: Vec<crate::fleet::RemoteEndpoint>,
}

impl HostView {
    /// Whether `net` is one address that this host routes through an endpoint interface of
    /// `service`: an endpoint here, whose packets must come in through that service's
    /// interfaces (and which this host publishes to the fleet).
    pub fn is_local_endpoint_address(&self, service: &crate::policy::Service, net: &IpNet) -> bool {
        net.prefix_len() == net.max_prefix_len()
            && self.routes.get(&net.addr()).is_some_and(|interface| {
                service.selects_interface(interface) && self.interfaces.contains_key(interface)
            })
    }
}

/// A cgroup v2 directory as the kernel knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cgroup {
    pub id: u64,
    /// Its depth in the hierarchy: 0 for the root.
    pub level: u32,
}

/// LPM entry of the ipcache, without the slot (the map layer adds it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: [u8; 16],
    /// Prefix length over the 16-byte form (IPv4 counts from 96).
    pub len: u8,
}

/// The range IPv4 addresses take in the 16-byte keys: `::ffff:0:0/96`.
const MAPPED: Prefix = Prefix {
    addr: enforcer_common::addr::v4_mapped([0; 4]),
    len: 96,
};

impl Prefix {
    pub fn of(net: &IpNet) -> Self {
        let (addr, len) = match net {
            IpNet::V4(v4) => (
                enforcer_common::addr::v4_mapped(v4.network().octets()),
                96 + v4.prefix_len(),
            ),
            IpNet::V6(v6) => (v6.network().octets(), v6.prefix_len()),
        };
        Self { addr, len }
    }

    pub fn contains(&self, addr: &[u8; 16]) -> bool {
        let bits = u32::from(self.len);
        let mask = if bits == 0 {
            0
        } else {
            u128::MAX << (128 - bits)
        };
        u128::from_be_bytes(self.addr) & mask == u128::from_be_bytes(*addr) & mask
    }

    /// Whether the prefix is one whole address (an IPv4 /32 or IPv6 /128): the datapath finds
    /// those in a hash table before it walks the trie.
    pub fn is_host(&self) -> bool {
        self.len == 128
    }

    /// Whether the prefix covers an IPv4 address (in its mapped form, `::ffff:0:0/96`) without
    /// being that one whole address: an IPv4 prefix shorter than /32, or an IPv6 prefix as wide
    /// as the mapped range or wider around it.
    pub fn covers_ipv4_partly(&self) -> bool {
        !self.is_host() && (self.contains(&MAPPED.addr) || MAPPED.contains(&self.addr))
    }

    /// Whether the prefix covers an IPv6 address outside the mapped range without being that
    /// one whole address: any prefix but a /128 that does not lie within `::ffff:0:0/96`.
    pub fn covers_ipv6_partly(&self) -> bool {
        let within_mapped = self.len >= MAPPED.len && MAPPED.contains(&self.addr);
        !(self.is_host() || within_mapped)
    }

    /// The IPv4 address (`u32::from_be_bytes`) the prefix is whole of, if it is one: its key in
    /// the IPv4 identity table (see `enforcer_common::identity_table`).
    pub fn host_v4(&self) -> Option<u32> {
        v4_of_mapped(&self.addr).filter(|_| self.is_host())
    }

    /// The IPv6 address (not IPv4-mapped) the prefix is whole of, if it is one, as its key in
    /// the IPv6 identity table.
    pub fn host_v6(&self) -> Option<[u64; 2]> {
        (self.is_host() && v4_of_mapped(&self.addr).is_none())
            .then(|| enforcer_common::addr::Address16(self.addr).words())
    }

    pub fn key(&self, slot: u8) -> (u32, IpcacheKey) {
        (
            enforcer_common::addr::IPCACHE_KEY_HEADER_BITS + u32::from(self.len),
            IpcacheKey {
                slot,
                _pad: [0; 3],
                addr: self.addr,
            },
        )
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addr = enforcer_common::addr::from_key_bytes(self.addr);
        let len = if addr.is_ipv4() {
            self.len.saturating_sub(96)
        } else {
            self.len
        };
        write!(f, "{addr}/{len}")
    }
}

/// The compiled tables, with slot 0 in every key (the map layer writes them into a slot).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    pub ipcache: BTreeMap<Prefix, IdentityInfo>,
    pub endpoints: BTreeMap<EndpointKey, IdentityInfo>,
    pub cgroups: BTreeMap<CgroupKey, IdentityInfo>,
    /// Persistent (see `imbl`): a generation shares what it did not change with the one before.
    pub rules: OrdMap<PolicyKey, RuleVerdict>,
    pub ranges: BTreeMap<RangeKey, PortRanges>,
    /// Which of `rules` and `ranges` each pair has ([`layer`] bits), derived from them.
    pub pairs: OrdMap<Pair, u32>,
    /// The levels of the hierarchy the services' cgroups sit at (see
    /// `enforcer_common::config::PolicyConfig::cgroup_levels`).
    pub cgroup_levels: u32,
    /// Whether no prefix of `ipcache` covers an IPv4 address but whole (see
    /// `enforcer_common::config::flags::IPV4_HOSTS_ONLY`).
    pub ipv4_hosts_only: bool,
    /// The same for IPv6 addresses outside the mapped range (see
    /// `enforcer_common::config::flags::IPV6_HOSTS_ONLY`).
    pub ipv6_hosts_only: bool,
}

impl Tables {
    /// Entries per kernel map, by map name.
    pub fn entry_counts(&self) -> [(&'static str, usize); 5] {
        [
            ("IPCACHE", self.ipcache.len()),
            ("ENDPOINTS", self.endpoints.len()),
            ("CGROUPS", self.cgroups.len()),
            ("RULES", self.rules.len()),
            ("PORT_RANGES", self.ranges.len()),
        ]
    }

    /// Word `word` of a slot of the pair filter: the layer bits of its buckets' pairs.
    pub fn pair_filter_word(&self, word: u32) -> u64 {
        let first = word * pair_filter::BUCKETS_PER_WORD;
        let pairs = Pair::in_bucket(first)..Pair::in_bucket(first + pair_filter::BUCKETS_PER_WORD);
        self.pairs
            .range(pairs)
            .fold(0, |word, (pair, bits)| word | pair.in_word(*bits))
    }

    /// Every word of a slot of the pair filter, in one pass over the pairs.
    pub fn pair_filter_words(&self) -> Vec<u64> {
        let mut words = vec![0; pair_filter::WORDS_PER_SLOT as usize];
        for (pair, bits) in &self.pairs {
            words[pair.word() as usize] |= pair.in_word(*bits);
        }
        words
    }

    /// Removes the rule entries, port ranges and layers of the pair `(src, dst)`.
    pub(super) fn remove_pair(&mut self, src: u32, dst: u32) {
        let rules: Vec<PolicyKey> = self
            .rules
            .range(pair_rule_keys(src, dst))
            .map(|(key, _)| *key)
            .collect();
        for key in rules {
            self.rules.remove(&key);
        }
        let ranges: Vec<RangeKey> = self
            .ranges
            .range(pair_range_keys(src, dst))
            .map(|(key, _)| *key)
            .collect();
        for key in ranges {
            self.ranges.remove(&key);
        }
        self.pairs.remove(&Pair::of(src, dst));
    }

    /// Sets the layer bits of the pair `(src, dst)` from its rule entries and port ranges.
    pub(super) fn mark_pair(&mut self, src: u32, dst: u32) {
        let rules = self.rules.range(pair_rule_keys(src, dst));
        let ranges = self.ranges.range(pair_range_keys(src, dst));
        let bits = rules
            .map(|(key, _)| rule_layer_bit(key))
            .chain(ranges.map(|(key, _)| range_layer_bit(key)))
            .fold(0, |bits, bit| bits | bit);
        if bits != 0 {
            self.pairs.insert(Pair::of(src, dst), bits);
        }
    }

    /// The layer bits of every pair that has rule entries, from those entries.
    pub(super) fn pair_layers(&self) -> OrdMap<Pair, u32> {
        let mut pairs: BTreeMap<Pair, u32> = BTreeMap::new();
        let mut mark = |src_identity: u32, dst_identity: u32, bit: u32| {
            *pairs
                .entry(Pair::of(src_identity, dst_identity))
                .or_default() |= bit;
        };
        for key in self.rules.keys() {
            mark(key.src_identity, key.dst_identity, rule_layer_bit(key));
        }
        for key in self.ranges.keys() {
            mark(key.src_identity, key.dst_identity, range_layer_bit(key));
        }
        pairs.into_iter().collect()
    }
}

/// The layer bit of a rule entry.
fn rule_layer_bit(key: &PolicyKey) -> u32 {
    match (key.proto, key.port) {
        (ANY_PROTO, _) => layer::ANY_PROTOCOL_BIT,
        (protocol, ANY_PORT) => layer::bit(layer::ANY_PORT, protocol),
        (protocol, _) => layer::bit(layer::EXACT, protocol),
    }
}

/// The layer bit of a port-range entry.
fn range_layer_bit(key: &RangeKey) -> u32 {
    layer::bit(layer::RANGE, key.proto)
}

/// Every rule entry key of the pair `(src_identity, dst_identity)`.
fn pair_rule_keys(src_identity: u32, dst_identity: u32) -> std::ops::RangeInclusive<PolicyKey> {
    let key = |port, proto| PolicyKey {
        src_identity,
        dst_identity,
        port,
        proto,
        _pad: 0,
    };
    key(0, 0)..=key(u16::MAX, u8::MAX)
}

/// Every port-range key of the pair `(src_identity, dst_identity)`, in any slot.
fn pair_range_keys(src_identity: u32, dst_identity: u32) -> std::ops::RangeInclusive<RangeKey> {
    let key = |proto, slot| RangeKey {
        src_identity,
        dst_identity,
        proto,
        slot,
        _pad: [0; 2],
    };
    key(0, 0)..=key(u8::MAX, u8::MAX)
}

/// A (source, destination) pair that has rules, ordered by its bucket of the pair filter first:
/// the pairs of one filter word are neighbours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pair {
    pub bucket: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
}

impl Pair {
    pub fn of(src_identity: u32, dst_identity: u32) -> Self {
        Self {
            bucket: pair_filter::bucket(src_identity, dst_identity),
            src_identity,
            dst_identity,
        }
    }

    /// The word of a slot of the pair filter that holds this pair's bucket.
    pub fn word(&self) -> u32 {
        self.bucket / pair_filter::BUCKETS_PER_WORD
    }

    /// This pair's layer bits `bits` where its bucket sits in its word.
    fn in_word(&self, bits: u32) -> u64 {
        u64::from(bits) << pair_filter::shift(self.bucket)
    }

    /// The first pair `bucket` can hold.
    fn in_bucket(bucket: u32) -> Self {
        Self {
            bucket,
            src_identity: 0,
            dst_identity: 0,
        }
    }
}
