//! Typed access to the datapath's maps, writing compiled tables into a policy slot, and the
//! atomic switch between generations.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::{
    Pod,
    maps::{
        Array, ArrayOfMaps, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray,
        PerCpuHashMap, RingBuf,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
};
use enforcer_common::{
    addr::{Ipcache4Key, IpcacheKey},
    config::{PolicyConfig, flags as config_flags},
    conntrack::{
        CachedPass, CtEntry, CtKey, CtKey4, FlowCacheTable, FlowCacheTable6, FlowTableCounts,
    },
    counters::{Counter, EDGE_CACHE_SLOTS, EdgeCacheSlot, FlowCounterKey},
    event::{DenialTable, EventCpuState},
    flow_filter,
    identity::{CgroupKey, EndpointKey, IdentityInfo},
    identity_table::{self, Bucket32, Bucket128, IdentityBucket, Shape, TableKey},
    policy::{PolicyKey, PortRanges, RangeKey, RuleVerdict, SlotVerdicts, action, pair_filter},
    verdict::{
        PACKET_COUNTER_SLOTS,
        reason::{self, REASON_SLOTS},
    },
};

use imbl::{OrdMap, ordmap::DiffItem};

use crate::{
    compile::{Compiled, Pair, Prefix, Tables},
    datapath::bpf_sys,
};

/// Names of every map in the object, as `bpftool map` shows them.
pub const MAP_NAMES: [&str; 32] = [
    "POLICY_ACTIVE",
    "IPCACHE",
    "IPCACHE_EXACT",
    "IPCACHE_EXACT4",
    "IPCACHE_TABLE4",
    "IPCACHE_TABLE6",
    "ENDPOINTS",
    "ENDPOINT_TABLE",
    "CGROUPS",
    "RULES",
    "PORT_RANGES",
    "PAIR_FILTER",
    "CONNTRACK4",
    "UNANSWERED4",
    "CONNTRACK",
    "UNANSWERED",
    "FLOW_STAMPS",
    "FLOW_TABLES",
    "FRAGMENTS",
    "HANDED_OVER4",
    "HANDED_OVER",
    "RATE_LIMITS",
    "EVENTS",
    "EVENT_STATE",
    "LOST_PACKETS",
    "DENIAL_TABLE",
    "DENIAL_DETAILS",
    "PACKET_COUNTS",
    "FLOW_COUNTS",
    "EDGE_CACHE",
    "FLOW_CACHES",
    "FLOW_CACHES6",
];

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {name} is missing from the eBPF object or pin directory")]
    Missing { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error(
        "{table} needs {needed} entries while a policy switch is in progress but holds at most {capacity}; shrink the policy"
    )]
    Capacity {
        table: &'static str,
        needed: usize,
        capacity: u32,
    },
    #[error("freezing the generation's config: {0}")]
    Freeze(std::io::Error),
    #[error("switching to the generation's config: {0}")]
    Switch(std::io::Error),
    #[error("reading the monotonic clock: {0}")]
    Clock(nix::Error),
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

/// A key of a slot-versioned table.
trait SlotKey: Pod + Ord {
    fn slot(&self) -> u8;
    fn in_slot(self, slot: u8) -> Self;
}

/// `SlotKey` for the key types of the slot-versioned hash maps: each has a `slot` field (a
/// `u8`, or a `u32` in the identity tables' keys).
macro_rules! slot_key {
    ($($key:ty),* $(,)?) => {
        $(
            impl SlotKey for $key {
                fn slot(&self) -> u8 {
                    u8::try_from(self.slot).unwrap_or(u8::MAX)
                }
                fn in_slot(self, slot: u8) -> Self {
                    Self {
                        slot: slot.into(),
                        ..self
                    }
                }
            }
        )*
    };
}

slot_key!(RangeKey, EndpointKey, CgroupKey, IpcacheKey, Ipcache4Key);

/// The keys of `map` in `slot`, as the kernel holds them.
fn keys_in_slot<K: SlotKey, V: Pod>(
    map: &HashMap<MapData, K, V>,
    slot: u8,
) -> impl Iterator<Item = K> + '_ {
    map.keys()
        .filter_map(Result::ok)
        .filter(move |key| key.slot() == slot)
}

/// The trie's keys in `slot`.
fn trie_keys_in_slot(
    trie: &LpmTrie<MapData, IpcacheKey, IdentityInfo>,
    slot: u8,
) -> impl Iterator<Item = LpmKey<IpcacheKey>> + '_ {
    trie.keys()
        .filter_map(Result::ok)
        .filter(move |key| key.data().slot == slot)
}

/// Entries and capacity of one map, for `status` and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fill {
    pub entries: usize,
    pub capacity: u32,
}

/// Handles to the maps the controller reads and writes.
pub struct KernelMaps {
    active: ArrayOfMaps<MapData, Array<MapData, PolicyConfig>>,
    /// `active`'s descriptor again, for the thread that switches generations (aya's handle
    /// does not lend its own).
    active_fd: Arc<OwnedFd>,
    ipcache: LpmTrie<MapData, IpcacheKey, IdentityInfo>,
    ipcache_exact: HashMap<MapData, IpcacheKey, IdentityInfo>,
    ipcache_exact4: HashMap<MapData, Ipcache4Key, IdentityInfo>,
    ipcache_table4: Array<MapData, Bucket32>,
    ipcache_table6: Array<MapData, Bucket128>,
    endpoints: HashMap<MapData, EndpointKey, IdentityInfo>,
    endpoint_table: Array<MapData, Bucket32>,
    cgroups: HashMap<MapData, CgroupKey, IdentityInfo>,
    rules: HashMap<MapData, PolicyKey, SlotVerdicts>,
    ranges: HashMap<MapData, RangeKey, PortRanges>,
    pair_filter: Array<MapData, u64>,
    conntrack4: HashMap<MapData, CtKey4, CtEntry>,
    unanswered4: HashMap<MapData, CtKey4, CtEntry>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    unanswered: HashMap<MapData, CtKey, CtEntry>,
    flow_filter: Array<MapData, flow_filter::Word>,
    flow_tables: PerCpuArray<MapData, FlowTableCounts>,
    event_state: PerCpuArray<MapData, EventCpuState>,
    lost_packets: PerCpuArray<MapData, u64>,
    denial_table: PerCpuArray<MapData, DenialTable>,
    packet_counts: PerCpuArray<MapData, Counter>,
    flow_counts: PerCpuHashMap<MapData, FlowCounterKey, Counter>,
    edge_cache: PerCpuArray<MapData, EdgeCacheSlot>,
    flow_cache: PerCpuArray<MapData, FlowCacheTable>,
    flow_cache6: PerCpuArray<MapData, FlowCacheTable6>,
    capacities: BTreeMap<&'static str, u32>,
}

