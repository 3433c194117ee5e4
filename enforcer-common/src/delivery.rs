//! BPF host routing's interfaces (the datapath's `PEER_DELIVERY` map): which veth endpoints a
//! packet may be delivered into directly, by interface index.

/// Interface indexes the map covers, `0..INTERFACES`: 512 KiB of kernel memory (the kernel
/// gives every array entry 8 bytes). An interface numbered past it (a host that has created
/// this many interfaces since boot) takes the kernel's forwarding path, as without the option.
pub const INTERFACES: u32 = 1 << 16;

/// A marked interface's value.
pub const TAKES_PART: u32 = 1;

/// An IPv4 header's checksum (as a number, host order) once its TTL is one lower, updated
/// rather than computed again (RFC 1624), as the kernel's `ip_decrease_ttl` does: the TTL is
/// the high byte of its 16-bit word, so the one's complement sum goes up by 0x0100.
pub const fn checksum_after_ttl_decrement(checksum: u16) -> u16 {
    let sum = checksum as u32 + 0x0100;
    (sum + (sum >= 0xFFFF) as u32) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum of `header` computed from scratch (RFC 1071), its own field taken as 0.
    fn computed(header: &[u8; 20]) -> u16 {
        let mut sum: u32 = header
            .chunks(2)
            .enumerate()
            .filter(|(word, _)| *word != 5)
            .map(|(_, pair)| u32::from(u16::from_be_bytes([pair[0], pair[1]])))
            .sum();
        while sum > 0xFFFF {
            sum = (sum & 0xFFFF) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn the_updated_checksum_is_the_one_computed_for_the_lower_ttl() {
        // Headers that differ in every field, TTLs from 2 to 255, and a state that walks
        // through the addresses (a small xorshift; no dependency for a test).
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        for ttl in 2..=255u8 {
            for _ in 0..64 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let bytes = state.to_be_bytes();
                let mut header = [
                    0x45, bytes[0], 0, 64, bytes[1], bytes[2], 0x40, 0, ttl, 17, 0, 0, 10,
                    bytes[3], bytes[4], 2, 10, bytes[5], bytes[6], bytes[7],
                ];
                let before = computed(&header);
                header[10..12].copy_from_slice(&before.to_be_bytes());
                header[8] = ttl - 1;
                assert_eq!(
                    checksum_after_ttl_decrement(before),
                    computed(&header),
                    "header {header:02x?}"
                );
            }
        }
    }
}
