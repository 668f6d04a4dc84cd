//! "Fragmentation needed" (IPv4 with DF) and "packet too big" (IPv6) for packets of VIP flows
//! that are larger than the MTU toward their next hop.
//!
//! The kernel's own answer would quote the packet as bg rewrote it (client → backend, or VIP →
//! client), which the sender cannot match to any socket of its own: path MTU discovery would
//! silently fail and large segments would be lost for good. So bg answers itself, from the VIP,
//! quoting the packet as its sender sent it (the caller undoes the rewrite first), and hands
//! the error to the kernel (`XDP_PASS`, Ethernet header as it arrived, so addressed to this
//! host), which routes it to the sender like any packet it forwards. (`XDP_TX` back out of a
//! veth left these frames stuck in the peer's queue for long stretches on this kernel; these
//! answers are rare, and the kernel path resolves neighbours and routes on its own.)

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use bg_common::{csum, FAMILY_V4};
use network_types::eth::EthHdr;

use crate::parse::ptr_at;

const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const ICMP_HLEN: usize = 8;
/// Most bytes of the original packet quoted: the whole IPv4 header (up to 60) and 8 bytes of
/// L4 header; for IPv6 the fixed header, extension headers and 8 bytes of L4 header, cut here
/// if longer (RFC 4443 allows any length up to the minimum MTU).
const MAX_QUOTE: usize = 232;
const ETH_P_IPV4: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86ddu16.to_be();

/// Sums `len` bytes (even) of the packet from `start` as raw 16-bit words, at most `MAX_WORDS`.
#[inline(always)]
fn sum_words(ctx: &XdpContext, start: usize, len: usize, initial: u32) -> Option<u32> {
    const MAX_WORDS: usize = (ICMP_HLEN + MAX_QUOTE) / 2;
    let mut sum = initial;
    for i in 0..MAX_WORDS {
        if i * 2 >= len {
            break;
        }
        let w: *const u16 = ptr_at(ctx, start + i * 2)?;
        sum += unsafe { w.read_unaligned() } as u32;
    }
    Some(sum)
}

fn write_words(p: *mut u8, words: &[u32]) {
    for (i, w) in words.iter().enumerate() {
        unsafe { (p as *mut u32).add(i).write_unaligned(*w) };
    }
}

/// Replaces the frame (Ethernet, then an IP packet whose L4 header starts `l4_off` bytes into
/// the frame, as its sender sent it) with the ICMP error about it, addressed to its sender,
/// from `vip`. Returns `XDP_PASS`, or None when the frame could not be rebuilt (then it is no
/// longer the packet it was: the caller drops it).
#[inline(always)]
pub fn too_big(ctx: &XdpContext, family: u8, vip: &[u32; 4], mtu: u32, l4_off: usize) -> Option<u32> {
    let v4 = family == FAMILY_V4;
    let (ip_hlen, icmp_type, icmp_code) = if v4 { (IPV4_HLEN, 3u8, 4u8) } else { (IPV6_HLEN, 2u8, 0u8) };
    let outer = ip_hlen + ICMP_HLEN;
    let quote = {
        let q = l4_off.checked_sub(EthHdr::LEN)? + 8;
        if q > MAX_QUOTE {
            MAX_QUOTE
        } else {
            q
        }
    };
    // What the rebuilt frame needs from the old one: both MACs (kept: the frame stays addressed
    // to this host) and the sender's address.
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let (dst_mac, src_mac) = unsafe { ((*eth).dst_addr, (*eth).src_addr) };
    let sender: [u32; 4] = if v4 {
        let p: *const u32 = ptr_at(ctx, EthHdr::LEN + 12)?;
        [unsafe { p.read_unaligned() }, 0, 0, 0]
    } else {
        let p: *const [u32; 4] = ptr_at(ctx, EthHdr::LEN + 8)?;
        unsafe { p.read_unaligned() }
    };
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer as i32)) } != 0 {
        return None;
    }
    let total = EthHdr::LEN + outer + quote;
    let len = ctx.data_end() - ctx.data();
    if len < total || unsafe { bpf_xdp_adjust_tail(ctx.ctx, total as i32 - len as i32) } != 0 {
        return None;
    }

    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    unsafe {
        (*eth).dst_addr = dst_mac;
        (*eth).src_addr = src_mac;
        (*eth).ether_type = if v4 { ETH_P_IPV4 } else { ETH_P_IPV6 };
    }
    let icmp_len = ICMP_HLEN + quote;
    let ip: *mut [u8; IPV6_HLEN] = ptr_at(ctx, EthHdr::LEN)?;
    let ip = ip as *mut u8;
    let mut icmp_sum;
    if v4 {
        let tot_len = ((IPV4_HLEN + icmp_len) as u32).to_be() >> 16;
        // Version/IHL 0x45, TOS 0, total length, id 0, no flags, TTL 64, ICMP, checksum 0.
        let word0 = u32::from_be_bytes([0x45, 0, 0, 0]).to_be() | (tot_len << 16);
        write_words(ip, &[word0, 0, u32::from_be_bytes([64, 1, 0, 0]).to_be(), vip[0], sender[0]]);
        let mut h = 0u32;
        for i in 0..IPV4_HLEN / 2 {
            h += unsafe { (ip as *const u16).add(i).read_unaligned() } as u32;
        }
        unsafe { (ip.add(10) as *mut u16).write_unaligned(!csum::fold(h)) };
        icmp_sum = 0;
    } else {
        let plen = (icmp_len as u16).to_be() as u32;
        // Version 6, no traffic class or flow label; payload length, ICMPv6, hop limit 64.
        write_words(ip, &[u32::from_be_bytes([0x60, 0, 0, 0]).to_be(), plen | (u32::from_be_bytes([0, 0, 58, 64]).to_be() & 0xffff_0000)]);
        write_words(unsafe { ip.add(8) }, vip);
        write_words(unsafe { ip.add(24) }, &sender);
        // The pseudo header: both addresses, the upper-layer length, next header 58.
        icmp_sum = 0;
        for i in 0..4 {
            let (a, b) = (vip[i], sender[i]);
            icmp_sum += (a & 0xffff) + (a >> 16) + (b & 0xffff) + (b >> 16);
        }
        icmp_sum += (icmp_len as u16).to_be() as u32 + (58u16).to_be() as u32;
    }
    let icmp: *mut [u8; ICMP_HLEN] = ptr_at(ctx, EthHdr::LEN + ip_hlen)?;
    let icmp = icmp as *mut u8;
    let rest = if v4 { (mtu & 0xffff).to_be() } else { mtu.to_be() };
    write_words(icmp, &[u32::from_be_bytes([icmp_type, icmp_code, 0, 0]).to_be(), rest]);
    icmp_sum = sum_words(ctx, EthHdr::LEN + ip_hlen, icmp_len, icmp_sum)?;
    unsafe { (icmp.add(2) as *mut u16).write_unaligned(!csum::fold(icmp_sum)) };
    Some(xdp_action::XDP_PASS)
}