impl KernelMaps {
    /// Takes the maps out of `source`, which yields a map by name (from a loaded object or from
    /// pins). Returns the ring buffer separately: it belongs to the event reader.
    pub fn open(
        mut source: impl FnMut(&'static str) -> Option<Map>,
    ) -> Result<(Self, RingBuf<MapData>), MapsError> {
        let mut capacities = BTreeMap::new();
        let mut take = |name: &'static str| -> Result<Map, MapsError> {
            let map = source(name).ok_or(MapsError::Missing { name })?;
            if let Ok(info) = map_data(&map).info() {
                capacities.insert(name, info.max_entries());
            }
            Ok(map)
        };
        macro_rules! typed {
            ($name:literal) => {
                take($name)?.try_into().map_err(map_err($name))?
            };
        }
        let active = take("POLICY_ACTIVE")?;
        let active_fd = map_data(&active)
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(MapsError::Switch)?;
        let maps = Self {
            active: active.try_into().map_err(map_err("POLICY_ACTIVE"))?,
            active_fd: Arc::new(active_fd),
            ipcache: typed!("IPCACHE"),
            ipcache_exact: typed!("IPCACHE_EXACT"),
            ipcache_exact4: typed!("IPCACHE_EXACT4"),
            ipcache_table4: typed!("IPCACHE_TABLE4"),
            ipcache_table6: typed!("IPCACHE_TABLE6"),
            endpoints: typed!("ENDPOINTS"),
            endpoint_table: typed!("ENDPOINT_TABLE"),
            cgroups: typed!("CGROUPS"),
            rules: typed!("RULES"),
            ranges: typed!("PORT_RANGES"),
            pair_filter: typed!("PAIR_FILTER"),
            conntrack4: typed!("CONNTRACK4"),
            unanswered4: typed!("UNANSWERED4"),
            conntrack: typed!("CONNTRACK"),
            unanswered: typed!("UNANSWERED"),
            flow_filter: typed!("FLOW_STAMPS"),
            flow_tables: typed!("FLOW_TABLES"),
            event_state: typed!("EVENT_STATE"),
            lost_packets: typed!("LOST_PACKETS"),
            denial_table: typed!("DENIAL_TABLE"),
            packet_counts: typed!("PACKET_COUNTS"),
            flow_counts: typed!("FLOW_COUNTS"),
            edge_cache: typed!("EDGE_CACHE"),
            flow_cache: typed!("FLOW_CACHES"),
            flow_cache6: typed!("FLOW_CACHES6"),
            capacities: BTreeMap::new(),
        };
        let events: RingBuf<MapData> = typed!("EVENTS");
        Ok((Self { capacities, ..maps }, events))
    }

    /// Opens the maps pinned under `dir`.
    pub fn from_pins(dir: &Path) -> Result<(Self, RingBuf<MapData>), MapsError> {
        Self::open(|name| {
            MapData::from_pin(dir.join(name))
                .ok()
                .and_then(|data| Map::from_map_data(data).ok())
        })
    }

    /// The installed generation's config, if one is installed.
    pub fn installed(&self) -> Result<Option<PolicyConfig>, MapsError> {
        match self.active.get(&0, 0) {
            Ok(config) => config
                .get(&0, 0)
                .map(Some)
                .map_err(map_err("POLICY_ACTIVE")),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(MapError::SyscallError(error))
                if error.io_error.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            Err(error) => Err(map_err("POLICY_ACTIVE")(error)),
        }
    }

    pub fn capacity(&self, name: &'static str) -> u32 {
        self.capacities.get(name).copied().unwrap_or(0)
    }

    /// Writes `next` into `slot`. With `previous` (what the slot holds) only the difference is
    /// written; without, the slot is cleared first. `other` is what the other slot holds, if
    /// known: rule entries keep its half as it is. Returns the number of map writes.
    fn write_slot(
        &mut self,
        slot: u8,
        previous: Option<&Tables>,
        next: &Tables,
        other: Option<&Tables>,
    ) -> Result<usize, MapsError> {
        // The two writes that grow with the rules, side by side: inserting is the kernel's work
        // (about a microsecond an entry), and a full load has 100 000 rule entries.
        let (rules, pairs) = std::thread::scope(|scope| {
            let rules = scope.spawn(|| {
                sync_rules(
                    &mut self.rules,
                    slot,
                    previous.map(|p| &p.rules),
                    &next.rules,
                    other.map(|o| &o.rules),
                )
            });
            let pairs = sync_pair_filter(
                &mut self.pair_filter,
                slot,
                previous.map(|p| &p.pairs),
                next,
            );
            (rules.join(), pairs)
        });
        let mut writes = rules
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            .map_err(map_err("RULES"))?;
        writes += pairs.map_err(map_err("PAIR_FILTER"))?;
        writes += sync_hash(
            &mut self.ranges,
            slot,
            previous.map(|p| &p.ranges),
            &next.ranges,
        )
        .map_err(map_err("PORT_RANGES"))?;
        writes += sync_hash(
            &mut self.endpoints,
            slot,
            previous.map(|p| &p.endpoints),
            &next.endpoints,
        )
        .map_err(map_err("ENDPOINTS"))?;
        writes += sync_hash(
            &mut self.cgroups,
            slot,
            previous.map(|p| &p.cgroups),
            &next.cgroups,
        )
        .map_err(map_err("CGROUPS"))?;
        writes += sync_ipcache(
            Ipcache {
                trie: &mut self.ipcache,
                exact: &mut self.ipcache_exact,
                exact4: &mut self.ipcache_exact4,
            },
            slot,
            previous.map(|p| &p.ipcache),
            &next.ipcache,
        )
        .map_err(map_err("IPCACHE"))?;
        writes += sync_identity_table(
            &mut self.ipcache_table4,
            identity_table::ADDRESSES4,
            slot,
            previous.map(|p| &p.ipcache),
            &next.ipcache,
            Prefix::host_v4,
        )
        .map_err(map_err("IPCACHE_TABLE4"))?;
        writes += sync_identity_table(
            &mut self.ipcache_table6,
            identity_table::ADDRESSES6,
            slot,
            previous.map(|p| &p.ipcache),
            &next.ipcache,
            Prefix::host_v6,
        )
        .map_err(map_err("IPCACHE_TABLE6"))?;
        writes += sync_identity_table(
            &mut self.endpoint_table,
            identity_table::ENDPOINTS,
            slot,
            previous.map(|p| &p.endpoints),
            &next.endpoints,
            |key| Some(key.ifindex),
        )
        .map_err(map_err("ENDPOINT_TABLE"))?;
        Ok(writes)
    }

