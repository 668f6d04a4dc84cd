//! How a rewritten packet leaves: `bpf_fib_lookup` for egress interface and neighbour, then
//! `XDP_REDIRECT` with rewritten MACs and TTL decremented like a router. Whenever the lookup
//! does not give a complete answer, the packet is passed to the kernel, which routes it (and
//! decrements the TTL itself); except a packet of a VIP flow that is too big for its next hop
//! and must not be fragmented, which bg answers itself (`pmtu`), in both forwarding modes.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect},
    programs::XdpContext,
};
use bg_common::{DpConfig, FlowEntry, Fwd, DP_FLAG_REDIRECT, FAMILY_V4, NH_EPOCH_SHIFT};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, ip::Ipv6Hdr};

use crate::{
    parse::{read_addr, End, Packet},
    pmtu,
    rewrite::{decrement_ttl, rewrite},
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
    /// For TCP/UDP: the packet and what its rewrite replaced (None for ICMP errors, which are
    /// small enough for any link).
    pub flow: Option<(Packet, Undo)>,
    /// The flow entry a client's packet followed, whose next-hop cache this packet may use and
    /// fill; null for replies, new flows and everything else.
    pub entry: *mut FlowEntry,
}

/// The end of a packet the rewrite changed, and its address and port before (raw).
pub struct Undo {
    pub end: End,
    pub addr: [u32; 4],
    pub port: u16,
}

/// IPv4 "don't fragment", raw.
const IP_DF: u16 = 0x4000u16.to_be();

#[inline(always)]
pub fn forward(ctx: &XdpContext, out: &Out, cfg: &DpConfig) -> (u32, Fwd) {
    let redirect = cfg.flags & DP_FLAG_REDIRECT != 0;
    // In kernel mode only packets that could be too big for a link are looked up: the MTU is
    // all the lookup is for there, and no IPv4 link is smaller than 576 bytes nor IPv6 one
    // smaller than 1280.
    if !redirect && (out.flow.is_none() || ctx.data_end() - ctx.data() <= EthHdr::LEN + 576) {
        return (xdp_action::XDP_PASS, Fwd::Kernel);
    }
    let ip_len = ip_total_len(out);
    // The flow's cached next hop: one clock read instead of the FIB lookup.
    let epoch = if out.entry.is_null() { 0 } else { (unsafe { bpf_ktime_get_coarse_ns() } >> NH_EPOCH_SHIFT) as u32 };
    if !out.entry.is_null() {
        let e = unsafe { &*out.entry };
        if e.nh_ifindex != 0 && e.nh_epoch == epoch && ip_len <= e.nh_len {
            decrement_ttl(out.l3, out.family);
            unsafe {
                let macs = &e.nh_macs;
                (*out.eth).dst_addr.copy_from_slice(&macs[..6]);
                (*out.eth).src_addr.copy_from_slice(&macs[6..]);
            }
            return (unsafe { bpf_redirect(e.nh_ifindex, 0) } as u32, Fwd::Redirect);
        }
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
    if rc as u32 == BPF_FIB_LKUP_RET_FRAG_NEEDED {
        if let Some((pkt, undo)) = &out.flow {
            let df = out.family != FAMILY_V4 || unsafe { u16::from_ne_bytes((*(out.l3 as *const Ipv4Hdr)).frags) } & IP_DF != 0;
            if df {
                return too_big(ctx, pkt, undo, unsafe { p.__bindgen_anon_1.mtu_result } as u32);
            }
        }
    }
    if !redirect {
        return (xdp_action::XDP_PASS, Fwd::Kernel);
    }
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS if crate::egress::no_redirect(p.ifindex) => (xdp_action::XDP_PASS, Fwd::KernelNoRedirect),
        BPF_FIB_LKUP_RET_SUCCESS => {
            decrement_ttl(out.l3, out.family);
            unsafe {
                (*out.eth).dst_addr = p.dmac;
                (*out.eth).src_addr = p.smac;
            }
            if !out.entry.is_null() {
                // Cache this next hop in the flow for about a second, for packets up to this
                // long (the longest the FIB said fits, in this epoch).
                let e = unsafe { &mut *out.entry };
                if e.nh_epoch != epoch || e.nh_ifindex != p.ifindex {
                    e.nh_len = 0;
                }
                e.nh_epoch = epoch;
                e.nh_ifindex = p.ifindex;
                if ip_len > e.nh_len {
                    e.nh_len = ip_len;
                }
                e.nh_macs[..6].copy_from_slice(&p.dmac);
                e.nh_macs[6..].copy_from_slice(&p.smac);
            }
            let action = unsafe { bpf_redirect(p.ifindex, 0) } as u32;
            (action, Fwd::Redirect)
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => (xdp_action::XDP_PASS, Fwd::KernelNoNeigh),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => (xdp_action::XDP_PASS, Fwd::KernelFragNeeded),
        _ => (xdp_action::XDP_PASS, Fwd::KernelOther),
    }
}

/// Answers a packet too big for its next hop: the rewrite is undone, so the sender sees its own
/// packet quoted, from the VIP (the address the sender knows the flow by, as client or as
/// backend).
#[inline(always)]
fn too_big(ctx: &XdpContext, pkt: &Packet, undo: &Undo, mtu: u32) -> (u32, Fwd) {
    let vip = match undo.end {
        End::Dst => undo.addr,
        End::Src => read_addr(pkt.l3, pkt.family, End::Src),
    };
    rewrite(pkt, undo.end, &undo.addr, undo.port);
    let l4_off = pkt.ports as usize - ctx.data();
    match pmtu::too_big(ctx, pkt.family, &vip, mtu, l4_off) {
        Some(action) => (action, Fwd::TooBigAnswered),
        None => (xdp_action::XDP_DROP, Fwd::TooBigDropped),
    }
}

/// The IP packet's total length by its header (IPv6: payload length + 40).
#[inline(always)]
fn ip_total_len(out: &Out) -> u16 {
    unsafe {
        if out.family == FAMILY_V4 {
            u16::from_be_bytes((*(out.l3 as *const Ipv4Hdr)).tot_len)
        } else {
            u16::from_be_bytes((*(out.l3 as *const Ipv6Hdr)).payload_len).wrapping_add(Ipv6Hdr::LEN as u16)
        }
    }
}
