//! The redirect path: after the rewrite, `bpf_fib_lookup` in the test's own network namespace
//! decides between XDP_REDIRECT (neighbour known: MACs rewritten, TTL decremented) and XDP_PASS
//! (neighbour unresolved, no route, above the MTU without DF); a packet above the MTU that must
//! not be fragmented is answered by bg itself (an ICMP error quoting the packet as its sender
//! sent it), in both forwarding modes. Needs root.

use std::net::SocketAddrV4;

use bg_common::Fwd;
use bg_tests::{
    netns::{InNetns, Netns},
    packet::{self, Pkt, TCP_SYN},
    paths,
};
use bg_userspace::{config::Config, dataplane::Dataplane};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

const CONFIG: &str = r#"
interfaces = ["fwd0"]
forwarding = "redirect"
[[service]]
name = "resolved"
vip = "10.100.0.1:80"
blue = ["10.1.0.2:8080"]
green = ["10.1.0.2:8090"]
[[service]]
name = "unresolved"
vip = "10.100.0.1:81"
blue = ["10.1.0.3:8080"]
green = ["10.1.0.3:8090"]
[[service]]
name = "unrouted"
vip = "10.100.0.1:82"
blue = ["10.77.0.2:8080"]
green = ["10.77.0.2:8090"]
[[service]]
name = "six"
vip = "[fd00:100::1]:80"
blue = ["[fd00:1::2]:8080"]
green = ["[fd00:1::2]:8090"]
"#;

/// The ICMP error bg built in place of `input`: the Ethernet addresses as they arrived (the
/// kernel routes it), from `vip` to the sender, the sender's own packet quoted (its IP header
/// and first 8 L4 bytes, byte for byte as sent).
fn assert_too_big_v4(input: &[u8], out: &[u8], vip: &str, sender: &str, mtu: u32) {
    assert_eq!(&out[..12], &input[..12], "MACs as they arrived: the frame is for this host, which forwards it");
    let icmp = packet::parse_icmp(out);
    assert_eq!((icmp.outer_src.to_string().as_str(), icmp.outer_dst.to_string().as_str()), (vip, sender));
    assert_eq!((icmp.ty, icmp.code, icmp.rest), (3, 4, mtu), "fragmentation needed, next-hop MTU {mtu}");
    assert!(icmp.outer_ip_ok && icmp.icmp_ok, "IP and ICMP checksums");
    assert_eq!(out.len(), 14 + 20 + 8 + 28, "IP header, ICMP header, quoted IP header + 8 bytes");
    assert_eq!(&out[14 + 28..], &input[14..14 + 28], "the packet quoted as its sender sent it");
}

fn run(dp: &Dataplane, input: &[u8]) -> (u32, Vec<u8>) {
    packet::test_run(dp.program(), input)
}

