//! Address, port, TTL and checksum rewrite (incremental, RFC 1624).

use bg_common::{csum, PROTO_UDP};

use crate::parse::Packet;

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

/// Decrements the TTL as a router does (the caller checked TTL > 1) and fixes the checksum.
#[inline(always)]
pub fn decrement_ttl(pkt: &Packet) {
    unsafe {
        let ip = &mut *pkt.ip;
        // TTL and protocol form one 16-bit word of the header.
        let old = u16::from_ne_bytes([ip.ttl, ip.proto as u8]);
        ip.ttl -= 1;
        let new = u16::from_ne_bytes([ip.ttl, ip.proto as u8]);
        ip.check = csum::replace2(u16::from_ne_bytes(ip.check), old, new).to_ne_bytes();
    }
}
