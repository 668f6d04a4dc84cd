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
use bg_common::{DpConfig, Fwd, DP_FLAG_REDIRECT};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::rewrite::decrement_ttl;

const AF_INET: u8 = 2;

/// The headers of a rewritten packet that forwarding reads and writes.
pub struct Out {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    /// Raw source and destination ports (zero for ICMP).
    pub ports: [u16; 2],
}

#[inline(always)]
pub fn forward(ctx: &XdpContext, out: &Out, cfg: &DpConfig) -> (u32, Fwd) {
    if cfg.flags & DP_FLAG_REDIRECT == 0 {
        return (xdp_action::XDP_PASS, Fwd::Kernel);
    }
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    unsafe {
        let ip = &*out.ip;
        let ports = out.ports;
        p.family = AF_INET;
        p.l4_protocol = ip.proto as u8;
        p.sport = ports[0];
        p.dport = ports[1];
        p.__bindgen_anon_1.tot_len = u16::from_be_bytes(ip.tot_len);
        p.ifindex = (*ctx.ctx).ingress_ifindex;
        p.__bindgen_anon_2.tos = ip.tos;
        p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src_addr);
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst_addr);
    }
    let rc = unsafe {
        fib_lookup(ctx.ctx as *mut _, &mut p, size_of::<bpf_fib_lookup>() as i32, 0)
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            decrement_ttl(out.ip);
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