    /// Entries of each slot-versioned table in `slot`, counted in the kernel.
    fn slot_entries(&self, slot: u8) -> [usize; 5] {
        [
            trie_keys_in_slot(&self.ipcache, slot).count(),
            keys_in_slot(&self.endpoints, slot).count(),
            keys_in_slot(&self.cgroups, slot).count(),
            rules_in_slot(&self.rules, slot).count(),
            keys_in_slot(&self.ranges, slot).count(),
        ]
    }

    /// Installs `config` as the live generation, and returns as soon as the programs see it.
    /// The kernel returns from an update of an array-of-maps only after a grace period (no
    /// program run may still hold the old config): 6-10 ms that a switch need not wait. A
    /// thread of its own makes the update and waits that out, while this one watches the map
    /// for the new config; the [`GracePeriod`] it returns ends with that thread, and the old
    /// generation's slot may be written only after it.
    fn switch_to(&mut self, config: &PolicyConfig) -> Result<GracePeriod, MapsError> {
        let mut generation: Array<MapData, PolicyConfig> =
            Array::create(1, 0).map_err(map_err("POLICY_ACTIVE"))?;
        generation
            .set(0, config, 0)
            .map_err(map_err("POLICY_ACTIVE"))?;
        let data = IterableMap::map(&generation);
        bpf_sys::freeze(data.fd().as_fd()).map_err(MapsError::Freeze)?;
        let id = data.info().map_err(map_err("POLICY_ACTIVE"))?.id();
        // The thread holds the config map open until the array holds it.
        let inner = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(MapsError::Switch)?;
        let outer = Arc::clone(&self.active_fd);
        let update = std::thread::Builder::new()
            .name("switch".to_owned())
            .spawn(move || bpf_sys::set_inner_map(outer.as_fd(), 0, inner.as_fd()))
            .map_err(MapsError::Switch)?;
        loop {
            if bpf_sys::inner_map_id(self.active_fd.as_fd(), 0).is_ok_and(|live| live == id) {
                return Ok(GracePeriod(Some(update)));
            }
            if update.is_finished() {
                // Returned: switched (the map shows it from now on), or refused.
                return match update.join() {
                    Ok(Ok(())) => Ok(GracePeriod(None)),
                    Ok(Err(error)) => Err(MapsError::Switch(error)),
                    Err(_) => Err(MapsError::Switch(std::io::Error::other(
                        "the switching thread panicked",
                    ))),
                };
            }
            std::thread::yield_now();
        }
    }

    /// Per-(verdict, reason) packet and byte counts, summed over CPUs.
    pub fn packet_counts(&self) -> Result<Vec<(u8, u8, Counter)>, MapsError> {
        let mut counts = Vec::new();
        for index in 0..PACKET_COUNTER_SLOTS {
            let per_cpu = self
                .packet_counts
                .get(&index, 0)
                .map_err(map_err("PACKET_COUNTS"))?;
            let total = sum(per_cpu.iter());
            if total.packets > 0 {
                counts.push((
                    (index / REASON_SLOTS) as u8,
                    (index % REASON_SLOTS) as u8,
                    total,
                ));
            }
        }
        // Read after the counters, see `flows_with_counts`.
        for flow in self.flows_with_counts() {
            let (verdict, reason) = (flow.verdict, reason::ESTABLISHED);
            match counts
                .iter_mut()
                .find(|(v, r, _)| (*v, *r) == (verdict, reason))
            {
                Some((_, _, total)) => add(total, &passed(&flow)),
                None => counts.push((verdict, reason, passed(&flow))),
            }
        }
        Ok(counts)
    }

    /// The slots of the datapath's flow cache, over all CPUs, that counted packets they have
    /// not moved to the counters yet. Read after the counters they move to: counts that move
    /// meanwhile show at the next read, never twice.
    fn flows_with_counts(&self) -> Vec<CachedPass> {
        let ipv4 = self.flow_cache.get(&0, 0).ok();
        let ipv6 = self.flow_cache6.get(&0, 0).ok();
        let ipv4 = ipv4.iter().flat_map(|tables| tables.iter());
        let ipv6 = ipv6.iter().flat_map(|tables| tables.iter());
        ipv4.flat_map(|table| table.slots.iter().map(|flow| flow.pass))
            .chain(ipv6.flat_map(|table| table.slots.iter().map(|flow| flow.pass)))
            .filter(|pass| pass.packets != 0)
            .collect()
    }

    /// Per-(source, destination, verdict) packet and byte counts, summed over CPUs: the
    /// table's, plus what the per-CPU edge cache holds, plus what the flow cache's slots hold.
    /// Each is read before the cache whose counts move into it: counts the kernel moves
    /// meanwhile show at the next read, never twice.
    pub fn flow_counts(&self) -> Vec<(FlowCounterKey, Counter)> {
        let mut counts: BTreeMap<FlowCounterKey, Counter> = self
            .flow_counts
            .iter()
            .filter_map(Result::ok)
            .map(|(key, per_cpu)| (key, sum(per_cpu.iter())))
            .collect();
        for index in 0..EDGE_CACHE_SLOTS {
            let Ok(per_cpu) = self.edge_cache.get(&index, 0) else {
                continue;
            };
            for slot in per_cpu.iter().filter(|slot| slot.counter.packets != 0) {
                add(counts.entry(slot.key).or_default(), &slot.counter);
            }
        }
        for flow in self.flows_with_counts() {
            let edge = FlowCounterKey {
                src_identity: flow.src_identity,
                dst_identity: flow.dst_identity,
                verdict: flow.verdict,
                _pad: [0; 3],
            };
            add(counts.entry(edge).or_default(), &passed(&flow));
        }
        counts.into_iter().collect()
    }

    /// Events the ring buffer could not take, over all CPUs, since the maps were created.
    pub fn events_lost(&self) -> u64 {
        self.event_state
            .get(&0, 0)
            .map(|per_cpu| per_cpu.iter().map(|state| state.lost).sum())
            .unwrap_or(0)
    }

