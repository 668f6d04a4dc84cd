//! Packet tier: the real XDP object under BPF_PROG_TEST_RUN with crafted frames. Needs root.
//!
//! The main table runs in order on one data path (earlier rows create the flows later rows
//! use). Every row states its input, the action, the reason counted and the expected output;
//! rewritten outputs have both checksums recomputed from scratch.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use bg_common::{Color, Fwd, Reason, Selector};
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

/// Asserts `frame` is a valid IPv4 packet from `src` to `dst` carrying `payload`.
fn assert_rewritten(frame: &[u8], src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8], what: &str) {
    let p = packet::parse_v4(frame);
    assert_eq!((p.src, p.dst), (src, dst), "{what}: addresses/ports after rewrite");
    assert!(p.ip_checksum_ok, "{what}: IPv4 header checksum does not verify");
    assert!(p.l4_checksum_ok, "{what}: L4 checksum does not verify when recomputed");
    assert_eq!(p.payload, payload, "{what}: payload changed");
}

/// What a row expects of the output frame.
enum Out {
    /// Byte for byte the input.
    Unchanged,
    /// Rewritten to (src, dst), checksums valid, payload and IP options kept.
    Rewritten(&'static str, &'static str),
    /// Dropped: no output to check.
    Dropped,
}

struct Row {
    what: &'static str,
    input: Vec<u8>,
    action: u32,
    reason: Reason,
    out: Out,
}

fn row(what: &'static str, input: Vec<u8>, reason: Reason, out: Out) -> Row {
    let action = if reason.is_drop() { XDP_DROP } else { XDP_PASS };
    Row { what, input, action, reason, out }
}

