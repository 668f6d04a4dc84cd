//! A packet builder that fills lengths and checksums (Katran's `PacketBuilder` idea), and a
//! parser that checks them from scratch.

use std::net::{Ipv4Addr, SocketAddrV4};

use bg_common::csum::{checksum, l4_checksum_v4};

pub const ETH_LEN: usize = 14;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// An IPv4 TCP/UDP frame to build. Defaults: TTL 64, DF set, no options, no VLAN tag.
#[derive(Clone, Debug)]
pub struct Pkt {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    pub ttl: u8,
    /// IPv4 options (padded to a multiple of 4 bytes).
    pub options: Vec<u8>,
    /// Overrides the IHL nibble (for malformed headers).
    pub ihl: Option<u8>,
    /// Fragment offset in 8-byte units; non-zero fragments carry `payload` only (no L4 header).
    pub frag_offset: u16,
    pub more_fragments: bool,
    /// A VLAN tag: (TPID, VLAN id); 0x8100 is 802.1Q, 0x88a8 is 802.1ad (the outer tag of
    /// QinQ).
    pub vlan: Option<(u16, u16)>,
    /// UDP: send checksum 0 ("none").
    pub udp_no_checksum: bool,
    /// Overrides the IP version nibble (for malformed headers).
    pub version: Option<u8>,
    /// Clears "don't fragment" (set by default on unfragmented packets).
    pub no_df: bool,
    /// TCP sequence and acknowledgment numbers.
    pub seq: u32,
    pub ack: u32,
}

impl Pkt {
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Pkt {
        Pkt {
            src,
            dst,
            proto: 6,
            tcp_flags: flags,
            payload: Vec::new(),
            ttl: 64,
            options: Vec::new(),
            ihl: None,
            frag_offset: 0,
            more_fragments: false,
            vlan: None,
            udp_no_checksum: false,
            version: None,
            no_df: false,
            seq: DEFAULT_SEQ,
            ack: 0,
        }
    }

    pub fn no_df(mut self) -> Pkt {
        self.no_df = true;
        self
    }

    pub fn seq(mut self, seq: u32) -> Pkt {
        self.seq = seq;
        self
    }

    pub fn ack(mut self, ack: u32) -> Pkt {
        self.ack = ack;
        self
    }

    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Pkt {
        Pkt { proto: 17, ..Pkt::tcp(src, dst, 0) }
    }

    pub fn payload(mut self, p: &[u8]) -> Pkt {
        self.payload = p.to_vec();
        self
    }

    pub fn ttl(mut self, ttl: u8) -> Pkt {
        self.ttl = ttl;
        self
    }

    pub fn options(mut self, o: &[u8]) -> Pkt {
        self.options = o.to_vec();
        self
    }

    pub fn ihl(mut self, ihl: u8) -> Pkt {
        self.ihl = Some(ihl);
        self
    }

    pub fn fragment(mut self, offset: u16, more: bool) -> Pkt {
        self.frag_offset = offset;
        self.more_fragments = more;
        self
    }

    /// An 802.1Q tag.
    pub fn vlan(mut self, id: u16) -> Pkt {
        self.vlan = Some((0x8100, id));
        self
    }

    /// An 802.1ad (service) tag.
    pub fn vlan_ad(mut self, id: u16) -> Pkt {
        self.vlan = Some((0x88a8, id));
        self
    }

    pub fn version(mut self, v: u8) -> Pkt {
        self.version = Some(v);
        self
    }

    pub fn no_udp_checksum(mut self) -> Pkt {
        self.udp_no_checksum = true;
        self
    }

    /// The L4 segment (header + payload) with its checksum.
    fn l4(&self) -> Vec<u8> {
        let (mut l4, check_at) = segment(self.proto, self.tcp_flags, self.src.port(), self.dst.port(), self.seq, self.ack, &self.payload);
        if !(self.proto == 17 && self.udp_no_checksum) {
            let mut c = l4_checksum_v4(self.src.ip().octets(), self.dst.ip().octets(), self.proto, &l4);
            if self.proto == 17 && c == 0 {
                c = 0xffff;
            }
            l4[check_at..check_at + 2].copy_from_slice(&c.to_ne_bytes());
        }
        l4
    }

