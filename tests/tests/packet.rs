//! Packet tier: the real XDP object under BPF_PROG_TEST_RUN with crafted frames. Needs root.
//!
//! The main table runs in order on one data path (earlier rows create the flows later rows
//! use). Every row states its input, the action, the reason counted and the expected output;
//! rewritten outputs have both checksums recomputed from scratch.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use bg_common::{Color, Fwd, Reason};
use bg_tests::{
    packet::{self, Pkt, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    paths,
};
use bg_userspace::{config::Config, dataplane::Dataplane};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

/// Packet tests keep forwarding in the kernel (no FIB lookup), so results do not depend on
/// this machine's routes; `forwarding.rs` tests the redirect path in its own namespace.
const CONFIG: &str = r#"
interfaces = ["unused0"]
forwarding = "kernel"
max_new_flows_per_sec = 0
[[service]]
name = "web"
vip = "10.100.0.1:80"
blue = ["10.1.0.2:8080"]
green = ["10.2.0.2:9090"]

[[service]]
name = "dns"
vip = "10.100.0.1:53"
protocol = "udp"
blue = ["10.1.0.2:5353"]
green = ["10.2.0.2:5353"]
"#;

const CLIENT: &str = "10.0.0.2:40000";
const VIP: &str = "10.100.0.1:80";
const DNS: &str = "10.100.0.1:53";
const BLUE: &str = "10.1.0.2:8080";
const BLUE_DNS: &str = "10.1.0.2:5353";
const GREEN: &str = "10.2.0.2:9090";

fn dataplane(config: &str) -> Dataplane {
    let object = std::fs::read(paths::ebpf_object()).expect("reading the XDP object");
    let config = Config::parse(config).expect("test config is valid");
    Dataplane::open(&object, &config, None, Color::Blue).expect("loading the XDP program (are you root?)")
}

/// Runs the program once on `input`; returns the action and the output frame.
fn run(dp: &Dataplane, input: &[u8]) -> (u32, Vec<u8>) {
    packet::test_run(dp.program(), input)
}

/// Asserts `frame` is a valid IPv4 packet from `src` to `dst` carrying `payload`, its L4
/// checksum verifying strictly (a UDP checksum of 0 does not pass here).
fn assert_rewritten(frame: &[u8], src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8], what: &str) {
    let p = packet::parse_v4(frame);
    assert_eq!((p.src, p.dst), (src, dst), "{what}: addresses/ports after rewrite");
    assert!(p.ip_checksum_ok, "{what}: IPv4 header checksum does not verify");
    assert!(p.l4_checksum_ok, "{what}: L4 checksum does not verify when recomputed (field {:#06x})", p.l4_checksum);
    assert_eq!(p.payload, payload, "{what}: payload changed");
}

/// What a row expects, written out in the row (never taken from the program's own tables):
/// the XDP action and what becomes of the bytes.
enum Expect {
    /// XDP_PASS, byte for byte the input, no flow state created.
    Pass,
    /// XDP_DROP; the bytes were not rewritten first and no flow state was created.
    Drop,
    /// XDP_PASS (these tests forward through the kernel) rewritten to (src, dst): addresses
    /// and ports, the IPv4 header checksum and the L4 checksum verify from scratch (a UDP
    /// checksum of 0 in the input must stay 0, any other must verify), payload, IPv4 options,
    /// IPv6 extension headers, TTL/hop limit and Ethernet header unchanged.
    Rewritten(&'static str, &'static str),
}

struct Row {
    what: &'static str,
    input: Vec<u8>,
    expect: Expect,
    reason: Reason,
}

fn row(what: &'static str, input: Vec<u8>, expect: Expect, reason: Reason) -> Row {
    Row { what, input, expect, reason }
}

/// Checks a rewritten frame of either family against its input.
fn check_rewritten(what: &str, input: &[u8], out: &[u8], src: &str, dst: &str) {
    assert_eq!(out.len(), input.len(), "{what}: length");
    assert_eq!(&out[..14], &input[..14], "{what}: Ethernet header untouched in kernel mode");
    let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    if out[12..14] == [0x08, 0x00] {
        let (i, o) = (packet::parse_v4(input), packet::parse_v4(out));
        assert_eq!((SocketAddr::V4(o.src), SocketAddr::V4(o.dst)), (src, dst), "{what}: addresses/ports after rewrite");
        assert!(o.ip_checksum_ok, "{what}: IPv4 header checksum does not verify");
        if i.proto == 17 && i.l4_checksum == 0 {
            assert_eq!(o.l4_checksum, 0, "{what}: a UDP datagram sent without checksum must stay without one");
        } else {
            assert!(o.l4_checksum_ok, "{what}: L4 checksum does not verify when recomputed (field {:#06x})", o.l4_checksum);
        }
        assert_eq!((o.payload, o.options, o.ttl), (i.payload, i.options, i.ttl), "{what}: payload, IP options, TTL kept");
    } else {
        let (i, o) = (packet::parse_v6(input), packet::parse_v6(out));
        assert_eq!((SocketAddr::V6(o.src), SocketAddr::V6(o.dst)), (src, dst), "{what}: addresses/ports after rewrite");
        assert!(o.l4_checksum_ok, "{what}: L4 checksum with the IPv6 pseudo header does not verify");
        assert_eq!((o.payload, o.ext_len, o.hop_limit), (i.payload, i.ext_len, i.hop_limit), "{what}: payload, extension headers, hop limit kept");
        assert_eq!(&out[14 + 40..14 + 40 + o.ext_len], &input[14 + 40..14 + 40 + i.ext_len], "{what}: extension header bytes kept");
    }
}

fn check(dp: &Dataplane, r: &Row) {
    let before = dp.reason_count(r.reason).unwrap();
    let state = |dp: &Dataplane| {
        let f = dp.flow_counts().unwrap();
        (f.entries, f.unconfirmed_entries)
    };
    let entries = state(dp);
    let (action, out) = run(dp, &r.input);
    let want = match r.expect {
        Expect::Pass | Expect::Rewritten(..) => XDP_PASS,
        Expect::Drop => XDP_DROP,
    };
    assert_eq!(action, want, "{}: action", r.what);
    assert_eq!(dp.reason_count(r.reason).unwrap(), before + 1, "{}: counted as {}", r.what, r.reason.name());
    match r.expect {
        Expect::Pass | Expect::Drop => {
            assert_eq!(out, r.input, "{}: bytes must be unchanged", r.what);
            assert_eq!(state(dp), entries, "{}: no flow state may be created", r.what);
        }
        Expect::Rewritten(src, dst) => check_rewritten(r.what, &r.input, &out, src, dst),
    }
}

/// A UDP payload for which the checksum of the datagram after the rewrite toward `BLUE_DNS`
/// computes to 0, which must be sent as 0xffff.
fn payload_with_zero_checksum_after_rewrite() -> Vec<u8> {
    for v in 0..=u16::MAX {
        let p = v.to_be_bytes();
        let after = Pkt::udp(sa(CLIENT), sa(BLUE_DNS)).payload(&p).no_udp_checksum().build();
        let mut seg = after[14 + 20..].to_vec();
        seg[6] = 0;
        seg[7] = 0;
        if bg_common::csum::l4_checksum_v4([10, 0, 0, 2], [10, 1, 0, 2], 17, &seg) == 0 {
            return p.to_vec();
        }
    }
    panic!("no payload gives a zero checksum");
}