fn check(dp: &Dataplane, r: &Row) {
    let before = dp.reason_count(r.reason).unwrap();
    let (action, out) = run(dp, &r.input);
    assert_eq!(action, r.action, "{}: action", r.what);
    assert_eq!(dp.reason_count(r.reason).unwrap(), before + 1, "{}: counted as {}", r.what, r.reason.name());
    match r.out {
        Out::Unchanged => assert_eq!(out, r.input, "{}: bytes must be unchanged", r.what),
        Out::Rewritten(src, dst) => {
            let input = packet::parse_v4(&r.input);
            assert_eq!(out.len(), r.input.len(), "{}: length", r.what);
            assert_eq!(&out[..14], &r.input[..14], "{}: Ethernet header untouched in kernel mode", r.what);
            assert_rewritten(&out, sa(src), sa(dst), &input.payload, r.what);
            let got = packet::parse_v4(&out);
            assert_eq!(got.options, input.options, "{}: IP options kept", r.what);
            assert_eq!(got.ttl, input.ttl, "{}: TTL is the kernel's to decrement in kernel mode", r.what);
        }
        Out::Dropped => {}
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
    let dp = dataplane(CONFIG);
    let other = "10.9.9.9:80";
    let syn = || Pkt::tcp(sa(CLIENT), sa(VIP), TCP_SYN);
    let truncated = |p: Vec<u8>, keep: usize| p[..keep].to_vec();
    let mut bare_eth = vec![0u8; 14];
    bare_eth[12..14].copy_from_slice(&[0x88, 0xb5]);
    let zero_payload = payload_with_zero_checksum_after_rewrite();

    let rows = vec![
        row("TCP SYN to VIP:80", syn().build(), Reason::NewFlow, Out::Rewritten(CLIENT, BLUE)),
        row("TCP data on that flow", Pkt::tcp(sa(CLIENT), sa(VIP), TCP_ACK).payload(b"GET / HTTP/1.1\r\n\r\n").build(), Reason::ToBackend, Out::Rewritten(CLIENT, BLUE)),
        row("backend SYN-ACK", Pkt::tcp(sa(BLUE), sa(CLIENT), TCP_SYN | TCP_ACK).build(), Reason::FromBackend, Out::Rewritten(VIP, CLIENT)),
        row("backend response", Pkt::tcp(sa(BLUE), sa(CLIENT), TCP_ACK).payload(b"blue\n").build(), Reason::FromBackend, Out::Rewritten(VIP, CLIENT)),
        row("retransmitted SYN stays on its flow", syn().build(), Reason::ToBackend, Out::Rewritten(CLIENT, BLUE)),
        row("TCP to another host", Pkt::tcp(sa(CLIENT), sa(other), TCP_SYN).build(), Reason::PassNotOurs, Out::Unchanged),
        row("TCP to the VIP on an unserved port", Pkt::tcp(sa(CLIENT), sa("10.100.0.1:443"), TCP_SYN).build(), Reason::PassNotOurs, Out::Unchanged),
        row("UDP to the VIP's TCP port", packet::udp(sa(CLIENT), sa(VIP), b"x"), Reason::PassNotOurs, Out::Unchanged),
        row("backend talking to a client directly", Pkt::tcp(sa(BLUE), sa("10.0.0.3:5555"), TCP_ACK).build(), Reason::PassNotOurs, Out::Unchanged),
        row("IPv6 TCP to a host that is no VIP", packet::ipv6_tcp_syn(), Reason::PassNotOurs, Out::Unchanged),
        row("ARP", packet::arp(Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 100, 0, 1)), Reason::PassNotIp, Out::Unchanged),
        row("bare Ethernet header (LLDP type)", bare_eth, Reason::PassNotIp, Out::Unchanged),
        row("IPv4 header cut at 10 bytes", truncated(syn().build(), 14 + 10), Reason::PassTruncated, Out::Unchanged),
        row("TCP header cut at 10 bytes, to the VIP", truncated(syn().build(), 14 + 20 + 10), Reason::DropMalformed, Out::Dropped),
        row("TCP header cut at 10 bytes, to another host", truncated(Pkt::tcp(sa(CLIENT), sa(other), TCP_SYN).build(), 14 + 20 + 10), Reason::PassTruncated, Out::Unchanged),
        row("UDP header cut at 4 bytes, to the VIP", truncated(Pkt::udp(sa(CLIENT), sa(DNS)).build(), 14 + 20 + 4), Reason::DropMalformed, Out::Dropped),
        row("IPv4 options (IHL 7), SYN to the VIP", Pkt::tcp(sa("10.0.0.2:40100"), sa(VIP), TCP_SYN).options(&[1, 1, 1, 1, 0x44, 4, 5, 0]).build(), Reason::NewFlow, Out::Rewritten("10.0.0.2:40100", BLUE)),
        row("IHL 4, to the VIP", syn().ihl(4).build(), Reason::DropMalformed, Out::Dropped),
        row("IHL 4, to another host", Pkt::tcp(sa(CLIENT), sa(other), TCP_SYN).ihl(4).build(), Reason::PassMalformed, Out::Unchanged),
        row("first fragment, to the VIP", Pkt::tcp(sa("10.0.0.2:40200"), sa(VIP), TCP_SYN).fragment(0, true).build(), Reason::DropFragment, Out::Dropped),
        row("middle fragment, to the VIP", Pkt::tcp(sa(CLIENT), sa(VIP), 0).payload(&[7; 16]).fragment(3, true).build(), Reason::DropFragment, Out::Dropped),
        row("last fragment, to the VIP", Pkt::tcp(sa(CLIENT), sa(VIP), 0).payload(&[7; 16]).fragment(5, false).build(), Reason::DropFragment, Out::Dropped),
        row("fragment to another host", Pkt::udp(sa(CLIENT), sa(other)).payload(&[7; 16]).fragment(3, true).build(), Reason::PassFragment, Out::Unchanged),
        row("VLAN-tagged SYN to the VIP", Pkt::tcp(sa("10.0.0.2:40300"), sa(VIP), TCP_SYN).vlan(7).build(), Reason::PassVlan, Out::Unchanged),
        row("TTL 1 SYN to the VIP", Pkt::tcp(sa("10.0.0.2:40400"), sa(VIP), TCP_SYN).ttl(1).build(), Reason::PassTtlExpired, Out::Unchanged),
        row("TTL 0 SYN to the VIP", Pkt::tcp(sa("10.0.0.2:40401"), sa(VIP), TCP_SYN).ttl(0).build(), Reason::PassTtlExpired, Out::Unchanged),
        row("TTL 2 SYN to the VIP", Pkt::tcp(sa("10.0.0.2:40402"), sa(VIP), TCP_SYN).ttl(2).build(), Reason::NewFlow, Out::Rewritten("10.0.0.2:40402", BLUE)),
        row("UDP query to the VIP", Pkt::udp(sa(CLIENT), sa(DNS)).payload(b"query").build(), Reason::NewFlow, Out::Rewritten(CLIENT, BLUE_DNS)),
        row("UDP reply from the backend", Pkt::udp(sa(BLUE_DNS), sa(CLIENT)).payload(b"answer").build(), Reason::FromBackend, Out::Rewritten(DNS, CLIENT)),
        row("8-byte UDP datagram (no payload)", Pkt::udp(sa("10.0.0.2:40500"), sa(DNS)).build(), Reason::NewFlow, Out::Rewritten("10.0.0.2:40500", BLUE_DNS)),
        row("UDP whose rewritten checksum computes to 0", Pkt::udp(sa(CLIENT), sa(DNS)).payload(&zero_payload).build(), Reason::ToBackend, Out::Rewritten(CLIENT, BLUE_DNS)),
        row("TCP RST to the VIP, no flow", Pkt::tcp(sa("10.0.0.2:40600"), sa(VIP), TCP_RST).build(), Reason::DropRstNoFlow, Out::Dropped),
        row("TCP ACK to the VIP, no flow (entry lost)", Pkt::tcp(sa("10.0.0.2:40700"), sa(VIP), TCP_ACK).build(), Reason::LostFlow, Out::Rewritten("10.0.0.2:40700", BLUE)),
    ];
    for r in &rows {
        check(&dp, r);
    }

    // The 0 → 0xffff rule: the checksum field of that row's output is 0xffff.
    let (_, out) = run(&dp, &Pkt::udp(sa(CLIENT), sa(DNS)).payload(&zero_payload).build());
    assert_eq!(packet::parse_v4(&out).l4_checksum, 0xffff, "a computed UDP checksum of 0 is sent as 0xffff");
    // UDP checksum 0 ("none") stays 0.
    let (_, out) = run(&dp, &Pkt::udp(sa("10.0.0.2:40501"), sa(DNS)).payload(b"q").no_udp_checksum().build());
    let p = packet::parse_v4(&out);
    assert_eq!((p.dst, p.l4_checksum, p.ip_checksum_ok), (sa(BLUE_DNS), 0, true), "UDP checksum 0 stays 0");

    // Drops and passes created no flow entries: only the rows marked NewFlow/LostFlow did.
    let flows = dp.flow_counts().unwrap();
    assert_eq!(flows.flows, [7, 0], "flows per color [blue, green]");
    assert_eq!(flows.entries, 14, "two entries per flow");
    let total: u64 = Reason::ALL.iter().map(|r| dp.reason_count(*r).unwrap()).sum();
    assert_eq!(total, rows.len() as u64 + 2, "every run counted exactly one reason");
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

#[test]
fn rst_removes_the_flow_and_fin_lets_it_expire_when_idle() {
    let config = CONFIG.replace("max_new_flows_per_sec = 0", "max_new_flows_per_sec = 0\nclosing_timeout_secs = 1");
    let mut dp = dataplane(&config);
    // RST from the backend ends the flow: both entries go, the RST itself is still NATed.
    run(&dp, &packet::tcp(sa(CLIENT), sa(VIP), TCP_SYN, b""));
    assert_eq!(dp.flow_counts().unwrap().entries, 2);
    let (action, out) = run(&dp, &packet::tcp(sa(BLUE), sa(CLIENT), TCP_RST | TCP_ACK, b""));
    assert_eq!(action, XDP_PASS);
    assert_rewritten(&out, sa(VIP), sa(CLIENT), b"", "RST from the backend");
    assert_eq!(dp.flow_counts().unwrap().entries, 0, "RST removed both directions");
    assert_eq!(dp.fwd_count(Fwd::FlowsRemoved).unwrap(), 2);

    // FIN marks the flow closing; while packets flow it stays, idle past the timeout it is over.
    let c2 = sa("10.0.0.2:41000");
    run(&dp, &packet::tcp(c2, sa(VIP), TCP_SYN, b""));
    run(&dp, &packet::tcp(c2, sa(VIP), TCP_FIN | TCP_ACK, b""));
    let (_, out) = run(&dp, &packet::tcp(c2, sa(VIP), TCP_ACK, b""));
    assert_rewritten(&out, c2, sa(BLUE), b"", "closing flow still follows its entry");
    dp.select(Color::Green).unwrap();
    // A SYN reusing the port of a closing flow is a new connection: it follows the flip.
    let c3 = sa("10.0.0.2:41001");
    run(&dp, &packet::tcp(c3, sa(VIP), TCP_SYN, b""));
    run(&dp, &packet::tcp(c3, sa(VIP), TCP_FIN | TCP_ACK, b""));
    let (_, out) = run(&dp, &packet::tcp(c3, sa(VIP), TCP_SYN, b""));
    assert_rewritten(&out, c3, sa(GREEN), b"", "SYN on a closing entry starts a new flow");

    std::thread::sleep(Duration::from_millis(2100));
    let lost = dp.reason_count(Reason::LostFlow).unwrap();
    let (_, out) = run(&dp, &packet::tcp(c2, sa(VIP), TCP_ACK, b""));
    assert_rewritten(&out, c2, sa(GREEN), b"", "an idle closing flow is over: re-pinned to the active color");
    assert_eq!(dp.reason_count(Reason::LostFlow).unwrap(), lost + 1);
}

#[test]
fn udp_flows_expire_after_the_idle_timeout() {
    let config = CONFIG.replace("max_new_flows_per_sec = 0", "max_new_flows_per_sec = 0\nudp_idle_timeout_secs = 1");
    let mut dp = dataplane(&config);
    let q = packet::udp(sa(CLIENT), sa(DNS), b"q");
    let (_, out) = run(&dp, &q);
    assert_rewritten(&out, sa(CLIENT), sa(BLUE_DNS), b"q", "first datagram");
    dp.select(Color::Green).unwrap();
    let (_, out) = run(&dp, &q);
    assert_rewritten(&out, sa(CLIENT), sa(BLUE_DNS), b"q", "within the idle timeout: same backend");
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(dp.flow_counts().unwrap().expired, 2, "both entries are expired");
    let (_, out) = run(&dp, &q);
    assert_rewritten(&out, sa(CLIENT), sa("10.2.0.2:5353"), b"q", "after the idle timeout: a new flow on the active color");
}

#[test]
fn new_flow_rate_bound_drops_syns_but_not_established_flows() {
    // Pin to one CPU: the bound is per CPU.
    let mut set = nix::sched::CpuSet::new();
    set.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
    let cpus = aya::util::nr_cpus().unwrap() as u32;
    let dp = dataplane(&CONFIG.replace("max_new_flows_per_sec = 0", &format!("max_new_flows_per_sec = {}", 5 * cpus)));
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

/// While one thread flips the selector as fast as it can, others run new-flow packets: every
/// output goes wholly to one color's backend (blue is 10.1.0.x:8080, green 10.2.0.x:9090, so a
/// torn read would show as a mixed address/port pair).
#[test]
fn a_flip_is_atomic_under_concurrent_packets() {
    let config = CONFIG
        .replace(r#"blue = ["10.1.0.2:8080"]"#, r#"blue = ["10.1.0.2:8080", "10.1.0.3:8080", "10.1.0.4:8080"]"#)
        .replace(r#"green = ["10.2.0.2:9090"]"#, r#"green = ["10.2.0.2:9090", "10.2.0.3:9090"]"#);
    let dp = dataplane(&config);
    let mut selector = dp.selector_handle().unwrap();
    let stop = AtomicBool::new(false);
    let flips = AtomicU64::new(0);
    let seen = [AtomicU64::new(0), AtomicU64::new(0)];
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut n = 0u64;
            while n < 100_000 || seen.iter().any(|c| c.load(Ordering::Relaxed) < 1000) {
                selector.set(0, Selector::new((n & 1) as u32, 1 - (n & 1) as u32, 0), 0).unwrap();
                n += 1;
                if n > 2_000_000 {
                    break;
                }
            }
            flips.store(n, Ordering::Relaxed);
            stop.store(true, Ordering::Relaxed);
        });
        for t in 0..2u32 {
            let (dp, stop, seen) = (&dp, &stop, &seen);
            s.spawn(move || {
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    // A fresh 5-tuple every time, so each packet takes the new-flow path.
                    let client = SocketAddrV4::new(Ipv4Addr::from(0x0b00_0000 + (t << 20) + (i >> 14)), 1024 + (i & 0x3fff) as u16);
                    i += 1;
                    let (action, out) = run(dp, &packet::tcp(client, sa(VIP), TCP_SYN, b""));
                    assert_eq!(action, XDP_PASS);
                    let p = packet::parse_v4(&out);
                    let color = match (p.dst.ip().octets(), p.dst.port()) {
                        ([10, 1, 0, 2..=4], 8080) => 0,
                        ([10, 2, 0, 2..=3], 9090) => 1,
                        _ => panic!("torn backend: {} (client {client})", p.dst),
                    };
                    assert!(p.ip_checksum_ok && p.l4_checksum_ok);
                    seen[color].fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let (b, g) = (seen[0].load(Ordering::Relaxed), seen[1].load(Ordering::Relaxed));
    eprintln!("atomicity: {} flips, {b} new flows to blue, {g} to green, 0 torn", flips.load(Ordering::Relaxed));
    assert!(flips.load(Ordering::Relaxed) >= 100_000);
    assert!(b >= 1000 && g >= 1000, "both colors were seen: blue {b}, green {g}");
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

    // Not about a VIP flow, or not an error: untouched.
    let stranger = Pkt::tcp(sa("10.0.0.9:1234"), sa(BLUE), TCP_ACK).build();
    for (what, input, reason) in [
        ("error about another flow", packet::icmp_error(ip("10.1.0.1"), ip("10.0.0.9"), 3, 4, 1280, &stranger, 8), Reason::PassNotOurs),
        ("echo request to the VIP", packet::icmp_echo(ip("10.0.0.2"), ip("10.100.0.1")), Reason::PassNotL4),
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
    let client = sa6("[fd00::2]:40000");
    let vip = sa6("[fd00::100]:80");
    let blue = sa6("[fd00:1::2]:8080");
    let check6 = |out: &[u8], src, dst, payload: &[u8], what: &str| {
        let p = packet::parse_v6(out);
        assert_eq!((p.src, p.dst), (src, dst), "{what}: addresses/ports");
        assert!(p.l4_checksum_ok, "{what}: L4 checksum with the IPv6 pseudo header");
        assert_eq!(p.payload, payload, "{what}: payload");
        p
    };
    let expect = |dp: &Dataplane, what: &str, input: Vec<u8>, reason: Reason| -> Vec<u8> {
        let before = dp.reason_count(reason).unwrap();
        let (action, out) = run(dp, &input);
        assert_eq!(action, if reason.is_drop() { XDP_DROP } else { XDP_PASS }, "{what}: action");
        assert_eq!(dp.reason_count(reason).unwrap(), before + 1, "{what}: {}", reason.name());
        let rewritten = matches!(
            reason,
            Reason::NewFlow | Reason::ToBackend | Reason::FromBackend | Reason::LostFlow | Reason::IcmpToBackend | Reason::IcmpToClient
        );
        if !reason.is_drop() && !rewritten {
            assert_eq!(out, input, "{what}: untouched");
        }
        out
    };

    let out = expect(&dp, "SYN", Pkt6::tcp(client, vip, TCP_SYN).build(), Reason::NewFlow);
    let p = check6(&out, client, blue, b"", "SYN to the v6 VIP");
    assert_eq!(p.hop_limit, 64);
    let out = expect(&dp, "reply", Pkt6::tcp(blue, client, TCP_ACK).payload(b"blue\n").build(), Reason::FromBackend);
    check6(&out, vip, client, b"blue\n", "reply from the v6 backend");
    let out = expect(&dp, "UDP", Pkt6::udp(client, sa6("[fd00::100]:53")).payload(b"q").build(), Reason::NewFlow);
    check6(&out, client, sa6("[fd00:1::2]:5353"), b"q", "UDP to the v6 VIP");

    // Extension headers are walked, up to 4.
    let c2 = sa6("[fd00::2]:40001");
    let out = expect(&dp, "hop-by-hop + dest opts", Pkt6::tcp(c2, vip, TCP_SYN).ext(0, 8).ext(60, 16).payload(b"x").build(), Reason::NewFlow);
    assert_eq!(check6(&out, c2, blue, b"x", "with extension headers").ext_len, 24, "extension headers kept");
    let five = |dst| Pkt6::tcp(sa6("[fd00::2]:40002"), dst, TCP_SYN).ext(0, 8).ext(60, 8).ext(43, 8).ext(60, 8).ext(60, 8).build();
    expect(&dp, "5 extension headers to the VIP", five(vip), Reason::DropMalformed);
    expect(&dp, "5 extension headers elsewhere", five(sa6("[fd00::9]:80")), Reason::PassMalformed);
    expect(&dp, "fragment header to the VIP", Pkt6::tcp(sa6("[fd00::2]:40003"), vip, TCP_SYN).ext(44, 8).build(), Reason::DropFragment);
    expect(&dp, "hop limit 1", Pkt6::tcp(sa6("[fd00::2]:40004"), vip, TCP_SYN).hop_limit(1).build(), Reason::PassTtlExpired);
    let mut truncated = Pkt6::tcp(sa6("[fd00::2]:40005"), vip, TCP_SYN).build();
    truncated.truncate(14 + 40 + 10);
    expect(&dp, "TCP header cut short, to the VIP", truncated, Reason::DropMalformed);

    // Packet Too Big about a reply (VIP → client), sent by a router to the VIP: it must reach
    // the backend about its own packet (IPv6 routers never fragment: PMTUD is the only way).
    let router: std::net::Ipv6Addr = "fd00::1".parse().unwrap();
    let reply = Pkt6::tcp(vip, client, TCP_ACK).payload(&[3; 1300]).build();
    let err = packet::icmp6_error(router, *vip.ip(), 2, 0, 1280, &reply, 20);
    let out = expect(&dp, "packet too big to the VIP", err, Reason::IcmpToBackend);
    let p = packet::parse_icmp6(&out);
    assert_eq!((p.outer_src, p.outer_dst), (router, *blue.ip()), "outer: router → backend");
    assert_eq!((p.inner_src, p.inner_dst), (blue, client), "quote: backend → client");
    assert_eq!((p.ty, p.rest), (2, 1280));
    assert!(p.icmp_ok, "ICMPv6 checksum (pseudo header + quote) verifies");

    // The backend answers unreachable about client → backend, quoting 8 bytes: the client sees
    // it from the VIP about client → VIP.
    let request = Pkt6::tcp(client, blue, TCP_ACK).build();
    let err = packet::icmp6_error(*blue.ip(), *client.ip(), 1, 4, 0, &request, 8);
    let out = expect(&dp, "unreachable from the backend", err, Reason::IcmpToClient);
    let p = packet::parse_icmp6(&out);
    assert_eq!((p.outer_src, p.outer_dst), (*vip.ip(), *client.ip()));
    assert_eq!((p.inner_src, p.inner_dst), (client, vip));
    assert!(p.icmp_ok, "ICMPv6 checksum verifies");

    // A flip moves new v6 flows, not old ones.
    dp.select(Color::Green).unwrap();
    let (_, out) = run(&dp, &Pkt6::tcp(sa6("[fd00::2]:40010"), vip, TCP_SYN).build());
    check6(&out, sa6("[fd00::2]:40010"), sa6("[fd00:2::2]:9090"), b"", "new v6 flow after the flip");
    let (_, out) = run(&dp, &Pkt6::tcp(client, vip, TCP_ACK).build());
    check6(&out, client, blue, b"", "old v6 flow after the flip");
}

/// A table smaller than the live flows: the LRU evicts, the counters say how many, and a
/// packet of an evicted TCP flow counts as `lost_flow`.
#[test]
fn flow_table_pressure_is_counted() {
    let config = CONFIG.replace("max_new_flows_per_sec = 0", "max_new_flows_per_sec = 0\nflow_table_size = 1024");
    let dp = dataplane(&config);
    for i in 0..2000u32 {
        let client = SocketAddrV4::new(Ipv4Addr::from(0x0a00_0000 + 2 + (i >> 10)), 10000 + (i & 1023) as u16);
        run(&dp, &packet::tcp(client, sa(VIP), TCP_SYN, b""));
    }
    let f = dp.flow_counts().unwrap();
    assert_eq!(dp.fwd_count(Fwd::FlowsCreated).unwrap(), 4000, "two entries created per flow");
    assert!(f.entries <= 1024, "the table holds at most its size: {f:?}");
    assert_eq!(f.evicted, 4000 - f.entries, "evictions = created - present: {f:?}");
    assert!(f.evicted >= 2976);
    // The first flow was evicted long ago: its next packet is a lost flow, re-pinned.
    let lost = dp.reason_count(Reason::LostFlow).unwrap();
    let (_, out) = run(&dp, &packet::tcp(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 10000), sa(VIP), TCP_ACK, b""));
    assert_eq!(dp.reason_count(Reason::LostFlow).unwrap(), lost + 1);
    assert_rewritten(&out, sa("10.0.0.2:10000"), sa(BLUE), b"", "re-pinned lost flow");
}
