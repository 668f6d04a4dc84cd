//! Bounded header access and parsing. Every read is checked against `data_end` first.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use bg_common::{FlowKey, Reason, FAMILY_V4, PROTO_TCP, PROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

/// A pointer to a `T` at `offset`, if the whole `T` lies inside the packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Reason> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(Reason::PassTruncated);
    }
    Ok((start + offset) as *mut T)
}

/// The parts of a TCP/UDP over IPv4 packet the program reads and rewrites.
pub struct Packet {
    pub ip: *mut Ipv4Hdr,
    /// Source and destination port, raw (network order), as the first 4 bytes of TCP and UDP.
    pub ports: *mut [u16; 2],
    /// The L4 checksum field.
    pub l4_check: *mut u16,
    pub proto: u8,
}

const ETH_P_IPV4_RAW: u16 = 0x0800u16.to_be();
/// Version 4, IHL 5 (no options).
const VIHL_PLAIN: u8 = 0x45;
/// More-fragments flag and fragment offset, raw.
const IP_MF_OFFSET_RAW: u16 = 0x3fffu16.to_be();

/// Parses Ethernet / IPv4 / TCP-or-UDP. `Err` carries why the packet is not ours to rewrite;
/// all of those are passed untouched.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    if unsafe { (*eth).ether_type } != ETH_P_IPV4_RAW {
        return Err(Reason::PassNotIpv4);
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN)?;
    let vihl = unsafe { (*ip).vihl };
    if vihl >> 4 != 4 {
        return Err(Reason::PassNotIpv4);
    }
    if vihl != VIHL_PLAIN {
        return Err(Reason::PassIpOptions);
    }
    let proto = unsafe { (*ip).proto } as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Reason::PassNotL4);
    }
    if u16::from_ne_bytes(unsafe { (*ip).frags }) & IP_MF_OFFSET_RAW != 0 {
        return Err(Reason::PassFragment);
    }
    let l4 = EthHdr::LEN + Ipv4Hdr::LEN;
    if proto == PROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, l4)?;
        Ok(Packet {
            ip,
            ports: tcp as *mut [u16; 2],
            l4_check: unsafe { core::ptr::addr_of_mut!((*tcp).check) } as *mut u16,
            proto,
        })
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, l4)?;
        Ok(Packet {
            ip,
            ports: udp as *mut [u16; 2],
            l4_check: unsafe { core::ptr::addr_of_mut!((*udp).check) } as *mut u16,
            proto,
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
}