#[test]
fn every_edge_case_has_its_stated_action() {
    use Expect::{Drop, Pass, Rewritten};
    let dp = dataplane(CONFIG);
    let other = "10.9.9.9:80";
    let syn = || Pkt::tcp(sa(CLIENT), sa(VIP), TCP_SYN);
    let truncated = |p: Vec<u8>, keep: usize| p[..keep].to_vec();
    let mut bare_eth = vec![0u8; 14];
    bare_eth[12..14].copy_from_slice(&[0x88, 0xb5]);
    let zero_payload = payload_with_zero_checksum_after_rewrite();
    // An IPv6 packet in an IPv4 frame and the other way round: the version nibble decides.
    let v6_in_v4_frame = |dst: &str| {
        let mut f = Pkt::tcp(sa("10.0.0.2:40800"), sa(dst), TCP_SYN).build();
        f[14] = 0x65; // version 6, IHL 5
        f
    };

    // A TCP header claiming 4 words.
    let doff4 = |dst: &str| {
        let mut f = Pkt::tcp(sa("10.0.0.2:40901"), sa(dst), TCP_SYN).build();
        f[14 + 20 + 12] = 4 << 4;
        f
    };
    // Another IP protocol (47 is GRE): the TCP frame relabelled, IP checksum fixed.
    let other_proto = |dst: &str, proto: u8| {
        let mut f = Pkt::tcp(sa("10.0.0.2:40900"), sa(dst), 0).build();
        f[14 + 9] = proto;
        f[24..26].copy_from_slice(&[0, 0]);
        let c = bg_common::csum::checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_ne_bytes());
        f
    };

    let rows = vec![
        row("TCP SYN to VIP:80", syn().build(), Rewritten(CLIENT, BLUE), Reason::NewFlow),
        row("TCP data on that flow", Pkt::tcp(sa(CLIENT), sa(VIP), TCP_ACK).payload(b"GET / HTTP/1.1\r\n\r\n").build(), Rewritten(CLIENT, BLUE), Reason::ToBackend),
        row("backend SYN-ACK acknowledging the SYN (noted, confirms nothing yet)", Pkt::tcp(sa(BLUE), sa(CLIENT), TCP_SYN | TCP_ACK).seq(0x0a0b_0c0d).ack(packet::DEFAULT_SEQ + 1).build(), Rewritten(VIP, CLIENT), Reason::FromBackend),
        row("client ACK of it (the handshake completes: confirmed)", Pkt::tcp(sa(CLIENT), sa(VIP), TCP_ACK).seq(packet::DEFAULT_SEQ + 1).ack(0x0a0b_0c0e).build(), Rewritten(CLIENT, BLUE), Reason::ToBackend),
        row("backend response", Pkt::tcp(sa(BLUE), sa(CLIENT), TCP_ACK).payload(b"blue\n").build(), Rewritten(VIP, CLIENT), Reason::FromBackend),
        row("retransmitted SYN stays on its flow", syn().build(), Rewritten(CLIENT, BLUE), Reason::ToBackend),
        row("TTL 1 on an established flow", Pkt::tcp(sa(CLIENT), sa(VIP), TCP_ACK).ttl(1).build(), Pass, Reason::PassTtlExpired),
        row("TTL 0 on an established flow", Pkt::tcp(sa(CLIENT), sa(VIP), TCP_ACK).ttl(0).build(), Pass, Reason::PassTtlExpired),
        row("TTL 1 on a reply", Pkt::tcp(sa(BLUE), sa(CLIENT), TCP_ACK).payload(b"x").ttl(1).build(), Pass, Reason::PassTtlExpired),
        row("TTL 2 on a reply", Pkt::tcp(sa(BLUE), sa(CLIENT), TCP_ACK).payload(b"x").ttl(2).build(), Rewritten(VIP, CLIENT), Reason::FromBackend),
        row("TCP to another host", Pkt::tcp(sa(CLIENT), sa(other), TCP_SYN).build(), Pass, Reason::PassNotOurs),
        row("TCP to the VIP on an unserved port", Pkt::tcp(sa(CLIENT), sa("10.100.0.1:443"), TCP_SYN).build(), Drop, Reason::DropStray),
        row("UDP to the VIP's TCP port", packet::udp(sa(CLIENT), sa(VIP), b"x"), Drop, Reason::DropStray),
        row("ICMP echo request to the VIP", packet::icmp_echo(Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 100, 0, 1)), Drop, Reason::DropStray),
        row("ICMP echo request to another host", packet::icmp_echo(Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 9, 9, 9)), Pass, Reason::PassNotL4),
        row("GRE to the VIP", other_proto(VIP, 47), Drop, Reason::DropStray),
        row("GRE to another host", other_proto(other, 47), Pass, Reason::PassNotL4),
        row("ICMP error to the VIP about no flow of it", packet::icmp_error(Ipv4Addr::new(10, 1, 0, 1), Ipv4Addr::new(10, 100, 0, 1), 3, 4, 1280, &Pkt::tcp(sa(VIP), sa("10.0.0.7:1234"), TCP_ACK).build(), 8), Drop, Reason::DropStray),
        row("SYN to the VIP from 127.0.0.1", Pkt::tcp(sa("127.0.0.1:40010"), sa(VIP), TCP_SYN).build(), Drop, Reason::DropMartian),
        row("SYN to the VIP from 0.0.0.5", Pkt::tcp(sa("0.0.0.5:40011"), sa(VIP), TCP_SYN).build(), Drop, Reason::DropMartian),
        row("SYN to the VIP from 224.0.0.1 (multicast)", Pkt::tcp(sa("224.0.0.1:40012"), sa(VIP), TCP_SYN).build(), Drop, Reason::DropMartian),
        row("SYN to the VIP from 255.255.255.255", Pkt::tcp(sa("255.255.255.255:40013"), sa(VIP), TCP_SYN).build(), Drop, Reason::DropMartian),
        row("SYN to the VIP from the VIP itself", Pkt::tcp(sa("10.100.0.1:40014"), sa(VIP), TCP_SYN).build(), Drop, Reason::DropMartian),
        row("UDP to the VIP from 127.0.0.1", Pkt::udp(sa("127.0.0.1:40015"), sa(DNS)).payload(b"q").build(), Drop, Reason::DropMartian),
        row("SYN to the VIP from 223.255.255.1 (the last unicast /8)", Pkt::tcp(sa("223.255.255.1:40016"), sa(VIP), TCP_SYN).build(), Rewritten("223.255.255.1:40016", BLUE), Reason::NewFlow),
        row("backend's service port to a client bg has no flow of (static reverse NAT)", Pkt::tcp(sa(BLUE), sa("10.0.0.3:5555"), TCP_ACK).build(), Rewritten(VIP, "10.0.0.3:5555"), Reason::FromBackend),
        row("backend from another port (a connection of its own)", Pkt::tcp(sa("10.1.0.2:33000"), sa("10.0.0.3:5555"), TCP_SYN).build(), Pass, Reason::PassNotOurs),
        row("IPv6 TCP to a host that is no VIP", packet::ipv6_tcp_syn(), Pass, Reason::PassNotOurs),
        row("ARP", packet::arp(Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 100, 0, 1)), Pass, Reason::PassNotIp),
        row("bare Ethernet header (LLDP type)", bare_eth, Pass, Reason::PassNotIp),
        row("IPv4 header cut at 10 bytes", truncated(syn().build(), 14 + 10), Pass, Reason::PassTruncated),
        row("TCP header cut at 10 bytes, to the VIP", truncated(syn().build(), 14 + 20 + 10), Drop, Reason::DropMalformed),
        row("TCP data offset 4 (under a header's 5 words), to the VIP", doff4(VIP), Drop, Reason::DropMalformed),
        row("TCP data offset 4, to another host", doff4(other), Pass, Reason::PassTruncated),
        row("TCP header cut at 10 bytes, to another host", truncated(Pkt::tcp(sa(CLIENT), sa(other), TCP_SYN).build(), 14 + 20 + 10), Pass, Reason::PassTruncated),
        row("UDP header cut at 4 bytes, to the VIP", truncated(Pkt::udp(sa(CLIENT), sa(DNS)).build(), 14 + 20 + 4), Drop, Reason::DropMalformed),
        row("IPv4 options (IHL 7), SYN to the VIP", Pkt::tcp(sa("10.0.0.2:40100"), sa(VIP), TCP_SYN).options(&[1, 1, 1, 1, 0x44, 4, 5, 0]).build(), Rewritten("10.0.0.2:40100", BLUE), Reason::NewFlow),
        row("IHL 4, to the VIP", syn().ihl(4).build(), Drop, Reason::DropMalformed),
        row("IHL 4, to another host", Pkt::tcp(sa(CLIENT), sa(other), TCP_SYN).ihl(4).build(), Pass, Reason::PassMalformed),
        row("IP version 5 in an IPv4 frame, to the VIP", syn().version(5).build(), Drop, Reason::DropMalformed),
        row("IP version 5 in an IPv4 frame, to another host", Pkt::tcp(sa(CLIENT), sa(other), TCP_SYN).version(5).build(), Pass, Reason::PassMalformed),
        row("IP version 6 in an IPv4 frame, to the VIP", v6_in_v4_frame(VIP), Drop, Reason::DropMalformed),
        row("IP version 6 in an IPv4 frame, to another host", v6_in_v4_frame(other), Pass, Reason::PassMalformed),
        row("first fragment, to the VIP", Pkt::tcp(sa("10.0.0.2:40200"), sa(VIP), TCP_SYN).fragment(0, true).build(), Drop, Reason::DropFragment),
        row("middle fragment, to the VIP", Pkt::tcp(sa(CLIENT), sa(VIP), 0).payload(&[7; 16]).fragment(3, true).build(), Drop, Reason::DropFragment),
        row("last fragment, to the VIP", Pkt::tcp(sa(CLIENT), sa(VIP), 0).payload(&[7; 16]).fragment(5, false).build(), Drop, Reason::DropFragment),
        row("fragment to another host", Pkt::udp(sa(CLIENT), sa(other)).payload(&[7; 16]).fragment(3, true).build(), Pass, Reason::PassFragment),
        row("802.1Q-tagged SYN to the VIP", Pkt::tcp(sa("10.0.0.2:40300"), sa(VIP), TCP_SYN).vlan(7).build(), Pass, Reason::PassVlan),
        row("802.1ad-tagged SYN to the VIP", Pkt::tcp(sa("10.0.0.2:40301"), sa(VIP), TCP_SYN).vlan_ad(7).build(), Pass, Reason::PassVlan),
        row("TTL 1 SYN to the VIP", Pkt::tcp(sa("10.0.0.2:40400"), sa(VIP), TCP_SYN).ttl(1).build(), Pass, Reason::PassTtlExpired),
        row("TTL 0 SYN to the VIP", Pkt::tcp(sa("10.0.0.2:40401"), sa(VIP), TCP_SYN).ttl(0).build(), Pass, Reason::PassTtlExpired),
        row("TTL 2 SYN to the VIP", Pkt::tcp(sa("10.0.0.2:40402"), sa(VIP), TCP_SYN).ttl(2).build(), Rewritten("10.0.0.2:40402", BLUE), Reason::NewFlow),
        row("UDP query to the VIP", Pkt::udp(sa(CLIENT), sa(DNS)).payload(b"query").build(), Rewritten(CLIENT, BLUE_DNS), Reason::NewFlow),
        row("UDP reply from the backend", Pkt::udp(sa(BLUE_DNS), sa(CLIENT)).payload(b"answer").build(), Rewritten(DNS, CLIENT), Reason::FromBackend),
        row("8-byte UDP datagram (no payload)", Pkt::udp(sa("10.0.0.2:40500"), sa(DNS)).build(), Rewritten("10.0.0.2:40500", BLUE_DNS), Reason::NewFlow),
        row("UDP whose rewritten checksum computes to 0", Pkt::udp(sa(CLIENT), sa(DNS)).payload(&zero_payload).build(), Rewritten(CLIENT, BLUE_DNS), Reason::ToBackend),
        row("UDP without checksum (0)", Pkt::udp(sa("10.0.0.2:40501"), sa(DNS)).payload(b"q").no_udp_checksum().build(), Rewritten("10.0.0.2:40501", BLUE_DNS), Reason::NewFlow),
        row("TCP RST to the VIP, no flow", Pkt::tcp(sa("10.0.0.2:40600"), sa(VIP), TCP_RST).build(), Drop, Reason::DropRstNoFlow),
        row("TCP ACK to the VIP, no flow (entry lost)", Pkt::tcp(sa("10.0.0.2:40700"), sa(VIP), TCP_ACK).build(), Rewritten("10.0.0.2:40700", BLUE), Reason::LostFlow),
    ];
    for r in &rows {
        check(&dp, r);
    }

    // The 0 -> 0xffff rule, byte for byte: a computed 0 is sent as 0xffff.
    let (_, out) = run(&dp, &Pkt::udp(sa(CLIENT), sa(DNS)).payload(&zero_payload).build());
    assert_eq!(packet::parse_v4(&out).l4_checksum, 0xffff, "a computed UDP checksum of 0 is sent as 0xffff");

    // Drops and passes created no flow entries: only the rows that started flows did.
    // Eight rows started flows; the completed handshake and the UDP reply confirmed two of them.
    let flows = dp.flow_counts().unwrap();
    assert_eq!(flows.flows, [8, 0], "flows per color [blue, green]");
    assert_eq!((flows.entries, flows.unconfirmed_entries), (2, 6), "one entry per flow: established, unconfirmed");
    assert_eq!(dp.fwd_count(Fwd::FlowsCreated).unwrap(), 8);
    assert_eq!(dp.fwd_count(Fwd::FlowsConfirmed).unwrap(), 2);
    let total: u64 = Reason::ALL.iter().map(|r| dp.reason_count(*r).unwrap()).sum();
    assert_eq!(total, rows.len() as u64 + 1, "every run counted exactly one reason");
}

#[test]
fn after_a_flip_new_flows_go_to_the_other_color_and_old_flows_stay() {
    let mut dp = dataplane(CONFIG);
    let first = packet::tcp(sa(CLIENT), sa(VIP), TCP_SYN, b"");
    let (_, out) = run(&dp, &first);
    assert_rewritten(&out, sa(CLIENT), sa(BLUE), b"", "before the flip");

    dp.select(Color::Green).unwrap();
    assert_eq!(dp.active().unwrap(), Color::Green);
    let second = packet::tcp(sa("10.0.0.2:40001"), sa(VIP), TCP_SYN, b"");
    let (action, out) = run(&dp, &second);
    assert_eq!(action, XDP_PASS);
    assert_rewritten(&out, sa("10.0.0.2:40001"), sa(GREEN), b"", "new flow after the flip");

    // The first flow is pinned to blue: its packets and replies keep their backend.
    let (_, out) = run(&dp, &packet::tcp(sa(CLIENT), sa(VIP), TCP_ACK, b"more"));
    assert_rewritten(&out, sa(CLIENT), sa(BLUE), b"more", "old flow after the flip");
    let (_, out) = run(&dp, &packet::tcp(sa(BLUE), sa(CLIENT), TCP_ACK, b"blue\n"));
    assert_rewritten(&out, sa(VIP), sa(CLIENT), b"blue\n", "old flow's reply after the flip");
    let (_, out) = run(&dp, &packet::tcp(sa(GREEN), sa("10.0.0.2:40001"), TCP_ACK, b"green\n"));
    assert_rewritten(&out, sa(VIP), sa("10.0.0.2:40001"), b"green\n", "green reply");

    dp.select(Color::Blue).unwrap();
    let third = packet::tcp(sa("10.0.0.2:40002"), sa(VIP), TCP_SYN, b"");
    let (_, out) = run(&dp, &third);
    assert_rewritten(&out, sa("10.0.0.2:40002"), sa(BLUE), b"", "new flow after rollback");
    assert_eq!(dp.flow_counts().unwrap().flows, [2, 1], "flows per color [blue, green]");
    let c = dp.counters().unwrap();
    assert_eq!((c.colors[0].new_flows, c.colors[1].new_flows), (2, 1), "new flows per color");
    assert_eq!((c.colors[0].packets, c.colors[1].packets), (4, 2), "packets per color");
}

