//! Address, port, TTL and checksum rewrite (incremental, RFC 1624).

use bg_common::{csum, PROTO_UDP};
use network_types::ip::Ipv4Hdr;

use crate::parse::{IcmpError, Packet};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    Src,
    Dst,
}

/// Rewrites one end's IPv4 address and port and fixes the IP and L4 checksums.
#[inline(always)]
pub fn rewrite(pkt: &Packet, end: End, addr: u32, port: u16) {
    unsafe {
        let ip = &mut *pkt.ip;
        let field = match end {
            End::Src => &mut ip.src_addr,
            End::Dst => &mut ip.dst_addr,
        };
        let old_addr = u32::from_ne_bytes(*field);
        *field = addr.to_ne_bytes();
        let check = u16::from_ne_bytes(ip.check);
        ip.check = csum::replace4(check, old_addr, addr).to_ne_bytes();

        let ports = &mut *pkt.ports;
        let i = match end {
            End::Src => 0,
            End::Dst => 1,
        };
        let old_port = ports[i];
        ports[i] = port;

        // The L4 checksum covers the pseudo header (addresses) and the ports. UDP over IPv4 may
        // carry 0, "no checksum": it stays 0; a computed 0 is sent as 0xffff (RFC 768).
        let l4 = pkt.l4_check;
        let old = l4.read_unaligned();
        if pkt.proto == PROTO_UDP && old == 0 {
            return;
        }
        let mut new = csum::replace4(old, old_addr, addr);
        new = csum::replace2(new, old_port, port);
        if pkt.proto == PROTO_UDP && new == 0 {
            new = 0xffff;
        }
        l4.write_unaligned(new);
    }
}

/// Rewrites one address of an IPv4 header and fixes its checksum; returns the old address.
#[inline(always)]
pub fn rewrite_ip_addr(ip: *mut Ipv4Hdr, end: End, addr: u32) -> u32 {
    unsafe {
        let ip = &mut *ip;
        let field = match end {
            End::Src => &mut ip.src_addr,
            End::Dst => &mut ip.dst_addr,
        };
        let old = u32::from_ne_bytes(*field);
        *field = addr.to_ne_bytes();
        ip.check = csum::replace4(u16::from_ne_bytes(ip.check), old, addr).to_ne_bytes();
        old
    }
}

/// Rewrites one end of the packet quoted inside an ICMP error (address, port, its IP header
/// checksum and, when quoted, its L4 checksum) and carries every changed word into the ICMP
/// checksum, which covers the quote.
#[inline(always)]
pub fn rewrite_quoted(e: &IcmpError, end: End, addr: u32, port: u16) {
    unsafe {
        let ip = &mut *e.inner_ip;
        let old_ip_check = u16::from_ne_bytes(ip.check);
        let old_addr = rewrite_ip_addr(e.inner_ip, end, addr);
        let new_ip_check = u16::from_ne_bytes(ip.check);
        let ports = &mut *e.inner_ports;
        let i = match end {
            End::Src => 0,
            End::Dst => 1,
        };
        let old_port = ports[i];
        ports[i] = port;

        let mut icmp = e.icmp_check.read_unaligned();
        icmp = csum::replace4(icmp, old_addr, addr);
        icmp = csum::replace2(icmp, old_ip_check, new_ip_check);
        icmp = csum::replace2(icmp, old_port, port);
        let l4 = e.inner_l4_check;
        if !l4.is_null() {
            let old = l4.read_unaligned();
            if !(e.inner_proto == PROTO_UDP && old == 0) {
                let mut new = csum::replace4(old, old_addr, addr);
                new = csum::replace2(new, old_port, port);
                if e.inner_proto == PROTO_UDP && new == 0 {
                    new = 0xffff;
                }
                l4.write_unaligned(new);
                icmp = csum::replace2(icmp, old, new);
            }
        }
        e.icmp_check.write_unaligned(icmp);
    }
}

/// Decrements the TTL as a router does (the caller checked TTL > 1) and fixes the checksum.
#[inline(always)]
pub fn decrement_ttl(ip: *mut Ipv4Hdr) {
    unsafe {
        let ip = &mut *ip;
        // TTL and protocol form one 16-bit word of the header.
        let old = u16::from_ne_bytes([ip.ttl, ip.proto as u8]);
        ip.ttl -= 1;
        let new = u16::from_ne_bytes([ip.ttl, ip.proto as u8]);
        ip.check = csum::replace2(u16::from_ne_bytes(ip.check), old, new).to_ne_bytes();
    }
}