    /// The packets the lost events stood for (their counts), over all CPUs, since the maps
    /// were created.
    pub fn events_lost_packets(&self) -> u64 {
        self.lost_packets
            .get(&0, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }

    /// Denied packets the kernel counted under a de-duplicated shape and has not reported
    /// yet, over all CPUs: they go out with the shape's next report, or when another shape
    /// takes its slot. A de-duplicated denial is in a record's count, in a lost record's
    /// ([`Self::events_lost_packets`]), or here.
    pub fn denied_packets_unreported(&self) -> u64 {
        self.denial_table
            .get(&0, 0)
            .map(|per_cpu| {
                per_cpu
                    .iter()
                    .flat_map(|table| table.slots.iter())
                    .map(|slot| u64::from(slot.state.suppressed))
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Entries and capacity of the maps an operator sizes.
    pub fn fill(&self) -> BTreeMap<&'static str, Fill> {
        let fill = |name: &'static str, entries: usize| {
            (
                name,
                Fill {
                    entries,
                    capacity: self.capacity(name),
                },
            )
        };
        BTreeMap::from([
            fill("IPCACHE", self.ipcache.keys().count()),
            fill("ENDPOINTS", self.endpoints.keys().count()),
            fill("CGROUPS", self.cgroups.keys().count()),
            fill("RULES", self.rules.keys().count()),
            fill("PORT_RANGES", self.ranges.keys().count()),
            fill("CONNTRACK4", self.conntrack4.keys().count()),
            fill("UNANSWERED4", self.unanswered4.keys().count()),
            fill("CONNTRACK", self.conntrack.keys().count()),
            fill("UNANSWERED", self.unanswered.keys().count()),
        ])
    }

    /// Moves IPv4 flows from the tables of the long key to those of the short one, where this
    /// build's programs look for them: an earlier build kept every flow under the long key, and
    /// its established connections must not be judged as new once these programs take over.
    /// Returns how many moved.
    pub fn move_ipv4_flows(&mut self) -> Result<usize, MapsError> {
        let answered =
            move_ipv4(&mut self.conntrack, &mut self.conntrack4).map_err(map_err("CONNTRACK4"))?;
        let unanswered = move_ipv4(&mut self.unanswered, &mut self.unanswered4)
            .map_err(map_err("UNANSWERED4"))?;
        Ok(answered + unanswered)
    }

    /// Stamps the flow filter's bucket of every tracked flow (see
    /// `enforcer_common::flow_filter`), a minute ahead of now: an earlier build's programs
    /// tracked flows without stamping, and this build's look for a flow only where its bucket is
    /// stamped. Ahead, because the datapath's own stamps meanwhile must not be overwritten by an
    /// older one. Returns how many buckets were stamped.
    pub fn stamp_tracked_flows(&mut self) -> Result<usize, MapsError> {
        let mut buckets = BTreeSet::new();
        buckets.extend(flow_buckets(
            [&self.conntrack4, &self.unanswered4],
            flow_filter::bucket4,
        ));
        buckets.extend(flow_buckets(
            [&self.conntrack, &self.unanswered],
            flow_filter::bucket,
        ));
        let stamp = flow_filter::stamp(monotonic_ns()? + STAMP_AHEAD.as_nanos() as u64);
        // A whole entry at a time, every bucket of it ahead (see `flow_filter`): what the
        // datapath stamps meanwhile is never set back.
        let words: BTreeSet<u32> = buckets
            .iter()
            .map(|bucket| flow_filter::place(*bucket).0)
            .collect();
        for word in &words {
            self.flow_filter
                .set(*word, [stamp; flow_filter::BUCKETS_PER_WORD as usize], 0)
                .map_err(map_err("FLOW_STAMPS"))?;
        }
        Ok(buckets.len())
    }

    /// Flows that entered the unanswered table and flows that moved on to the established one
    /// at their first reply, over all CPUs, since the maps were created.
    pub fn flow_table_counts(&self) -> FlowTableCounts {
        self.flow_tables
            .get(&0, 0)
            .map(|per_cpu| {
                per_cpu
                    .iter()
                    .fold(FlowTableCounts::default(), |total, cpu| FlowTableCounts {
                        opened: total.opened + cpu.opened,
                        answered: total.answered + cpu.answered,
                    })
            })
            .unwrap_or_default()
    }
}

/// The flow filter's buckets of the flows in one family's `tables`, by that family's `bucket`.
fn flow_buckets<'a, K: Pod>(
    tables: [&'a HashMap<MapData, K, CtEntry>; 2],
    bucket: fn(&K) -> u32,
) -> impl Iterator<Item = u32> + 'a {
    tables
        .into_iter()
        .flat_map(|table| table.keys().filter_map(Result::ok))
        .map(move |key| bucket(&key))
}

/// How far ahead of now [`KernelMaps::stamp_tracked_flows`] stamps: longer than the controller
/// can take between reading the clock and its last write, and within what the datapath takes
/// for now (`flow_filter::AHEAD`, 128 units of about a second).
const STAMP_AHEAD: Duration = Duration::from_secs(60);

/// The monotonic clock, which the datapath's clocks read (`bpf_ktime_get_ns`, or its coarse
/// form, once a tick on each CPU: a tick or two behind).
fn monotonic_ns() -> Result<u64, MapsError> {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|now| now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
        .map_err(MapsError::Clock)
}

/// Moves the flows of `long` whose ends are both IPv4 into `short`.
fn move_ipv4(
    long: &mut HashMap<MapData, CtKey, CtEntry>,
    short: &mut HashMap<MapData, CtKey4, CtEntry>,
) -> Result<usize, MapError> {
    let ipv4: Vec<(CtKey, CtKey4)> = long
        .keys()
        .filter_map(Result::ok)
        .filter_map(|key| Some((key, CtKey4::of_mapped(&key)?)))
        .collect();
    let mut moved = 0;
    for (key, short_key) in ipv4 {
        // Gone meanwhile (expired, evicted): nothing to move.
        let Ok(entry) = long.get(&key, 0) else {
            continue;
        };
        short.insert(short_key, entry, 0)?;
        let _ = long.remove(&key);
        moved += 1;
    }
    Ok(moved)
}

fn map_data(map: &Map) -> &MapData {
    match map {
        Map::Array(data)
        | Map::ArrayOfMaps(data)
        | Map::HashMap(data)
        | Map::LruHashMap(data)
        | Map::LpmTrie(data)
        | Map::PerCpuArray(data)
        | Map::PerCpuHashMap(data)
        | Map::PerCpuLruHashMap(data)
        | Map::RingBuf(data) => data,
        other => panic!("unexpected map type {other:?}"),
    }
}

/// The packets a flow cache slot passed and has not moved to the counters yet.
fn passed(flow: &CachedPass) -> Counter {
    Counter {
        packets: u64::from(flow.packets),
        bytes: flow.bytes,
    }
}

fn add(total: &mut Counter, more: &Counter) {
    total.packets += more.packets;
    total.bytes += more.bytes;
}

fn sum<'a>(values: impl Iterator<Item = &'a Counter>) -> Counter {
    values.fold(Counter::default(), |mut total, value| {
        add(&mut total, value);
        total
    })
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(error))
            if error.io_error.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        other => other,
    }
}

