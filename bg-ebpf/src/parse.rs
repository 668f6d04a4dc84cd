//! Bounded header access and parsing. Every read is checked against `data_end` first.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use bg_common::{
    FlowKey, Reason, VipAddr, FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, ip::Ipv6Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::maps::BG_VIP_ADDRS_V1;

/// A pointer to a `T` at `offset`, if the whole `T` lies inside the packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Which end of a packet.
#[derive(Clone, Copy)]
pub enum End {
    Src,
    Dst,
}

/// Where an address sits in an IP header of `family`.
#[inline(always)]
pub fn addr_ptr(l3: *mut u8, family: u8, end: End) -> *mut u8 {
    let off = match (family == FAMILY_V4, end) {
        (true, End::Src) => 12,
        (true, End::Dst) => 16,
        (false, End::Src) => 8,
        (false, End::Dst) => 24,
    };
    unsafe { l3.add(off) }
}

/// An address as map keys hold it: network order words, IPv4 in word 0.
#[inline(always)]
pub fn read_addr(l3: *mut u8, family: u8, end: End) -> [u32; 4] {
    let p = addr_ptr(l3, family, end) as *const u32;
    unsafe {
        if family == FAMILY_V4 {
            [p.read_unaligned(), 0, 0, 0]
        } else {
            [
                p.read_unaligned(),
                p.add(1).read_unaligned(),
                p.add(2).read_unaligned(),
                p.add(3).read_unaligned(),
            ]
        }
    }
}

/// The parts of a TCP/UDP packet the program reads and rewrites.
pub struct Packet {
    pub eth: *mut EthHdr,
    /// Start of the IP header.
    pub l3: *mut u8,
    pub family: u8,
    /// Source and destination port, raw (network order), as the first 4 bytes of TCP and UDP.
    pub ports: *mut [u16; 2],
    /// The L4 checksum field.
    pub l4_check: *mut u16,
    pub proto: u8,
    /// TCP flags byte (CWR..FIN); 0 for UDP.
    pub tcp_flags: u8,
    /// TCP sequence and acknowledgment numbers, host order; 0 for UDP.
    pub seq: u32,
    pub ack: u32,
    /// TCP: payload bytes after the TCP header (by the IP length); 0 for UDP.
    pub payload_len: u32,
}

/// An ICMP/ICMPv6 error quoting a TCP/UDP packet (a VIP flow candidate).
pub struct IcmpError {
    pub eth: *mut EthHdr,
    /// Start of the outer IP header.
    pub l3: *mut u8,
    pub family: u8,
    /// The ICMP checksum (covers the ICMP header and the quote; for ICMPv6 also the outer
    /// addresses through the pseudo header).
    pub icmp_check: *mut u16,
    /// Start of the quoted IP header (IPv4 without options, or IPv6 without extension headers).
    pub inner_l3: *mut u8,
    /// The quoted source and destination ports.
    pub inner_ports: *mut [u16; 2],
    /// The quoted L4 checksum, when the quote is long enough to hold it (else null).
    pub inner_l4_check: *mut u16,
    pub inner_proto: u8,
}

/// What the program works on.
pub enum Parsed {
    Flow(Packet),
    Icmp(IcmpError),
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const ETH_P_IPV4: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86ddu16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const ETH_P_8021AD: u16 = 0x88a8u16.to_be();
/// More-fragments flag and fragment offset, raw.
const IP_MF_OFFSET: u16 = 0x3fffu16.to_be();

/// IPv6 extension headers bg walks over; at most this many before the L4 header.
pub const MAX_IPV6_EXT_HEADERS: usize = 4;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROB: u8 = 12;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PARAMETER_PROB: u8 = 4;

/// Whether `addr` is one of the VIPs, whatever the port.
#[inline(always)]
pub fn is_vip(addr: [u32; 4], family: u8) -> bool {
    let key = VipAddr { addr, family: family as u32 };
    unsafe { BG_VIP_ADDRS_V1.get(&key) }.is_some()
}

/// Parses Ethernet / IPv4 or IPv6 / TCP, UDP or ICMP error. `Err` carries the final reason: a
/// pass (not ours, left untouched) or, only for packets addressed to a VIP, a drop (the VIP
/// check comes first).
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Parsed, Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassTruncated)?;
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == ETH_P_IPV4 {
        parse_v4(ctx, eth)
    } else if ether_type == ETH_P_IPV6 {
        parse_v6(ctx, eth)
    } else if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        Err(Reason::PassVlan)
    } else {
        Err(Reason::PassNotIp)
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, eth: *mut EthHdr) -> Result<Parsed, Reason> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(Reason::PassTruncated)?;
    let l3 = ip as *mut u8;
    // Only a packet addressed to a VIP is ever dropped; anything else is the kernel's to judge.
    let bad = |pass: Reason, drop: Reason| {
        if is_vip(read_addr(l3, FAMILY_V4, End::Dst), FAMILY_V4) {
            drop
        } else {
            pass
        }
    };
    let vihl = unsafe { (*ip).vihl };
    let ihl = (vihl & 0x0f) as usize;
    if vihl >> 4 != 4 || ihl < 5 {
        return Err(bad(Reason::PassMalformed, Reason::DropMalformed));
    }
    let proto = unsafe { (*ip).proto } as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_ICMP {
        return Err(bad(Reason::PassNotL4, Reason::DropStray));
    }
    if u16::from_ne_bytes(unsafe { (*ip).frags }) & IP_MF_OFFSET != 0 {
        return Err(bad(Reason::PassFragment, Reason::DropFragment));
    }
    if unsafe { (*ip).ttl } <= 1 {
        return Err(Reason::PassTtlExpired);
    }
    // IPv4 options are skipped: the L4 header starts at IHL * 4 (20..=60 bytes).
    let l4 = EthHdr::LEN + ihl * 4;
    if proto == PROTO_ICMP {
        // ICMP to a VIP is ours only as an error about one of its flows (echo and the rest:
        // strays).
        return parse_icmp_error(ctx, eth, l3, FAMILY_V4, l4).map(Parsed::Icmp).map_err(|r| bad(r, Reason::DropStray));
    }
    let ip_end = EthHdr::LEN + u16::from_be_bytes(unsafe { (*ip).tot_len }) as usize;
    parse_l4(ctx, eth, l3, FAMILY_V4, proto, l4, ip_end)
        .ok_or_else(|| bad(Reason::PassTruncated, Reason::DropMalformed))
        .map(Parsed::Flow)
}

