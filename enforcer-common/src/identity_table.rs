//! Identity tables: direct-mapped, set-associative tables of identities by key, in array maps
//! in front of the hash maps that hold the same entries (`IPCACHE_TABLE4` by IPv4 address in
//! front of `IPCACHE_EXACT4`, `IPCACHE_TABLE6` by IPv6 address in front of `IPCACHE_EXACT`,
//! `ENDPOINT_TABLE` by interface index in front of `ENDPOINTS`).
//! The verifier turns an array lookup into a few instructions, where a hash lookup is a helper
//! call that hashes the key and walks a bucket (about 29 ns on the build host); a new flow
//! entering through an interface resolves two addresses and its interface.
//!
//! A bucket holds the first few keys (its ways, in ascending order) of those that map to it, and
//! says whether it holds them all. A key not in a complete bucket is in neither the table nor
//! the hash map, and the caller goes on as a hash miss would; a key not in an incomplete one
//! may be in the hash map. A bucket never written is incomplete: a table the controller has not
//! filled (a new one beside an earlier build's pinned maps, say) sends every lookup to the hash
//! map, and is never wrong, only slower. Both generations live side by side, one half of the
//! array each, like the pair filter's.

use crate::identity::IdentityInfo;

/// A key of an identity table: compared word by word (an array comparison would be a `memcmp`
/// call, which BPF does not have) and mixed into the 32 bits whose top ones pick its bucket.
pub trait TableKey: Copy {
    /// The key no bucket way holds before it is written.
    const ZERO: Self;
    fn same(&self, other: &Self) -> bool;
    /// A multiplicative (Fibonacci) hash, whose top bits spread keys that differ in any bits
    /// (consecutive addresses, interface indexes, addresses of one IPv6 prefix) over all
    /// buckets.
    fn mix(&self) -> u32;
}

impl TableKey for u32 {
    const ZERO: Self = 0;
    #[inline(always)]
    fn same(&self, other: &Self) -> bool {
        self == other
    }
    #[inline(always)]
    fn mix(&self) -> u32 {
        self.wrapping_mul(0x9e37_79b1)
    }
}

/// A whole IPv6 address as two native-order words of its 16 bytes (see
/// [`crate::addr::Address16::words`]).
impl TableKey for [u64; 2] {
    const ZERO: Self = [0; 2];
    #[inline(always)]
    fn same(&self, other: &Self) -> bool {
        self[0] == other[0] && self[1] == other[1]
    }
    #[inline(always)]
    fn mix(&self) -> u32 {
        ((self[0] ^ self[1]).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32
    }
}

/// One bucket (see the module documentation): the first `WAYS` keys that map to it, their
/// identities, and whether it holds every key that does. The tables' buckets fill one 64-byte
/// cache line each (asserted below for the two kinds there are).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentityBucket<K, const WAYS: usize> {
    pub keys: [K; WAYS],
    pub identities: [IdentityInfo; WAYS],
    /// Entries in use, from the first.
    pub used: u32,
    /// Nonzero when the bucket holds every key that maps to it (see the module documentation).
    pub complete: u32,
    pub _pad: [u32; 2],
}

/// A bucket of 32-bit keys (IPv4 addresses, interface indexes): four fill a cache line.
pub type Bucket32 = IdentityBucket<u32, 4>;
/// A bucket of IPv6 addresses: two fill a cache line.
pub type Bucket128 = IdentityBucket<[u64; 2], 2>;
kernel_abi!(Bucket32 = 64, Bucket128 = 64);

/// What a bucket says about a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    Found(IdentityInfo),
    /// In neither the table nor the hash map behind it.
    Absent,
    /// Not in the table; the hash map behind it may hold it.
    AskTheMap,
}

impl<K: TableKey, const WAYS: usize> IdentityBucket<K, WAYS> {
    /// A bucket no key maps to.
    pub const EMPTY: Self = Self {
        complete: 1,
        ..Self::NEVER_WRITTEN
    };

