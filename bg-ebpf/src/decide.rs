//! Flow table and backend choice: which backend a packet goes to, or which VIP a reply comes from.

use bg_common::{
    hash::flow_hash, BackendSet, FlowKey, NatEntry, Reason, VipKey, FAMILY_V4, MAX_BACKENDS,
    NAT_FROM_BACKEND, NAT_TO_BACKEND,
};

use crate::{
    maps::{BG_ACTIVE_V1, BG_BACKEND_SETS_V1, BG_FLOWS_V1, BG_SERVICES_V1},
    parse::Packet,
    rewrite::{rewrite, End},
};

/// Decides and applies the rewrite for a parsed TCP/UDP packet.
#[inline(always)]
pub fn process(pkt: &Packet) -> Reason {
    let key = pkt.key();
    // One lookup serves both directions of a known flow.
    if let Some(entry) = unsafe { BG_FLOWS_V1.get(&key) } {
        let (addr, port, kind) = (entry.addr[0], entry.port, entry.kind);
        return if kind == NAT_TO_BACKEND {
            rewrite(pkt, End::Dst, addr, port);
            Reason::ToBackend
        } else {
            rewrite(pkt, End::Src, addr, port);
            Reason::FromBackend
        };
    }

    let vip = VipKey {
        addr: key.dst,
        port: key.dport,
        proto: key.proto,
        family: FAMILY_V4,
    };
    let Some(service) = (unsafe { BG_SERVICES_V1.get(&vip) }) else {
        return Reason::PassNotOurs;
    };
    new_flow(pkt, &key, service.index)
}

/// A VIP packet with no flow entry: pick a backend of the active color, record both directions,
/// rewrite toward the backend.
#[inline(always)]
fn new_flow(pkt: &Packet, key: &FlowKey, service: u32) -> Reason {
    let Some(selector) = BG_ACTIVE_V1.get(0) else {
        return Reason::DropNoBackend;
    };
    let Some(set) = BG_BACKEND_SETS_V1.get(BackendSet::index(selector.slot(), service)) else {
        return Reason::DropNoBackend;
    };
    let count = set.count;
    if count == 0 {
        return Reason::DropNoBackend;
    }
    let i = (flow_hash(key) % count) as usize;
    if i >= MAX_BACKENDS {
        return Reason::DropNoBackend;
    }
    let backend = &set.backends[i];
    let color = set.color as u8;

    let forward = NatEntry {
        addr: backend.addr,
        port: backend.port,
        kind: NAT_TO_BACKEND,
        color,
    };
    let reply_key = FlowKey {
        src: backend.addr,
        dst: key.src,
        sport: backend.port,
        dport: key.sport,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    };
    let reply = NatEntry {
        addr: key.dst,
        port: key.dport,
        kind: NAT_FROM_BACKEND,
        color,
    };
    // Reply entry first: once the forward entry exists, later packets skip this path, and their
    // replies must find the reverse mapping.
    if BG_FLOWS_V1.insert(&reply_key, &reply, 0).is_err()
        || BG_FLOWS_V1.insert(key, &forward, 0).is_err()
    {
        return Reason::DropFlowTableFull;
    }
    rewrite(pkt, End::Dst, backend.addr[0], backend.port);
    Reason::NewFlow
}
