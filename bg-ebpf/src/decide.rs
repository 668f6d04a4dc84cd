//! Flow table and backend choice: which backend a packet goes to, or which VIP a reply comes
//! from. Rules (each counted as a `Reason`):
//! - a packet with a live flow entry follows it, whatever the active color is now;
//! - a new flow (TCP SYN without ACK, or any UDP datagram) to a VIP gets a backend of the
//!   active color by Maglev, and two entries (both directions) are recorded;
//! - TCP RST to a VIP without an entry is dropped and creates nothing; RST on a flow removes
//!   its entries after forwarding it; FIN marks the direction closing (expires when idle);
//! - other TCP to a VIP without an entry (lost/evicted/drained) goes by the same hash to the
//!   active color and is re-recorded (`LostFlow`);
//! - UDP entries expire after an idle timeout; expired entries count as absent.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use bg_common::{
    addr_filter_bit, hash::flow_hash, ring_base, BackendSet, DpConfig, FlowKey, Fwd, NatEntry, Reason, ServiceInfo,
    VipKey, SERVICE_PREVIEW,
    FAMILY_V4, FAMILY_V6, FLOW_CLOSING, LAST_SEEN_GRANULARITY_NS, MAX_BACKENDS, NAT_FROM_BACKEND, NAT_TO_BACKEND,
    PROTO_TCP, PROTO_UDP, RING_SIZE,
};

