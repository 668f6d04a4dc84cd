//! ICMP errors about VIP flows, rewritten for the NAT so path MTU discovery and error
//! reporting keep working. The quoted packet is one the flow sent, so its reversed 5-tuple is a
//! flow key: one lookup finds the flow and which way the error travels.

use bg_common::{FlowKey, NAT_TO_BACKEND, FAMILY_V4};

use crate::{
    decide::{Verdict, NO_COLOR},
    maps::BG_FLOWS_V1,
    parse::IcmpError,
    rewrite::{rewrite_ip_addr, rewrite_quoted, End},
};
use bg_common::Reason;

#[inline(always)]
pub fn process(e: &IcmpError) -> Verdict {
    let (inner_src, inner_dst, ports) = unsafe {
        (
            u32::from_ne_bytes((*e.inner_ip).src_addr),
            u32::from_ne_bytes((*e.inner_ip).dst_addr),
            *e.inner_ports,
        )
    };
    // The packet that would answer the quoted one.
    let key = FlowKey {
        src: [inner_dst, 0, 0, 0],
        dst: [inner_src, 0, 0, 0],
        sport: ports[1],
        dport: ports[0],
        proto: e.inner_proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    let Some(entry) = (unsafe { BG_FLOWS_V1.get(&key) }) else {
        return Verdict { reason: Reason::PassNotOurs, color: NO_COLOR };
    };
    let (addr, port, color) = (entry.addr[0], entry.port, entry.color);
    let outer = unsafe { &*e.ip };
    if entry.kind == NAT_TO_BACKEND {
        // Quoted VIP → client (a reply we rewrote); the error is addressed to the VIP and
        // belongs to the backend.
        let vip = inner_src;
        rewrite_quoted(e, End::Src, addr, port);
        if u32::from_ne_bytes(outer.dst_addr) == vip {
            rewrite_ip_addr(e.ip, End::Dst, addr);
        }
        Verdict { reason: Reason::IcmpToBackend, color }
    } else {
        // Quoted client → backend (a request we rewrote); the error goes to the client, which
        // knows the connection as client → VIP.
        let backend = inner_dst;
        rewrite_quoted(e, End::Dst, addr, port);
        if u32::from_ne_bytes(outer.src_addr) == backend {
            rewrite_ip_addr(e.ip, End::Src, addr);
        }
        Verdict { reason: Reason::IcmpToClient, color }
    }
}
