//! Every map the programs use. Names stay within the kernel's 15 characters so that `bpftool`
//! shows them whole; the controller finds them by these names.

use aya_ebpf::{
    btf_maps::{
        Array, ArrayOfMaps, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf,
    },
    macros::btf_map,
};

use crate::{cpu_state::CpuState, subject::Subject};
use enforcer_common::{
    addr::{Ipcache4Key, IpcacheKey},
    config::PolicyConfig,
    conntrack::{
        CtEntry, CtKey, CtKey4, FlowCacheTable, FlowCacheTable6, FlowTableCounts, FragEntry,
        FragKey,
    },
    counters::{Counter, EDGE_CACHE_SLOTS, EdgeCacheSlot, FlowCounterKey},
    event::{DenialDetailsTable, DenialTable, EventCpuState, FlowEvent},
    flow_filter,
    identity::{CgroupKey, EndpointKey, IdentityInfo},
    identity_table::{self, Bucket32, Bucket128},
    policy::{PolicyKey, PortRanges, RangeKey, RateState, SlotVerdicts, pair_filter},
    verdict::PACKET_COUNTER_SLOTS,
};

const NO_PREALLOC: usize = aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize;
const NO_COMMON_LRU: usize = aya_ebpf::bindings::BPF_F_NO_COMMON_LRU as usize;

/// The installed generation's config, swapped as a whole (see `enforcer_common::config`).
#[btf_map]
pub static POLICY_ACTIVE: ArrayOfMaps<Array<PolicyConfigBytes, 1>, 1> = ArrayOfMaps::new();

/// The config map's value as the inner-map template declares it: plain bytes, not the
/// `PolicyConfig` struct. Kernels 5.15 to 6.1 accept an inner map only if its `timer_off` equals
/// the template's, and that is -ENOENT for a template whose BTF value is a struct but -EINVAL
/// for the BTF-less maps the controller creates per generation (aya cannot give them BTF), so
/// 6.1 refused every switch with EINVAL. A byte array is not a struct: -EINVAL on both sides.
pub type PolicyConfigBytes = [u8; core::mem::size_of::<PolicyConfig>()];

// The policy tables. Both generations live side by side, told apart by the slot in the key (in
// RULES, by the half of the value; in PAIR_FILTER, by the half of the array).
#[btf_map]
pub static IPCACHE: LpmTrie<IpcacheKey, IdentityInfo, 131072> = LpmTrie::new();
/// The trie's whole-address entries (/32, /128) again, by exact key: most lookups are for an
/// endpoint's own address, and a hash lookup does not grow with the trie.
#[btf_map]
pub static IPCACHE_EXACT: HashMap<IpcacheKey, IdentityInfo, 131072, NO_PREALLOC> = HashMap::new();
/// The IPv4 ones of those, under an 8-byte key rather than 20 (see `Ipcache4Key`).
#[btf_map]
pub static IPCACHE_EXACT4: HashMap<Ipcache4Key, IdentityInfo, 131072, NO_PREALLOC> = HashMap::new();
/// In front of `IPCACHE_EXACT4`, what a lookup finds without a hash (see
/// `enforcer_common::identity_table`).
#[btf_map]
pub static IPCACHE_TABLE4: Array<Bucket32, { identity_table::ADDRESSES4.entries() as usize }> =
    Array::new();
/// In front of `IPCACHE_EXACT`, as `IPCACHE_TABLE4` is in front of `IPCACHE_EXACT4`.
#[btf_map]
pub static IPCACHE_TABLE6: Array<Bucket128, { identity_table::ADDRESSES6.entries() as usize }> =
    Array::new();
#[btf_map]
pub static ENDPOINTS: HashMap<EndpointKey, IdentityInfo, 8192> = HashMap::new();
/// In front of `ENDPOINTS`, as `IPCACHE_TABLE4` is in front of `IPCACHE_EXACT4`.
#[btf_map]
pub static ENDPOINT_TABLE: Array<Bucket32, { identity_table::ENDPOINTS.entries() as usize }> =
    Array::new();
#[btf_map]
pub static CGROUPS: HashMap<CgroupKey, IdentityInfo, 8192> = HashMap::new();
/// The rule entries. Named anew when its value became one per slot (it was `POLICY`): a
/// controller of this build adopting an earlier one's pins starts it empty, fills it, and only
/// then attaches the programs that read it.
#[btf_map]
pub static RULES: HashMap<PolicyKey, SlotVerdicts, 524288, NO_PREALLOC> = HashMap::new();
#[btf_map]
pub static PAIR_FILTER: Array<u64, { pair_filter::WORDS as usize }> = Array::new();
#[btf_map]
pub static PORT_RANGES: HashMap<RangeKey, PortRanges, 65536, NO_PREALLOC> = HashMap::new();

