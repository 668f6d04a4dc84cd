//! Packet tier: the real XDP object under BPF_PROG_TEST_RUN with crafted frames. Needs root.

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::{TestRun, TestRunOptions};
use bg_common::{hash::flow_hash, Color, FlowKey, Reason, FAMILY_V4};
use bg_tests::{packet, paths};
use bg_userspace::{config::Config, dataplane::Dataplane};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

const CONFIG: &str = r#"
interfaces = ["unused0"]
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
const BLUE: &str = "10.1.0.2:8080";
const GREEN: &str = "10.2.0.2:9090";

fn dataplane(config: &str) -> Dataplane {
    let object = std::fs::read(paths::ebpf_object()).expect("reading the XDP object");
    let config = Config::parse(config).expect("test config is valid");
    let mut dp = Dataplane::load(&object, 4096).expect("loading the XDP program (are you root?)");
    dp.install_services(&config.services).expect("installing services");
    dp.select(Color::Blue).expect("selecting blue");
    dp
}

/// Runs the program once on `input`; returns the action and the output frame.
fn run(dp: &Dataplane, input: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; input.len() + 512];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(input);
    opts.data_out = Some(&mut out);
    let r = dp.program().test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

fn stat(dp: &Dataplane, reason: Reason) -> u64 {
    dp.stats().unwrap().into_iter().find(|(r, _)| *r == reason).unwrap().1
}

/// Asserts `frame` is a valid IPv4 packet from `src` to `dst` carrying `payload`.
fn assert_rewritten(frame: &[u8], src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8], what: &str) {
    let p = packet::parse_v4(frame);
    assert_eq!((p.src, p.dst), (src, dst), "{what}: addresses/ports after rewrite");
    assert!(p.ip_checksum_ok, "{what}: IPv4 header checksum does not verify");
    assert!(p.l4_checksum_ok, "{what}: L4 checksum does not verify when recomputed");
    assert_eq!(p.payload, payload, "{what}: payload changed");
}

#[test]
fn syn_to_vip_goes_to_active_backend_with_valid_checksums() {
    let dp = dataplane(CONFIG);
    let syn = packet::tcp(sa(CLIENT), sa(VIP), packet::TCP_SYN, b"");
    let (action, out) = run(&dp, &syn);
    assert_eq!(action, XDP_PASS, "a rewritten packet is passed to the kernel to route");
    assert_eq!(out.len(), syn.len());
    assert_eq!(&out[..14], &syn[..14], "Ethernet header untouched");
    assert_rewritten(&out, sa(CLIENT), sa(BLUE), b"", "SYN");
    assert_eq!(stat(&dp, Reason::NewFlow), 1);

    // Later data of the same flow follows the flow entry.
    let data = packet::tcp(sa(CLIENT), sa(VIP), packet::TCP_ACK, b"GET / HTTP/1.1\r\n\r\n");
    let (action, out) = run(&dp, &data);
    assert_eq!(action, XDP_PASS);
    assert_rewritten(&out, sa(CLIENT), sa(BLUE), b"GET / HTTP/1.1\r\n\r\n", "data");
    assert_eq!(stat(&dp, Reason::ToBackend), 1);
}

#[test]
fn reply_from_backend_leaves_with_vip_as_source() {
    let dp = dataplane(CONFIG);
    run(&dp, &packet::tcp(sa(CLIENT), sa(VIP), packet::TCP_SYN, b""));
    let synack = packet::tcp(sa(BLUE), sa(CLIENT), packet::TCP_SYN | packet::TCP_ACK, b"");
    let (action, out) = run(&dp, &synack);
    assert_eq!(action, XDP_PASS);
    assert_rewritten(&out, sa(VIP), sa(CLIENT), b"", "SYN-ACK");
    let body = packet::tcp(sa(BLUE), sa(CLIENT), packet::TCP_ACK, b"blue\n");
    let (_, out) = run(&dp, &body);
    assert_rewritten(&out, sa(VIP), sa(CLIENT), b"blue\n", "response");
    assert_eq!(stat(&dp, Reason::FromBackend), 2);
}

#[test]
fn traffic_not_for_a_vip_passes_byte_for_byte() {
    let dp = dataplane(CONFIG);
    let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
        ("TCP to another host", packet::tcp(sa(CLIENT), sa("10.1.0.2:80"), packet::TCP_SYN, b""), Reason::PassNotOurs),
        ("TCP to the VIP on an unserved port", packet::tcp(sa(CLIENT), sa("10.100.0.1:443"), packet::TCP_SYN, b""), Reason::PassNotOurs),
        ("UDP to the VIP's TCP port", packet::udp(sa(CLIENT), sa(VIP), b"x"), Reason::PassNotOurs),
        ("backend talking to a client directly", packet::tcp(sa(BLUE), sa(CLIENT), packet::TCP_ACK, b"hi"), Reason::PassNotOurs),
        ("IPv6", packet::ipv6_tcp_syn(), Reason::PassNotIpv4),
        ("ARP", packet::arp(Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 100, 0, 1)), Reason::PassNotIpv4),
        ("truncated TCP header", packet::tcp(sa(CLIENT), sa(VIP), packet::TCP_SYN, b"")[..14 + 20 + 10].to_vec(), Reason::PassTruncated),
    ];
    for (what, input, reason) in cases {
        let before = stat(&dp, reason);
        let (action, out) = run(&dp, &input);
        assert_eq!(action, XDP_PASS, "{what}: action");
        assert_eq!(out, input, "{what}: bytes must be unchanged");
        assert_eq!(stat(&dp, reason), before + 1, "{what}: counted as {}", reason.name());
    }
    assert_eq!(stat(&dp, Reason::NewFlow), 0, "no flow was created");
}

