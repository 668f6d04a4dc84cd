//! ICMP/ICMPv6 errors about VIP flows, rewritten for the NAT so path MTU discovery and error
//! reporting keep working. The quoted packet is one bg rewrote: either client → backend (the
//! error travels to the client; the static reply map names the VIP) or VIP → client (a reply;
//! the error is sent to the VIP and belongs to the backend; the flow tables name it).

use bg_common::{BackendKey, FlowKey, Reason, REPLY_HAS_PREVIEW};

use crate::{
    decide::Verdict,
    flows::{self, Table},
    maps::{BG_PREVIEW_REPLIES_V1, BG_REPLIES_V2},
    parse::{is_vip, read_addr, End, IcmpError},
    rewrite::{rewrite_icmp_outer, rewrite_quoted},
};

#[inline(always)]
pub fn process(e: &IcmpError) -> Verdict {
    let inner_src = read_addr(e.inner_l3, e.family, End::Src);
    let inner_dst = read_addr(e.inner_l3, e.family, End::Dst);
    let stray = || {
        // An error sent to a VIP about no flow bg has is a stray; one passing through, not ours.
        let to_vip = is_vip(read_addr(e.l3, e.family, End::Dst), e.family);
        Verdict::untouched(if to_vip { Reason::DropStray } else { Reason::PassNotOurs })
    };
    if !crate::decide::maybe_ours(&inner_src) && !crate::decide::maybe_ours(&inner_dst) {
        return stray();
    }
    let ports = unsafe { *e.inner_ports };
    // Quoted client → backend (a request we rewrote), on its way to the client, which knows
    // the connection as client → VIP. A router's own address stays the source; the backend's
    // becomes the VIP.
    let bkey = BackendKey { addr: inner_dst, port: ports[1], proto: e.inner_proto, family: e.family };
    if let Some(r) = unsafe { BG_REPLIES_V2.get(&bkey) } {
        let (mut vip, mut vip_port) = (r.vip, r.vip_port);
        if r.flags & REPLY_HAS_PREVIEW != 0 {
            let reply = FlowKey { src: inner_dst, dst: inner_src, sport: ports[1], dport: ports[0], proto: e.inner_proto, family: e.family, _pad: [0; 2] };
            if let Some(p) = unsafe { BG_PREVIEW_REPLIES_V1.get(&reply) } {
                (vip, vip_port) = (p.vip, p.vip_port);
            }
        }
        rewrite_quoted(e, End::Dst, &vip, vip_port);
        if read_addr(e.l3, e.family, End::Src) == inner_dst {
            rewrite_icmp_outer(e, End::Src, &vip);
        }
        return Verdict::rewritten(Reason::IcmpToClient, r.color, crate::decide::NO_SIGNAL);
    }
    // Quoted VIP → client (a reply we rewrote): the error is addressed to the VIP and belongs
    // to the backend of the flow client → VIP. Only as such: an error about a VIP reply sent to
    // anyone else would carry the backend's address to them once rewritten.
    if read_addr(e.l3, e.family, End::Dst) != inner_src {
        return stray();
    }
    let fkey = FlowKey { src: inner_dst, dst: inner_src, sport: ports[1], dport: ports[0], proto: e.inner_proto, family: e.family, _pad: [0; 2] };
    let entry = match flows::get(Table::Established, &fkey).or_else(|| flows::get(Table::Unconfirmed, &fkey)) {
        Some(x) => unsafe { &*x },
        None => return stray(),
    };
    let (backend, port, color) = (entry.backend, entry.backend_port, entry.color);
    rewrite_quoted(e, End::Src, &backend, port);
    rewrite_icmp_outer(e, End::Dst, &backend);
    Verdict::rewritten(Reason::IcmpToBackend, color, crate::decide::NO_SIGNAL)
}
