//! Addresses in map keys: one 16-byte form for both families.

/// Bytes before the address in [`IpcacheKey`]: the slot byte and its padding. LPM prefixes
/// always cover them, so a lookup never crosses from one policy slot into the other.
pub const IPCACHE_KEY_HEADER_BITS: u32 = 32;
/// An IPv4 address is stored as the IPv4-mapped IPv6 address `::ffff:a.b.c.d`.
pub const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
/// Prefix length, within the 128-bit address, of the IPv4-mapped block.
pub const V4_MAPPED_PREFIX_BITS: u32 = 96;

/// Data part of the LPM key of the address → identity map (the "ipcache").
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcacheKey {
    pub slot: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

/// Maps IPv4 bytes to the 16-byte form used in every key.
#[inline(always)]
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// Address family codes in events.
pub mod family {
    pub const INET: u8 = 4;
    pub const INET6: u8 = 6;
}

/// Key of the IPv4 whole-address table (`IPCACHE_EXACT4`): the address as a number
/// (`u32::from_be_bytes`) and the slot. 8 bytes where [`IpcacheKey`] takes 20: the kernel hashes
/// and compares a hash map's key word by word, and most lookups are for IPv4 addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipcache4Key {
    pub addr: u32,
    pub slot: u8,
    pub _pad: [u8; 3],
}

impl Ipcache4Key {
    /// The key of the 16-byte form `addr` in `slot`, if it is an IPv4-mapped address.
    #[inline(always)]
    pub fn of_mapped(slot: u8, addr: &[u8; 16]) -> Option<Self> {
        Some(Self {
            addr: v4_of_mapped(addr)?,
            slot,
            _pad: [0; 3],
        })
    }
}

/// The IPv4 address (as `u32::from_be_bytes`) that a 16-byte form holds, if it is IPv4-mapped.
#[inline(always)]
pub fn v4_of_mapped(addr: &[u8; 16]) -> Option<u32> {
    Address16(*addr).v4_of_mapped()
}

/// A 16-byte address (an IPv4 one in its mapped form), aligned for word loads: the BPF target
/// reads an address it cannot prove aligned a byte at a time, sixteen loads and their shifts
/// where two or four loads do. The datapath holds a packet's addresses in it.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Address16(pub [u8; 16]);

impl Address16 {
    /// The address as two native-order words: its key in the IPv6 identity table (see
    /// `identity_table`), where the datapath and the controller, on one host, compute it alike.
    #[inline(always)]
    pub fn words(&self) -> [u64; 2] {
        // SAFETY: 16 bytes aligned for `u64` (the type's alignment), and any bits are a valid
        // `u64`.
        unsafe { *(self as *const Self).cast::<[u64; 2]>() }
    }

    /// The IPv4 address (as `u32::from_be_bytes`) this is the mapped form of, if it is one.
    /// Word compares: a slice compare would be a call to `bcmp` in the eBPF object.
    #[inline(always)]
    pub fn v4_of_mapped(&self) -> Option<u32> {
        // SAFETY: as in `words`, for `u32`.
        let words = unsafe { *(self as *const Self).cast::<[u32; 4]>() };
        if words[0] != 0 || words[1] != 0 || words[2] != u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
            return None;
        }
        Some(u32::from_be(words[3]))
    }
}

impl core::ops::Deref for Address16 {
    type Target = [u8; 16];

    #[inline(always)]
    fn deref(&self) -> &[u8; 16] {
        &self.0
    }
}

kernel_abi!(IpcacheKey = 20, Ipcache4Key = 8, Address16 = 16);

#[cfg(feature = "user")]
mod user {
    use std::net::{IpAddr, Ipv6Addr};

    use super::*;

    /// The 16-byte key form of an address.
    pub fn to_key_bytes(ip: IpAddr) -> [u8; 16] {
        match ip {
            IpAddr::V4(v4) => v4_mapped(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        }
    }

    /// The address a 16-byte key form stands for (IPv4-mapped forms come back as IPv4).
    pub fn from_key_bytes(bytes: [u8; 16]) -> IpAddr {
        let v6 = Ipv6Addr::from(bytes);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }

    /// LPM prefix length of `prefix_len` bits of `ip`, counted over the whole key.
    pub fn lpm_prefix_len(ip: IpAddr, prefix_len: u8) -> u32 {
        let within = match ip {
            IpAddr::V4(_) => V4_MAPPED_PREFIX_BITS + u32::from(prefix_len),
            IpAddr::V6(_) => u32::from(prefix_len),
        };
        IPCACHE_KEY_HEADER_BITS + within
    }
}

#[cfg(feature = "user")]
pub use user::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_keyed_by_its_two_halves_in_host_order() {
        let bytes: [u8; 16] = core::array::from_fn(|n| n as u8 * 17);
        let (high, low) = bytes.split_at(8);
        assert_eq!(
            Address16(bytes).words(),
            [
                u64::from_ne_bytes(high.try_into().unwrap()),
                u64::from_ne_bytes(low.try_into().unwrap())
            ]
        );
    }

    #[test]
    fn an_ipv4_mapped_address_has_a_short_key_and_an_ipv6_one_none() {
        assert_eq!(
            Ipcache4Key::of_mapped(1, &v4_mapped([10, 0, 1, 2])),
            Some(Ipcache4Key {
                addr: 0x0a00_0102,
                slot: 1,
                _pad: [0; 3],
            })
        );
        let mut almost = v4_mapped([10, 0, 1, 2]);
        for byte in 0..12 {
            almost[byte] ^= 0x01;
            assert_eq!(v4_of_mapped(&almost), None, "byte {byte} changed");
            almost[byte] ^= 0x01;
        }
        assert_eq!(v4_of_mapped(&[0; 16]), None, "::, not 0.0.0.0");
        assert_eq!(v4_of_mapped(&v4_mapped([0; 4])), Some(0));
    }
}