/// IPv6: hop-by-hop, routing and destination options headers are skipped, at most
/// `MAX_IPV6_EXT_HEADERS` of them; a fragment header makes it a fragment; a routing header
/// with segments left makes the destination a waypoint (dropped when it is a VIP).
#[inline(always)]
fn parse_v6(ctx: &XdpContext, eth: *mut EthHdr) -> Result<Parsed, Reason> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(Reason::PassTruncated)?;
    let l3 = ip as *mut u8;
    let bad = |pass: Reason, drop: Reason| {
        if is_vip(read_addr(l3, FAMILY_V6, End::Dst), FAMILY_V6) {
            drop
        } else {
            pass
        }
    };
    if unsafe { (*ip).vcf[0] } >> 4 != 6 {
        return Err(bad(Reason::PassMalformed, Reason::DropMalformed));
    }
    let mut next = unsafe { (*ip).next_hdr } as u8;
    let mut off = EthHdr::LEN + Ipv6Hdr::LEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        if next == IPV6_FRAGMENT {
            return Err(bad(Reason::PassFragment, Reason::DropFragment));
        }
        if next != IPV6_HOP_BY_HOP && next != IPV6_ROUTING && next != IPV6_DEST_OPTS {
            break;
        }
        // Every extension header is at least 8 bytes: next header, length, 6 more.
        let h: *const [u8; 4] = ptr_at(ctx, off).ok_or_else(|| bad(Reason::PassTruncated, Reason::DropMalformed))?;
        if next == IPV6_ROUTING && unsafe { (*h)[3] } != 0 {
            // Segments left: the destination is a waypoint, and the L4 checksum covers the
            // final destination further down the list. Not a packet for the VIP to answer.
            return Err(bad(Reason::PassNotOurs, Reason::DropSourceRouted));
        }
        next = unsafe { (*h)[0] };
        off += (unsafe { (*h)[1] } as usize + 1) * 8;
    }
    if next == IPV6_FRAGMENT {
        return Err(bad(Reason::PassFragment, Reason::DropFragment));
    }
    if next == IPV6_HOP_BY_HOP || next == IPV6_ROUTING || next == IPV6_DEST_OPTS {
        // More extension headers than bg walks: not ours to rewrite.
        return Err(bad(Reason::PassMalformed, Reason::DropMalformed));
    }
    if next != PROTO_TCP && next != PROTO_UDP && next != PROTO_ICMPV6 {
        return Err(bad(Reason::PassNotL4, Reason::DropStray));
    }
    if unsafe { (*ip).hop_limit } <= 1 {
        return Err(Reason::PassTtlExpired);
    }
    if next == PROTO_ICMPV6 {
        return parse_icmp_error(ctx, eth, l3, FAMILY_V6, off).map(Parsed::Icmp).map_err(|r| bad(r, Reason::DropStray));
    }
    let ip_end = EthHdr::LEN + Ipv6Hdr::LEN + u16::from_be_bytes(unsafe { (*ip).payload_len }) as usize;
    parse_l4(ctx, eth, l3, FAMILY_V6, next, off, ip_end)
        .ok_or_else(|| bad(Reason::PassTruncated, Reason::DropMalformed))
        .map(Parsed::Flow)
}