/// The rule entries the kernel holds in `slot`, with the other slot's half.
fn rules_in_slot(
    map: &HashMap<MapData, PolicyKey, SlotVerdicts>,
    slot: u8,
) -> impl Iterator<Item = (PolicyKey, SlotVerdicts)> + '_ {
    map.iter()
        .filter_map(Result::ok)
        .filter(move |(_, verdicts)| verdicts.in_slot(slot).is_some())
}

/// Writes the rule entries `next` into `slot`'s half of each entry, keeping the other half:
/// from `other` (the other slot's entries) when known, else as the kernel holds it. An entry
/// neither slot has any more is removed.
fn sync_rules(
    map: &mut HashMap<MapData, PolicyKey, SlotVerdicts>,
    slot: u8,
    previous: Option<&OrdMap<PolicyKey, RuleVerdict>>,
    next: &OrdMap<PolicyKey, RuleVerdict>,
    other: Option<&OrdMap<PolicyKey, RuleVerdict>>,
) -> Result<usize, MapError> {
    let (removed, written): (Vec<PolicyKey>, Vec<(&PolicyKey, &RuleVerdict)>) = match previous {
        Some(previous) => {
            let changes = Changes::between_generations(previous, next);
            (
                changes.removed.into_iter().copied().collect(),
                changes.written,
            )
        }
        None => (
            rules_in_slot(map, slot)
                .map(|(key, _)| key)
                .filter(|key| !next.contains_key(key))
                .collect(),
            next.iter().collect(),
        ),
    };
    let other_slot = 1 - (slot & 1);
    let other_half = |key: &PolicyKey| -> RuleVerdict {
        let held = match other {
            Some(other) => other.get(key).copied(),
            None => map
                .get(key, 0)
                .ok()
                .and_then(|verdicts| verdicts.in_slot(other_slot)),
        };
        held.unwrap_or_default()
    };
    let plan = RuleWrites::plan(slot, &removed, &written, other_half);
    for key in &plan.emptied {
        ignore_missing(map.remove(key))?;
    }
    update_batch(map, &plan.keys, &plan.values)?;
    Ok(removed.len() + written.len())
}

/// What writing one slot's rule entries does to the kernel's entries, each of which holds both
/// slots' halves.
#[derive(Debug, Default, PartialEq)]
struct RuleWrites {
    /// Entries written whole: this slot's half as `next` has it, the other's as it was.
    keys: Vec<PolicyKey>,
    values: Vec<SlotVerdicts>,
    /// Entries neither slot has any more: removed.
    emptied: Vec<PolicyKey>,
}

impl RuleWrites {
    /// Writes for `slot` losing the keys `removed` and taking `written`; `other_half` is what
    /// the other slot holds for a key (action `NONE` if nothing).
    fn plan(
        slot: u8,
        removed: &[PolicyKey],
        written: &[(&PolicyKey, &RuleVerdict)],
        other_half: impl Fn(&PolicyKey) -> RuleVerdict,
    ) -> Self {
        let halves = |mine: RuleVerdict, theirs: RuleVerdict| {
            let mut by_slot = [theirs; 2];
            by_slot[usize::from(slot & 1)] = mine;
            SlotVerdicts { by_slot }
        };
        let mut writes = Self::default();
        for key in removed {
            let theirs = other_half(key);
            if theirs.action == action::NONE {
                writes.emptied.push(*key);
            } else {
                writes.keys.push(*key);
                writes.values.push(halves(RuleVerdict::default(), theirs));
            }
        }
        for (key, verdict) in written {
            writes.keys.push(**key);
            writes.values.push(halves(**verdict, other_half(key)));
        }
        writes
    }
}

/// Writes `slot`'s half of the pair filter from `next`'s pairs: the words of the pairs that
/// changed since `previous`, or without it every word of the slot.
fn sync_pair_filter(
    filter: &mut Array<MapData, u64>,
    slot: u8,
    previous: Option<&OrdMap<Pair, u32>>,
    next: &Tables,
) -> Result<usize, MapError> {
    let in_slot = |word: u32| pair_filter::first_word(slot) + word;
    let (indexes, words): (Vec<u32>, Vec<u64>) = match previous {
        Some(previous) => {
            let changes = Changes::between_generations(previous, &next.pairs);
            let changed: BTreeSet<u32> = changes
                .removed
                .into_iter()
                .chain(changes.written.into_iter().map(|(pair, _)| pair))
                .map(Pair::word)
                .collect();
            changed
                .into_iter()
                .map(|word| (in_slot(word), next.pair_filter_word(word)))
                .unzip()
        }
        None => (
            (0..pair_filter::WORDS_PER_SLOT).map(in_slot).collect(),
            next.pair_filter_words(),
        ),
    };
    update_batch(filter, &indexes, &words)?;
    Ok(indexes.len())
}

/// Writes `slot`'s half of an identity table for the entries of `next` that `key_of` gives a
/// key: only the buckets whose keys changed since `previous` (what the slot holds), or every
/// bucket of the half without it.
fn sync_identity_table<K: Ord, T: TableKey + Ord, const WAYS: usize>(
    table: &mut Array<MapData, IdentityBucket<T, WAYS>>,
    shape: Shape,
    slot: u8,
    previous: Option<&BTreeMap<K, IdentityInfo>>,
    next: &BTreeMap<K, IdentityInfo>,
    key_of: impl Fn(&K) -> Option<T>,
) -> Result<usize, MapError>
where
    IdentityBucket<T, WAYS>: Pod,
{
    let (indexes, values): (Vec<u32>, Vec<IdentityBucket<T, WAYS>>) =
        identity_buckets_to_write(shape, previous, next, key_of)
            .into_iter()
            .map(|(bucket, value)| (shape.first_index(slot) + bucket, value))
            .unzip();
    update_batch(table, &indexes, &values)?;
    Ok(indexes.len())
}

