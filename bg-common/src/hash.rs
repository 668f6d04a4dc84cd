//! The flow hash that picks a backend for a new flow. Both sides use this one function: the
//! data path to choose, the tests to predict the choice.

use crate::FlowKey;

/// murmur3's 32-bit finalizer: full avalanche, cheap, no tables.
#[inline(always)]
pub fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Hash of a flow's 5-tuple (client side, as the packet arrives at the gateway).
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u32 {
    let mut h = 0x9e37_79b9u32;
    h = mix32(h ^ k.src[0]);
    h = mix32(h ^ k.src[1] ^ k.src[2] ^ k.src[3]);
    h = mix32(h ^ k.dst[0]);
    h = mix32(h ^ k.dst[1] ^ k.dst[2] ^ k.dst[3]);
    h = mix32(h ^ ((k.sport as u32) << 16 | k.dport as u32));
    mix32(h ^ k.proto as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytemuck::Zeroable;

    #[test]
    fn source_port_spreads_flows_over_backends() {
        let mut counts = [0u32; 4];
        let mut k = FlowKey::zeroed();
        k.src[0] = u32::from_ne_bytes([10, 0, 0, 2]);
        k.dst[0] = u32::from_ne_bytes([10, 100, 0, 1]);
        k.dport = 80u16.to_be();
        k.proto = 6;
        for p in 30000u16..34000 {
            k.sport = p.to_be();
            counts[(flow_hash(&k) % 4) as usize] += 1;
        }
        for c in counts {
            assert!((900..1100).contains(&c), "uneven spread {counts:?}");
        }
    }
}
