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
    use std::vec::Vec;

    /// A small deterministic generator so the test needs no crates.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 32) as u32
        }
    }

    /// RFC 1071 written out from scratch, independent of the code under test: big-endian
    /// 16-bit words (an odd last byte is the high half of a final word), summed in 64 bits,
    /// carries folded back until none is left, complemented. Returns the value in network
    /// order as a number (`0xb861` for the bytes `b8 61`).
    fn reference(data: &[u8]) -> u16 {
        let mut sum: u64 = 0;
        let mut i = 0;
        while i < data.len() {
            let hi = data[i] as u64;
            let lo = if i + 1 < data.len() { data[i + 1] as u64 } else { 0 };
            sum += (hi << 8) | lo;
            i += 2;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// The pseudo header of RFC 768/793 (IPv4) laid out byte by byte.
    fn reference_l4_v4(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> u16 {
        let mut v = Vec::new();
        v.extend_from_slice(&src);
        v.extend_from_slice(&dst);
        v.push(0);
        v.push(proto);
        v.extend_from_slice(&(segment.len() as u16).to_be_bytes());
        v.extend_from_slice(segment);
        reference(&v)
    }

    /// The pseudo header of RFC 8200 section 8.1 (IPv6).
    fn reference_l4_v6(src: [u8; 16], dst: [u8; 16], next: u8, segment: &[u8]) -> u16 {
        let mut v = Vec::new();
        v.extend_from_slice(&src);
        v.extend_from_slice(&dst);
        v.extend_from_slice(&(segment.len() as u32).to_be_bytes());
        v.extend_from_slice(&[0, 0, 0, next]);
        v.extend_from_slice(segment);
        reference(&v)
    }

    /// The code under test returns raw values (stored with `to_ne_bytes`); as a number in
    /// network order:
    fn net(raw: u16) -> u16 {
        u16::from_be_bytes(raw.to_ne_bytes())
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn rfc1071_and_rfc1624_examples() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2; the checksum is its
        // complement, 220d.
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&bytes).to_ne_bytes(), [0x22, 0x0d]);
        assert_eq!(reference(&bytes), 0x220d);
        // RFC 1624 section 4: HC = 0xdd2f, a field m = 0x5555 becomes m' = 0x3285; eqn. 3
        // gives HC' = 0x0000 (eqn. 2 of RFC 1141 would wrongly give 0xffff).
        assert_eq!(replace2(0xdd2f, 0x5555, 0x3285), 0x0000);
        // The same change in the other byte order (raw words on a little-endian host).
        assert_eq!(replace2(0x2fdd, 0x5555, 0x8532), 0x0000);
        // The classic IPv4 header, checksum b861.
        let h: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h).to_ne_bytes(), [0xb8, 0x61]);
    }

    /// Frames Linux sent over a veth with checksum offload off (so the kernel computed every
    /// checksum itself), captured with an AF_PACKET socket: the checksum fields as the kernel
    /// wrote them must be what the helpers compute with the field zeroed.
    #[test]
    fn linux_computed_vectors() {
        struct V {
            what: &'static str,
            ip: &'static str,
            v6: bool,
            check_at: usize,
            expect: u16,
        }
        let vectors = [
            V { what: "UDP/IPv4, 18-byte payload", v6: false, check_at: 6, expect: 0x66c3,
                ip: "4500002e1e114000401198aac0000201c00002029c400035001a66c3626720636865636b73756d20766563746f72" },
            V { what: "TCP SYN/IPv4 with options", v6: false, check_at: 16, expect: 0xb0c8,
                ip: "4500003c581d400040065e9bc0000201c00002029c4200505b78656500000000a002faf0b0c80000020405b40402080a2c518e7e000000000103030a" },
            V { what: "TCP RST/IPv4", v6: false, check_at: 16, expect: 0xce5b,
                ip: "45000028000040004006b6ccc0000202c000020100509c42000000005b78656650140000ce5b0000" },
            V { what: "UDP/IPv6, odd payload length", v6: true, check_at: 6, expect: 0x1fd4,
                ip: "600bb6d0000b114020010db800000000000000000000000120010db80000000000000000000000029c4114e9000b1fd46f6464" },
        ];
        for v in vectors {
            let ip = unhex(v.ip);
            let (mut seg, proto) = if v.v6 { (ip[40..].to_vec(), ip[6]) } else { (ip[20..].to_vec(), ip[9]) };
            assert_eq!(u16::from_be_bytes([seg[v.check_at], seg[v.check_at + 1]]), v.expect, "{}: vector", v.what);
            seg[v.check_at] = 0;
            seg[v.check_at + 1] = 0;
            let got = if v.v6 {
                l4_checksum_v6(ip[8..24].try_into().unwrap(), ip[24..40].try_into().unwrap(), proto, &seg)
            } else {
                assert_eq!(checksum(&ip[..20]), 0, "{}: IPv4 header verifies", v.what);
                l4_checksum_v4(ip[12..16].try_into().unwrap(), ip[16..20].try_into().unwrap(), proto, &seg)
            };
            assert_eq!(net(got), v.expect, "{}", v.what);
        }
    }

    #[test]
    fn helpers_agree_with_the_reference_on_random_data() {
        let mut rng = Lcg(3);
        for _ in 0..20_000 {
            let len = (rng.next() % 1600) as usize;
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            assert_eq!(net(checksum(&data)), reference(&data), "len {len}");
            let src4 = rng.next().to_be_bytes();
            let dst4 = rng.next().to_be_bytes();
            let proto = if rng.next() & 1 == 0 { 6 } else { 17 };
            assert_eq!(net(l4_checksum_v4(src4, dst4, proto, &data)), reference_l4_v4(src4, dst4, proto, &data), "v4 len {len}");
            let mut src6 = [0u8; 16];
            let mut dst6 = [0u8; 16];
            src6.iter_mut().chain(dst6.iter_mut()).for_each(|b| *b = rng.next() as u8);
            assert_eq!(net(l4_checksum_v6(src6, dst6, proto, &data)), reference_l4_v6(src6, dst6, proto, &data), "v6 len {len}");
        }
    }

    /// Random 20-byte headers with a reference checksum: after changing a word with the
    /// incremental helpers, the reference over the whole header must verify (sum to 0).
    fn header_with_checksum(rng: &mut Lcg) -> [u8; 20] {
        let mut h = [0u8; 20];
        for b in h.iter_mut() {
            *b = rng.next() as u8;
        }
        h[10] = 0;
        h[11] = 0;
        let c = reference(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    #[test]
    fn replace4_matches_the_reference() {
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
            assert_eq!(reference(&h), 0, "header {h:02x?}");
        }
    }

    #[test]
    fn replace2_matches_the_reference() {
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
            assert_eq!(reference(&h), 0, "header {h:02x?}");
        }
    }
}
