//! Address, port, TTL/hop limit and checksum rewrite (incremental, RFC 1624).

use bg_common::{csum, FAMILY_V4, PROTO_UDP};

use crate::parse::{addr_ptr, End, IcmpError, Packet};

/// Carries an address change into a checksum that covers it (1 word for IPv4, 4 for IPv6).
#[inline(always)]
fn fold_addr(mut check: u16, family: u8, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    check = csum::replace4(check, old[0], new[0]);
    if family != FAMILY_V4 {
        check = csum::replace4(check, old[1], new[1]);
        check = csum::replace4(check, old[2], new[2]);
        check = csum::replace4(check, old[3], new[3]);
    }
    check
}

/// Writes an address into an IP header; fixes the IPv4 header checksum. Returns the old one.
/// IPv6 has no header checksum; the caller carries the change into the L4/ICMPv6 checksum.
#[inline(always)]
pub fn write_addr(l3: *mut u8, family: u8, end: End, addr: &[u32; 4]) -> [u32; 4] {
    let p = addr_ptr(l3, family, end) as *mut u32;
    unsafe {
        if family == FAMILY_V4 {
            let old = p.read_unaligned();
            p.write_unaligned(addr[0]);
            let check = l3.add(10) as *mut u16;
            check.write_unaligned(csum::replace4(check.read_unaligned(), old, addr[0]));
            [old, 0, 0, 0]
        } else {
            let old = [
                p.read_unaligned(),
                p.add(1).read_unaligned(),
                p.add(2).read_unaligned(),
                p.add(3).read_unaligned(),
            ];
            p.write_unaligned(addr[0]);
            p.add(1).write_unaligned(addr[1]);
            p.add(2).write_unaligned(addr[2]);
            p.add(3).write_unaligned(addr[3]);
            old
        }
    }
}

/// Updates an L4 checksum for an address and port change. A UDP checksum of 0 ("none", IPv4)
/// stays 0; a computed 0 is sent as 0xffff (RFC 768).
#[inline(always)]
fn fix_l4(check: *mut u16, proto: u8, family: u8, old_addr: &[u32; 4], addr: &[u32; 4], old_port: u16, port: u16) -> Option<(u16, u16)> {
    let old = unsafe { check.read_unaligned() };
    if proto == PROTO_UDP && old == 0 {
        return None;
    }
    let mut new = fold_addr(old, family, old_addr, addr);
    new = csum::replace2(new, old_port, port);
    if proto == PROTO_UDP && new == 0 {
        new = 0xffff;
    }
    unsafe { check.write_unaligned(new) };
    Some((old, new))
}

/// Rewrites one end's address and port and fixes the IP and L4 checksums.
#[inline(always)]
pub fn rewrite(pkt: &Packet, end: End, addr: &[u32; 4], port: u16) {
    let old_addr = write_addr(pkt.l3, pkt.family, end, addr);
    let ports = unsafe { &mut *pkt.ports };
    let i = match end {
        End::Src => 0,
        End::Dst => 1,
    };
    let old_port = ports[i];
    ports[i] = port;
    fix_l4(pkt.l4_check, pkt.proto, pkt.family, &old_addr, addr, old_port, port);
}

/// Rewrites one end of the packet quoted inside an ICMP error (address, port, its IPv4 header
/// checksum and, when quoted, its L4 checksum) and carries every changed word into the ICMP
/// checksum, which covers the quote.
#[inline(always)]
pub fn rewrite_quoted(e: &IcmpError, end: End, addr: &[u32; 4], port: u16) {
    unsafe {
        let ip_check = e.inner_l3.add(10) as *mut u16;
        let old_ip_check = if e.family == FAMILY_V4 { ip_check.read_unaligned() } else { 0 };
        let old_addr = write_addr(e.inner_l3, e.family, end, addr);
        let ports = &mut *e.inner_ports;
        let i = match end {
            End::Src => 0,
            End::Dst => 1,
        };
        let old_port = ports[i];
        ports[i] = port;

        let mut icmp = e.icmp_check.read_unaligned();
        icmp = fold_addr(icmp, e.family, &old_addr, addr);
        if e.family == FAMILY_V4 {
            icmp = csum::replace2(icmp, old_ip_check, ip_check.read_unaligned());
        }
        icmp = csum::replace2(icmp, old_port, port);
        if !e.inner_l4_check.is_null() {
            if let Some((old, new)) = fix_l4(e.inner_l4_check, e.inner_proto, e.family, &old_addr, addr, old_port, port) {
                icmp = csum::replace2(icmp, old, new);
            }
        }
        e.icmp_check.write_unaligned(icmp);
    }
}

/// Rewrites an address of the ICMP error's outer header. ICMPv6's checksum covers the outer
/// addresses (pseudo header), ICMPv4's does not.
#[inline(always)]
pub fn rewrite_icmp_outer(e: &IcmpError, end: End, addr: &[u32; 4]) {
    let old = write_addr(e.l3, e.family, end, addr);
    if e.family != FAMILY_V4 {
        unsafe {
            let icmp = e.icmp_check.read_unaligned();
            e.icmp_check.write_unaligned(fold_addr(icmp, e.family, &old, addr));
        }
    }
}

/// Decrements the TTL (IPv4, fixing the checksum) or hop limit (IPv6) as a router does; the
/// caller checked it is above 1.
#[inline(always)]
pub fn decrement_ttl(l3: *mut u8, family: u8) {
    unsafe {
        if family == FAMILY_V4 {
            // TTL and protocol form one 16-bit word of the header.
            let word = l3.add(8) as *mut u16;
            let old = word.read_unaligned();
            *l3.add(8) -= 1;
            let check = l3.add(10) as *mut u16;
            check.write_unaligned(csum::replace2(check.read_unaligned(), old, word.read_unaligned()));
        } else {
            *l3.add(7) -= 1;
        }
    }
}