/// Opens a TCP flow to the VIP from `client` and confirms it: SYN (seq `isn`), the backend's
/// SYN-ACK acking it, the client's ACK. Returns the sequence number the client sends next.
fn open_flow(dp: &Dataplane, client: SocketAddrV4, backend: SocketAddrV4, isn: u32) -> u32 {
    let (_, out) = run(dp, &Pkt::tcp(client, sa(VIP), TCP_SYN).seq(isn).build());
    assert_rewritten(&out, client, backend, b"", "SYN");
    let (_, out) = run(dp, &Pkt::tcp(backend, client, TCP_SYN | TCP_ACK).seq(7_000).ack(isn + 1).build());
    assert_rewritten(&out, sa(VIP), client, b"", "SYN-ACK");
    let (_, out) = run(dp, &Pkt::tcp(client, sa(VIP), TCP_ACK).seq(isn + 1).ack(7_001).build());
    assert_rewritten(&out, client, backend, b"", "handshake ACK");
    isn + 1
}

#[test]
fn an_rst_near_what_the_client_sent_ends_a_flow_a_blind_one_does_not_and_fin_lets_it_expire_when_idle() {
    let config = CONFIG.replace("max_new_flows_per_sec = 0", "max_new_flows_per_sec = 0\nclosing_timeout_secs = 1");
    let mut dp = dataplane(&config);
    let c1 = sa("10.0.0.2:40000");
    let next = open_flow(&dp, c1, sa(BLUE), 1_000_000);
    let (_, out) = run(&dp, &Pkt::tcp(c1, sa(VIP), TCP_ACK).seq(next).payload(b"0123456789").build());
    assert_rewritten(&out, c1, sa(BLUE), b"0123456789", "data");
    let next = next + 10;
    assert_eq!(dp.flow_counts().unwrap().entries, 1, "one established entry");
    dp.select(Color::Green).unwrap();

    // A spoofed segment far ahead does not move the window the RSTs are checked against.
    run(&dp, &Pkt::tcp(c1, sa(VIP), TCP_ACK).seq(next.wrapping_add(10_000_000)).payload(b"x").build());
    // A blind RST, its sequence number far from what the client sent: forwarded (the backend
    // judges it), but the flow's state stays: it is not even marked closing.
    for seq in [next.wrapping_add(10_000_000), next.wrapping_add(10_000_001), next.wrapping_sub(200_000), 0x8000_0000] {
        let (action, out) = run(&dp, &Pkt::tcp(c1, sa(VIP), TCP_RST).seq(seq).build());
        assert_eq!(action, XDP_PASS);
        assert_rewritten(&out, c1, sa(BLUE), b"", "blind RST forwarded to its flow's backend");
    }
    std::thread::sleep(Duration::from_millis(1500));
    let lost = dp.reason_count(Reason::LostFlow).unwrap();
    let (_, out) = run(&dp, &Pkt::tcp(c1, sa(VIP), TCP_ACK).seq(next).build());
    assert_rewritten(&out, c1, sa(BLUE), b"", "idle past the closing timeout after blind RSTs: still on blue");
    assert_eq!(dp.reason_count(Reason::LostFlow).unwrap(), lost, "no blind RST erased or aged the flow");

    // An RST at what the client sent ends it: forwarded, the entry closing; idle past the
    // closing timeout it is over, and the next packet is a lost flow on the active color.
    let (_, out) = run(&dp, &Pkt::tcp(c1, sa(VIP), TCP_RST).seq(next).build());
    assert_rewritten(&out, c1, sa(BLUE), b"", "in-window RST forwarded");
    std::thread::sleep(Duration::from_millis(2100));
    let (_, out) = run(&dp, &Pkt::tcp(c1, sa(VIP), TCP_ACK).seq(next).build());
    assert_rewritten(&out, c1, sa(GREEN), b"", "after the RST and the closing timeout: re-pinned to the active color");
    assert_eq!(dp.reason_count(Reason::LostFlow).unwrap(), lost + 1);

    // An RST from the backend is forwarded from the VIP and changes no state (a spoofed one
    // cannot end a flow either; the client's stack judges it).
    dp.select(Color::Blue).unwrap();
    let c4 = sa("10.0.0.2:41004");
    let n4 = open_flow(&dp, c4, sa(BLUE), 5_000);
    dp.select(Color::Green).unwrap();
    let (_, out) = run(&dp, &Pkt::tcp(sa(BLUE), c4, TCP_RST | TCP_ACK).seq(7_001).build());
    assert_rewritten(&out, sa(VIP), c4, b"", "RST from the backend");
    std::thread::sleep(Duration::from_millis(1500));
    let (_, out) = run(&dp, &Pkt::tcp(c4, sa(VIP), TCP_ACK).seq(n4).build());
    assert_rewritten(&out, c4, sa(BLUE), b"", "a backend's RST left the entry as it was");

    // FIN marks the flow closing; while packets flow it stays, idle past the timeout it is over.
    dp.select(Color::Blue).unwrap();
    let c2 = sa("10.0.0.2:41000");
    let n2 = open_flow(&dp, c2, sa(BLUE), 9_000);
    run(&dp, &Pkt::tcp(c2, sa(VIP), TCP_FIN | TCP_ACK).seq(n2).build());
    let (_, out) = run(&dp, &Pkt::tcp(c2, sa(VIP), TCP_ACK).seq(n2 + 1).build());
    assert_rewritten(&out, c2, sa(BLUE), b"", "closing flow still follows its entry");
    dp.select(Color::Green).unwrap();
    // A SYN reusing the port of a closing flow is a new connection: it follows the flip.
    let c3 = sa("10.0.0.2:41001");
    dp.select(Color::Blue).unwrap();
    let n3 = open_flow(&dp, c3, sa(BLUE), 20_000);
    run(&dp, &Pkt::tcp(c3, sa(VIP), TCP_FIN | TCP_ACK).seq(n3).build());
    dp.select(Color::Green).unwrap();
    let (_, out) = run(&dp, &Pkt::tcp(c3, sa(VIP), TCP_SYN).seq(30_000).build());
    assert_rewritten(&out, c3, sa(GREEN), b"", "SYN on a closing entry starts a new flow");

    std::thread::sleep(Duration::from_millis(2100));
    let lost = dp.reason_count(Reason::LostFlow).unwrap();
    let (_, out) = run(&dp, &Pkt::tcp(c2, sa(VIP), TCP_ACK).seq(n2 + 1).build());
    assert_rewritten(&out, c2, sa(GREEN), b"", "an idle closing flow is over: re-pinned to the active color");
    assert_eq!(dp.reason_count(Reason::LostFlow).unwrap(), lost + 1);
}

#[test]
fn udp_flows_expire_after_the_idle_timeout() {
    let config = CONFIG.replace("max_new_flows_per_sec = 0", "max_new_flows_per_sec = 0\nudp_idle_timeout_secs = 1\nunconfirmed_timeout_secs = 3");
    let mut dp = dataplane(&config);
    let q = packet::udp(sa(CLIENT), sa(DNS), b"q");
    let (_, out) = run(&dp, &q);
    assert_rewritten(&out, sa(CLIENT), sa(BLUE_DNS), b"q", "first datagram");
    assert_eq!((dp.flow_counts().unwrap().entries, dp.flow_counts().unwrap().unconfirmed_entries), (0, 1), "unconfirmed until answered");
    let (_, out) = run(&dp, &packet::udp(sa(BLUE_DNS), sa(CLIENT), b"a"));
    assert_rewritten(&out, sa(DNS), sa(CLIENT), b"a", "the answer");
    assert_eq!((dp.flow_counts().unwrap().entries, dp.flow_counts().unwrap().unconfirmed_entries), (1, 0), "an answer confirms a UDP flow");
    dp.select(Color::Green).unwrap();
    let (_, out) = run(&dp, &q);
    assert_rewritten(&out, sa(CLIENT), sa(BLUE_DNS), b"q", "within the idle timeout: same backend");
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(dp.flow_counts().unwrap().expired, 1, "the confirmed entry is expired after 1 s idle");
    let (_, out) = run(&dp, &q);
    assert_rewritten(&out, sa(CLIENT), sa("10.2.0.2:5353"), b"q", "after the idle timeout: a new flow on the active color");

    // A flow nobody answers stays unconfirmed and expires after unconfirmed_timeout_secs (3),
    // not after the UDP idle time (1): its datagrams keep it alive.
    let lonely = packet::udp(sa("10.0.0.2:40900"), sa(DNS), b"x");
    run(&dp, &lonely);
    std::thread::sleep(Duration::from_millis(1500));
    let (_, out) = run(&dp, &lonely);
    assert_rewritten(&out, sa("10.0.0.2:40900"), sa("10.2.0.2:5353"), b"x", "unanswered, 1.5 s idle: still its flow");
    dp.select(Color::Blue).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (_, out) = run(&dp, &lonely);
    assert_rewritten(&out, sa("10.0.0.2:40900"), sa("10.2.0.2:5353"), b"x", "refreshed by its datagrams");
    std::thread::sleep(Duration::from_millis(3200));
    let (_, out) = run(&dp, &lonely);
    assert_rewritten(&out, sa("10.0.0.2:40900"), sa(BLUE_DNS), b"x", "idle past the unconfirmed timeout: a new flow on the active color");
}

#[test]
fn new_flow_rate_bound_drops_syns_but_not_established_flows() {
    // One CPU sends everything: the bound is the whole gateway's, so all of it is available
    // here (a budget split per CPU would admit only its share).
    let mut set = nix::sched::CpuSet::new();
    set.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
    let dp = dataplane(&CONFIG.replace("max_new_flows_per_sec = 0", "max_new_flows_per_sec = 5"));
    let mut new = 0;
    let mut dropped = 0;
    for port in 42000..42020u16 {
        let (action, _) = run(&dp, &packet::tcp(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), port), sa(VIP), TCP_SYN, b""));
        if action == XDP_DROP { dropped += 1 } else { new += 1 }
    }
    // The one-second window may roll over once during the loop on a slow machine.
    assert!((5..=10).contains(&new), "{new} new flows admitted, {dropped} dropped");
    assert_eq!(dp.reason_count(Reason::DropNewFlowRate).unwrap(), dropped);
    // Established flows are untouched by the bound.
    let (action, out) = run(&dp, &packet::tcp(sa("10.0.0.2:42000"), sa(VIP), TCP_ACK, b"x"));
    assert_eq!(action, XDP_PASS);
    assert_rewritten(&out, sa("10.0.0.2:42000"), sa(BLUE), b"x", "established flow under the bound");
    assert_eq!(dp.flow_counts().unwrap().flows[0], new as u64, "dropped SYNs created no entries");
}

