//! How a rewritten packet leaves: `bpf_fib_lookup` for egress interface and neighbour, then
//! `XDP_REDIRECT` with rewritten MACs and TTL decremented like a router. Whenever the lookup
//! does not give a complete answer, the packet is passed to the kernel, which routes it (and
//! decrements the TTL itself).

use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use bg_common::{DpConfig, Fwd, DP_FLAG_REDIRECT, FAMILY_V4};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, ip::Ipv6Hdr};

use crate::{
    parse::{read_addr, End},
    rewrite::decrement_ttl,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The headers of a rewritten packet that forwarding reads and writes.
pub struct Out {
    pub eth: *mut EthHdr,
    /// Start of the IP header.
    pub l3: *mut u8,
    pub family: u8,
    /// The L4 protocol (after IPv6 extension headers).
    pub proto: u8,
    /// Raw source and destination ports (zero for ICMP).
    pub ports: [u16; 2],
}

#[inline(always)]
pub fn forward(ctx: &XdpContext, out: &Out, cfg: &DpConfig) -> (u32, Fwd) {
    if cfg.flags & DP_FLAG_REDIRECT == 0 {
        return (xdp_action::XDP_PASS, Fwd::Kernel);
    }
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.l4_protocol = out.proto;
    p.sport = out.ports[0];
    p.dport = out.ports[1];
    p.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let src = read_addr(out.l3, out.family, End::Src);
    let dst = read_addr(out.l3, out.family, End::Dst);
    unsafe {
        if out.family == FAMILY_V4 {
            let ip = &*(out.l3 as *const Ipv4Hdr);
            p.family = AF_INET;
            p.__bindgen_anon_1.tot_len = u16::from_be_bytes(ip.tot_len);
            p.__bindgen_anon_2.tos = ip.tos;
            p.__bindgen_anon_3.ipv4_src = src[0];
            p.__bindgen_anon_4.ipv4_dst = dst[0];
        } else {
            let ip = &*(out.l3 as *const Ipv6Hdr);
            p.family = AF_INET6;
            p.__bindgen_anon_1.tot_len = u16::from_be_bytes(ip.payload_len).wrapping_add(Ipv6Hdr::LEN as u16);
            p.__bindgen_anon_3.ipv6_src = src;
            p.__bindgen_anon_4.ipv6_dst = dst;
        }
    }
    let rc = unsafe {
        fib_lookup(ctx.ctx as *mut _, &mut p, size_of::<bpf_fib_lookup>() as i32, 0)
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            decrement_ttl(out.l3, out.family);
            unsafe {
                (*out.eth).dst_addr = p.dmac;
                (*out.eth).src_addr = p.smac;
            }
            let action = unsafe { bpf_redirect(p.ifindex, 0) } as u32;
            (action, Fwd::Redirect)
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => (xdp_action::XDP_PASS, Fwd::KernelNoNeigh),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => (xdp_action::XDP_PASS, Fwd::KernelFragNeeded),
        _ => (xdp_action::XDP_PASS, Fwd::KernelOther),
    }
}