    /// A bucket as an array map starts it: all zero, so incomplete.
    pub const NEVER_WRITTEN: Self = Self {
        keys: [K::ZERO; WAYS],
        identities: [IdentityInfo {
            identity: 0,
            flags: 0,
        }; WAYS],
        used: 0,
        complete: 0,
        _pad: [0; 2],
    };

    /// What the bucket says about `key`. The loop has a constant count, which the compiler
    /// unrolls: the eBPF object holds `WAYS` compares, and no loop for the verifier to follow.
    #[inline(always)]
    pub fn probe(&self, key: &K) -> Probe {
        let used = self.used as usize;
        let mut way = 0;
        while way < WAYS {
            if way < used && self.keys[way].same(key) {
                return Probe::Found(self.identities[way]);
            }
            way += 1;
        }
        if self.complete != 0 {
            Probe::Absent
        } else {
            Probe::AskTheMap
        }
    }
}

impl<K: TableKey, const WAYS: usize> Default for IdentityBucket<K, WAYS> {
    fn default() -> Self {
        Self::NEVER_WRITTEN
    }
}

/// The shape of one table: `2^bits` buckets per slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub bits: u32,
}

impl Shape {
    /// Buckets of one slot.
    #[inline(always)]
    pub const fn buckets_per_slot(self) -> u32 {
        1 << self.bits
    }

    /// Buckets of the whole array: both slots.
    #[inline(always)]
    pub const fn entries(self) -> u32 {
        2 << self.bits
    }

    /// The bucket of `key` within a slot: the top bits of its mix.
    #[inline(always)]
    pub fn bucket<K: TableKey>(self, key: &K) -> u32 {
        key.mix() >> (32 - self.bits)
    }

    /// The array index of `slot`'s first bucket.
    #[inline(always)]
    pub const fn first_index(self, slot: u8) -> u32 {
        (slot as u32 & 1) << self.bits
    }

    /// The array index of `key`'s bucket in `slot`.
    #[inline(always)]
    pub fn index<K: TableKey>(self, slot: u8, key: &K) -> u32 {
        self.first_index(slot) | self.bucket(key)
    }
}

/// IPv4 whole addresses (`u32::from_be_bytes`): 8192 buckets a slot, room for 32 768
/// addresses (1 MiB for both slots).
pub const ADDRESSES4: Shape = Shape { bits: 13 };
/// IPv6 whole addresses ([`crate::addr::Address16::words`]): 8192 buckets a slot, room for 16 384
/// addresses (1 MiB for both slots).
pub const ADDRESSES6: Shape = Shape { bits: 13 };
/// Endpoint interfaces by index: 1024 buckets a slot (128 KiB for both slots).
pub const ENDPOINTS: Shape = Shape { bits: 10 };

#[cfg(feature = "user")]
mod layout {
    use std::{collections::BTreeMap, vec::Vec};

    use super::{IdentityBucket, Shape, TableKey};
    use crate::identity::IdentityInfo;

    impl Shape {
        /// The non-empty buckets of one slot holding `entries`, by bucket within the slot; every
        /// other bucket of the slot is [`IdentityBucket::EMPTY`]. A function of the entries
        /// alone, so that two generations' layouts differ only in the buckets their entries do.
        pub fn layout<K: TableKey + Ord, const WAYS: usize>(
            self,
            entries: impl IntoIterator<Item = (K, IdentityInfo)>,
        ) -> BTreeMap<u32, IdentityBucket<K, WAYS>> {
            let mut by_bucket: BTreeMap<u32, Vec<(K, IdentityInfo)>> = BTreeMap::new();
            for (key, identity) in entries {
                by_bucket
                    .entry(self.bucket(&key))
                    .or_default()
                    .push((key, identity));
            }
            by_bucket
                .into_iter()
                .map(|(bucket, mut keyed)| {
                    keyed.sort_unstable_by_key(|(key, _)| *key);
                    (bucket, IdentityBucket::holding(&keyed))
                })
                .collect()
        }
    }