/// Two CPUs sending new flows at once share one budget: together they get exactly the bound
/// (not the bound each, not half of it each).
#[test]
fn the_rate_bound_holds_its_total_across_cpus() {
    let cpus = aya::util::nr_cpus().unwrap();
    assert!(cpus >= 2, "this test needs two CPUs");
    for attempt in 0..3 {
        let dp = dataplane(&CONFIG.replace("max_new_flows_per_sec = 0", "max_new_flows_per_sec = 10"));
        let started = bg_userspace::dataplane::monotonic_ns();
        let admitted: u32 = std::thread::scope(|s| {
            let workers: Vec<_> = (0..2usize)
                .map(|cpu| {
                    let dp = &dp;
                    s.spawn(move || {
                        let mut set = nix::sched::CpuSet::new();
                        set.set(cpu).unwrap();
                        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
                        let client = Ipv4Addr::new(10, 0, 3, 2 + cpu as u8);
                        (0..20u16).filter(|i| run(dp, &packet::tcp(SocketAddrV4::new(client, 44000 + i), sa(VIP), TCP_SYN, b"")).0 != XDP_DROP).count() as u32
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        // Windows are seconds of the monotonic clock (the program's `bpf_ktime_get_ns`): a run
        // inside one of them sees one budget; one that crossed a boundary is tried again.
        let ended = bg_userspace::dataplane::monotonic_ns();
        if started / 1_000_000_000 == ended / 1_000_000_000 {
            // The bound holds to within one flow per other CPU (two that check at the same
            // moment can both take the last slot).
            assert!((10..=11).contains(&admitted), "40 SYNs from two CPUs under a bound of 10/s: {admitted} admitted");
            assert_eq!(dp.reason_count(Reason::DropNewFlowRate).unwrap(), 40 - admitted as u64);
            return;
        }
        eprintln!("attempt {attempt} crossed a second boundary; again");
    }
    panic!("no attempt finished inside one rate window");
}

#[test]
fn new_flows_spread_over_weighted_backends_by_maglev() {
    let config = CONFIG.replace(
        r#"blue = ["10.1.0.2:8080"]"#,
        r#"blue = ["10.1.0.2:8080", { address = "10.1.0.3:8080", weight = 2 }, { address = "10.1.0.4:8080", weight = 0 }]"#,
    );
    let cfg = Config::parse(&config).unwrap();
    let table = bg_userspace::dataplane::maglev_table(&cfg.services[0].blue).unwrap();
    let dp = dataplane(&config);
    let backends = [sa("10.1.0.2:8080"), sa("10.1.0.3:8080"), sa("10.1.0.4:8080")];
    let mut hits = [0u32; 3];
    for i in 0..600u32 {
        let client = SocketAddrV4::new(Ipv4Addr::from(0x0a00_0000 + 2 + (i / 200)), 43000 + (i % 200) as u16);
        let key = bg_common::FlowKey {
            src: [u32::from_ne_bytes(client.ip().octets()), 0, 0, 0],
            dst: [u32::from_ne_bytes([10, 100, 0, 1]), 0, 0, 0],
            sport: client.port().to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            family: bg_common::FAMILY_V4,
            _pad: [0; 2],
        };
        let expected = table[(bg_common::hash::flow_hash(&key) % bg_common::RING_SIZE) as usize] as usize;
        let (_, out) = run(&dp, &packet::tcp(client, sa(VIP), TCP_SYN, b""));
        assert_rewritten(&out, client, backends[expected], b"", "Maglev choice");
        hits[expected] += 1;
    }
    assert_eq!(hits[2], 0, "weight 0 gets no new flows");
    let ratio = hits[1] as f64 / hits[0] as f64;
    assert!((1.5..2.6).contains(&ratio), "weight 2 vs 1 gave {hits:?}");
}

/// A backend going down rewrites only the Maglev entries that move (about 1/N of the ring,
/// not the ring), and a flap back and forth rewrites nothing more: each slot keeps what it was
/// last written with. Whatever was skipped, the table in the kernel is the whole table.
#[test]
fn a_flapping_backend_rewrites_only_the_ring_entries_that_move() {
    // Batched writes, then one update per entry (a kernel without array batch operations).
    for batch in [true, false] {
        flapping_backend(batch);
    }
}

fn flapping_backend(batch: bool) {
    const N: usize = 16;
    let blue: Vec<String> = (0..N).map(|i| format!("\"10.1.0.{}:8080\"", 10 + i)).collect();
    let config = CONFIG.replace(r#"blue = ["10.1.0.2:8080"]"#, &format!("blue = [{}]", blue.join(", ")));
    let cfg = Config::parse(&config).unwrap();
    let mut dp = dataplane(&config);
    dp.set_batch_writes(batch);
    let up = vec![1u32; N];
    let mut down = up.clone();
    down[3] = 0;
    let dns = vec![1u32; 1];
    let full = |w: &[u32]| bg_userspace::dataplane::maglev_table_weighted(&cfg.services[0].blue, w).unwrap();
    let ring = bg_common::RING_SIZE as u64;
    // Expected, from the tables themselves: the entries of backend 3 move, plus Maglev's
    // small disruption of the others.
    let moved = full(&up).iter().zip(full(&down)).filter(|(a, b)| **a != *b).count() as u64;
    assert!(moved >= ring / N as u64 && moved < 2 * ring / N as u64, "Maglev moved {moved} of {ring} entries");
    let mut step = |weights: &[u32], what: &str| -> u64 {
        let before = dp.ring_entries_written();
        dp.publish(Color::Blue, &[weights.to_vec(), dns.clone()]).unwrap();
        let kernel = dp.ring(Color::Blue, 0).unwrap();
        let wrong = kernel.iter().zip(full(weights)).filter(|(k, f)| **k != *f).count();
        assert_eq!((kernel.len(), wrong), (ring as usize, 0), "{what}: entries of the kernel's table that differ from the whole new table");
        dp.ring_entries_written() - before
    };
    // Into the spare slot, never written: whole (both services' rings).
    assert_eq!(step(&up, "first publish"), ring + ring, "a slot never written is written whole");
    // Into the slot init wrote with every backend up: only the entries that move.
    assert_eq!(step(&down, "backend 3 down"), moved, "a backend going down rewrites the entries that move");
    // Each slot now holds one of the two states: flapping costs no ring writes at all.
    for i in 0..4 {
        assert_eq!(step(if i % 2 == 0 { &up } else { &down }, "flap"), 0, "flap {i}: the slot already holds it");
    }
    // Another backend down too: against what that slot holds (backend 3 up), only what moves.
    let mut two = down.clone();
    two[7] = 0;
    let expect = full(&up).iter().zip(full(&two)).filter(|(a, b)| **a != *b).count() as u64;
    assert_eq!(step(&two, "backends 3 and 7 down"), expect);
}

/// The data plane's state as one writer step left it: the active color, the canary share and
/// which one-hot weight table each color's backends were last published with.
#[derive(Clone, Copy, Debug)]
struct Published {
    active: Color,
    canary_permille: u32,
    /// [blue, green]: the index of the only backend with a positive weight.
    table: [usize; 2],
}

/// What the writer thread of the atomicity test has done: states in order, the number of the
/// last one whose writes began and of the last one whose writes finished.
struct History {
    states: std::sync::Mutex<Vec<Published>>,
    started: AtomicU64,
    done: AtomicU64,
}

/// Health republishes (each color's backend tables rebuilt in its spare slot, then the selector
/// switched) and canary/flip changes of the selector, from one thread, while two others run
/// new-flow packets through the program. Each color has three backends with distinct ports, and
/// every republish gives weight to exactly one of them (a cycle of three tables, so a stale
/// table is never the current or the next one). For each packet, the states that may have
/// been in force are those from the last one finished before it ran to the last one begun
/// after it ran; its output must be that state's one live backend, whole (address and port of
/// the same backend), of the active color or, with a canary on, of either color.
#[test]
fn republished_backend_sets_and_canary_changes_are_atomic_under_concurrent_packets() {
    const BLUE3: [&str; 3] = ["10.1.0.2:8082", "10.1.0.3:8083", "10.1.0.4:8084"];
    const GREEN3: [&str; 3] = ["10.2.0.2:9092", "10.2.0.3:9093", "10.2.0.4:9094"];
    let config = CONFIG
        .replace(r#"blue = ["10.1.0.2:8080"]"#, &format!("blue = {BLUE3:?}"))
        .replace(r#"green = ["10.2.0.2:9090"]"#, &format!("green = {GREEN3:?}"))
        .replace("max_new_flows_per_sec = 0", "max_new_flows_per_sec = 0\nflow_table_size = 1048576");
    let object = std::fs::read(paths::ebpf_object()).unwrap();
    let cfg = Config::parse(&config).unwrap();
    let pins = bg_tests::run::PinDir::new("atom").unwrap();
    // Two handles on the same pinned maps, as a running agent and its packets have: one runs
    // packets, the other (adopting the first's maps) publishes and routes.
    let mut packets = Dataplane::open(&object, &cfg, Some(&pins.0), Color::Blue).unwrap();
    // A finished start (as an agent's): the next open adopts it instead of redoing it.
    packets.mark_ready().unwrap();
    let mut writer = Dataplane::open(&object, &cfg, Some(&pins.0), Color::Blue).unwrap();
    assert!(writer.adopted, "the writer shares the packet handle's maps");
    let one_hot = |live: usize| -> Vec<Vec<u32>> { vec![(0..3).map(|i| (i == live) as u32).collect(), vec![1]] };
    let mut state = Published { active: Color::Blue, canary_permille: 0, table: [0, 0] };
    for c in Color::ALL {
        writer.publish(c, &one_hot(0)).unwrap();
    }
    let history = History { states: std::sync::Mutex::new(vec![state]), started: AtomicU64::new(0), done: AtomicU64::new(0) };
    let stop = AtomicBool::new(false);
    let (checked, strict) = (AtomicU64::new(0), AtomicU64::new(0));
    let steps = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let _stop = bg_tests::live::StopOnDrop(&stop);
            let mut k = 0u64;
            let until = std::time::Instant::now() + Duration::from_secs(3);
            while std::time::Instant::now() < until {
                k += 1;
                let color = Color::ALL[(k % 2) as usize];
                match k % 4 {
                    // Health changes: republish one color with the next table of its cycle.
                    0 | 1 => state.table[color as usize] = (state.table[color as usize] + 1) % 3,
                    // A canary share appears, changes or goes away.
                    2 => state.canary_permille = [0, 100, 500, 999][(k / 4 % 4) as usize],
                    // A flip.
                    _ => state.active = state.active.other(),
                }
                history.states.lock().unwrap().push(state);
                history.started.store(k, Ordering::SeqCst);
                if k % 4 < 2 {
                    writer.publish(color, &one_hot(state.table[color as usize])).unwrap();
                } else {
                    writer.route(state.active, state.canary_permille).unwrap();
                }
                history.done.store(k, Ordering::SeqCst);
            }
            k
        });
        for t in 0..2u32 {
            let (packets, stop, history, checked, strict) = (&packets, &stop, &history, &checked, &strict);
            s.spawn(move || {
                let mut i = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    // A fresh 5-tuple every time, so each packet takes the new-flow path.
                    let client = SocketAddrV4::new(Ipv4Addr::from(0x0b00_0000 + (t << 22) + (i >> 14)), 1024 + (i & 0x3fff) as u16);
                    i += 1;
                    let from = history.done.load(Ordering::SeqCst) as usize;
                    let (action, out) = run(packets, &packet::tcp(client, sa(VIP), TCP_SYN, b""));
                    let to = history.started.load(Ordering::SeqCst) as usize;
                    assert_eq!(action, XDP_PASS);
                    let p = packet::parse_v4(&out);
                    assert!(p.ip_checksum_ok && p.l4_checksum_ok, "checksums of {client}");
                    let states = history.states.lock().unwrap()[from..=to].to_vec();
                    let allowed: Vec<SocketAddrV4> = states
                        .iter()
                        .flat_map(|st| {
                            let colors = if st.canary_permille == 0 { vec![st.active] } else { Color::ALL.to_vec() };
                            colors.into_iter().map(move |c| {
                                let list = if c == Color::Blue { BLUE3 } else { GREEN3 };
                                sa(list[st.table[c as usize]])
                            })
                        })
                        .collect();
                    assert!(
                        allowed.contains(&p.dst),
                        "client {client} went to {} while states {from}..={to} were possible ({states:?}): allowed {allowed:?}",
                        p.dst
                    );
                    checked.fetch_add(1, Ordering::Relaxed);
                    // The check has teeth when some backend of the color it went to was ruled out.
                    let same_color = allowed.iter().filter(|a| a.ip().octets()[1] == p.dst.ip().octets()[1]).collect::<std::collections::HashSet<_>>();
                    if same_color.len() < 3 {
                        strict.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        writer.join().unwrap()
    });
    let (checked, strict) = (checked.load(Ordering::Relaxed), strict.load(Ordering::Relaxed));
    eprintln!("atomicity: {steps} writer steps (republishes, canary changes, flips), {checked} new flows checked, {strict} of them with a backend of their color ruled out, 0 torn or stale");
    assert!(steps >= 40, "the writer made only {steps} steps");
    assert!(strict >= 10_000, "too few packets had a backend of their color ruled out ({strict}) for the check to mean much");
}

/// ICMP errors quoting a VIP flow are rewritten both ways so PMTUD keeps working: the outer
/// header, the quoted header and every checksum (outer IP, ICMP over the quote, quoted IP,
/// quoted UDP) verify afterwards; a quote of only 8 bytes of L4 header is enough.
#[test]
fn icmp_errors_about_vip_flows_are_rewritten_for_the_nat() {
    let dp = dataplane(CONFIG);
    let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    // Two flows on blue: TCP to VIP:80 and UDP to VIP:53.
    run(&dp, &packet::tcp(sa(CLIENT), sa(VIP), TCP_SYN, b""));
    run(&dp, &packet::udp(sa(CLIENT), sa(DNS), b"query"));

    // A router on the client side cannot forward a large reply (VIP → client): "fragmentation
    // needed", addressed to the VIP, must reach the backend as an error about its own packet.
    let reply = Pkt::tcp(sa(VIP), sa(CLIENT), TCP_ACK).payload(&[1; 1400]).build();
    let err = packet::icmp_error(ip("10.0.0.1"), ip("10.100.0.1"), 3, 4, 1280, &reply, 20);
    let before = dp.reason_count(Reason::IcmpToBackend).unwrap();
    let (action, out) = run(&dp, &err);
    assert_eq!(action, XDP_PASS);
    assert_eq!(dp.reason_count(Reason::IcmpToBackend).unwrap(), before + 1);
    let p = packet::parse_icmp(&out);
    assert_eq!((p.outer_src, p.outer_dst), (ip("10.0.0.1"), ip("10.1.0.2")), "outer: router → backend");
    assert_eq!((p.inner_src, p.inner_dst), (sa(BLUE), sa(CLIENT)), "quote: backend → client");
    assert_eq!((p.ty, p.code, p.rest), (3, 4, 1280), "type, code and MTU kept");
    assert!(p.outer_ip_ok && p.icmp_ok && p.inner_ip_ok, "checksums: {p:?}");

    // A router between gateway and backend cannot forward a large request (client → backend),
    // quoting only 8 bytes of TCP: the client must see it about client → VIP.
    let request = Pkt::tcp(sa(CLIENT), sa(BLUE), TCP_ACK).payload(&[2; 1400]).build();
    let err = packet::icmp_error(ip("10.1.0.1"), ip("10.0.0.2"), 3, 4, 1280, &request, 8);
    let (action, out) = run(&dp, &err);
    assert_eq!(action, XDP_PASS);
    let p = packet::parse_icmp(&out);
    assert_eq!((p.outer_src, p.outer_dst), (ip("10.1.0.1"), ip("10.0.0.2")), "a router's address stays");
    assert_eq!((p.inner_src, p.inner_dst), (sa(CLIENT), sa(VIP)), "quote: client → VIP");
    assert!(p.outer_ip_ok && p.icmp_ok && p.inner_ip_ok, "checksums: {p:?}");
    assert_eq!(dp.reason_count(Reason::IcmpToClient).unwrap(), 1);

    // The backend itself answers "port unreachable" quoting the whole UDP query: the outer
    // source becomes the VIP too, and the quoted UDP checksum still verifies.
    let query = Pkt::udp(sa(CLIENT), sa(BLUE_DNS)).payload(b"query").build();
    let err = packet::icmp_error(ip("10.1.0.2"), ip("10.0.0.2"), 3, 3, 0, &query, 13);
    let (_, out) = run(&dp, &err);
    let p = packet::parse_icmp(&out);
    assert_eq!((p.outer_src, p.outer_dst), (ip("10.100.0.1"), ip("10.0.0.2")), "outer: VIP → client");
    assert_eq!((p.inner_src, p.inner_dst), (sa(CLIENT), sa(DNS)), "quote: client → VIP:53");
    assert_eq!(p.inner_udp_ok, Some(true), "quoted UDP checksum");
    assert!(p.outer_ip_ok && p.icmp_ok && p.inner_ip_ok, "checksums: {p:?}");

    // Time exceeded (a router on the backend path, TTL ran out) and parameter problem (the
    // backend's host) about client -> backend reach the client about client -> VIP.
    for (what, from, ty, code, outer_src) in [
        ("time exceeded from a router", "10.1.0.1", 11, 0, "10.1.0.1"),
        ("parameter problem from the backend", "10.1.0.2", 12, 0, "10.100.0.1"),
    ] {
        let before = dp.reason_count(Reason::IcmpToClient).unwrap();
        let err = packet::icmp_error(ip(from), ip("10.0.0.2"), ty, code, 0x1400_0000, &request, 8);
        let (action, out) = run(&dp, &err);
        assert_eq!(action, XDP_PASS, "{what}: action");
        assert_eq!(dp.reason_count(Reason::IcmpToClient).unwrap(), before + 1, "{what}: counted as icmp_to_client");
        let p = packet::parse_icmp(&out);
        assert_eq!((p.outer_src, p.outer_dst), (ip(outer_src), ip("10.0.0.2")), "{what}: outer addresses");
        assert_eq!((p.inner_src, p.inner_dst), (sa(CLIENT), sa(VIP)), "{what}: quote: client -> VIP");
        assert_eq!((p.ty, p.code, p.rest), (ty, code, 0x1400_0000), "{what}: type, code and pointer kept");
        assert!(p.outer_ip_ok && p.icmp_ok && p.inner_ip_ok, "{what}: checksums: {p:?}");
    }

    // Not about a VIP flow, not an error, or a quote too short to name the flow: untouched.
    // Another port of a backend: not a service, so not a flow bg rewrote.
    let stranger = Pkt::tcp(sa("10.0.0.9:1234"), sa("10.1.0.2:22"), TCP_ACK).build();
    for (what, input, reason) in [
        ("error about another flow", packet::icmp_error(ip("10.1.0.1"), ip("10.0.0.9"), 3, 4, 1280, &stranger, 8), Reason::PassNotOurs),
        ("error quoting 4 bytes of TCP (under RFC 792's 8)", packet::icmp_error(ip("10.1.0.1"), ip("10.0.0.2"), 3, 4, 1280, &request, 4), Reason::PassNotL4),
        ("error quoting 7 bytes of UDP", packet::icmp_error(ip("10.1.0.2"), ip("10.0.0.2"), 3, 3, 0, &query, 7), Reason::PassNotL4),
    ] {
        let before = dp.reason_count(reason).unwrap();
        let (action, out) = run(&dp, &input);
        assert_eq!((action, &out), (XDP_PASS, &input), "{what}: passed untouched");
        assert_eq!(dp.reason_count(reason).unwrap(), before + 1, "{what}: {}", reason.name());
    }
}

const CONFIG6: &str = r#"
interfaces = ["unused0"]
forwarding = "kernel"
max_new_flows_per_sec = 0
[[service]]
name = "web6"
vip = "[fd00::100]:80"
blue = ["[fd00:1::2]:8080"]
green = ["[fd00:2::2]:9090"]
[[service]]
name = "dns6"
vip = "[fd00::100]:53"
protocol = "udp"
blue = ["[fd00:1::2]:5353"]
green = ["[fd00:2::2]:5353"]
"#;

fn sa6(s: &str) -> std::net::SocketAddrV6 {
    s.parse().unwrap()
}

#[test]
fn ipv6_flows_extension_headers_and_icmpv6_errors() {
    use packet::Pkt6;
    let mut dp = dataplane(CONFIG6);
    let client = sa6("[fd00:c::2]:40000");
    let vip = sa6("[fd00::100]:80");
    let blue = sa6("[fd00:1::2]:8080");
    let check6 = |out: &[u8], src, dst, payload: &[u8], what: &str| {
        let p = packet::parse_v6(out);
        assert_eq!((p.src, p.dst), (src, dst), "{what}: addresses/ports");
        assert!(p.l4_checksum_ok, "{what}: L4 checksum with the IPv6 pseudo header");
        assert_eq!(p.payload, payload, "{what}: payload");
        p
    };
    // Runs an ICMPv6 input whose outcome the caller checks; the action is written here.
    let icmp = |dp: &Dataplane, what: &str, input: Vec<u8>, action: u32, reason: Reason| -> Vec<u8> {
        let before = dp.reason_count(reason).unwrap();
        let (got, out) = run(dp, &input);
        assert_eq!(got, action, "{what}: action");
        assert_eq!(dp.reason_count(reason).unwrap(), before + 1, "{what}: {}", reason.name());
        out
    };
    use Expect::{Drop, Pass, Rewritten};
    let waypoint: Ipv6Addr = "fd00:77::1".parse().unwrap();
    let vip_ip: Ipv6Addr = *vip.ip();
    let c = |port: u16| sa6(&format!("[fd00:c::2]:{port}"));
    let ext4 = |dst| Pkt6::tcp(c(40006), dst, TCP_SYN).ext(0, 8).ext(60, 8).ext(43, 8).ext(60, 16).payload(b"4").build();
    let ext5 = |dst| Pkt6::tcp(c(40002), dst, TCP_SYN).ext(0, 8).ext(60, 8).ext(43, 8).ext(60, 8).ext(60, 8).build();
    // A UDP datagram whose checksum field says "none": invalid in IPv6.
    let udp6_zero = |dst| {
        let mut f = Pkt6::udp(c(40018), dst).payload(b"z").build();
        f[14 + 40 + 6..14 + 40 + 8].copy_from_slice(&[0, 0]);
        f
    };
    let mut cut_ip = Pkt6::tcp(c(40007), vip, TCP_SYN).build();
    cut_ip.truncate(14 + 30);
    let mut cut_tcp = Pkt6::tcp(c(40005), vip, TCP_SYN).build();
    cut_tcp.truncate(14 + 40 + 10);
    let rows = vec![
        row("SYN to the v6 VIP", Pkt6::tcp(client, vip, TCP_SYN).build(), Rewritten("[fd00:c::2]:40000", "[fd00:1::2]:8080"), Reason::NewFlow),
        row("reply from the v6 backend", Pkt6::tcp(blue, client, TCP_ACK).payload(b"blue\n").build(), Rewritten("[fd00::100]:80", "[fd00:c::2]:40000"), Reason::FromBackend),
        row("UDP to the v6 VIP", Pkt6::udp(client, sa6("[fd00::100]:53")).payload(b"q").build(), Rewritten("[fd00:c::2]:40000", "[fd00:1::2]:5353"), Reason::NewFlow),
        row("hop limit 1 on an established flow", Pkt6::tcp(client, vip, TCP_ACK).hop_limit(1).build(), Pass, Reason::PassTtlExpired),
        row("hop limit 1 on a reply", Pkt6::tcp(blue, client, TCP_ACK).hop_limit(1).build(), Pass, Reason::PassTtlExpired),
        row("hop-by-hop + destination options", Pkt6::tcp(c(40001), vip, TCP_SYN).ext(0, 8).ext(60, 16).payload(b"x").build(), Rewritten("[fd00:c::2]:40001", "[fd00:1::2]:8080"), Reason::NewFlow),
        row("exactly 4 extension headers, to the VIP", ext4(vip), Rewritten("[fd00:c::2]:40006", "[fd00:1::2]:8080"), Reason::NewFlow),
        row("5 extension headers, to the VIP", ext5(vip), Drop, Reason::DropMalformed),
        row("5 extension headers, elsewhere", ext5(sa6("[fd00::9]:80")), Pass, Reason::PassMalformed),
        row("routing header with no segments left, to the VIP", Pkt6::tcp(c(40008), vip, TCP_SYN).routing(&[vip_ip, waypoint], 0).payload(b"rh").build(), Rewritten("[fd00:c::2]:40008", "[fd00:1::2]:8080"), Reason::NewFlow),
        row("routing header with segments left, to the VIP as a waypoint", Pkt6::tcp(c(40009), vip, TCP_SYN).routing(&[waypoint, vip_ip], 1).build(), Drop, Reason::DropSourceRouted),
        row("routing header with segments left, elsewhere", Pkt6::tcp(c(40009), sa6("[fd00::9]:80"), TCP_SYN).routing(&[waypoint, "fd00::9".parse().unwrap()], 1).build(), Pass, Reason::PassNotOurs),
        row("fragment header, to the VIP", Pkt6::tcp(c(40003), vip, TCP_SYN).ext(44, 8).build(), Drop, Reason::DropFragment),
        row("fragment header, elsewhere", Pkt6::udp(c(40003), sa6("[fd00::9]:53")).ext(44, 8).payload(b"f").build(), Pass, Reason::PassFragment),
        row("hop limit 1 SYN", Pkt6::tcp(c(40004), vip, TCP_SYN).hop_limit(1).build(), Pass, Reason::PassTtlExpired),
        row("IPv6 header cut at 30 bytes", cut_ip, Pass, Reason::PassTruncated),
        row("TCP header cut short, to the VIP", cut_tcp, Drop, Reason::DropMalformed),
        row("IP version 4 in an IPv6 frame, to the VIP", Pkt6::tcp(c(40011), vip, TCP_SYN).version(4).build(), Drop, Reason::DropMalformed),
        row("IP version 4 in an IPv6 frame, elsewhere", Pkt6::tcp(c(40011), sa6("[fd00::9]:80"), TCP_SYN).version(4).build(), Pass, Reason::PassMalformed),
        row("ICMPv6 echo request to the VIP", packet::icmp6_echo(*client.ip(), vip_ip), Drop, Reason::DropStray),
        row("ICMPv6 echo request elsewhere", packet::icmp6_echo(*client.ip(), "fd00::9".parse().unwrap()), Pass, Reason::PassNotL4),
        row("TCP to the v6 VIP on an unserved port", Pkt6::tcp(c(40012), sa6("[fd00::100]:443"), TCP_SYN).build(), Drop, Reason::DropStray),
        row("UDP to the v6 VIP with checksum 0", udp6_zero(sa6("[fd00::100]:53")), Drop, Reason::DropUdp6NoChecksum),
        row("UDP elsewhere with checksum 0", udp6_zero(sa6("[fd00::9]:53")), Pass, Reason::PassNotOurs),
        row("SYN to the v6 VIP from ::1", Pkt6::tcp(sa6("[::1]:40013"), vip, TCP_SYN).build(), Drop, Reason::DropMartian),
        row("SYN to the v6 VIP from ::", Pkt6::tcp(sa6("[::]:40014"), vip, TCP_SYN).build(), Drop, Reason::DropMartian),
        row("SYN to the v6 VIP from ff02::1 (multicast)", Pkt6::tcp(sa6("[ff02::1]:40015"), vip, TCP_SYN).build(), Drop, Reason::DropMartian),
        row("SYN to the v6 VIP from ::ffff:10.0.0.2 (IPv4-mapped)", Pkt6::tcp(sa6("[::ffff:10.0.0.2]:40016"), vip, TCP_SYN).build(), Drop, Reason::DropMartian),
        row("SYN to the v6 VIP from the VIP itself", Pkt6::tcp(sa6("[fd00::100]:40017"), vip, TCP_SYN).build(), Drop, Reason::DropMartian),
    ];
    for r in &rows {
        check(&dp, r);
    }
    let router: Ipv6Addr = "fd00::1".parse().unwrap();
    let out = run(&dp, &ext4(vip)).1;
    assert_eq!(check6(&out, c(40006), blue, b"4", "4 extension headers").ext_len, 40, "extension headers kept");

    // Packet Too Big about a reply (VIP → client), sent by a router to the VIP: it must reach
    // the backend about its own packet (IPv6 routers never fragment: PMTUD is the only way).
    let reply = Pkt6::tcp(vip, client, TCP_ACK).payload(&[3; 1300]).build();
    let err = packet::icmp6_error(router, *vip.ip(), 2, 0, 1280, &reply, 20);
    let out = icmp(&dp, "packet too big to the VIP", err, XDP_PASS, Reason::IcmpToBackend);
    let p = packet::parse_icmp6(&out);
    assert_eq!((p.outer_src, p.outer_dst), (router, *blue.ip()), "outer: router → backend");
    assert_eq!((p.inner_src, p.inner_dst), (blue, client), "quote: backend → client");
    assert_eq!((p.ty, p.rest), (2, 1280));
    assert!(p.icmp_ok, "ICMPv6 checksum (pseudo header + quote) verifies");

    // The backend answers unreachable about client → backend, quoting 8 bytes: the client sees
    // it from the VIP about client → VIP.
    let request = Pkt6::tcp(client, blue, TCP_ACK).build();
    let err = packet::icmp6_error(*blue.ip(), *client.ip(), 1, 4, 0, &request, 8);
    let out = icmp(&dp, "unreachable from the backend", err, XDP_PASS, Reason::IcmpToClient);
    let p = packet::parse_icmp6(&out);
    assert_eq!((p.outer_src, p.outer_dst), (*vip.ip(), *client.ip()));
    assert_eq!((p.inner_src, p.inner_dst), (client, vip));
    assert!(p.icmp_ok, "ICMPv6 checksum verifies");
    // Time exceeded from a router on the backend path, quoting 8 bytes: the same way back.
    let err = packet::icmp6_error(router, *client.ip(), 3, 0, 0, &request, 8);
    let out = icmp(&dp, "time exceeded from a router", err, XDP_PASS, Reason::IcmpToClient);
    let p = packet::parse_icmp6(&out);
    assert_eq!((p.outer_src, p.outer_dst, p.ty), (router, *client.ip(), 3), "a router's address stays");
    assert_eq!((p.inner_src, p.inner_dst), (client, vip));
    assert!(p.icmp_ok, "ICMPv6 checksum verifies");

    // A flip moves new v6 flows, not old ones.
    dp.select(Color::Green).unwrap();
    let (_, out) = run(&dp, &Pkt6::tcp(sa6("[fd00:c::2]:40010"), vip, TCP_SYN).build());
    check6(&out, sa6("[fd00:c::2]:40010"), sa6("[fd00:2::2]:9090"), b"", "new v6 flow after the flip");
    let (_, out) = run(&dp, &Pkt6::tcp(client, vip, TCP_ACK).build());
    check6(&out, client, blue, b"", "old v6 flow after the flip");
}

/// An established table smaller than the live flows: the LRU evicts, the counters say how
/// many, and a packet of an evicted TCP flow counts as `lost_flow`, unconfirmed until its
/// backend answers.
#[test]
fn flow_table_pressure_is_counted() {
    let config = CONFIG.replace("max_new_flows_per_sec = 0", "max_new_flows_per_sec = 0\nflow_table_size = 1024");
    let dp = dataplane(&config);
    for i in 0..2000u32 {
        let client = SocketAddrV4::new(Ipv4Addr::from(0x0a00_0000 + 2 + (i >> 10)), 10000 + (i & 1023) as u16);
        run(&dp, &Pkt::tcp(client, sa(VIP), TCP_SYN).seq(i).build());
        run(&dp, &Pkt::tcp(sa(BLUE), client, TCP_SYN | TCP_ACK).seq(9).ack(i + 1).build());
        run(&dp, &Pkt::tcp(client, sa(VIP), TCP_ACK).seq(i + 1).ack(10).build());
    }
    let f = dp.flow_counts().unwrap();
    assert_eq!(dp.fwd_count(Fwd::FlowsCreated).unwrap(), 2000, "one entry created per flow");
    assert_eq!(dp.fwd_count(Fwd::FlowsConfirmed).unwrap(), 2000, "each confirmed by its completed handshake");
    assert_eq!(f.unconfirmed_entries, 0, "confirmed entries left the unconfirmed table");
    assert!(f.entries <= 1024, "the table holds at most its size: {f:?}");
    assert_eq!(f.evicted, 2000 - f.entries, "evictions = confirmed - present: {f:?}");
    assert!(f.evicted >= 976);
    // The first flow was evicted long ago: its next packet is a lost flow, re-pinned, and
    // unconfirmed until the backend answers something other than an RST.
    let lost = dp.reason_count(Reason::LostFlow).unwrap();
    let c = sa("10.0.0.2:10000");
    let (_, out) = run(&dp, &packet::tcp(c, sa(VIP), TCP_ACK, b""));
    assert_eq!(dp.reason_count(Reason::LostFlow).unwrap(), lost + 1);
    assert_rewritten(&out, c, sa(BLUE), b"", "re-pinned lost flow");
    assert_eq!(dp.flow_counts().unwrap().unconfirmed_entries, 1);
    run(&dp, &Pkt::tcp(sa(BLUE), c, TCP_RST).build());
    assert_eq!(dp.flow_counts().unwrap().unconfirmed_entries, 1, "an RST confirms nothing");
    run(&dp, &Pkt::tcp(sa(BLUE), c, TCP_ACK).payload(b"data").build());
    assert_eq!(dp.flow_counts().unwrap().unconfirmed_entries, 0, "a real answer confirms the lost flow");
    assert_eq!(dp.fwd_count(Fwd::FlowsConfirmed).unwrap(), 2001);
}

/// A SYN without ACK starts a new flow on the active color unless it retransmits the SYN that
/// created its entry; nothing recorded by earlier packets (a bare ACK, an unanswered SYN) can
/// capture a new connection after a flip.
#[test]
fn a_new_syn_follows_the_active_color_and_nothing_recorded_earlier_captures_it() {
    let mut dp = dataplane(CONFIG);
    // An unanswered SYN: its retransmission (same ISN) stays on its backend across a flip; a
    // SYN with another ISN on the same 4-tuple is a new connection and follows the flip.
    let c1 = sa("10.0.0.2:45001");
    let (_, out) = run(&dp, &Pkt::tcp(c1, sa(VIP), TCP_SYN).seq(111).build());
    assert_rewritten(&out, c1, sa(BLUE), b"", "SYN");
    dp.select(Color::Green).unwrap();
    let (_, out) = run(&dp, &Pkt::tcp(c1, sa(VIP), TCP_SYN).seq(111).build());
    assert_rewritten(&out, c1, sa(BLUE), b"", "its retransmission, after a flip: same backend");
    let (_, out) = run(&dp, &Pkt::tcp(c1, sa(VIP), TCP_SYN).seq(999).build());
    assert_rewritten(&out, c1, sa(GREEN), b"", "another ISN: a new connection on the active color");

    // A bare ACK (a spoof, or a flow bg lost) records an unconfirmed entry on blue; after a
    // flip, a SYN from that port is a new connection: green.
    dp.select(Color::Blue).unwrap();
    let c2 = sa("10.0.0.2:45002");
    let (_, out) = run(&dp, &Pkt::tcp(c2, sa(VIP), TCP_ACK).seq(5).build());
    assert_rewritten(&out, c2, sa(BLUE), b"", "bare ACK: a lost flow on blue");
    dp.select(Color::Green).unwrap();
    let (_, out) = run(&dp, &Pkt::tcp(c2, sa(VIP), TCP_SYN).seq(77).build());
    assert_rewritten(&out, c2, sa(GREEN), b"", "the SYN after the flip is not captured by the bare ACK's entry");
    // Its handshake completes on green.
    let (_, out) = run(&dp, &Pkt::tcp(sa(GREEN), c2, TCP_SYN | TCP_ACK).seq(500).ack(78).build());
    assert_rewritten(&out, sa(VIP), c2, b"", "green's SYN-ACK");
    let (_, out) = run(&dp, &Pkt::tcp(c2, sa(VIP), TCP_ACK).seq(78).ack(501).build());
    assert_rewritten(&out, c2, sa(GREEN), b"", "handshake ACK on green");
    let f = dp.flow_counts().unwrap();
    // c1: one unconfirmed entry (its second SYN replaced the first), on green; c2: established
    // on green.
    assert_eq!((f.entries, f.unconfirmed_entries, f.flows), (1, 1, [0, 2]));

    // Only a completed handshake confirms: not a SYN-ACK for another SYN, not a SYN-ACK alone
    // (a spoofed SYN gets one too), not a client ACK that does not acknowledge the SYN-ACK.
    let c3 = sa("10.0.0.2:45003");
    run(&dp, &Pkt::tcp(c3, sa(VIP), TCP_SYN).seq(1000).build());
    run(&dp, &Pkt::tcp(sa(GREEN), c3, TCP_SYN | TCP_ACK).seq(3000).ack(5000).build());
    run(&dp, &Pkt::tcp(c3, sa(VIP), TCP_ACK).seq(1001).ack(3001).build());
    assert_eq!(dp.fwd_count(Fwd::FlowsConfirmed).unwrap(), 1, "a SYN-ACK for another SYN confirms nothing");
    run(&dp, &Pkt::tcp(sa(GREEN), c3, TCP_SYN | TCP_ACK).seq(3000).ack(1001).build());
    assert_eq!(dp.fwd_count(Fwd::FlowsConfirmed).unwrap(), 1, "a SYN-ACK alone confirms nothing");
    for wrong in [3000u32, 3001 + 70_000, 0x7000_0000] {
        run(&dp, &Pkt::tcp(c3, sa(VIP), TCP_ACK).seq(1001).ack(wrong).build());
    }
    assert_eq!(dp.fwd_count(Fwd::FlowsConfirmed).unwrap(), 1, "an ACK that does not acknowledge the SYN-ACK confirms nothing");
    run(&dp, &Pkt::tcp(c3, sa(VIP), TCP_ACK).seq(1001).ack(3001).build());
    assert_eq!(dp.fwd_count(Fwd::FlowsConfirmed).unwrap(), 2, "the handshake's ACK does");
}

/// A SYN with a new ISN on an open established flow goes to the active color as a new flow,
/// but does not erase the old entry: the client's next packet decides. A spoofed SYN leaves
/// the live connection where it is; a client that really started over (its ACK carries the new
/// ISN + 1) moves to the new flow.
#[test]
fn a_syn_contesting_an_open_flow_takes_over_only_when_its_client_goes_on_with_it() {
    let mut dp = dataplane(CONFIG);
    let c = sa("10.0.0.2:46001");
    let next = open_flow(&dp, c, sa(BLUE), 40_000);
    dp.select(Color::Green).unwrap();

    // Spoofed: a SYN with another ISN, answered by green; the real client goes on with its
    // old connection (its challenge ACK, then data): blue, every time.
    let (_, out) = run(&dp, &Pkt::tcp(c, sa(VIP), TCP_SYN).seq(666).build());
    assert_rewritten(&out, c, sa(GREEN), b"", "the contesting SYN goes to the active color");
    run(&dp, &Pkt::tcp(sa(GREEN), c, TCP_SYN | TCP_ACK).ack(667).build());
    for payload in [&b""[..], b"more"] {
        let (_, out) = run(&dp, &Pkt::tcp(c, sa(VIP), TCP_ACK).seq(next).payload(payload).build());
        assert_rewritten(&out, c, sa(BLUE), payload, "the old connection goes on: blue");
    }
    assert_eq!(dp.fwd_count(Fwd::FlowsConfirmed).unwrap(), 1, "green's SYN-ACK did not take over the open flow");

    // Real: the client started over (ISN 777); its ACK of green's SYN-ACK carries 778.
    // A spoofer who also sends the ACK of its SYN (seq = its ISN + 1) cannot know green's ISN:
    // no takeover either.
    let (_, out) = run(&dp, &Pkt::tcp(c, sa(VIP), TCP_SYN).seq(888).build());
    assert_rewritten(&out, c, sa(GREEN), b"", "second spoofed SYN");
    run(&dp, &Pkt::tcp(sa(GREEN), c, TCP_SYN | TCP_ACK).seq(60_000).ack(889).build());
    let (_, out) = run(&dp, &Pkt::tcp(c, sa(VIP), TCP_ACK).seq(889).ack(123_456_789).build());
    assert_rewritten(&out, c, sa(BLUE), b"", "a blind ACK for the spoofed SYN stays with the live connection");
    // One guess only: the contest is over, even the right acknowledgment takes nothing over now.
    let (_, out) = run(&dp, &Pkt::tcp(c, sa(VIP), TCP_ACK).seq(889).ack(60_001).build());
    assert_rewritten(&out, c, sa(BLUE), b"", "no second guess");
    let (_, out) = run(&dp, &Pkt::tcp(c, sa(VIP), TCP_ACK).seq(next).payload(b"still").build());
    assert_rewritten(&out, c, sa(BLUE), b"still", "the old connection goes on: blue");

    // Real: the client started over (ISN 777); its ACK of green's SYN-ACK carries 778 and
    // acknowledges green's ISN.
    let (_, out) = run(&dp, &Pkt::tcp(c, sa(VIP), TCP_SYN).seq(777).build());
    assert_rewritten(&out, c, sa(GREEN), b"", "new connection's SYN");
    run(&dp, &Pkt::tcp(sa(GREEN), c, TCP_SYN | TCP_ACK).seq(90_000).ack(778).build());
    let (_, out) = run(&dp, &Pkt::tcp(c, sa(VIP), TCP_ACK).seq(778).ack(90_001).build());
    assert_rewritten(&out, c, sa(GREEN), b"", "its handshake ACK takes the 4-tuple over");
    let (_, out) = run(&dp, &Pkt::tcp(c, sa(VIP), TCP_ACK).seq(778).ack(90_001).payload(b"GET").build());
    assert_rewritten(&out, c, sa(GREEN), b"GET", "and stays on green");
    let f = dp.flow_counts().unwrap();
    assert_eq!((f.entries, f.unconfirmed_entries, f.flows), (1, 0, [0, 1]), "one established flow, on green");
}

/// New and unconfirmed flows cannot evict established ones: a SYN flood five times the size
/// of the unconfirmed table churns that table only, and every established flow keeps its
/// backend after a flip.
#[test]
fn a_flood_larger_than_the_unconfirmed_table_evicts_no_established_flow() {
    let config = CONFIG.replace("max_new_flows_per_sec = 0", "max_new_flows_per_sec = 0\nflow_table_size = 1024\nunconfirmed_table_size = 1024");
    let mut dp = dataplane(&config);
    let clients: Vec<SocketAddrV4> = (0..100u16).map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 2), 20_000 + i)).collect();
    let nexts: Vec<u32> = clients.iter().map(|c| open_flow(&dp, *c, sa(BLUE), 100 + c.port() as u32)).collect();
    for i in 0..5120u32 {
        let spoofed = SocketAddrV4::new(Ipv4Addr::from(0x0b00_0000 + i), 1024 + (i % 60000) as u16);
        run(&dp, &Pkt::tcp(spoofed, sa(VIP), TCP_SYN).seq(i).build());
        run(&dp, &Pkt::tcp(spoofed, sa(VIP), TCP_ACK).seq(i).build());
    }
    let f = dp.flow_counts().unwrap();
    assert_eq!(f.entries, 100, "every established entry is still there: {f:?}");
    assert!(f.unconfirmed_entries <= 1024, "the flood stayed in its table: {f:?}");
    dp.select(Color::Green).unwrap();
    for (c, next) in clients.iter().zip(&nexts) {
        let (_, out) = run(&dp, &Pkt::tcp(*c, sa(VIP), TCP_ACK).seq(*next).payload(b"x").build());
        assert_rewritten(&out, *c, sa(BLUE), b"x", "an established flow after the flood and a flip");
    }
}

/// Replies are rewritten by the static backend → VIP map, with no per-flow state; replies to
/// the gateway's own addresses (the agent's health checks) are left alone; a preview flow's
/// replies come from the preview VIP.
#[test]
fn replies_need_no_flow_state_except_to_the_gateway_itself_and_for_preview_flows() {
    let ns = bg_tests::netns::Netns::new(&bg_tests::run::tag("rep")).unwrap();
    ns.exec(&["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"]).unwrap();
    ns.exec(&["ip", "addr", "add", "10.77.0.1/24", "dev", "d0"]).unwrap();
    ns.exec(&["ip", "link", "set", "d0", "up"]).unwrap();
    let _inside = bg_tests::netns::InNetns::enter(&ns).unwrap();
    let config = CONFIG.replace("vip = \"10.100.0.1:80\"", "vip = \"10.100.0.1:80\"\npreview_vip = \"10.100.0.1:8080\"");
    assert!(config.contains("preview_vip"));
    let mut dp = dataplane(&config);

    // No flow at all: a backend's service port answering is rewritten from the VIP.
    let (_, out) = run(&dp, &Pkt::tcp(sa(BLUE), sa("10.0.0.50:1234"), TCP_ACK).payload(b"r").build());
    assert_rewritten(&out, sa(VIP), sa("10.0.0.50:1234"), b"r", "a reply without any flow state");
    assert_eq!(dp.flow_counts().unwrap().entries + dp.flow_counts().unwrap().unconfirmed_entries, 0);
    // To the gateway's own address: untouched (the agent checks backends from there).
    let health = Pkt::tcp(sa(BLUE), sa("10.77.0.1:50000"), TCP_SYN | TCP_ACK).build();
    let (action, out) = run(&dp, &health);
    assert_eq!((action, &out), (XDP_PASS, &health), "a reply to the gateway itself passes untouched");
    let (_, out) = run(&dp, &Pkt::tcp(sa(BLUE), sa("10.77.0.2:50000"), TCP_ACK).build());
    assert_rewritten(&out, sa(VIP), sa("10.77.0.2:50000"), b"", "another host of that network is a client");

    // Preview: the idle color (green) answers from the preview VIP; green answering a main-VIP
    // flow (after a flip) answers from the main VIP.
    let pc = sa("10.0.0.2:47001");
    let (_, out) = run(&dp, &Pkt::tcp(pc, sa("10.100.0.1:8080"), TCP_SYN).build());
    assert_rewritten(&out, pc, sa(GREEN), b"", "preview SYN to the idle color");
    let (_, out) = run(&dp, &Pkt::tcp(sa(GREEN), pc, TCP_SYN | TCP_ACK).ack(packet::DEFAULT_SEQ + 1).build());
    assert_rewritten(&out, sa("10.100.0.1:8080"), pc, b"", "its reply from the preview VIP");
    let (_, out) = run(&dp, &Pkt::tcp(sa(GREEN), sa("10.0.0.2:47002"), TCP_ACK).build());
    assert_rewritten(&out, sa(VIP), sa("10.0.0.2:47002"), b"", "green to another client: the main VIP");
    // The preview connection is over; after a flip the client reuses its port for the main
    // VIP and lands on the same green backend: its replies come from the main VIP, not from the
    // preview VIP the old mapping named.
    dp.select(Color::Green).unwrap();
    let (_, out) = run(&dp, &Pkt::tcp(pc, sa(VIP), TCP_SYN).seq(4242).build());
    assert_rewritten(&out, pc, sa(GREEN), b"", "main-VIP SYN from the reused port");
    let (_, out) = run(&dp, &Pkt::tcp(sa(GREEN), pc, TCP_SYN | TCP_ACK).ack(4243).build());
    assert_rewritten(&out, sa(VIP), pc, b"", "its SYN-ACK from the main VIP");
}

/// Packets forged to confirm or end flows: a SYN-ACK from another backend's address, a UDP
/// "reply" from the wrong backend, a FIN far from what the client sent; and an ICMP error about
/// a VIP reply addressed to a third host, which must not learn the backend's address.
#[test]
fn forged_answers_confirm_nothing_blind_fins_end_nothing_and_icmp_errors_leak_no_backend() {
    let config = CONFIG.replace(r#"blue = ["10.1.0.2:8080"]"#, r#"blue = ["10.1.0.2:8080", "10.1.0.3:8080"]"#).replace("max_new_flows_per_sec = 0", "max_new_flows_per_sec = 0\nclosing_timeout_secs = 1");
    let mut dp = dataplane(&config);
    let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    // Find a client whose flow goes to 10.1.0.2 (so 10.1.0.3 is "another backend").
    let c = (41000..41100u16)
        .map(|p| SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), p))
        .find(|c| {
            let (_, out) = run(&dp, &Pkt::tcp(*c, sa(VIP), TCP_SYN).seq(1).build());
            packet::parse_v4(&out).dst == sa(BLUE)
        })
        .expect("a flow to 10.1.0.2");
    run(&dp, &Pkt::tcp(sa("10.1.0.3:8080"), c, TCP_SYN | TCP_ACK).seq(500).ack(2).build());
    run(&dp, &Pkt::tcp(c, sa(VIP), TCP_ACK).seq(2).ack(501).build());
    let confirmed = dp.fwd_count(Fwd::FlowsConfirmed).unwrap();
    assert_eq!(confirmed, 0, "a SYN-ACK from another backend's address noted nothing");
    run(&dp, &Pkt::tcp(sa(BLUE), c, TCP_SYN | TCP_ACK).seq(700).ack(2).build());
    run(&dp, &Pkt::tcp(c, sa(VIP), TCP_ACK).seq(2).ack(701).build());
    assert_eq!(dp.fwd_count(Fwd::FlowsConfirmed).unwrap(), 1, "its own backend's did");

    // UDP: a "reply" from the other backend's address confirms nothing.
    let u = sa("10.0.0.2:41500");
    let (_, out) = run(&dp, &packet::udp(u, sa(DNS), b"q"));
    let to = packet::parse_v4(&out).dst;
    let wrong = if to == sa(BLUE_DNS) { "10.2.0.2:5353" } else { BLUE_DNS };
    run(&dp, &packet::udp(sa(wrong), u, b"forged"));
    assert_eq!(dp.fwd_count(Fwd::FlowsConfirmed).unwrap(), 1, "a UDP reply from the wrong backend confirms nothing");

    // A FIN far from what the client sent does not mark the flow closing: idle past the closing
    // timeout it still follows its backend after a flip.
    dp.select(Color::Green).unwrap();
    run(&dp, &Pkt::tcp(c, sa(VIP), TCP_FIN | TCP_ACK).seq(9_000_000).ack(701).build());
    std::thread::sleep(Duration::from_millis(2100));
    let (_, out) = run(&dp, &Pkt::tcp(c, sa(VIP), TCP_ACK).seq(2).ack(701).payload(b"x").build());
    assert_rewritten(&out, c, sa(BLUE), b"x", "a blind FIN ended nothing");

    // An error about a VIP reply (VIP -> client) sent to a third host, not to the VIP: left
    // alone (rewritten, its quote would name the backend to that host).
    let reply = Pkt::tcp(sa(VIP), c, TCP_ACK).payload(&[1; 100]).build();
    let err = packet::icmp_error(ip("10.0.0.1"), ip("10.0.0.77"), 3, 4, 1280, &reply, 20);
    let (action, out) = run(&dp, &err);
    assert_eq!((action, &out), (XDP_PASS, &err), "an error about a VIP reply to a third host passes untouched");
}

/// What each backend's real traffic saw, counted by the data path per backend (and so per
/// service and color): flows started, answered in time, refused by an RST, left without an
/// answer until the client retransmitted, reset after the answer; bytes each way; and the
/// SYN → SYN-ACK latency in a log2 histogram. Expectations are counted by hand from the
/// packets sent here.
#[test]
fn connection_signals_count_answers_refusals_silences_resets_bytes_and_latency() {
    let dp = dataplane(CONFIG);
    let maps = dp.signal_maps().unwrap();
    let (vip, blue, dns, blue_dns) = (sa(VIP), sa(BLUE), sa(DNS), sa(BLUE_DNS));
    let client = |port: u16| SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), port);
    let (mut to, mut from) = (0u64, 0u64);
    let mut send = |frame: Vec<u8>, reply: bool| {
        let (action, _) = run(&dp, &frame);
        assert_eq!(action, XDP_PASS, "every packet here is rewritten and passed");
        if reply {
            from += frame.len() as u64;
        } else {
            to += frame.len() as u64;
        }
    };
    // 1: a handshake answered 60 ms after its SYN, confirmed, then reset by the backend
    // (twice: counted once).
    send(Pkt::tcp(client(41001), vip, TCP_SYN).seq(1000).build(), false);
    std::thread::sleep(Duration::from_millis(60));
    send(Pkt::tcp(blue, client(41001), TCP_SYN | TCP_ACK).seq(5000).ack(1001).build(), true);
    send(Pkt::tcp(client(41001), vip, TCP_ACK).seq(1001).ack(5001).build(), false);
    send(Pkt::tcp(blue, client(41001), TCP_RST | TCP_ACK).seq(5001).ack(1001).build(), true);
    send(Pkt::tcp(blue, client(41001), TCP_RST).seq(5001).build(), true);
    // 2: the SYN sent again 850 ms later with no answer yet (unanswered in time), again
    // (counted once), then answered late (timed, not counted as answered).
    send(Pkt::tcp(client(41002), vip, TCP_SYN).seq(2000).build(), false);
    std::thread::sleep(Duration::from_millis(850));
    send(Pkt::tcp(client(41002), vip, TCP_SYN).seq(2000).build(), false);
    send(Pkt::tcp(client(41002), vip, TCP_SYN).seq(2000).build(), false);
    send(Pkt::tcp(blue, client(41002), TCP_SYN | TCP_ACK).seq(6000).ack(2001).build(), true);
    // 3: the SYN refused (an RST acknowledging it), then a second RST: counted once.
    send(Pkt::tcp(client(41003), vip, TCP_SYN).seq(3000).build(), false);
    send(Pkt::tcp(blue, client(41003), TCP_RST | TCP_ACK).ack(3001).build(), true);
    send(Pkt::tcp(blue, client(41003), TCP_RST | TCP_ACK).ack(3001).build(), true);
    // 4: an RST that acknowledges something else refuses nothing; nor one for no flow at all.
    send(Pkt::tcp(client(41004), vip, TCP_SYN).seq(4000).build(), false);
    send(Pkt::tcp(blue, client(41004), TCP_RST | TCP_ACK).ack(777).build(), true);
    send(Pkt::tcp(blue, client(49999), TCP_RST | TCP_ACK).ack(1).build(), true);
    // 6: a duplicate SYN sent at once (as a spoofer would) is no failure; the answer counts.
    send(Pkt::tcp(client(41006), vip, TCP_SYN).seq(6000).build(), false);
    send(Pkt::tcp(client(41006), vip, TCP_SYN).seq(6000).build(), false);
    send(Pkt::tcp(blue, client(41006), TCP_SYN | TCP_ACK).seq(9000).ack(6001).build(), true);
    // 7: answered, never confirmed by the client (half-open), then an RST from the backend
    // (what a spoofed wrong ACK draws): no reset of a confirmed flow.
    send(Pkt::tcp(client(41007), vip, TCP_SYN).seq(7000).build(), false);
    send(Pkt::tcp(blue, client(41007), TCP_SYN | TCP_ACK).seq(9500).ack(7001).build(), true);
    send(Pkt::tcp(blue, client(41007), TCP_RST).seq(9501).build(), true);
    // 8: confirmed, closed by the client (FIN), then reset by the backend: not counted.
    send(Pkt::tcp(client(41008), vip, TCP_SYN).seq(8000).build(), false);
    send(Pkt::tcp(blue, client(41008), TCP_SYN | TCP_ACK).seq(9700).ack(8001).build(), true);
    send(Pkt::tcp(client(41008), vip, TCP_ACK).seq(8001).ack(9701).build(), false);
    send(Pkt::tcp(client(41008), vip, TCP_FIN | TCP_ACK).seq(8001).ack(9701).build(), false);
    send(Pkt::tcp(blue, client(41008), TCP_RST).seq(9701).build(), true);
    // 5: UDP: one flow answered; one whose client sent again at once (no failure) and more
    // than a second later (unanswered in time).
    send(Pkt::udp(client(42001), dns).payload(b"q").build(), false);
    send(Pkt::udp(blue_dns, client(42001)).payload(b"a").build(), true);
    send(Pkt::udp(client(42002), dns).payload(b"q").build(), false);
    send(Pkt::udp(client(42002), dns).payload(b"q").build(), false);
    std::thread::sleep(Duration::from_millis(1100));
    send(Pkt::udp(client(42002), dns).payload(b"q").build(), false);

    let r = maps.read().unwrap();
    // Read by batch lookups and entry by entry alike.
    let each = bg_userspace::signals::Maps { batch: false, ..dp.signal_maps().unwrap() };
    assert_eq!(each.read().unwrap(), r, "batched and per-entry readings differ");
    // Blocks: web blue, web green, dns blue, dns green; one backend each.
    let web = r.blocks[0][0];
    assert_eq!(
        (web.new_flows, web.answered, web.refused, web.no_answer, web.resets),
        (7, 4, 1, 1, 1),
        "web blue: 7 SYN-started flows; 1, 6, 7, 8 answered in time; 3 refused; 2 unanswered in time; 1 reset: {web:?}"
    );
    let udp = r.blocks[2][0];
    assert_eq!((udp.new_flows, udp.answered, udp.no_answer, udp.refused, udp.resets), (2, 1, 1, 0, 0), "dns blue: {udp:?}");
    assert_eq!(web.bytes_to + udp.bytes_to, to, "bytes client -> backend, every frame counted whole");
    assert_eq!(web.bytes_from + udp.bytes_from, from, "bytes backend -> client");
    assert!(r.blocks[1][0] == Default::default() && r.blocks[3][0] == Default::default(), "green saw nothing: {r:?}");
    // Five SYN-ACKs timed: flow 1's after 60 ms (bucket [33.5, 67.1) ms, or the next on a
    // slow machine), flow 2's after 850 ms (bucket [537, 1074) ms), flows 6, 7 and 8 at once.
    let h = r.latency[0];
    assert_eq!(h.iter().sum::<u64>(), 5, "web blue handshakes timed: {h:?}");
    assert_eq!(h[16] + h[17] + h[18], 1, "flow 1's 60 ms handshake: {h:?}");
    assert_eq!(h[20], 1, "flow 2's late handshake, 850 ms: {h:?}");
    assert_eq!(h[..14].iter().sum::<u64>(), 3, "flows 6, 7 and 8, answered within 8 ms: {h:?}");
    assert!(r.latency[1..].iter().all(|h| h.iter().sum::<u64>() == 0), "no other histogram moved");
}

/// Two gateways given the same config (a fleet behind ECMP) compute identical Maglev tables:
/// a flow that ECMP moves from one to the other mid-connection lands on the same backend, and
/// a reply that returns through the other gateway is rewritten back to the VIP without that
/// flow's state there.
#[test]
fn two_gateways_from_one_config_keep_a_moved_flow_on_its_backend() {
    let mut cfg = String::from("interfaces = [\"unused0\"]\nforwarding = \"kernel\"\nmax_new_flows_per_sec = 0\n[[service]]\nname = \"web\"\nvip = \"10.100.0.1:80\"\n");
    let list = |net: u8| (2..10).map(|h| format!("\"10.{net}.0.{h}:8080\"")).collect::<Vec<_>>().join(", ");
    cfg += &format!("blue = [{}]\ngreen = [{}]\n", list(1), list(2));
    let (a, b) = (dataplane(&cfg), dataplane(&cfg));
    for color in Color::ALL {
        let (ra, rb) = (a.ring(color, 0).unwrap(), b.ring(color, 0).unwrap());
        assert_eq!(ra.len(), 16_381);
        assert!(ra == rb, "{} Maglev tables differ between the two gateways", color.name());
    }
    let vip = sa(VIP);
    let mut backends = std::collections::BTreeSet::new();
    for port in 30_000..30_200u16 {
        let client = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), port);
        // The SYN through gateway A picks the backend.
        let (_, out) = run(&a, &Pkt::tcp(client, vip, TCP_SYN).seq(100).build());
        let backend = packet::parse_v4(&out).dst;
        assert_eq!(backend.port(), 8080, "SYN rewritten to a blue backend: {backend}");
        backends.insert(*backend.ip());
        // Its SYN-ACK returns through gateway B, which never saw the flow: rewritten to the VIP.
        let (_, out) = run(&b, &Pkt::tcp(backend, client, TCP_SYN | TCP_ACK).seq(900).ack(101).build());
        assert_rewritten(&out, vip, client, b"", "a SYN-ACK through the other gateway");
        // ECMP moves the flow to gateway B: its ACK and data reach the same backend.
        let (_, out) = run(&b, &Pkt::tcp(client, vip, TCP_ACK).seq(101).ack(901).payload(b"GET /").build());
        assert_rewritten(&out, client, backend, b"GET /", "the moved flow's next packet");
    }
    assert!(backends.len() >= 6, "the flows spread over the backends: {backends:?}");
}
