//! Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! All values are "raw": 16-bit words loaded from the packet in native byte order. The one's
//! complement sum commutes with byte swapping, so updating with raw words gives the same bytes
//! as doing it in network order, and the data path never has to swap.

/// Folds a 32-bit one's complement accumulator into 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 eqn. 3: the checksum after one 16-bit word changed from `old` to `new`:
/// `HC' = ~(~HC + ~m + m')`.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    !fold(sum)
}

/// As [`replace2`] for a 32-bit field (an IPv4 address): both halves change.
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let sum = (!check) as u32
        + (!(old as u16)) as u32
        + (!((old >> 16) as u16)) as u32
        + (new as u16) as u32
        + (new >> 16);
    !fold(sum)
}

/// The one's complement sum of `data` as raw 16-bit words (odd length padded with zero),
/// added to `initial`. Used by tests and by userspace, not on the packet path.
pub fn sum_raw(data: &[u8], initial: u32) -> u32 {
    let mut sum = initial as u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_ne_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += u16::from_ne_bytes([*last, 0]) as u64;
    }
    while sum >> 32 != 0 {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    sum as u32
}

/// The Internet checksum of `data` (raw, ready to store with `to_ne_bytes`).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum_raw(data, 0))
}

/// The TCP/UDP checksum over the IPv4 pseudo header and `segment` (whose checksum field must be
/// zero), raw.
pub fn l4_checksum_v4(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> u16 {
    let len = segment.len() as u16;
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src);
    pseudo[4..8].copy_from_slice(&dst);
    pseudo[9] = proto;
    pseudo[10..12].copy_from_slice(&len.to_be_bytes());
    !fold(sum_raw(segment, sum_raw(&pseudo, 0)))
}

/// The TCP/UDP/ICMPv6 checksum over the IPv6 pseudo header and `segment` (whose checksum
/// field must be zero), raw.
pub fn l4_checksum_v6(src: [u8; 16], dst: [u8; 16], next_header: u8, segment: &[u8]) -> u16 {
    let mut pseudo = [0u8; 40];
    pseudo[0..16].copy_from_slice(&src);
    pseudo[16..32].copy_from_slice(&dst);
    pseudo[32..36].copy_from_slice(&(segment.len() as u32).to_be_bytes());
    pseudo[39] = next_header;
    !fold(sum_raw(segment, sum_raw(&pseudo, 0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator so the test needs no crates.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 32) as u32
        }
    }

    fn header_with_checksum(rng: &mut Lcg) -> [u8; 20] {
        let mut h = [0u8; 20];
        for b in h.iter_mut() {
            *b = rng.next() as u8;
        }
        h[10] = 0;
        h[11] = 0;
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_ne_bytes());
        h
    }

    #[test]
    fn known_vector_from_rfc1071_example() {
        // The classic IPv4 header example: checksum 0xb861.
        let h: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h).to_ne_bytes(), [0xb8, 0x61]);
    }

    #[test]
    fn replace4_matches_full_recomputation() {
        let mut rng = Lcg(7);
        for _ in 0..100_000 {
            let mut h = header_with_checksum(&mut rng);
            let at = 12 + 4 * (rng.next() as usize % 2);
            let old = u32::from_ne_bytes(h[at..at + 4].try_into().unwrap());
            let new = rng.next();
            let check = u16::from_ne_bytes([h[10], h[11]]);
            h[at..at + 4].copy_from_slice(&new.to_ne_bytes());
            let updated = replace4(check, old, new);
            h[10..12].copy_from_slice(&updated.to_ne_bytes());
            // A correct header sums to 0xffff (verifies as 0).
            assert_eq!(checksum(&h), 0, "header {h:02x?}");
        }
    }

    #[test]
    fn replace2_matches_full_recomputation() {
        let mut rng = Lcg(11);
        for _ in 0..100_000 {
            let mut h = header_with_checksum(&mut rng);
            let at = 2 * (rng.next() as usize % 10);
            if at == 10 {
                continue;
            }
            let old = u16::from_ne_bytes([h[at], h[at + 1]]);
            let new = rng.next() as u16;
            let check = u16::from_ne_bytes([h[10], h[11]]);
            h[at..at + 2].copy_from_slice(&new.to_ne_bytes());
            h[10..12].copy_from_slice(&replace2(check, old, new).to_ne_bytes());
            assert_eq!(checksum(&h), 0, "header {h:02x?}");
        }
    }

    #[test]
    fn l4_checksum_verifies_to_zero_with_pseudo_header() {
        let src = [10, 0, 0, 2];
        let dst = [10, 100, 0, 1];
        let mut seg = [0u8; 21]; // odd length on purpose
        seg[0] = 0x9c;
        seg[1] = 0x40;
        seg[20] = 0xab;
        let c = l4_checksum_v4(src, dst, 6, &seg);
        seg[16..18].copy_from_slice(&c.to_ne_bytes());
        assert_eq!(l4_checksum_v4(src, dst, 6, &seg), 0);
    }
}