    impl<K: TableKey, const WAYS: usize> IdentityBucket<K, WAYS> {
        /// The bucket for `keyed`, sorted by key: its first `WAYS`.
        fn holding(keyed: &[(K, IdentityInfo)]) -> Self {
            let mut bucket = Self::NEVER_WRITTEN;
            for (way, (key, identity)) in keyed.iter().take(WAYS).enumerate() {
                bucket.keys[way] = *key;
                bucket.identities[way] = *identity;
            }
            bucket.used = keyed.len().min(WAYS) as u32;
            bucket.complete = u32::from(keyed.len() <= WAYS);
            bucket
        }
    }
}

#[cfg(all(test, feature = "user"))]
mod tests {
    use std::vec::Vec;

    use super::*;

    fn identity(identity: u32) -> IdentityInfo {
        IdentityInfo { identity, flags: 0 }
    }

    /// IPv6 addresses of one /64, as endpoints of one subnet have them, in table-key form.
    fn ipv6(host: u64) -> [u64; 2] {
        let mut bytes = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        bytes[8..].copy_from_slice(&host.to_be_bytes());
        crate::addr::Address16(bytes).words()
    }

    /// What the table whose slot is laid out as `layout` says about `key`.
    fn probe_in<K: TableKey + Ord, const WAYS: usize>(
        shape: Shape,
        layout: &std::collections::BTreeMap<u32, IdentityBucket<K, WAYS>>,
        key: &K,
    ) -> Probe {
        layout
            .get(&shape.bucket(key))
            .copied()
            .unwrap_or(IdentityBucket::EMPTY)
            .probe(key)
    }

    /// `count` keys of `keys` that all map to one bucket of `shape`.
    fn colliding<K: TableKey>(shape: Shape, keys: impl Iterator<Item = K>, count: usize) -> Vec<K> {
        let mut keys = keys.peekable();
        let target = shape.bucket(keys.peek().expect("keys"));
        keys.filter(|key| shape.bucket(key) == target)
            .take(count)
            .collect()
    }

    fn every_key_laid_out_is_found_or_sent_to_the_map_and_no_other_is_found<
        K: TableKey + Ord + std::fmt::Debug,
        const WAYS: usize,
    >(
        keys: &[K],
        strangers: &[K],
    ) {
        let shape = Shape { bits: 4 };
        let named = |n: usize| identity(n as u32 + 1);
        let layout: std::collections::BTreeMap<u32, IdentityBucket<K, WAYS>> =
            shape.layout(keys.iter().enumerate().map(|(n, key)| (*key, named(n))));
        for (n, key) in keys.iter().enumerate() {
            let answer = probe_in(shape, &layout, key);
            assert!(
                answer == Probe::Found(named(n)) || answer == Probe::AskTheMap,
                "{key:?}: {answer:?}"
            );
        }
        for stranger in strangers {
            assert!(
                !matches!(probe_in(shape, &layout, stranger), Probe::Found(_)),
                "{stranger:?} was never laid out"
            );
        }
    }

    #[test]
    fn every_key_laid_out_is_found_or_sent_to_the_map_and_no_other_is_found_32() {
        let keys: Vec<u32> = (0..40).map(|n| 0x0a64_0000 + n).collect();
        let strangers: Vec<u32> = (0..40).map(|n| 0x0b00_0000 + n).collect();
        every_key_laid_out_is_found_or_sent_to_the_map_and_no_other_is_found::<u32, 4>(
            &keys, &strangers,
        );
    }

    #[test]
    fn every_key_laid_out_is_found_or_sent_to_the_map_and_no_other_is_found_128() {
        let keys: Vec<[u64; 2]> = (1..41).map(ipv6).collect();
        // Strangers share a key's words but one: a comparison of one word would find them.
        let strangers: Vec<[u64; 2]> = keys
            .iter()
            .flat_map(|[high, low]| [[*high, low ^ (1 << 63)], [high ^ 1, *low]])
            .collect();
        every_key_laid_out_is_found_or_sent_to_the_map_and_no_other_is_found::<[u64; 2], 2>(
            &keys, &strangers,
        );
    }