// Datapath state. Flows live in UNANSWERED until their first reply, then in CONNTRACK: a
// flood of spoofed SYNs (never answered) can evict only other unanswered flows. IPv4 flows
// live in the tables of the short key (see `CtKey4`), the others in those of the long one.
#[btf_map]
pub static CONNTRACK4: LruHashMap<CtKey4, CtEntry, 262144> = LruHashMap::new();
#[btf_map]
pub static UNANSWERED4: LruHashMap<CtKey4, CtEntry, 65536> = LruHashMap::new();
#[btf_map]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry, 262144> = LruHashMap::new();
#[btf_map]
pub static UNANSWERED: LruHashMap<CtKey, CtEntry, 65536> = LruHashMap::new();
/// When each bucket of flow keys last had a tracked flow written (see
/// `enforcer_common::flow_filter`): a packet of no tracked flow skips the tables above. Named
/// anew when its entries became four buckets each (it was `FLOW_FILTER`, one each): its shape
/// changed; a new build stamps the buckets of every tracked flow at its start.
#[btf_map]
pub static FLOW_STAMPS: Array<flow_filter::Word, { flow_filter::WORDS as usize }> = Array::new();
#[btf_map]
pub static FLOW_TABLES: PerCpuArray<FlowTableCounts, 1> = PerCpuArray::new();
#[btf_map]
pub static FRAGMENTS: LruHashMap<FragKey, FragEntry, 8192> = LruHashMap::new();
// Flows whose packet an interface hook handed over to the socket hook (see `sockets`). Per-CPU
// LRU lists: a packet is delivered on the CPU that handed it over, right after, so a flood on
// other CPUs cannot evict its note before the socket hook takes it. By family, as conntrack.
#[btf_map]
pub static HANDED_OVER4: LruHashMap<CtKey4, u8, 16384, NO_COMMON_LRU> = LruHashMap::new();
#[btf_map]
pub static HANDED_OVER: LruHashMap<CtKey, u8, 16384, NO_COMMON_LRU> = LruHashMap::new();
#[btf_map]
pub static RATE_LIMITS: LruHashMap<u32, RateState, 16384> = LruHashMap::new();

// Reporting.
/// The ring buffer's declared size; the controller may create it with another (see
/// `report::RING_BYTES`).
pub const EVENTS_BYTES: u32 = 4 << 20;
#[btf_map]
pub static EVENTS: RingBuf<FlowEvent, { EVENTS_BYTES as usize }> = RingBuf::new();
#[btf_map]
pub static EVENT_STATE: PerCpuArray<EventCpuState, 1> = PerCpuArray::new();
/// The packets the records the ring buffer could not take stood for (their `count`s), per
/// CPU. A map of its own: a field of `EVENT_STATE` would change the shape of a pinned map,
/// which an upgrade cannot adopt.
#[btf_map]
pub static LOST_PACKETS: PerCpuArray<u64, 1> = PerCpuArray::new();
/// Each CPU's clock reading, ring room estimate and last wakeup (see `cpu_state`). Soft state,
/// not pinned, like `SCRATCH`.
#[btf_map]
pub static CPU_STATE: PerCpuArray<CpuState, 1> = PerCpuArray::new();
/// The de-duplication of denial reports, per CPU and direct-mapped (see
/// `report::report_deduplicated`): one value, each CPU's table. Named anew when its slots
/// became one value (it was `DENIALS`, a value per slot): its shape changed.
#[btf_map]
pub static DENIAL_TABLE: PerCpuArray<DenialTable, 1> = PerCpuArray::new();
/// Beside `DENIAL_TABLE`, slot for slot: what a slot's packets not yet reported would be
/// reported with, should another shape take the slot.
#[btf_map]
pub static DENIAL_DETAILS: PerCpuArray<DenialDetailsTable, 1> = PerCpuArray::new();
#[btf_map]
pub static PACKET_COUNTS: PerCpuArray<Counter, { PACKET_COUNTER_SLOTS as usize }> =
    PerCpuArray::new();
/// In front of `FLOW_COUNTS`: an array slot per edge (by hash) instead of a hash update per
/// packet, the established flow's biggest cost (see `report::count`).
#[btf_map]
pub static EDGE_CACHE: PerCpuArray<EdgeCacheSlot, { EDGE_CACHE_SLOTS as usize }> =
    PerCpuArray::new();
#[btf_map]
pub static FLOW_COUNTS: LruPerCpuHashMap<FlowCounterKey, Counter, 65536> = LruPerCpuHashMap::new();

/// In front of conntrack for established IPv4 flows (see `flow_cache`): one value, each CPU's
/// table. Pinned: its slots hold packet counts not yet moved to `PACKET_COUNTS` and the edge
/// counters, which the controller reads. Named anew when its slots became one value (it was
/// `FLOW_CACHE`, a value per slot): its shape changed.
#[btf_map]
pub static FLOW_CACHES: PerCpuArray<FlowCacheTable, 1> = PerCpuArray::new();
/// The same for established IPv6 flows.
#[btf_map]
pub static FLOW_CACHES6: PerCpuArray<FlowCacheTable6, 1> = PerCpuArray::new();

/// The interfaces of BPF host routing (see `delivery`), by interface index: non-zero for a
/// veth endpoint the controller attached TC ingress to under `run --host-routing bpf`. Host
/// state the controller writes at every start, not pinned: a new load starts it empty, so no
/// mark outlives the interface it was for by more than a controller's absence. An interface
/// numbered past its end takes the kernel's path.
#[btf_map]
pub static PEER_DELIVERY: Array<u32, { enforcer_common::delivery::INTERFACES as usize }> =
    Array::new();

/// Working memory for the packet being judged (see `subject::Subject`).
#[btf_map]
pub static SCRATCH: PerCpuArray<Subject, 1> = PerCpuArray::new();