/// The TCP or UDP header at `l4`, if it is all there. `ip_end`: where the IP packet ends by
/// its own length field (for the TCP payload length).
#[inline(always)]
fn parse_l4(ctx: &XdpContext, eth: *mut EthHdr, l3: *mut u8, family: u8, proto: u8, l4: usize, ip_end: usize) -> Option<Packet> {
    if proto == PROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, l4)?;
        let b = tcp as *const u8;
        let (seq, ack, doff) = unsafe {
            (u32::from_be((b.add(4) as *const u32).read_unaligned()), u32::from_be((b.add(8) as *const u32).read_unaligned()), (*b.add(12) >> 4) as usize)
        };
        // A data offset under 5 words is no TCP header.
        if doff < 5 {
            return None;
        }
        // The payload ends where the IP length says, but never past the frame.
        let ip_end = ip_end.min(ctx.data_end() - ctx.data());
        Some(Packet {
            eth,
            l3,
            family,
            ports: tcp as *mut [u16; 2],
            l4_check: unsafe { core::ptr::addr_of_mut!((*tcp).check) } as *mut u16,
            proto,
            tcp_flags: unsafe { *b.add(13) },
            seq,
            ack,
            payload_len: ip_end.saturating_sub(l4 + doff * 4) as u32,
        })
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, l4)?;
        Some(Packet {
            eth,
            l3,
            family,
            ports: udp as *mut [u16; 2],
            l4_check: unsafe { core::ptr::addr_of_mut!((*udp).check) } as *mut u16,
            proto,
            tcp_flags: 0,
            seq: 0,
            ack: 0,
            payload_len: 0,
        })
    }
}

/// An ICMP error (IPv4: unreachable incl. "fragmentation needed", time exceeded, parameter
/// problem; IPv6: unreachable, packet too big, time exceeded, parameter problem) quoting a
/// TCP/UDP packet (IPv4 without options or IPv6 without extension headers) and at least 8
/// bytes of its L4 header (RFC 792's minimum). Anything else is not ours.
#[inline(always)]
fn parse_icmp_error(ctx: &XdpContext, eth: *mut EthHdr, l3: *mut u8, family: u8, l4: usize) -> Result<IcmpError, Reason> {
    let icmp: *mut [u8; 8] = ptr_at(ctx, l4).ok_or(Reason::PassNotL4)?;
    let ty = unsafe { (*icmp)[0] };
    let inner_l4_at;
    let inner_l3: *mut u8;
    let inner_proto;
    if family == FAMILY_V4 {
        if ty != ICMP_DEST_UNREACH && ty != ICMP_TIME_EXCEEDED && ty != ICMP_PARAMETER_PROB {
            return Err(Reason::PassNotL4);
        }
        let inner: *mut Ipv4Hdr = ptr_at(ctx, l4 + 8).ok_or(Reason::PassNotL4)?;
        if unsafe { (*inner).vihl } != 0x45 {
            return Err(Reason::PassNotL4);
        }
        inner_proto = unsafe { (*inner).proto } as u8;
        inner_l3 = inner as *mut u8;
        inner_l4_at = l4 + 8 + Ipv4Hdr::LEN;
    } else {
        if !(ICMPV6_DEST_UNREACH..=ICMPV6_PARAMETER_PROB).contains(&ty) {
            return Err(Reason::PassNotL4);
        }
        let inner: *mut Ipv6Hdr = ptr_at(ctx, l4 + 8).ok_or(Reason::PassNotL4)?;
        inner_proto = unsafe { (*inner).next_hdr } as u8;
        inner_l3 = inner as *mut u8;
        inner_l4_at = l4 + 8 + Ipv6Hdr::LEN;
    }
    if inner_proto != PROTO_TCP && inner_proto != PROTO_UDP {
        return Err(Reason::PassNotL4);
    }
    let inner_ports: *mut [u16; 4] = ptr_at(ctx, inner_l4_at).ok_or(Reason::PassNotL4)?;
    let check_at = if inner_proto == PROTO_TCP { 16 } else { 6 };
    let inner_l4_check = ptr_at::<u16>(ctx, inner_l4_at + check_at).unwrap_or(core::ptr::null_mut());
    Ok(IcmpError {
        eth,
        l3,
        family,
        icmp_check: unsafe { (icmp as *mut u8).add(2) } as *mut u16,
        inner_l3,
        inner_ports: inner_ports as *mut [u16; 2],
        inner_l4_check,
        inner_proto,
    })
}

impl Packet {
    /// The flow key of this packet as it arrived.
    #[inline(always)]
    pub fn key(&self) -> FlowKey {
        let ports = unsafe { *self.ports };
        FlowKey {
            src: read_addr(self.l3, self.family, End::Src),
            dst: read_addr(self.l3, self.family, End::Dst),
            sport: ports[0],
            dport: ports[1],
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }

    #[inline(always)]
    pub fn has(&self, flag: u8) -> bool {
        self.tcp_flags & flag != 0
    }
}