    fn a_full_bucket_sends_the_keys_it_cannot_hold_to_the_map<
        K: TableKey + Ord + std::fmt::Debug,
        const WAYS: usize,
    >(
        keys: impl Iterator<Item = K>,
    ) {
        let shape = Shape { bits: 8 };
        let keys = colliding(shape, keys, WAYS + 1);
        let layout: std::collections::BTreeMap<u32, IdentityBucket<K, WAYS>> =
            shape.layout(keys.iter().map(|key| (*key, identity(1))));
        assert_eq!(layout.len(), 1);
        let bucket = layout[&shape.bucket(&keys[0])];
        for key in &keys[..WAYS] {
            assert_eq!(bucket.probe(key), Probe::Found(identity(1)), "{key:?}");
        }
        assert_eq!(bucket.probe(&keys[WAYS]), Probe::AskTheMap);
        let fewer: std::collections::BTreeMap<u32, IdentityBucket<K, WAYS>> =
            shape.layout(keys[..WAYS].iter().map(|key| (*key, identity(1))));
        assert_eq!(
            fewer[&shape.bucket(&keys[0])].probe(&keys[WAYS]),
            Probe::Absent
        );
    }

    #[test]
    fn a_full_bucket_sends_the_keys_it_cannot_hold_to_the_map_32() {
        a_full_bucket_sends_the_keys_it_cannot_hold_to_the_map::<u32, 4>(1..);
    }

    #[test]
    fn a_full_bucket_sends_the_keys_it_cannot_hold_to_the_map_128() {
        a_full_bucket_sends_the_keys_it_cannot_hold_to_the_map::<[u64; 2], 2>((1..).map(ipv6));
    }

    #[test]
    fn a_bucket_never_written_sends_every_key_to_the_map() {
        assert_eq!(Bucket32::default().probe(&7), Probe::AskTheMap);
        assert_eq!(Bucket128::default().probe(&ipv6(7)), Probe::AskTheMap);
    }

    #[test]
    fn an_unused_way_never_matches_even_the_key_zero() {
        assert_eq!(Bucket32::EMPTY.probe(&0), Probe::Absent);
        assert_eq!(Bucket128::EMPTY.probe(&[0; 2]), Probe::Absent);
        let one: std::collections::BTreeMap<u32, Bucket32> = ENDPOINTS.layout([(7, identity(300))]);
        assert_eq!(one[&ENDPOINTS.bucket(&7)].probe(&0), Probe::Absent);
        let one: std::collections::BTreeMap<u32, Bucket128> =
            ADDRESSES6.layout([(ipv6(7), identity(300))]);
        assert_eq!(
            one[&ADDRESSES6.bucket(&ipv6(7))].probe(&[0; 2]),
            Probe::Absent
        );
    }

    #[test]
    fn the_layout_is_the_same_whatever_order_the_entries_come_in() {
        let shape = Shape { bits: 2 };
        let entries: Vec<(u32, IdentityInfo)> = (0..20).map(|n| (n * 7919, identity(n))).collect();
        let forward: std::collections::BTreeMap<u32, Bucket32> =
            shape.layout(entries.iter().copied());
        assert_eq!(forward, shape.layout(entries.iter().rev().copied()));
    }

    #[test]
    fn the_addresses_of_one_ipv6_subnet_spread_over_the_buckets() {
        let buckets: std::collections::BTreeSet<u32> = (1..=4096)
            .map(|host| ADDRESSES6.bucket(&ipv6(host)))
            .collect();
        // 4096 keys thrown at 8192 buckets land in about 3225 distinct ones if spread at random.
        assert!(buckets.len() > 3000, "{} buckets", buckets.len());
    }

    #[test]
    fn the_slots_take_the_two_halves_of_the_array() {
        for shape in [ADDRESSES4, ADDRESSES6, ENDPOINTS] {
            for key in [0, 1, 0x0a64_0001, u32::MAX] {
                assert!(shape.index(0, &key) < shape.buckets_per_slot());
                assert!(shape.index(1, &key) >= shape.buckets_per_slot());
                assert!(shape.index(1, &key) < shape.entries());
            }
        }
    }
}