/// The buckets (within a slot) that bring an identity table holding `previous` in line with
/// `next`, and what each must hold (see [`sync_identity_table`]). Only the buckets of keys that
/// changed are laid out, from a pass over `next`: a whole layout of a large policy's addresses
/// took 0.2 ms, most of a one-rule change's map writes.
fn identity_buckets_to_write<K: Ord, T: TableKey + Ord, const WAYS: usize>(
    shape: Shape,
    previous: Option<&BTreeMap<K, IdentityInfo>>,
    next: &BTreeMap<K, IdentityInfo>,
    key_of: impl Fn(&K) -> Option<T>,
) -> BTreeMap<u32, IdentityBucket<T, WAYS>> {
    let buckets: BTreeSet<u32> = match previous {
        Some(previous) => {
            let changes = Changes::between(previous, next);
            let changed = changes.written.iter().map(|(key, _)| *key);
            changes
                .removed
                .iter()
                .copied()
                .chain(changed)
                .filter_map(&key_of)
                .map(|key| shape.bucket(&key))
                .collect()
        }
        None => (0..shape.buckets_per_slot()).collect(),
    };
    let entries = next.iter().filter_map(|(key, identity)| {
        let key = key_of(key)?;
        buckets
            .contains(&shape.bucket(&key))
            .then_some((key, *identity))
    });
    let mut layout = shape.layout(entries);
    buckets
        .into_iter()
        .map(|bucket| {
            let value = layout.remove(&bucket).unwrap_or(IdentityBucket::EMPTY);
            (bucket, value)
        })
        .collect()
}

fn sync_hash<K: SlotKey, V: Pod + PartialEq>(
    map: &mut HashMap<MapData, K, V>,
    slot: u8,
    previous: Option<&BTreeMap<K, V>>,
    next: &BTreeMap<K, V>,
) -> Result<usize, MapError> {
    let (removed, written): (Vec<K>, Vec<(&K, &V)>) = match previous {
        Some(previous) => {
            let changes = Changes::between(previous, next);
            (
                changes.removed.into_iter().copied().collect(),
                changes.written,
            )
        }
        None => (keys_in_slot(map, slot).collect(), next.iter().collect()),
    };
    for key in &removed {
        ignore_missing(map.remove(&key.in_slot(slot)))?;
    }
    let keys: Vec<K> = written.iter().map(|(key, _)| key.in_slot(slot)).collect();
    let values: Vec<V> = written.iter().map(|(_, value)| **value).collect();
    update_batch(map, &keys, &values)?;
    Ok(removed.len() + written.len())
}

/// Writes `keys[i]` = `values[i]` in as few system calls as the kernel takes.
fn update_batch<K: Pod, V: Pod>(
    map: &impl IterableMap<K, V>,
    keys: &[K],
    values: &[V],
) -> Result<(), MapError> {
    bpf_sys::update_batch(map.map().fd().as_fd(), keys, values).map_err(|io_error| {
        MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_update_batch",
            io_error,
        })
    })
}

/// What turns one table into another: the keys to remove and the entries to write (new or
/// changed), found in one pass over both, which are sorted.
#[derive(Debug, PartialEq)]
struct Changes<'a, K, V> {
    removed: Vec<&'a K>,
    written: Vec<(&'a K, &'a V)>,
}

impl<'a, K: Ord + Clone, V: PartialEq + Clone> Changes<'a, K, V> {
    /// The changes between two generations of a persistent map: what they share (all of it
    /// but what a change touched) is skipped, not compared.
    fn between_generations(previous: &'a OrdMap<K, V>, next: &'a OrdMap<K, V>) -> Self {
        let mut changes = Self {
            removed: Vec::new(),
            written: Vec::new(),
        };
        for item in previous.diff(next) {
            match item {
                DiffItem::Add(key, value)
                | DiffItem::Update {
                    new: (key, value), ..
                } => changes.written.push((key, value)),
                DiffItem::Remove(key, _) => changes.removed.push(key),
            }
        }
        changes
    }
}

impl<'a, K: Ord, V: PartialEq> Changes<'a, K, V> {
    fn between(previous: &'a BTreeMap<K, V>, next: &'a BTreeMap<K, V>) -> Self {
        let mut changes = Self {
            removed: Vec::new(),
            written: Vec::new(),
        };
        let (mut before, mut after) = (previous.iter().peekable(), next.iter().peekable());
        loop {
            match (before.peek(), after.peek()) {
                (None, None) => return changes,
                (Some(&(old, _)), None) => {
                    changes.removed.push(old);
                    before.next();
                }
                (None, Some(&entry)) => {
                    changes.written.push(entry);
                    after.next();
                }
                (Some(&(old, old_value)), Some(&(new, new_value))) => match old.cmp(new) {
                    std::cmp::Ordering::Less => {
                        changes.removed.push(old);
                        before.next();
                    }
                    std::cmp::Ordering::Greater => {
                        changes.written.push((new, new_value));
                        after.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if old_value != new_value {
                            changes.written.push((new, new_value));
                        }
                        before.next();
                        after.next();
                    }
                },
            }
        }
    }
}

/// The config flags of the generation `compiled` installs.
fn generation_flags(compiled: &Compiled) -> u32 {
    let audit = if compiled.audit {
        config_flags::AUDIT
    } else {
        0
    };
    let ipv4_hosts_only = if compiled.tables.ipv4_hosts_only {
        config_flags::IPV4_HOSTS_ONLY
    } else {
        0
    };
    let ipv6_hosts_only = if compiled.tables.ipv6_hosts_only {
        config_flags::IPV6_HOSTS_ONLY
    } else {
        0
    };
    audit | ipv4_hosts_only | ipv6_hosts_only
}

fn lpm_key(prefix: &Prefix, slot: u8) -> LpmKey<IpcacheKey> {
    let (len, data) = prefix.key(slot);
    LpmKey::new(len, data)
}

/// The trie and its exact-address companions (whole addresses again, by exact key: IPv4 ones
/// under the short key).
struct Ipcache<'a> {
    trie: &'a mut LpmTrie<MapData, IpcacheKey, IdentityInfo>,
    exact: &'a mut HashMap<MapData, IpcacheKey, IdentityInfo>,
    exact4: &'a mut HashMap<MapData, Ipcache4Key, IdentityInfo>,
}