#[test]
fn rewritten_packets_are_redirected_when_the_neighbour_is_known_else_passed() {
    let ns = Netns::new(&bg_tests::run::tag("fwd")).unwrap();
    ns.exec(&["ip", "link", "add", "fwd0", "type", "veth", "peer", "name", "fwd1"]).unwrap();
    ns.exec(&["ip", "addr", "add", "10.1.0.1/24", "dev", "fwd0"]).unwrap();
    ns.exec(&["ip", "link", "set", "fwd0", "mtu", "1400", "up"]).unwrap();
    ns.exec(&["ip", "link", "set", "fwd1", "up"]).unwrap();
    ns.exec(&["ip", "neigh", "replace", "10.1.0.2", "lladdr", "02:00:00:00:00:aa", "dev", "fwd0", "nud", "permanent"]).unwrap();
    ns.exec(&["ip", "route", "add", "10.0.0.0/24", "dev", "fwd0", "mtu", "lock", "1300"]).unwrap();
    ns.exec(&["ip", "-6", "addr", "add", "fd00:1::1/64", "dev", "fwd0", "nodad"]).unwrap();
    ns.exec(&["ip", "-6", "route", "add", "fd00:c::/64", "dev", "fwd0"]).unwrap();
    ns.exec(&["ip", "-6", "neigh", "replace", "fd00:1::2", "lladdr", "02:00:00:00:00:aa", "dev", "fwd0", "nud", "permanent"]).unwrap();
    ns.exec(&["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"]).unwrap();
    ns.exec(&["sysctl", "-q", "-w", "net.ipv4.conf.all.forwarding=1"]).unwrap();
    ns.exec(&["sysctl", "-q", "-w", "net.ipv4.conf.lo.forwarding=1"]).unwrap();
    let mac_text = ns.exec(&["cat", "/sys/class/net/fwd0/address"]).unwrap().stdout;
    let fwd0_mac: Vec<u8> = String::from_utf8_lossy(&mac_text)
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();

    let _inside = InNetns::enter(&ns).unwrap();
    let object = std::fs::read(paths::ebpf_object()).unwrap();
    let dp = Dataplane::open(&object, &Config::parse(CONFIG).unwrap(), None, bg_common::Color::Blue).unwrap();

    // Route and neighbour known: redirected, MACs from the FIB, TTL decremented.
    let syn = Pkt::tcp(sa("10.0.0.2:40000"), sa("10.100.0.1:80"), TCP_SYN).build();
    let (action, out) = run(&dp, &syn);
    assert_eq!(action, XDP_REDIRECT, "neighbour known: XDP_REDIRECT");
    let p = packet::parse_v4(&out);
    assert_eq!(p.dst, sa("10.1.0.2:8080"));
    assert_eq!(p.eth_dst, BACKEND_MAC, "destination MAC from the neighbour table");
    assert_eq!(p.eth_src.to_vec(), fwd0_mac, "source MAC of the egress interface");
    assert_eq!(p.ttl, 63, "TTL decremented like a router");
    assert!(p.ip_checksum_ok && p.l4_checksum_ok, "checksums after rewrite and TTL decrement");
    assert_eq!(dp.fwd_count(Fwd::Redirect).unwrap(), 1);

    // Neighbour unresolved: passed to the kernel (which resolves it), rewritten, TTL untouched.
    let syn = Pkt::tcp(sa("10.0.0.2:40001"), sa("10.100.0.1:81"), TCP_SYN).build();
    let (action, out) = run(&dp, &syn);
    assert_eq!(action, XDP_PASS, "neighbour unresolved: XDP_PASS");
    let p = packet::parse_v4(&out);
    assert_eq!((p.dst, p.ttl), (sa("10.1.0.3:8080"), 64));
    assert_eq!(&out[..12], &syn[..12], "MACs untouched on the kernel path");
    assert!(p.ip_checksum_ok && p.l4_checksum_ok);
    assert_eq!(dp.fwd_count(Fwd::KernelNoNeigh).unwrap(), 1);

    // Larger than the egress MTU (1400), DF set: bg answers "fragmentation needed" itself,
    // quoting the packet as the client sent it (to the VIP), from the VIP.
    let big = Pkt::tcp(sa("10.0.0.2:40002"), sa("10.100.0.1:80"), TCP_SYN).payload(&[0x5a; 1450]).build();
    let (action, out) = run(&dp, &big);
    assert_eq!(action, XDP_PASS, "above the MTU with DF: answered, the answer handed to the kernel");
    assert_too_big_v4(&big, &out, "10.100.0.1", "10.0.0.2", 1400);
    assert_eq!(dp.fwd_count(Fwd::TooBigAnswered).unwrap(), 1);

    // Its reply direction: a backend's segment too big for the route back to the client
    // (1300) is answered to the backend, quoting backend -> client as the backend sent it.
    let reply = Pkt::tcp(sa("10.1.0.2:8080"), sa("10.0.0.2:40002"), TCP_SYN | packet::TCP_ACK).payload(&[0x5a; 1400]).build();
    let (action, out) = run(&dp, &reply);
    assert_eq!(action, XDP_PASS, "a reply above the MTU with DF: answered");
    assert_too_big_v4(&reply, &out, "10.100.0.1", "10.1.0.2", 1300);
    assert_eq!(dp.fwd_count(Fwd::TooBigAnswered).unwrap(), 2);

    // Without DF: the kernel fragments it.
    let big = Pkt::tcp(sa("10.0.0.2:40004"), sa("10.100.0.1:80"), TCP_SYN).payload(&[0x5a; 1450]).no_df().build();
    let (action, out) = run(&dp, &big);
    assert_eq!(action, XDP_PASS, "above the MTU without DF: XDP_PASS");
    let p = packet::parse_v4(&out);
    assert_eq!((p.dst, p.ttl, p.payload.len()), (sa("10.1.0.2:8080"), 64, 1450));
    assert!(p.ip_checksum_ok && p.l4_checksum_ok);
    assert_eq!(dp.fwd_count(Fwd::KernelFragNeeded).unwrap(), 1);

    // IPv6 never fragments on the way: "packet too big" from the VIP, the client's packet
    // quoted (fixed header + 8 bytes), checksum over the pseudo header.
    let client6: std::net::SocketAddrV6 = "[fd00:c::2]:40005".parse().unwrap();
    let big6 = packet::Pkt6::tcp(client6, "[fd00:100::1]:80".parse().unwrap(), TCP_SYN).payload(&[0x5a; 1400]).build();
    let (action, out) = run(&dp, &big6);
    assert_eq!(action, XDP_PASS, "IPv6 above the MTU: answered");
    assert_eq!(&out[..12], &big6[..12], "MACs as they arrived");
    let icmp = packet::parse_icmp6(&out);
    assert_eq!((icmp.outer_src, icmp.outer_dst), ("fd00:100::1".parse().unwrap(), *client6.ip()));
    assert_eq!((icmp.ty, icmp.rest), (2, 1400), "packet too big, MTU 1400");
    assert!(icmp.icmp_ok, "ICMPv6 checksum");
    assert_eq!(out.len(), 14 + 40 + 8 + 48);
    assert_eq!(&out[14 + 48..], &big6[14..14 + 48], "the packet quoted as the client sent it");
    assert_eq!(dp.fwd_count(Fwd::TooBigAnswered).unwrap(), 3);

    // The per-flow next-hop cache: a flow's small packets are redirected from it (right MACs,
    // TTL decremented) without a FIB lookup, but a packet longer than any the FIB said fits is
    // looked up again, and answered "too big" when it is.
    let c = sa("10.0.0.2:40020");
    run(&dp, &Pkt::tcp(c, sa("10.100.0.1:80"), TCP_SYN).build());
    for i in 0..3 {
        let (action, out) = run(&dp, &Pkt::tcp(c, sa("10.100.0.1:80"), packet::TCP_ACK).payload(b"small").build());
        assert_eq!(action, XDP_REDIRECT, "small packet {i}: redirected");
        let p = packet::parse_v4(&out);
        assert_eq!((p.dst, p.ttl, p.eth_dst), (sa("10.1.0.2:8080"), 63, BACKEND_MAC), "small packet {i}: rewritten, TTL and MACs as the FIB says");
        assert!(p.ip_checksum_ok && p.l4_checksum_ok);
    }
    let big = Pkt::tcp(c, sa("10.100.0.1:80"), packet::TCP_ACK).payload(&[0x5a; 1450]).build();
    let (action, out) = run(&dp, &big);
    assert_eq!(action, XDP_PASS, "a cached flow's packet above the MTU: not redirected from the cache");
    assert_too_big_v4(&big, &out, "10.100.0.1", "10.0.0.2", 1400);
    assert_eq!(dp.fwd_count(Fwd::TooBigAnswered).unwrap(), 4);

    // No route to the backend: the kernel decides (and answers unreachable).
    let syn = Pkt::tcp(sa("10.0.0.2:40003"), sa("10.100.0.1:82"), TCP_SYN).build();
    let (action, out) = run(&dp, &syn);
    assert_eq!(action, XDP_PASS, "no route: XDP_PASS");
    assert_eq!(packet::parse_v4(&out).dst, sa("10.77.0.2:8080"));
    assert_eq!(dp.fwd_count(Fwd::KernelOther).unwrap(), 1);
}