    pub fn build(&self) -> Vec<u8> {
        let body = if self.frag_offset == 0 { self.l4() } else { self.payload.clone() };
        let mut opts = self.options.clone();
        while !opts.len().is_multiple_of(4) {
            opts.push(0);
        }
        let hlen = 20 + opts.len();
        let mut h = vec![0u8; 20];
        h[0] = self.version.unwrap_or(4) << 4 | self.ihl.unwrap_or((hlen / 4) as u8);
        h[2..4].copy_from_slice(&((hlen + body.len()) as u16).to_be_bytes());
        h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        let mut frag = self.frag_offset & 0x1fff;
        if self.more_fragments {
            frag |= 0x2000;
        } else if self.frag_offset == 0 && !self.no_df {
            frag |= 0x4000; // DF on unfragmented packets
        }
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        h[8] = self.ttl;
        h[9] = self.proto;
        h[12..16].copy_from_slice(&self.src.ip().octets());
        h[16..20].copy_from_slice(&self.dst.ip().octets());
        h.extend_from_slice(&opts);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_ne_bytes());
        h.extend_from_slice(&body);
        ethernet(0x0800, self.vlan, &h)
    }
}

/// A TCP (20-byte header) or UDP segment without its checksum; returns it and where the
/// checksum goes.
/// The sequence number every built TCP segment carries unless `seq` says otherwise.
pub const DEFAULT_SEQ: u32 = 0x0102_0304;

#[allow(clippy::too_many_arguments)]
fn segment(proto: u8, tcp_flags: u8, sport: u16, dport: u16, seq: u32, ack: u32, payload: &[u8]) -> (Vec<u8>, usize) {
    let mut l4 = if proto == 6 {
        let mut t = vec![0u8; 20];
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&ack.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = tcp_flags;
        t[14..16].copy_from_slice(&64240u16.to_be_bytes());
        t
    } else {
        let mut u = vec![0u8; 8];
        u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u
    };
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(payload);
    (l4, if proto == 6 { 16 } else { 6 })
}

pub fn ethernet(ethertype: u16, vlan: Option<(u16, u16)>, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_LEN + 4 + payload.len());
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    if let Some((tpid, id)) = vlan {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Ethernet + IPv4 + TCP (20-byte header, no options) with `flags` and `payload`.
pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, payload: &[u8]) -> Vec<u8> {
    Pkt::tcp(src, dst, flags).payload(payload).build()
}

/// Ethernet + IPv4 + UDP with `payload`.
pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    Pkt::udp(src, dst).payload(payload).build()
}

/// An ARP request.
pub fn arp(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&CLIENT_MAC);
    a.extend_from_slice(&sender.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    ethernet(0x0806, None, &a)
}

/// Ethernet + IPv6 + TCP SYN (checksum not filled: the program must not touch it).
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
    ethernet(0x86dd, None, &p)
}

/// What a parsed IPv4 TCP/UDP frame says, with its checksums verified from scratch.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
    pub ttl: u8,
    pub ip_checksum_ok: bool,
    pub l4_checksum_ok: bool,
    /// The L4 checksum field as sent (raw).
    pub l4_checksum: u16,
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
}