impl Ipcache<'_> {
    fn remove(&mut self, prefix: &Prefix, slot: u8) -> Result<(), MapError> {
        // The exact entry goes first: a lookup never finds it without its trie entry.
        if prefix.is_host() {
            let (_, key) = prefix.key(slot);
            match Ipcache4Key::of_mapped(slot, &key.addr) {
                Some(v4) => ignore_missing(self.exact4.remove(&v4))?,
                None => ignore_missing(self.exact.remove(&key))?,
            }
        }
        ignore_missing(self.trie.remove(&lpm_key(prefix, slot)))
    }

    fn insert(&mut self, prefix: &Prefix, slot: u8, info: &IdentityInfo) -> Result<(), MapError> {
        self.trie.insert(&lpm_key(prefix, slot), info, 0)?;
        if prefix.is_host() {
            let (_, key) = prefix.key(slot);
            match Ipcache4Key::of_mapped(slot, &key.addr) {
                Some(v4) => self.exact4.insert(v4, info, 0)?,
                None => self.exact.insert(key, info, 0)?,
            }
        }
        Ok(())
    }

    /// Empties `slot` of whatever it holds.
    fn clear(&mut self, slot: u8) -> Result<usize, MapError> {
        let stale: Vec<_> = trie_keys_in_slot(self.trie, slot).collect();
        let stale_exact: Vec<_> = keys_in_slot(self.exact, slot).collect();
        let stale_exact4: Vec<_> = keys_in_slot(self.exact4, slot).collect();
        for key in stale_exact {
            ignore_missing(self.exact.remove(&key))?;
        }
        for key in stale_exact4 {
            ignore_missing(self.exact4.remove(&key))?;
        }
        for key in &stale {
            ignore_missing(self.trie.remove(key))?;
        }
        Ok(stale.len())
    }
}

fn sync_ipcache(
    mut ipcache: Ipcache<'_>,
    slot: u8,
    previous: Option<&BTreeMap<Prefix, IdentityInfo>>,
    next: &BTreeMap<Prefix, IdentityInfo>,
) -> Result<usize, MapError> {
    let mut writes = 0;
    let written: Vec<(&Prefix, &IdentityInfo)> = match previous {
        Some(previous) => {
            let changes = Changes::between(previous, next);
            for prefix in &changes.removed {
                ipcache.remove(prefix, slot)?;
            }
            writes += changes.removed.len();
            changes.written
        }
        None => {
            writes += ipcache.clear(slot)?;
            next.iter().collect()
        }
    };
    for (prefix, info) in &written {
        ipcache.insert(prefix, slot, info)?;
    }
    Ok(writes + written.len())
}

/// What one slot of the tables holds, as far as the controller knows.
#[derive(Clone, Debug, Default)]
enum SlotContents {
    /// Written by another controller (adopted state): cleared before reuse.
    #[default]
    Unknown,
    Known(Arc<Tables>),
}

impl SlotContents {
    fn tables(&self) -> Option<&Tables> {
        match self {
            Self::Known(tables) => Some(tables),
            Self::Unknown => None,
        }
    }
}

/// The outcome of installing a generation.
#[derive(Clone, Debug)]
pub struct Installed {
    pub generation: u32,
    pub slot: u8,
    /// Map writes it took; small when the policy changed little.
    pub writes: usize,
    pub took: Duration,
}

/// The wait that follows a switch: until it ends, a program run may still read the generation
/// switched from, so that generation's slot is not written.
#[derive(Debug)]
struct GracePeriod(Option<std::thread::JoinHandle<std::io::Result<()>>>);

impl GracePeriod {
    fn wait(self) {
        let Some(update) = self.0 else { return };
        match update.join() {
            Ok(Ok(())) => {}
            // Seen switched before it returned: nothing to undo, and nothing else to wait for.
            Ok(Err(error)) => tracing::warn!("the generation switch returned an error: {error}"),
            Err(_) => tracing::warn!("the generation switch's thread panicked"),
        }
    }
}

/// Installs compiled policies as generations, alternating between the two slots.
pub struct Installer {
    live: Option<PolicyConfig>,
    slots: [SlotContents; 2],
    /// After the last switch: the old generation's slot is written only once it is over.
    grace: Option<GracePeriod>,
}

impl Installer {
    /// Starts from what the maps hold: a fresh datapath, or the state a previous controller left.
    pub fn adopt(maps: &KernelMaps) -> Result<Self, MapsError> {
        Ok(Self {
            live: maps.installed()?,
            slots: Default::default(),
            grace: None,
        })
    }

    /// The generation now live.
    pub fn live(&self) -> Option<&PolicyConfig> {
        self.live.as_ref()
    }

    /// The number the next installed generation gets (0 is never used: it means none).
    pub fn next_generation(&self) -> u32 {
        self.live
            .as_ref()
            .map_or(1, |live| live.generation.wrapping_add(1).max(1))
    }

