//! Bounded header access and parsing. Every read is checked against `data_end` first.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use bg_common::{FlowKey, Reason, VipAddr, FAMILY_V4, PROTO_TCP, PROTO_UDP};
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

/// Parses Ethernet / IPv4 / TCP-or-UDP. `Err` carries the final reason: a pass (not ours, left
/// untouched) or, only for packets addressed to a VIP, a drop (the VIP check comes first).
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Reason> {
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
    if proto != PROTO_TCP && proto != PROTO_UDP {
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
    if proto == PROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, l4).ok_or_else(truncated)?;
        Ok(Packet {
            eth,
            ip,
            ports: tcp as *mut [u16; 2],
            l4_check: unsafe { core::ptr::addr_of_mut!((*tcp).check) } as *mut u16,
            proto,
            tcp_flags: unsafe { *(tcp as *const u8).add(13) },
        })
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, l4).ok_or_else(truncated)?;
        Ok(Packet {
            eth,
            ip,
            ports: udp as *mut [u16; 2],
            l4_check: unsafe { core::ptr::addr_of_mut!((*udp).check) } as *mut u16,
            proto,
            tcp_flags: 0,
        })
    }
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