/// `forwarding = "kernel"`: every rewritten packet is passed to the kernel, except one too big
/// for its next hop with DF, which bg answers (the kernel's answer would quote the rewritten
/// packet, which the client cannot match).
#[test]
fn kernel_forwarding_passes_but_answers_too_big_packets_itself() {
    let ns = Netns::new(&bg_tests::run::tag("fwdk")).unwrap();
    ns.exec(&["ip", "link", "add", "fwd0", "type", "veth", "peer", "name", "fwd1"]).unwrap();
    ns.exec(&["ip", "addr", "add", "10.1.0.1/24", "dev", "fwd0"]).unwrap();
    ns.exec(&["ip", "link", "set", "fwd0", "mtu", "1400", "up"]).unwrap();
    ns.exec(&["ip", "link", "set", "fwd1", "up"]).unwrap();
    ns.exec(&["ip", "neigh", "replace", "10.1.0.2", "lladdr", "02:00:00:00:00:aa", "dev", "fwd0", "nud", "permanent"]).unwrap();
    ns.exec(&["sysctl", "-q", "-w", "net.ipv4.conf.all.forwarding=1"]).unwrap();
    let _inside = InNetns::enter(&ns).unwrap();
    let object = std::fs::read(paths::ebpf_object()).unwrap();
    let config = CONFIG.replace("forwarding = \"redirect\"", "forwarding = \"kernel\"");
    assert!(config.contains("\"kernel\""));
    let dp = Dataplane::open(&object, &Config::parse(&config).unwrap(), None, bg_common::Color::Blue).unwrap();

    for (port, size) in [(40010u16, 0usize), (40011, 1000)] {
        let syn = Pkt::tcp(sa(&format!("10.0.0.2:{port}")), sa("10.100.0.1:80"), TCP_SYN).payload(&vec![0x5a; size]).build();
        let (action, out) = run(&dp, &syn);
        assert_eq!(action, XDP_PASS, "{size}-byte payload within the MTU: the kernel routes it");
        let p = packet::parse_v4(&out);
        assert_eq!((p.dst, p.ttl), (sa("10.1.0.2:8080"), 64), "rewritten, TTL left to the kernel");
        assert_eq!(&out[..12], &syn[..12], "MACs untouched");
    }
    assert_eq!(dp.fwd_count(Fwd::Kernel).unwrap(), 2);
    let big = Pkt::tcp(sa("10.0.0.2:40012"), sa("10.100.0.1:80"), TCP_SYN).payload(&[0x5a; 1450]).build();
    let (action, out) = run(&dp, &big);
    assert_eq!(action, XDP_PASS, "too big with DF: answered by bg in kernel mode too");
    assert_too_big_v4(&big, &out, "10.100.0.1", "10.0.0.2", 1400);
    assert_eq!(dp.fwd_count(Fwd::TooBigAnswered).unwrap(), 1);
    let big = Pkt::tcp(sa("10.0.0.2:40013"), sa("10.100.0.1:80"), TCP_SYN).payload(&[0x5a; 1450]).no_df().build();
    assert_eq!(run(&dp, &big).0, XDP_PASS, "without DF: the kernel fragments it");
    assert_eq!(dp.fwd_count(Fwd::Kernel).unwrap(), 3);
}
