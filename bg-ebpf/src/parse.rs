//! Bounded header access and parsing. Every read is checked against `data_end` first.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use bg_common::{FlowKey, Reason, VipAddr, FAMILY_V4, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

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

/// The parts of a TCP/UDP over IPv4 packet the program reads and rewrites.
pub struct Packet {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    /// Source and destination port, raw (network order), as the first 4 bytes of TCP and UDP.
    pub ports: *mut [u16; 2],
    /// The L4 checksum field.
    pub l4_check: *mut u16,
    pub proto: u8,
    /// TCP flags byte (CWR..FIN); 0 for UDP.
    pub tcp_flags: u8,
}

/// An ICMP error whose quoted packet belongs to a VIP flow candidate.
pub struct IcmpError {
    pub eth: *mut EthHdr,
    /// The outer header.
    pub ip: *mut Ipv4Hdr,
    /// The ICMP checksum (covers the ICMP header and the quoted bytes).
    pub icmp_check: *mut u16,
    /// The quoted IPv4 header (no options).
    pub inner_ip: *mut Ipv4Hdr,
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
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const ETH_P_8021AD: u16 = 0x88a8u16.to_be();
/// More-fragments flag and fragment offset, raw.
const IP_MF_OFFSET: u16 = 0x3fffu16.to_be();

/// Whether `addr` (raw IPv4) is one of the VIPs, whatever the port.
#[inline(always)]
fn is_vip_v4(addr: u32) -> bool {
    let key = VipAddr { addr: [addr, 0, 0, 0], family: FAMILY_V4 as u32 };
    unsafe { BG_VIP_ADDRS_V1.get(&key) }.is_some()
}

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROB: u8 = 12;

/// Parses Ethernet / IPv4 / TCP, UDP or ICMP error. `Err` carries the final reason: a pass (not
/// ours, left untouched) or, only for packets addressed to a VIP, a drop (the VIP check comes
/// first).
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Parsed, Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassTruncated)?;
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        return Err(Reason::PassVlan);
    }
    if ether_type != ETH_P_IPV4 {
        return Err(Reason::PassNotIp);
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(Reason::PassTruncated)?;
    let dst = u32::from_ne_bytes(unsafe { (*ip).dst_addr });
    // Only a packet addressed to a VIP is ever dropped; anything else is the kernel's to judge.
    let bad = |pass: Reason, drop: Reason| if is_vip_v4(dst) { drop } else { pass };

    let vihl = unsafe { (*ip).vihl };
    let ihl = (vihl & 0x0f) as usize;
    if vihl >> 4 != 4 || ihl < 5 {
        return Err(bad(Reason::PassMalformed, Reason::DropMalformed));
    }
    let proto = unsafe { (*ip).proto } as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_ICMP {
        return Err(Reason::PassNotL4);
    }
    if u16::from_ne_bytes(unsafe { (*ip).frags }) & IP_MF_OFFSET != 0 {
        return Err(bad(Reason::PassFragment, Reason::DropFragment));
    }
    if unsafe { (*ip).ttl } <= 1 {
        return Err(Reason::PassTtlExpired);
    }
    // IPv4 options are skipped: the L4 header starts at IHL * 4 (20..=60 bytes).
    let l4 = EthHdr::LEN + ihl * 4;
    let truncated = || bad(Reason::PassTruncated, Reason::DropMalformed);
    if proto == PROTO_ICMP {
        return parse_icmp_error(ctx, eth, ip, l4).map(Parsed::Icmp);
    }
    if proto == PROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, l4).ok_or_else(truncated)?;
        Ok(Parsed::Flow(Packet {
            eth,
            ip,
            ports: tcp as *mut [u16; 2],
            l4_check: unsafe { core::ptr::addr_of_mut!((*tcp).check) } as *mut u16,
            proto,
            tcp_flags: unsafe { *(tcp as *const u8).add(13) },
        }))
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, l4).ok_or_else(truncated)?;
        Ok(Parsed::Flow(Packet {
            eth,
            ip,
            ports: udp as *mut [u16; 2],
            l4_check: unsafe { core::ptr::addr_of_mut!((*udp).check) } as *mut u16,
            proto,
            tcp_flags: 0,
        }))
    }
}

/// An ICMP error (unreachable incl. "fragmentation needed", time exceeded, parameter problem)
/// quoting an IPv4 TCP/UDP header and at least 8 bytes of its L4 header (RFC 792's minimum).
/// Anything else is not ours.
#[inline(always)]
fn parse_icmp_error(ctx: &XdpContext, eth: *mut EthHdr, ip: *mut Ipv4Hdr, l4: usize) -> Result<IcmpError, Reason> {
    let icmp: *mut [u8; 8] = ptr_at(ctx, l4).ok_or(Reason::PassNotL4)?;
    let ty = unsafe { (*icmp)[0] };
    if ty != ICMP_DEST_UNREACH && ty != ICMP_TIME_EXCEEDED && ty != ICMP_PARAMETER_PROB {
        return Err(Reason::PassNotL4);
    }
    let inner_ip: *mut Ipv4Hdr = ptr_at(ctx, l4 + 8).ok_or(Reason::PassNotL4)?;
    let inner_proto = unsafe { (*inner_ip).proto } as u8;
    if unsafe { (*inner_ip).vihl } != 0x45 || (inner_proto != PROTO_TCP && inner_proto != PROTO_UDP) {
        return Err(Reason::PassNotL4);
    }
    let inner_l4 = l4 + 8 + Ipv4Hdr::LEN;
    let inner_ports: *mut [u16; 4] = ptr_at(ctx, inner_l4).ok_or(Reason::PassNotL4)?;
    let check_at = if inner_proto == PROTO_TCP { 16 } else { 6 };
    let inner_l4_check = ptr_at::<u16>(ctx, inner_l4 + check_at).unwrap_or(core::ptr::null_mut());
    Ok(IcmpError {
        eth,
        ip,
        icmp_check: unsafe { (icmp as *mut u8).add(2) } as *mut u16,
        inner_ip,
        inner_ports: inner_ports as *mut [u16; 2],
        inner_l4_check,
        inner_proto,
    })
}

impl Packet {
    /// The flow key of this packet as it arrived.
    #[inline(always)]
    pub fn key(&self) -> FlowKey {
        let (src, dst, ports) = unsafe {
            (
                u32::from_ne_bytes((*self.ip).src_addr),
                u32::from_ne_bytes((*self.ip).dst_addr),
                *self.ports,
            )
        };
        FlowKey {
            src: [src, 0, 0, 0],
            dst: [dst, 0, 0, 0],
            sport: ports[0],
            dport: ports[1],
            proto: self.proto,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }

    #[inline(always)]
    pub fn has(&self, flag: u8) -> bool {
        self.tcp_flags & flag != 0
    }
}