/// Parses Ethernet + IPv4 + TCP/UDP and recomputes both checksums.
pub fn parse_v4(frame: &[u8]) -> Parsed {
    assert!(frame.len() >= ETH_LEN + 20, "frame too short: {} bytes", frame.len());
    assert_eq!(&frame[12..14], &[0x08, 0x00], "not IPv4");
    let ip = &frame[ETH_LEN..];
    let hlen = ((ip[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let ip = &ip[..total];
    let proto = ip[9];
    let src_ip = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst_ip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &ip[hlen..];
    let ports = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    let (check_at, l4_hlen) = match proto {
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
        ttl: ip[8],
        ip_checksum_ok: checksum(&ip[..hlen]) == 0,
        // Strict: a UDP checksum of 0 ("none") does not verify here; a caller that sent 0
        // checks for 0 itself (see `l4_checksum`).
        l4_checksum_ok: stored == computed,
        l4_checksum: stored,
        options: ip[20..hlen].to_vec(),
        payload: l4[l4_hlen..].to_vec(),
        eth_dst: frame[0..6].try_into().unwrap(),
        eth_src: frame[6..12].try_into().unwrap(),
    }
}

/// An ICMPv4 error from `from` to `to` quoting the IP header and the first `quote_l4` bytes of
/// the L4 part of `quoted` (an Ethernet frame, e.g. from [`Pkt::build`]); `rest` is the second
/// word of the ICMP header (the next-hop MTU for "fragmentation needed").
pub fn icmp_error(from: Ipv4Addr, to: Ipv4Addr, ty: u8, code: u8, rest: u32, quoted: &[u8], quote_l4: usize) -> Vec<u8> {
    let inner = &quoted[ETH_LEN..];
    let ihl = ((inner[0] & 0x0f) as usize) * 4;
    let quote = &inner[..(ihl + quote_l4).min(inner.len())];
    let mut icmp = vec![ty, code, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(quote);
    icmp_frame(from, to, icmp)
}

/// An IPv4 frame carrying the ICMP message `icmp` (its checksum is filled here).
fn icmp_frame(from: Ipv4Addr, to: Ipv4Addr, mut icmp: Vec<u8>) -> Vec<u8> {
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_ne_bytes());
    let mut h = vec![0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    h[8] = 64;
    h[9] = 1;
    h[12..16].copy_from_slice(&from.octets());
    h[16..20].copy_from_slice(&to.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_ne_bytes());
    h.extend_from_slice(&icmp);
    ethernet(0x0800, None, &h)
}

/// An ICMP echo request.
pub fn icmp_echo(from: Ipv4Addr, to: Ipv4Addr) -> Vec<u8> {
    icmp_frame(from, to, vec![8, 0, 0, 0, 0, 1, 0, 1, b'p', b'i', b'n', b'g'])
}

/// An ICMPv4 error as parsed back, every checksum recomputed.
#[derive(Debug)]
pub struct ParsedIcmp {
    pub outer_src: Ipv4Addr,
    pub outer_dst: Ipv4Addr,
    pub ty: u8,
    pub code: u8,
    pub rest: u32,
    pub outer_ip_ok: bool,
    pub icmp_ok: bool,
    pub inner_src: SocketAddrV4,
    pub inner_dst: SocketAddrV4,
    pub inner_ip_ok: bool,
    /// For a quote holding a whole UDP datagram: whether its checksum verifies (strictly: 0
    /// does not).
    pub inner_udp_ok: Option<bool>,
}

pub fn parse_icmp(frame: &[u8]) -> ParsedIcmp {
    let ip = &frame[ETH_LEN..];
    assert_eq!((ip[0], ip[9]), (0x45, 1), "outer IPv4 without options carrying ICMP");
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let icmp = &ip[20..total];
    let inner = &icmp[8..];
    let inner_src_ip = Ipv4Addr::new(inner[12], inner[13], inner[14], inner[15]);
    let inner_dst_ip = Ipv4Addr::new(inner[16], inner[17], inner[18], inner[19]);
    let l4 = &inner[20..];
    let port = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    let inner_udp_ok = (inner[9] == 17 && u16::from_be_bytes([l4[4], l4[5]]) as usize == l4.len()).then(|| {
        let mut seg = l4.to_vec();
        let stored = u16::from_ne_bytes([seg[6], seg[7]]);
        seg[6] = 0;
        seg[7] = 0;
        let mut c = l4_checksum_v4(inner_src_ip.octets(), inner_dst_ip.octets(), 17, &seg);
        if c == 0 {
            c = 0xffff;
        }
        stored == c
    });
    ParsedIcmp {
        outer_src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        outer_dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        ty: icmp[0],
        code: icmp[1],
        rest: u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
        outer_ip_ok: checksum(&ip[..20]) == 0,
        icmp_ok: checksum(icmp) == 0,
        inner_src: SocketAddrV4::new(inner_src_ip, port(0)),
        inner_dst: SocketAddrV4::new(inner_dst_ip, port(2)),
        inner_ip_ok: checksum(&inner[..20]) == 0,
        inner_udp_ok,
    }
}

/// An IPv6 TCP/UDP frame to build, with optional extension headers before the L4 header.
#[derive(Clone, Debug)]
pub struct Pkt6 {
    pub src: std::net::SocketAddrV6,
    pub dst: std::net::SocketAddrV6,
    pub proto: u8,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    pub hop_limit: u8,
    /// (next-header number of this extension header, its 8-byte-multiple body incl. the
    /// 2 bytes next-header/length that the builder fills, the bytes after those two).
    pub ext: Vec<(u8, usize, Vec<u8>)>,
    /// Overrides the IP version nibble (for malformed headers).
    pub version: u8,
    /// TCP sequence and acknowledgment numbers.
    pub seq: u32,
    pub ack: u32,
}

use std::net::{Ipv6Addr, SocketAddrV6};

use bg_common::csum::l4_checksum_v6;

impl Pkt6 {
    pub fn tcp(src: SocketAddrV6, dst: SocketAddrV6, flags: u8) -> Pkt6 {
        Pkt6 { src, dst, proto: 6, tcp_flags: flags, payload: Vec::new(), hop_limit: 64, ext: Vec::new(), version: 6, seq: DEFAULT_SEQ, ack: 0 }
    }
    pub fn seq(mut self, seq: u32) -> Pkt6 {
        self.seq = seq;
        self
    }
    pub fn ack(mut self, ack: u32) -> Pkt6 {
        self.ack = ack;
        self
    }
    pub fn udp(src: SocketAddrV6, dst: SocketAddrV6) -> Pkt6 {
        Pkt6 { proto: 17, ..Pkt6::tcp(src, dst, 0) }
    }
    pub fn payload(mut self, p: &[u8]) -> Pkt6 {
        self.payload = p.to_vec();
        self
    }
    pub fn hop_limit(mut self, h: u8) -> Pkt6 {
        self.hop_limit = h;
        self
    }
    /// Adds an extension header of `kind` (0 hop-by-hop, 43 routing, 60 destination options,
    /// 44 fragment) and `len` bytes (a multiple of 8).
    pub fn ext(mut self, kind: u8, len: usize) -> Pkt6 {
        self.ext.push((kind, len, Vec::new()));
        self
    }

    /// A routing header (type 4, segment routing) listing `segments` with `segments_left`;
    /// per RFC 8200 the L4 checksum then covers the final destination (`segments[0]`, the
    /// last one visited), not the IPv6 destination.
    pub fn routing(mut self, segments: &[Ipv6Addr], segments_left: u8) -> Pkt6 {
        let mut body = vec![4, segments_left, segments.len().saturating_sub(1) as u8, 0, 0, 0];
        for s in segments {
            body.extend_from_slice(&s.octets());
        }
        self.ext.push((43, 8 + 16 * segments.len(), body));
        self
    }

    pub fn version(mut self, v: u8) -> Pkt6 {
        self.version = v;
        self
    }

    /// The address the L4 checksum covers: the final destination of a routing header with
    /// segments left, else the IPv6 destination.
    fn final_destination(&self) -> Ipv6Addr {
        for (kind, _, body) in &self.ext {
            if *kind == 43 && body.len() >= 22 && body[1] > 0 {
                return Ipv6Addr::from(<[u8; 16]>::try_from(&body[6..22]).unwrap());
            }
        }
        *self.dst.ip()
    }

    pub fn build(&self) -> Vec<u8> {
        let (mut l4, at) = segment(self.proto, self.tcp_flags, self.src.port(), self.dst.port(), self.seq, self.ack, &self.payload);
        let mut c = l4_checksum_v6(self.src.ip().octets(), self.final_destination().octets(), self.proto, &l4);
        if self.proto == 17 && c == 0 {
            c = 0xffff;
        }
        l4[at..at + 2].copy_from_slice(&c.to_ne_bytes());
        // Extension headers, chained.
        let mut body = Vec::new();
        let kinds: Vec<u8> = self.ext.iter().map(|e| e.0).chain([self.proto]).collect();
        for (i, (_, len, content)) in self.ext.iter().enumerate() {
            let mut h = vec![0u8; *len];
            h[0] = kinds[i + 1];
            h[1] = (*len / 8 - 1) as u8;
            h[2..2 + content.len()].copy_from_slice(content);
            body.extend_from_slice(&h);
        }
        body.extend_from_slice(&l4);
        let mut ip = vec![self.version << 4, 0, 0, 0];
        ip.extend_from_slice(&(body.len() as u16).to_be_bytes());
        ip.push(kinds[0]);
        ip.push(self.hop_limit);
        ip.extend_from_slice(&self.src.ip().octets());
        ip.extend_from_slice(&self.dst.ip().octets());
        ip.extend_from_slice(&body);
        ethernet(0x86dd, None, &ip)
    }
}

/// What a parsed IPv6 TCP/UDP frame says, with the L4 checksum verified from scratch.
#[derive(Debug)]
pub struct Parsed6 {
    pub src: SocketAddrV6,
    pub dst: SocketAddrV6,
    pub hop_limit: u8,
    pub l4_checksum_ok: bool,
    pub payload: Vec<u8>,
    /// Bytes of extension headers between the IPv6 header and L4.
    pub ext_len: usize,
}

fn v6(b: &[u8]) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap())
}

pub fn parse_v6(frame: &[u8]) -> Parsed6 {
    assert_eq!(&frame[12..14], &[0x86, 0xdd], "not IPv6");
    let ip = &frame[ETH_LEN..];
    let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    let (src, dst) = (v6(&ip[8..24]), v6(&ip[24..40]));
    let mut next = ip[6];
    let mut off = 40;
    while matches!(next, 0 | 43 | 60) {
        next = ip[off];
        off += (ip[off + 1] as usize + 1) * 8;
    }
    let l4 = &ip[off..40 + plen];
    let at = if next == 6 { 16 } else { 6 };
    let stored = u16::from_ne_bytes([l4[at], l4[at + 1]]);
    let mut z = l4.to_vec();
    z[at] = 0;
    z[at + 1] = 0;
    let mut c = l4_checksum_v6(src.octets(), dst.octets(), next, &z);
    if next == 17 && c == 0 {
        c = 0xffff;
    }
    let hlen = if next == 6 { ((l4[12] >> 4) as usize) * 4 } else { 8 };
    let port = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    Parsed6 {
        src: SocketAddrV6::new(src, port(0), 0, 0),
        dst: SocketAddrV6::new(dst, port(2), 0, 0),
        hop_limit: ip[7],
        l4_checksum_ok: stored == c,
        payload: l4[hlen..].to_vec(),
        ext_len: off - 40,
    }
}

/// An ICMPv6 error from `from` to `to` quoting the IPv6 header and the first `quote_l4` bytes of
/// the L4 part of `quoted` (built without extension headers).
pub fn icmp6_error(from: Ipv6Addr, to: Ipv6Addr, ty: u8, code: u8, rest: u32, quoted: &[u8], quote_l4: usize) -> Vec<u8> {
    let inner = &quoted[ETH_LEN..];
    let quote = &inner[..(40 + quote_l4).min(inner.len())];
    let mut icmp = vec![ty, code, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(quote);
    let c = l4_checksum_v6(from.octets(), to.octets(), 58, &icmp);
    icmp[2..4].copy_from_slice(&c.to_ne_bytes());
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    ip.push(58);
    ip.push(64);
    ip.extend_from_slice(&from.octets());
    ip.extend_from_slice(&to.octets());
    ip.extend_from_slice(&icmp);
    ethernet(0x86dd, None, &ip)
}

/// An ICMPv6 echo request.
pub fn icmp6_echo(from: Ipv6Addr, to: Ipv6Addr) -> Vec<u8> {
    let mut icmp = vec![128, 0, 0, 0, 0, 1, 0, 1, b'p', b'i', b'n', b'g'];
    let c = l4_checksum_v6(from.octets(), to.octets(), 58, &icmp);
    icmp[2..4].copy_from_slice(&c.to_ne_bytes());
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    ip.push(58);
    ip.push(64);
    ip.extend_from_slice(&from.octets());
    ip.extend_from_slice(&to.octets());
    ip.extend_from_slice(&icmp);
    ethernet(0x86dd, None, &ip)
}

/// An ICMPv6 error as parsed back, its checksum (with pseudo header) recomputed.
#[derive(Debug)]
pub struct ParsedIcmp6 {
    pub outer_src: Ipv6Addr,
    pub outer_dst: Ipv6Addr,
    pub ty: u8,
    pub rest: u32,
    pub icmp_ok: bool,
    pub inner_src: SocketAddrV6,
    pub inner_dst: SocketAddrV6,
}

pub fn parse_icmp6(frame: &[u8]) -> ParsedIcmp6 {
    let ip = &frame[ETH_LEN..];
    assert_eq!(ip[6], 58, "ICMPv6 right after the IPv6 header");
    let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    let (src, dst) = (v6(&ip[8..24]), v6(&ip[24..40]));
    let icmp = &ip[40..40 + plen];
    let mut z = icmp.to_vec();
    let stored = u16::from_ne_bytes([z[2], z[3]]);
    z[2] = 0;
    z[3] = 0;
    let inner = &icmp[8..];
    let l4 = &inner[40..];
    let port = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    ParsedIcmp6 {
        outer_src: src,
        outer_dst: dst,
        ty: icmp[0],
        rest: u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
        icmp_ok: stored == l4_checksum_v6(src.octets(), dst.octets(), 58, &z),
        inner_src: SocketAddrV6::new(v6(&inner[8..24]), port(0), 0, 0),
        inner_dst: SocketAddrV6::new(v6(&inner[24..40]), port(2), 0, 0),
    }
}

/// Runs an XDP program once on `input` under BPF_PROG_TEST_RUN; returns the action and the
/// output frame.
pub fn test_run(prog: &aya::programs::Xdp, input: &[u8]) -> (u32, Vec<u8>) {
    use aya::{TestRun, TestRunOptions};
    let mut out = vec![0u8; input.len() + 512];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(input);
    opts.data_out = Some(&mut out);
    let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}
