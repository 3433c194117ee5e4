//! Identity tables: direct-mapped, four-way tables of identities by a 32-bit key, in array maps
//! in front of the hash maps that hold the same entries (`IPCACHE_TABLE4` by IPv4 address in
//! front of `IPCACHE_EXACT4`, `ENDPOINT_TABLE` by interface index in front of `ENDPOINTS`).
//! The verifier turns an array lookup into a few instructions, where a hash lookup is a helper
//! call that hashes the key and walks a bucket (about 29 ns on the build host); a new flow
//! entering through an interface resolves two addresses and its interface.
//!
//! A bucket holds the first [`WAYS`] keys (in ascending order) of those that map to it, and
//! says whether it holds them all. A key not in a complete bucket is in neither the table nor
//! the hash map, and the caller goes on as a hash miss would; a key not in an incomplete one
//! may be in the hash map. A bucket never written is incomplete: a table the controller has not
//! filled (a new one beside an earlier build's pinned maps, say) sends every lookup to the hash
//! map, and is never wrong, only slower. Both generations live side by side, one half of the
//! array each, like the pair filter's.

use crate::identity::IdentityInfo;

/// Entries a bucket holds: four keys and their identities fill one 64-byte cache line.
pub const WAYS: usize = 4;

/// One bucket (see the module documentation).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityBucket {
    pub keys: [u32; WAYS],
    pub identities: [IdentityInfo; WAYS],
    /// Entries in use, from the first.
    pub used: u32,
    /// Nonzero when the bucket holds every key that maps to it (see the module documentation).
    pub complete: u32,
    pub _pad: [u32; 2],
}
kernel_abi!(IdentityBucket = 64);

/// What a bucket says about a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    Found(IdentityInfo),
    /// In neither the table nor the hash map behind it.
    Absent,
    /// Not in the table; the hash map behind it may hold it.
    AskTheMap,
}

impl IdentityBucket {
    /// A bucket no key maps to.
    pub const EMPTY: Self = Self {
        keys: [0; WAYS],
        identities: [IdentityInfo {
            identity: 0,
            flags: 0,
        }; WAYS],
        used: 0,
        complete: 1,
        _pad: [0; 2],
    };

    /// What the bucket says about `key`. Unrolled: a loop would need the verifier to follow it
    /// (and bounds checks on its index), four compares need neither.
    #[inline(always)]
    pub fn probe(&self, key: u32) -> Probe {
        let used = self.used;
        if used > 0 && self.keys[0] == key {
            return Probe::Found(self.identities[0]);
        }
        if used > 1 && self.keys[1] == key {
            return Probe::Found(self.identities[1]);
        }
        if used > 2 && self.keys[2] == key {
            return Probe::Found(self.identities[2]);
        }
        if used > 3 && self.keys[3] == key {
            return Probe::Found(self.identities[3]);
        }
        if self.complete != 0 {
            Probe::Absent
        } else {
            Probe::AskTheMap
        }
    }
}
const _: () = assert!(WAYS == 4, "IdentityBucket::probe compares four ways");

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

    /// The bucket of `key` within a slot: a multiplicative (Fibonacci) hash, whose top bits
    /// spread keys that differ in their low bits (consecutive addresses, interface indexes)
    /// over all buckets.
    #[inline(always)]
    pub const fn bucket(self, key: u32) -> u32 {
        key.wrapping_mul(0x9e37_79b1) >> (32 - self.bits)
    }

    /// The array index of `slot`'s first bucket.
    #[inline(always)]
    pub const fn first_index(self, slot: u8) -> u32 {
        (slot as u32 & 1) << self.bits
    }

    /// The array index of `key`'s bucket in `slot`.
    #[inline(always)]
    pub const fn index(self, slot: u8, key: u32) -> u32 {
        self.first_index(slot) | self.bucket(key)
    }
}

/// IPv4 whole addresses (`u32::from_be_bytes`): 8192 buckets a slot, room for 32 768
/// addresses (1 MiB for both slots).
pub const ADDRESSES4: Shape = Shape { bits: 13 };
/// Endpoint interfaces by index: 1024 buckets a slot (128 KiB for both slots).
pub const ENDPOINTS: Shape = Shape { bits: 10 };

#[cfg(feature = "user")]
mod layout {
    use std::{collections::BTreeMap, vec::Vec};

    use super::{IdentityBucket, Shape, WAYS};
    use crate::identity::IdentityInfo;

