//! ICMP/ICMPv6 errors about VIP flows, rewritten for the NAT so path MTU discovery and error
//! reporting keep working. The quoted packet is one the flow sent, so its reversed 5-tuple is a
//! flow key: one lookup finds the flow and which way the error travels.

use bg_common::{FlowKey, Reason, NAT_TO_BACKEND};

use crate::{
    decide::{Verdict, NO_COLOR},
    maps::BG_FLOWS_V1,
    parse::{read_addr, End, IcmpError},
    rewrite::{rewrite_icmp_outer, rewrite_quoted},
};

#[inline(always)]
pub fn process(e: &IcmpError) -> Verdict {
    let inner_src = read_addr(e.inner_l3, e.family, End::Src);
    let inner_dst = read_addr(e.inner_l3, e.family, End::Dst);
    if !crate::decide::maybe_ours(&inner_src) && !crate::decide::maybe_ours(&inner_dst) {
        return Verdict { reason: Reason::PassNotOurs, color: NO_COLOR };
    }
    let ports = unsafe { *e.inner_ports };
    // The packet that would answer the quoted one.
    let key = FlowKey {
        src: inner_dst,
        dst: inner_src,
        sport: ports[1],
        dport: ports[0],
        proto: e.inner_proto,
        family: e.family,
        _pad: [0; 2],
    };
    let Some(entry) = (unsafe { BG_FLOWS_V1.get(&key) }) else {
        // An error sent to a VIP about no flow bg has is a stray; one passing through, not ours.
        let to_vip = crate::parse::is_vip(read_addr(e.l3, e.family, End::Dst), e.family);
        return Verdict { reason: if to_vip { Reason::DropStray } else { Reason::PassNotOurs }, color: NO_COLOR };
    };
    let (addr, port, color) = (entry.addr, entry.port, entry.color);
    if entry.kind == NAT_TO_BACKEND {
        // Quoted VIP → client (a reply we rewrote); the error is addressed to the VIP and
        // belongs to the backend.
        rewrite_quoted(e, End::Src, &addr, port);
        if read_addr(e.l3, e.family, End::Dst) == inner_src {
            rewrite_icmp_outer(e, End::Dst, &addr);
        }
        Verdict { reason: Reason::IcmpToBackend, color }
    } else {
        // Quoted client → backend (a request we rewrote); the error goes to the client, which
        // knows the connection as client → VIP. A router's own address stays the source; the
        // backend's becomes the VIP.
        rewrite_quoted(e, End::Dst, &addr, port);
        if read_addr(e.l3, e.family, End::Src) == inner_dst {
            rewrite_icmp_outer(e, End::Src, &addr);
        }
        Verdict { reason: Reason::IcmpToClient, color }
    }
}