#[test]
fn after_a_flip_new_flows_go_to_the_other_color_and_old_flows_stay() {
    let mut dp = dataplane(CONFIG);
    let first = packet::tcp(sa(CLIENT), sa(VIP), packet::TCP_SYN, b"");
    let (_, out) = run(&dp, &first);
    assert_rewritten(&out, sa(CLIENT), sa(BLUE), b"", "before the flip");

    dp.select(Color::Green).unwrap();
    assert_eq!(dp.active().unwrap(), Color::Green);
    let second = packet::tcp(sa("10.0.0.2:40001"), sa(VIP), packet::TCP_SYN, b"");
    let (action, out) = run(&dp, &second);
    assert_eq!(action, XDP_PASS);
    assert_rewritten(&out, sa("10.0.0.2:40001"), sa(GREEN), b"", "new flow after the flip");

    // The first flow is pinned to blue: its packets keep going there.
    let (_, out) = run(&dp, &first);
    assert_rewritten(&out, sa(CLIENT), sa(BLUE), b"", "old flow after the flip");
    let (_, out) = run(&dp, &packet::tcp(sa(GREEN), sa("10.0.0.2:40001"), packet::TCP_ACK, b"green\n"));
    assert_rewritten(&out, sa(VIP), sa("10.0.0.2:40001"), b"green\n", "green reply");

    dp.select(Color::Blue).unwrap();
    let third = packet::tcp(sa("10.0.0.2:40002"), sa(VIP), packet::TCP_SYN, b"");
    let (_, out) = run(&dp, &third);
    assert_rewritten(&out, sa("10.0.0.2:40002"), sa(BLUE), b"", "new flow after rollback");
    let counts = dp.flow_counts().unwrap();
    assert_eq!(counts.flows, [2, 1], "flows per color [blue, green]");
    assert_eq!(counts.entries, 6, "two entries per flow");
}

#[test]
fn udp_is_rewritten_and_zero_checksum_stays_zero() {
    let dp = dataplane(CONFIG);
    let dns = sa("10.100.0.1:53");
    let q = packet::udp(sa(CLIENT), dns, b"query");
    let (action, out) = run(&dp, &q);
    assert_eq!(action, XDP_PASS);
    assert_rewritten(&out, sa(CLIENT), sa("10.1.0.2:5353"), b"query", "UDP query");

    let mut no_csum = packet::udp(sa("10.0.0.2:40009"), dns, b"query");
    no_csum[14 + 20 + 6] = 0;
    no_csum[14 + 20 + 7] = 0;
    let (_, out) = run(&dp, &no_csum);
    assert_eq!(&out[14 + 20 + 6..14 + 20 + 8], &[0, 0], "UDP checksum 0 (none) must stay 0");
    let p = packet::parse_v4(&out);
    assert_eq!(p.dst, sa("10.1.0.2:5353"));
    assert!(p.ip_checksum_ok);

    let reply = packet::udp(sa("10.1.0.2:5353"), sa(CLIENT), b"answer");
    let (_, out) = run(&dp, &reply);
    assert_rewritten(&out, dns, sa(CLIENT), b"answer", "UDP reply");
}

#[test]
fn new_flows_spread_over_backends_by_the_shared_flow_hash() {
    let config = CONFIG.replace(
        r#"blue = ["10.1.0.2:8080"]"#,
        r#"blue = ["10.1.0.2:8080", "10.1.0.3:8080", "10.1.0.4:8080"]"#,
    );
    let dp = dataplane(&config);
    let backends = [sa("10.1.0.2:8080"), sa("10.1.0.3:8080"), sa("10.1.0.4:8080")];
    let mut hits = [0; 3];
    for port in 41000..41060u16 {
        let client = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), port);
        let key = FlowKey {
            src: [u32::from_ne_bytes(client.ip().octets()), 0, 0, 0],
            dst: [u32::from_ne_bytes([10, 100, 0, 1]), 0, 0, 0],
            sport: port.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            family: FAMILY_V4,
            _pad: [0; 2],
        };
        let expected = (flow_hash(&key) % 3) as usize;
        let (_, out) = run(&dp, &packet::tcp(client, sa(VIP), packet::TCP_SYN, b""));
        assert_rewritten(&out, client, backends[expected], b"", "spread");
        hits[expected] += 1;
    }
    assert!(hits.iter().all(|h| *h > 5), "every backend gets flows: {hits:?}");
}

#[test]
fn every_packet_is_counted_under_exactly_one_reason() {
    let dp = dataplane(CONFIG);
    let inputs = [
        packet::tcp(sa(CLIENT), sa(VIP), packet::TCP_SYN, b""),
        packet::arp(Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 1)),
        // A bare Ethernet header (the kernel's test_run refuses anything shorter).
        vec![0u8; 14],
    ];
    for i in &inputs {
        let (action, _) = run(&dp, i);
        assert_ne!(action, XDP_DROP);
    }
    let total: u64 = dp.stats().unwrap().iter().map(|(_, n)| n).sum();
    assert_eq!(total, inputs.len() as u64);
}
