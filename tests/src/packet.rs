//! A packet builder that fills lengths and checksums (Katran's `PacketBuilder` idea), and a
//! parser that checks them from scratch.

use std::net::{Ipv4Addr, SocketAddrV4};

use bg_common::csum::{checksum, l4_checksum_v4};

pub const ETH_LEN: usize = 14;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_LEN + payload.len());
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    h[6] = 0x40; // DF
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_ne_bytes());
    h.extend_from_slice(l4);
    h
}

/// Ethernet + IPv4 + TCP (20-byte header, no options) with `flags` and `payload`.
pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&src.port().to_be_bytes());
    t[2..4].copy_from_slice(&dst.port().to_be_bytes());
    t[4..8].copy_from_slice(&0x0102_0304u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t.extend_from_slice(payload);
    let c = l4_checksum_v4(src.ip().octets(), dst.ip().octets(), 6, &t);
    t[16..18].copy_from_slice(&c.to_ne_bytes());
    ethernet(0x0800, &ipv4(*src.ip(), *dst.ip(), 6, &t))
}

/// Ethernet + IPv4 + UDP with `payload`.
pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&src.port().to_be_bytes());
    u[2..4].copy_from_slice(&dst.port().to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(payload);
    let mut c = l4_checksum_v4(src.ip().octets(), dst.ip().octets(), 17, &u);
    if c == 0 {
        c = 0xffff;
    }
    u[6..8].copy_from_slice(&c.to_ne_bytes());
    ethernet(0x0800, &ipv4(*src.ip(), *dst.ip(), 17, &u))
}

/// An ARP request.
pub fn arp(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&CLIENT_MAC);
    a.extend_from_slice(&sender.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    ethernet(0x0806, &a)
}

/// Ethernet + IPv6 + TCP SYN (checksum not needed: the program must not touch it).
pub fn ipv6_tcp_syn() -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
    p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&80u16.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = TCP_SYN;
    p.extend_from_slice(&t);
    ethernet(0x86dd, &p)
}

/// What a parsed IPv4 TCP/UDP frame says, with its checksums verified from scratch.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
    pub ip_checksum_ok: bool,
    pub l4_checksum_ok: bool,
    pub payload: Vec<u8>,
}

/// Parses Ethernet + IPv4 (no options) + TCP/UDP and recomputes both checksums.
pub fn parse_v4(frame: &[u8]) -> Parsed {
    assert!(frame.len() >= ETH_LEN + 20, "frame too short: {} bytes", frame.len());
    assert_eq!(&frame[12..14], &[0x08, 0x00], "not IPv4");
    let ip = &frame[ETH_LEN..];
    assert_eq!(ip[0], 0x45, "IPv4 with options");
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let ip = &ip[..total];
    let proto = ip[9];
    let src_ip = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst_ip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &ip[20..];
    let ports = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    let (check_at, hdr_len) = match proto {
        6 => (16, ((l4[12] >> 4) as usize) * 4),
        17 => (6, 8),
        p => panic!("unexpected protocol {p}"),
    };
    let mut zeroed = l4.to_vec();
    zeroed[check_at] = 0;
    zeroed[check_at + 1] = 0;
    let stored = u16::from_ne_bytes([l4[check_at], l4[check_at + 1]]);
    let mut computed = l4_checksum_v4(src_ip.octets(), dst_ip.octets(), proto, &zeroed);
    if proto == 17 && computed == 0 {
        computed = 0xffff;
    }
    Parsed {
        src: SocketAddrV4::new(src_ip, ports(0)),
        dst: SocketAddrV4::new(dst_ip, ports(2)),
        proto,
        ip_checksum_ok: checksum(&ip[..20]) == 0,
        l4_checksum_ok: stored == computed || (proto == 17 && stored == 0),
        payload: l4[hdr_len..].to_vec(),
    }
}