    /// Writes `compiled` beside the live generation and switches to it. Nothing the live
    /// generation uses is touched; on error the live generation stays in force.
    pub fn install(
        &mut self,
        maps: &mut KernelMaps,
        compiled: &Compiled,
    ) -> Result<Installed, MapsError> {
        let started = Instant::now();
        let generation = self.next_generation();
        let slot = self.live.as_ref().map_or(0, |live| 1 - live.slot as u8);
        self.check_capacity(maps, &compiled.tables)?;
        // The target slot is about to change: until the switch, it is in an unknown state.
        self.end_grace_period();
        let previous = match std::mem::take(&mut self.slots[usize::from(slot)]) {
            SlotContents::Known(tables) => Some(tables),
            SlotContents::Unknown => None,
        };
        let other = self.slots[usize::from(1 - slot)].tables();
        let writes = maps.write_slot(slot, previous.as_deref(), &compiled.tables, other)?;
        let config = PolicyConfig {
            generation,
            slot: u32::from(slot),
            flags: generation_flags(compiled),
            cgroup_levels: compiled.tables.cgroup_levels,
            installed_at_ns: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |now| now.as_nanos() as u64),
            policy_hash: compiled.hash,
        };
        self.grace = Some(maps.switch_to(&config)?);
        self.slots[usize::from(slot)] = SlotContents::Known(Arc::clone(&compiled.tables));
        self.live = Some(config);
        Ok(Installed {
            generation,
            slot,
            writes,
            took: started.elapsed(),
        })
    }

    /// Brings the idle slot up to the live generation's tables, so that the next change writes
    /// only its own difference (rather than that plus the one before). Nothing reads the idle
    /// slot, so this runs after the switch, off the critical path.
    pub fn sync_idle(
        &mut self,
        maps: &mut KernelMaps,
        compiled: &Compiled,
    ) -> Result<usize, MapsError> {
        let Some(live) = &self.live else { return Ok(0) };
        let idle = usize::from(1 - live.slot as u8);
        self.end_grace_period();
        // The slot is in an unknown state until the writes are done.
        let previous = match std::mem::take(&mut self.slots[idle]) {
            SlotContents::Known(tables) => Some(tables),
            SlotContents::Unknown => None,
        };
        let other = self.slots[1 - idle].tables();
        let writes = maps.write_slot(idle as u8, previous.as_deref(), &compiled.tables, other)?;
        self.slots[idle] = SlotContents::Known(Arc::clone(&compiled.tables));
        Ok(writes)
    }

    /// Waits until no program run can still read the generation switched from last.
    pub fn end_grace_period(&mut self) {
        if let Some(grace) = self.grace.take() {
            grace.wait();
        }
    }

    /// Both generations share each map while switching: the live one and `next` must fit.
    fn check_capacity(&self, maps: &KernelMaps, next: &Tables) -> Result<(), MapsError> {
        let live_entries: [usize; 5] = match &self.live {
            None => [0; 5],
            Some(live) => match &self.slots[live.slot as usize] {
                SlotContents::Known(tables) => tables.entry_counts().map(|(_, count)| count),
                SlotContents::Unknown => maps.slot_entries(live.slot as u8),
            },
        };
        for ((table, count), live) in next.entry_counts().into_iter().zip(live_entries) {
            let capacity = maps.capacity(table);
            if capacity > 0 && count + live > capacity as usize {
                return Err(MapsError::Capacity {
                    table,
                    needed: count + live,
                    capacity,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_between_two_tables_are_what_turns_one_into_the_other() {
        let previous = BTreeMap::from([(1, 'a'), (2, 'b'), (4, 'd'), (6, 'f'), (9, 'i')]);
        let next = BTreeMap::from([(0, 'z'), (2, 'b'), (4, 'D'), (5, 'e'), (9, 'i'), (10, 'j')]);
        let changes = Changes::between(&previous, &next);
        assert_eq!(changes.removed, [&1, &6]);
        assert_eq!(
            changes.written,
            [(&0, &'z'), (&4, &'D'), (&5, &'e'), (&10, &'j')]
        );
        let mut rebuilt = previous.clone();
        for key in changes.removed {
            rebuilt.remove(key);
        }
        rebuilt.extend(
            changes
                .written
                .into_iter()
                .map(|(key, value)| (*key, *value)),
        );
        assert_eq!(rebuilt, next);
    }

    #[test]
    fn writing_one_slots_rules_keeps_the_other_slots_half_and_removes_what_neither_has() {
        let key = |port| PolicyKey {
            src_identity: 1,
            dst_identity: 2,
            port,
            proto: 6,
            _pad: 0,
        };
        let verdict = |rule| RuleVerdict {
            rule,
            action: action::ALLOW,
            ..RuleVerdict::default()
        };
        let none = RuleVerdict::default();
        // The other slot (0) has ports 80 and 81; slot 1 loses 80 and 82, and takes 81 and 83.
        let other = BTreeMap::from([(key(80), verdict(16)), (key(81), verdict(17))]);
        let (taken_81, taken_83) = (verdict(18), verdict(19));
        let plan = RuleWrites::plan(
            1,
            &[key(80), key(82)],
            &[(&key(81), &taken_81), (&key(83), &taken_83)],
            |key| other.get(key).copied().unwrap_or_default(),
        );
        assert_eq!(
            plan,
            RuleWrites {
                keys: vec![key(80), key(81), key(83)],
                values: vec![
                    SlotVerdicts {
                        by_slot: [verdict(16), none]
                    },
                    SlotVerdicts {
                        by_slot: [verdict(17), taken_81]
                    },
                    SlotVerdicts {
                        by_slot: [none, taken_83]
                    },
                ],
                emptied: vec![key(82)],
            }
        );
    }

    #[test]
    fn tables_without_a_difference_need_no_change() {
        let table = BTreeMap::from([(1, 'a'), (2, 'b')]);
        let unchanged = Changes::between(&table, &table);
        assert!(unchanged.removed.is_empty() && unchanged.written.is_empty());
        let empty = BTreeMap::new();
        let emptied = Changes::between(&table, &empty);
        assert_eq!(emptied.removed, [&1, &2]);
        let filled = Changes::between(&empty, &table);
        assert_eq!(filled.written, [(&1, &'a'), (&2, &'b')]);
    }

    /// A slot's identity table after the writes for a change is the table of the new
    /// entries, written whole: on random generations of a small table, where buckets overflow,
    /// empty, and fill again. Keys are drawn as numbers below 100 and made table keys by
    /// `key_of`.
    fn identity_buckets_written_for_changes_make_the_next_generations_table<
        T: TableKey + Ord + std::fmt::Debug,
        const WAYS: usize,
    >(
        key_of: impl Fn(&u32) -> Option<T> + Copy,
    ) {
        let shape = Shape { bits: 3 };
        let whole = |entries: &BTreeMap<u32, IdentityInfo>| {
            identity_buckets_to_write::<u32, T, WAYS>(shape, None, entries, key_of)
        };
        let mut draw = enforcer_testbed::policies::Draw::from_seed(16);
        let generation = |draw: &mut enforcer_testbed::policies::Draw| {
            (0..draw.below(60))
                .map(|_| {
                    let identity = IdentityInfo {
                        identity: 256 + draw.below(3) as u32,
                        flags: 0,
                    };
                    (draw.below(100) as u32, identity)
                })
                .collect::<BTreeMap<u32, IdentityInfo>>()
        };
        let mut previous = generation(&mut draw);
        let mut table = whole(&previous);
        assert_eq!(table.len(), shape.buckets_per_slot() as usize);
        for _ in 0..200 {
            let next = generation(&mut draw);
            let writes = identity_buckets_to_write(shape, Some(&previous), &next, key_of);
            table.extend(writes);
            assert_eq!(table, whole(&next), "{previous:?} -> {next:?}");
            previous = next;
        }
    }

    #[test]
    fn the_identity_buckets_written_for_a_change_make_the_next_generations_table() {
        identity_buckets_written_for_changes_make_the_next_generations_table::<u32, 4>(|key| {
            Some(*key)
        });
    }

    #[test]
    fn the_ipv6_identity_buckets_written_for_a_change_make_the_next_generations_table() {
        identity_buckets_written_for_changes_make_the_next_generations_table::<[u64; 2], 2>(
            |key| {
                let address = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, *key as u16);
                Some(enforcer_common::addr::Address16(address.octets()).words())
            },
        );
    }
}