use crate::{
    maps::{
        BG_ACTIVE_V1, BG_ADDR_FILTER_V1, BG_BACKEND_SETS_V1, BG_CONFIG_V1, BG_FLOWS_V1, BG_RATE_V2, BG_RINGS_V1,
        BG_SERVICES_V1,
    },
    parse::{is_vip, End, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    rewrite::rewrite,
    count_fwd,
};

/// No color: the packet was not rewritten.
pub const NO_COLOR: u8 = 0xff;

pub struct Verdict {
    pub reason: Reason,
    /// The flow's color for rewritten packets, else `NO_COLOR`.
    pub color: u8,
}

impl Verdict {
    #[inline(always)]
    fn untouched(reason: Reason) -> Verdict {
        Verdict { reason, color: NO_COLOR }
    }
}

/// Whether `addr`'s bit is set in the address filter.
#[inline(always)]
pub fn maybe_ours(addr: &[u32; 4]) -> bool {
    let bit = addr_filter_bit(addr);
    match BG_ADDR_FILTER_V1.get(bit >> 6) {
        Some(w) => *w & (1u64 << (bit & 63)) != 0,
        None => true,
    }
}

/// Decides and applies the rewrite for a parsed TCP/UDP packet.
#[inline(always)]
pub fn process(pkt: &Packet, key: &FlowKey) -> Verdict {
    let key = *key;
    // Neither to a VIP nor from a backend: cannot be a VIP flow; no hash lookups.
    if !maybe_ours(&key.dst) && !maybe_ours(&key.src) {
        return Verdict::untouched(Reason::PassNotOurs);
    }
    let Some(cfg) = BG_CONFIG_V1.get(0) else {
        return Verdict::untouched(Reason::PassNotOurs);
    };
    // One lookup serves both directions of a known flow.
    if let Some(entry) = BG_FLOWS_V1.get_ptr_mut(&key) {
        let entry = unsafe { &mut *entry };
        // Only UDP and closing TCP entries age; an open TCP flow needs no clock read.
        let ages = pkt.proto != PROTO_TCP || entry.flags & FLOW_CLOSING != 0;
        let now = if ages { unsafe { bpf_ktime_get_ns() } } else { 0 };
        let reopened = pkt.has(TCP_SYN) && !pkt.has(TCP_ACK) && entry.flags & FLOW_CLOSING != 0;
        if !(ages && entry.expired(pkt.proto, now, cfg)) && !reopened {
            return follow(pkt, &key, entry, now);
        }
        // Over: the packet is handled as if no entry existed; a new flow overwrites it.
    }
    let now = unsafe { bpf_ktime_get_ns() };

    let vip = VipKey { addr: key.dst, port: key.dport, proto: key.proto, family: key.family };
    let Some(service) = (unsafe { BG_SERVICES_V1.get(&vip) }) else {
        // To a VIP address but no service of it: a stray, which the kernel would route back out.
        return Verdict::untouched(if is_vip(key.dst, key.family) { Reason::DropStray } else { Reason::PassNotOurs });
    };
    if martian(&key.src, key.family) {
        return Verdict::untouched(Reason::DropMartian);
    }
    if key.family == FAMILY_V6 && pkt.proto == PROTO_UDP && unsafe { pkt.l4_check.read_unaligned() } == 0 {
        return Verdict::untouched(Reason::DropUdp6NoChecksum);
    }
    let reason = if pkt.proto == PROTO_TCP {
        if pkt.has(TCP_RST) {
            return Verdict::untouched(Reason::DropRstNoFlow);
        }
        if pkt.has(TCP_SYN) && !pkt.has(TCP_ACK) {
            Reason::NewFlow
        } else {
            Reason::LostFlow
        }
    } else {
        Reason::NewFlow
    };
    if over_rate(cfg, now) {
        return Verdict::untouched(Reason::DropNewFlowRate);
    }
    new_flow(pkt, &key, service, cfg, now, reason)
}

/// A source no real client has, to a VIP: IPv4 0/8, 127/8, 224/3 (multicast, reserved,
/// broadcast); IPv6 ::, ::1, ff00::/8, IPv4-mapped; or a VIP address itself.
#[inline(always)]
fn martian(src: &[u32; 4], family: u8) -> bool {
    // Addresses are in network order: the first byte on the wire is the lowest of word 0.
    let first = src[0].to_ne_bytes()[0];
    let bogus = if family == FAMILY_V4 {
        first == 0 || first == 127 || first >= 224
    } else {
        let mapped = src[0] == 0 && src[1] == 0 && src[2] == 0xffffu32.to_be();
        let low_zero = src[0] == 0 && src[1] == 0 && src[2] == 0;
        first == 0xff || mapped || (low_zero && (src[3] == 0 || src[3] == 1u32.to_be()))
    };
    bogus || is_vip(*src, family)
}

/// A packet of a known flow: rewrite as its entry says. `now` is 0 for open TCP flows, whose
/// `last_seen_ns` is only kept from their FIN on.
#[inline(always)]
fn follow(pkt: &Packet, key: &FlowKey, entry: &mut NatEntry, now: u64) -> Verdict {
    if now != 0 && now.wrapping_sub(entry.last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
        entry.last_seen_ns = now;
    }
    let (addr, port, kind, color) = (entry.addr, entry.port, entry.kind, entry.color);
    if pkt.has(TCP_FIN) && entry.flags & FLOW_CLOSING == 0 {
        entry.flags |= FLOW_CLOSING;
        entry.last_seen_ns = unsafe { bpf_ktime_get_ns() };
    }
    let reason = if kind == NAT_TO_BACKEND {
        rewrite(pkt, End::Dst, &addr, port);
        Reason::ToBackend
    } else {
        rewrite(pkt, End::Src, &addr, port);
        Reason::FromBackend
    };
    if pkt.has(TCP_RST) {
        // The connection is over for both ends: forget both directions now.
        let peer = if kind == NAT_TO_BACKEND {
            key.reply_key(addr, port)
        } else {
            key.forward_key(addr, port)
        };
        let removed = BG_FLOWS_V1.remove(key).is_ok() as u64 + BG_FLOWS_V1.remove(&peer).is_ok() as u64;
        count_fwd(Fwd::FlowsRemoved, removed);
    }
    Verdict { reason, color }
}

const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;

/// Writes a flow entry, counting it as created when its key had none (so that evictions can be
/// told from the counters); an expired entry under the same key is overwritten.
#[inline(always)]
fn record(key: &FlowKey, entry: &NatEntry) -> bool {
    match BG_FLOWS_V1.insert(key, entry, BPF_NOEXIST) {
        Ok(()) => {
            count_fwd(Fwd::FlowsCreated, 1);
            true
        }
        // The helper returns -errno.
        Err(e) if e == -EEXIST => BG_FLOWS_V1.insert(key, entry, 0).is_ok(),
        Err(_) => false,
    }
}

/// The new-flow rate bound: true when this second's budget, shared by every CPU, is spent.
/// `RateWindow` holds the second (of the monotonic clock) being counted and the flows counted
/// in it. The first CPU to see a new second resets the count with plain stores; the count is
/// raised with an atomic add (BPF_ATOMIC without fetch: the fetching forms do not work on this
/// toolchain). So the bound holds to within a few flows: CPUs that check at the same moment
/// can each pass the last slot, and a reset racing an add can lose that add.
#[inline(always)]
fn over_rate(cfg: &DpConfig, now: u64) -> bool {
    if cfg.new_flows_per_sec == 0 {
        return false;
    }
    let Some(w) = BG_RATE_V2.get_ptr_mut(0) else { return false };
    let second = now / 1_000_000_000;
    // SAFETY: the map value lives as long as the map; aligned 8-byte loads and stores are
    // single instructions, so no CPU sees half of one.
    unsafe {
        let (window, count) = (&raw mut (*w).start_ns, &raw mut (*w).count);
        if window.read_volatile() != second {
            window.write_volatile(second);
            count.write_volatile(0);
        }
        if count.read_volatile() >= cfg.new_flows_per_sec as u64 {
            return true;
        }
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(count, 1);
    }
    false
}

/// Picks a backend of the active color by Maglev, records both directions, rewrites.
#[inline(always)]
fn new_flow(pkt: &Packet, key: &FlowKey, service: &ServiceInfo, cfg: &DpConfig, now: u64, reason: Reason) -> Verdict {
    let Some(selector) = BG_ACTIVE_V1.get(0) else {
        return Verdict::untouched(Reason::DropNoBackend);
    };
    let hash = flow_hash(key);
    let slot = selector.slot_for(hash, service.flags & SERVICE_PREVIEW != 0);
    let Some(set) = BG_BACKEND_SETS_V1.get(BackendSet::index(slot, service.index)) else {
        return Verdict::untouched(Reason::DropNoBackend);
    };
    let ring_index = ring_base(slot, cfg.services, service.index) + hash % RING_SIZE;
    let Some(&b) = BG_RINGS_V1.get(ring_index) else {
        return Verdict::untouched(Reason::DropNoBackend);
    };
    if b >= set.count || b as usize >= MAX_BACKENDS {
        return Verdict::untouched(Reason::DropNoBackend);
    }
    let backend = &set.backends[b as usize];
    let color = set.color as u8;

    let forward = NatEntry {
        addr: backend.addr,
        last_seen_ns: now,
        port: backend.port,
        kind: NAT_TO_BACKEND,
        color,
        flags: 0,
        _pad: [0; 3],
    };
    let reply = NatEntry {
        addr: key.dst,
        last_seen_ns: now,
        port: key.dport,
        kind: NAT_FROM_BACKEND,
        color,
        flags: 0,
        _pad: [0; 3],
    };
    // Reply entry first: once the forward entry exists, later packets skip this path, and their
    // replies must find the reverse mapping.
    if !record(&key.reply_key(backend.addr, backend.port), &reply) || !record(key, &forward) {
        return Verdict::untouched(Reason::DropFlowTableFull);
    }
    rewrite(pkt, End::Dst, &backend.addr, backend.port);
    crate::count_new_flow(color);
    Verdict { reason, color }
}
