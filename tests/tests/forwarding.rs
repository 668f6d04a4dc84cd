//! The redirect path: after the rewrite, `bpf_fib_lookup` in the test's own network namespace
//! decides between XDP_REDIRECT (neighbour known: MACs rewritten, TTL decremented) and XDP_PASS
//! (neighbour unresolved, packet above the MTU, no route). Needs root.

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
green = ["10.1.0.2:8080"]
[[service]]
name = "unresolved"
vip = "10.100.0.1:81"
blue = ["10.1.0.3:8080"]
green = ["10.1.0.3:8080"]
[[service]]
name = "unrouted"
vip = "10.100.0.1:82"
blue = ["10.77.0.2:8080"]
green = ["10.77.0.2:8080"]
"#;

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

    // Larger than the egress MTU (1400): the kernel fragments or answers "frag needed".
    let big = Pkt::tcp(sa("10.0.0.2:40002"), sa("10.100.0.1:80"), TCP_SYN).payload(&[0x5a; 1450]).build();
    let (action, out) = run(&dp, &big);
    assert_eq!(action, XDP_PASS, "above the MTU: XDP_PASS");
    let p = packet::parse_v4(&out);
    assert_eq!((p.dst, p.ttl, p.payload.len()), (sa("10.1.0.2:8080"), 64, 1450));
    assert!(p.ip_checksum_ok && p.l4_checksum_ok);
    assert_eq!(dp.fwd_count(Fwd::KernelFragNeeded).unwrap(), 1);

    // No route to the backend: the kernel decides (and answers unreachable).
    let syn = Pkt::tcp(sa("10.0.0.2:40003"), sa("10.100.0.1:82"), TCP_SYN).build();
    let (action, out) = run(&dp, &syn);
    assert_eq!(action, XDP_PASS, "no route: XDP_PASS");
    assert_eq!(packet::parse_v4(&out).dst, sa("10.77.0.2:8080"));
    assert_eq!(dp.fwd_count(Fwd::KernelOther).unwrap(), 1);
}