    impl Shape {
        /// The non-empty buckets of one slot holding `entries`, by bucket within the slot; every
        /// other bucket of the slot is [`IdentityBucket::EMPTY`]. A function of the entries
        /// alone, so that two generations' layouts differ only in the buckets their entries do.
        pub fn layout(
            self,
            entries: impl IntoIterator<Item = (u32, IdentityInfo)>,
        ) -> BTreeMap<u32, IdentityBucket> {
            let mut by_bucket: BTreeMap<u32, Vec<(u32, IdentityInfo)>> = BTreeMap::new();
            for (key, identity) in entries {
                by_bucket
                    .entry(self.bucket(key))
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

    impl IdentityBucket {
        /// The bucket for `keyed`, sorted by key: its first [`WAYS`].
        fn holding(keyed: &[(u32, IdentityInfo)]) -> Self {
            let mut bucket = Self::default();
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
    use super::*;

    fn identity(identity: u32) -> IdentityInfo {
        IdentityInfo { identity, flags: 0 }
    }

    /// `count` keys that all map to one bucket of `shape`.
    fn colliding(shape: Shape, count: usize) -> std::vec::Vec<u32> {
        let target = shape.bucket(1);
        (1..)
            .filter(|key| shape.bucket(*key) == target)
            .take(count)
            .collect()
    }

    #[test]
    fn every_key_laid_out_is_found_or_sent_to_the_map_and_no_other_is_found() {
        let shape = Shape { bits: 4 };
        let keys: std::vec::Vec<u32> = (0..40).map(|n| 0x0a64_0000 + n).collect();
        let layout = shape.layout(keys.iter().map(|key| (*key, identity(*key))));
        let probe = |key: u32| {
            layout
                .get(&shape.bucket(key))
                .copied()
                .unwrap_or(IdentityBucket::EMPTY)
                .probe(key)
        };
        for key in &keys {
            let answer = probe(*key);
            assert!(
                answer == Probe::Found(identity(*key)) || answer == Probe::AskTheMap,
                "{key:#x}: {answer:?}"
            );
        }
        for stranger in (0..40).map(|n| 0x0b00_0000 + n) {
            assert_ne!(
                std::mem::discriminant(&probe(stranger)),
                std::mem::discriminant(&Probe::Found(identity(0))),
                "{stranger:#x} was never laid out"
            );
        }
    }

    #[test]
    fn a_full_bucket_sends_the_keys_it_cannot_hold_to_the_map() {
        let shape = Shape { bits: 8 };
        let keys = colliding(shape, WAYS + 1);
        let layout = shape.layout(keys.iter().map(|key| (*key, identity(*key))));
        assert_eq!(layout.len(), 1);
        let bucket = layout[&shape.bucket(keys[0])];
        for key in &keys[..WAYS] {
            assert_eq!(bucket.probe(*key), Probe::Found(identity(*key)));
        }
        assert_eq!(bucket.probe(keys[WAYS]), Probe::AskTheMap);
        let fewer = shape.layout(keys[..WAYS].iter().map(|key| (*key, identity(*key))));
        assert_eq!(
            fewer[&shape.bucket(keys[0])].probe(keys[WAYS]),
            Probe::Absent
        );
    }

    #[test]
    fn a_bucket_never_written_sends_every_key_to_the_map() {
        assert_eq!(IdentityBucket::default().probe(7), Probe::AskTheMap);
    }

    #[test]
    fn an_unused_way_never_matches_even_the_key_zero() {
        assert_eq!(IdentityBucket::EMPTY.probe(0), Probe::Absent);
        let one = ENDPOINTS.layout([(7, identity(300))]);
        assert_eq!(one[&ENDPOINTS.bucket(7)].probe(0), Probe::Absent);
    }

    #[test]
    fn the_layout_is_the_same_whatever_order_the_entries_come_in() {
        let shape = Shape { bits: 2 };
        let entries: std::vec::Vec<(u32, IdentityInfo)> =
            (0..20).map(|n| (n * 7919, identity(n))).collect();
        let reversed = entries.iter().rev().copied();
        assert_eq!(
            shape.layout(entries.iter().copied()),
            shape.layout(reversed)
        );
    }

    #[test]
    fn the_slots_take_the_two_halves_of_the_array() {
        for shape in [ADDRESSES4, ENDPOINTS] {
            for key in [0, 1, 0x0a64_0001, u32::MAX] {
                assert!(shape.index(0, key) < shape.buckets_per_slot());
                assert!(shape.index(1, key) >= shape.buckets_per_slot());
                assert!(shape.index(1, key) < shape.entries());
            }
        }
    }
}
