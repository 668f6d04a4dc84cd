//! bg's promise under pressure, in network namespaces: a small flow table under a new-connection
//! load that reuses ports while the color flips 100 times; SYN and bare-ACK floods at ten times
//! the rate bound next to 1000 idle connections and 4 streams; spoofed RSTs across every source
//! port of a client. Needs root.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use bg_tests::{
    live::StopOnDrop,
    netns::InNetns,
    packet::{Pkt, TCP_ACK, TCP_RST, TCP_SYN},
    topology::{http_get, Topology, CLIENT, ECHO_PORT, VIP, VIP_PORT},
    wire::{mac, Wire},
};

fn tag() -> String {
    bg_tests::run::tag("p")
}

fn status(t: &Topology) -> serde_json::Value {
    serde_json::from_slice(&t.bgctl(&["status", "--json", "--count-flows"]).unwrap().stdout).unwrap()
}

fn reason(t: &Topology, name: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&t.bgctl(&["stats", "--json"]).unwrap().stdout).unwrap();
    v["reasons"].as_array().unwrap().iter().find(|r| r[0] == name).unwrap_or_else(|| panic!("{name} counted"))[1].as_u64().unwrap()
}

fn syn_retransmits(t: &Topology) -> u64 {
    t.client.counter("netstat", "TcpExt", "TCPSynRetrans").unwrap()
}

fn resets(t: &Topology) -> u64 {
    [&t.client, &t.blue, &t.green].iter().map(|ns| Topology::tcp_counter(ns, "EstabResets").unwrap()).sum()
}

/// Small pseudo-random numbers (xorshift), enough for spoofed sequence numbers and ports.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 16) as u32
    }
}

/// A 4096-entry table (its unconfirmed table at the 1024 minimum), a client reusing 12000
/// ports (connect() takes the even ones: 6000 4-tuples, more than the table holds) at full
/// speed, 100 flips: every connection that starts
/// after a flip returned (and before the next one began) is answered by the new color, none
/// fails, and none needs a SYN retransmit. Hosts keep no TIME_WAIT, so ports come round at
/// once: with one client address, TIME_WAIT on the backends would make the harness, not bg,
/// drop reused 4-tuples (PAWS).
#[test]
fn a_small_table_under_port_reuse_sends_every_new_connection_to_the_color_of_each_of_100_flips() {
    let t = Topology::create(&tag()).unwrap();
    for ns in [&t.client, &t.blue, &t.green] {
        ns.exec(&["sysctl", "-q", "-w", "net.ipv4.tcp_max_tw_buckets=0"]).unwrap();
    }
    t.client.exec(&["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=40000 51999"]).unwrap();
    let config = t.config().replace("flow_table_size = 16384", "flow_table_size = 4096");
    assert!(config.contains("flow_table_size = 4096"));
    std::fs::write(t.config_path(), config).unwrap();
    let _backends = t.start_backends().unwrap();
    let _agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    let syn0 = syn_retransmits(&t);

    let stop = AtomicBool::new(false);
    let (requests, flips) = std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let load = s.spawn(|| {
            let _in = InNetns::enter(&t.client).unwrap();
            let mut seen: Vec<(Instant, Result<String, String>)> = Vec::new();
            let until = Instant::now() + bg_tests::topology::LOAD_LIMIT;
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                let started = Instant::now();
                seen.push((started, http_get(SocketAddr::new(VIP.parse().unwrap(), VIP_PORT)).map_err(|e| format!("{e:#}"))));
            }
            seen
        });
        std::thread::sleep(Duration::from_millis(300));
        let mut flips = Vec::new();
        for i in 0..100 {
            let color = if i % 2 == 0 { "green" } else { "blue" };
            let issued = Instant::now();
            t.bgctl(&["flip", color]).unwrap();
            flips.push((issued, Instant::now(), color));
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
        (load.join().unwrap(), flips)
    });

    let failures: Vec<&String> = requests.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    assert!(failures.is_empty(), "{} of {} requests failed: {:?}", failures.len(), requests.len(), &failures[..failures.len().min(5)]);
    let mut checked = 0;
    for (i, (_, returned, color)) in flips.iter().enumerate() {
        let next_issued = flips.get(i + 1).map(|f| f.0);
        for (started, r) in &requests {
            if started > returned && next_issued.is_none_or(|n| *started < n) {
                checked += 1;
                assert_eq!(r.as_deref(), Ok(*color), "flip {i} to {color}: a connection started after it returned was answered by the old color");
            }
        }
    }
    assert!(checked >= 1000, "enough connections between flips to mean something: {checked} of {}", requests.len());
    assert_eq!(syn_retransmits(&t) - syn0, 0, "no SYN needed a retransmit");
    let s = status(&t);
    // More distinct flows than the table holds went through it: it really was full.
    assert!(requests.len() > 4096 && s["flows"]["evicted"].as_u64().unwrap() > 0, "the table was full: {} requests, {}", requests.len(), s["flows"]);
    eprintln!("{} connections, {checked} checked against the flip before them; table {}", requests.len(), s["flows"]);
}

/// Raises this process's open-file limit to its hard limit (1000 connections need more than
/// the usual soft 1024).
fn raise_nofile() {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: get/setrlimit with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
}

/// One line exchanged on an echo connection: the answer must come from `color`.
fn exchange(c: &mut BufReader<TcpStream>, color: &str, msg: &str) -> Result<(), String> {
    c.get_mut().write_all(format!("{msg}\n").as_bytes()).map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    match c.read_line(&mut answer) {
        Ok(0) => Err("closed".into()),
        Ok(_) if answer == format!("{color} {msg}\n") => Ok(()),
        Ok(_) => Err(format!("answered {answer:?}")),
        Err(e) => Err(format!("read: {e}")),
    }
}

/// `n` echo connections to the VIP from the client, each answered once by blue (so confirmed:
/// established), then left idle.
fn open_idle(t: &Topology, n: usize) -> Vec<BufReader<TcpStream>> {
    let echo = SocketAddr::new(VIP.parse().unwrap(), ECHO_PORT);
    let _in = InNetns::enter(&t.client).unwrap();
    (0..n)
        .map(|i| {
            let c = TcpStream::connect_timeout(&echo, Duration::from_secs(5)).unwrap_or_else(|e| panic!("idle connection {i}: {e}"));
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut c = BufReader::new(c);
            exchange(&mut c, "blue", &format!("hello {i}")).unwrap_or_else(|e| panic!("idle connection {i}: {e}"));
            c
        })
        .collect()
}

/// A SYN flood and a bare-ACK flood, each at ten times the rate bound (1000 new flows/s) for
/// 10 s from one silent spoofed source, into a 4096-entry table, while 1000 idle connections
/// and 4 streams are open:
/// every one of them keeps working (bytes through, no reset) through the floods and a flip right
/// after them; the floods stay in the unconfirmed table.
#[test]
fn floods_at_ten_times_the_rate_bound_leave_idle_connections_and_streams_alone() {
    raise_nofile();
    let t = Topology::create(&tag()).unwrap();
    // A table the floods would fill many times over (4096 established, 1024 unconfirmed).
    let config = t.config().replace("watch_window_secs = 30", "watch_window_secs = 30\nmax_new_flows_per_sec = 1000").replace("flow_table_size = 16384", "flow_table_size = 4096");
    assert!(config.contains("flow_table_size = 4096") && config.contains("max_new_flows_per_sec = 1000"));
    std::fs::write(t.config_path(), config).unwrap();
    let _backends = t.start_backends().unwrap();
    let _agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    let resets0 = resets(&t);

    // 1000 idle connections, each answered once by blue (confirmed: established).
    let mut idle = open_idle(&t, 1000);
    assert!(status(&t)["flows"]["entries"].as_u64().unwrap() >= 1000, "the idle connections are established");

    let gw_mac = mac(&t.gw, "gw-c").unwrap();
    let stop = AtomicBool::new(false);
    let (sent, streams) = std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let (opened_tx, opened_rx) = std::sync::mpsc::channel();
        let streams = s.spawn(|| bg_tests::live::hold(&t, "blue", 4, 0, opened_tx, &stop));
        opened_rx.recv_timeout(Duration::from_secs(20)).expect("streams opened");
        let flood = s.spawn(|| {
            let wire = Wire::open(&t.client, "eth0", gw_mac).unwrap();
            let spoofed: std::net::Ipv4Addr = "10.0.0.99".parse().unwrap();
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let started = Instant::now();
            let mut sent = 0u64;
            // 10 000 SYNs and 10 000 bare ACKs a second, in 1 ms slices.
            while started.elapsed() < Duration::from_secs(10) {
                let slice = started.elapsed().as_millis() as u64;
                while sent < (slice + 1) * 20 {
                    let port = 1024 + (rng.next() % 64000) as u16;
                    let flags = if sent % 2 == 0 { TCP_SYN } else { TCP_ACK };
                    let dport = if sent % 4 < 2 { ECHO_PORT } else { VIP_PORT };
                    let f = Pkt::tcp(SocketAddrV4::new(spoofed, port), SocketAddrV4::new(VIP.parse().unwrap(), dport), flags).seq(rng.next()).ack(rng.next()).build();
                    wire.send(&f).unwrap();
                    sent += 1;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            sent
        });
        let sent = flood.join().unwrap();
        // A flip right after the floods: any established flow they had evicted would come
        // back as a lost flow on green, and green would reset it.
        t.bgctl(&["flip", "green"]).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        (sent, streams.join().unwrap())
    });
    assert!(sent >= 150_000, "the flood really ran: {sent} frames");
    assert!(reason(&t, "drop_new_flow_rate") > 0, "the flood ran into the rate bound");
    assert!(streams.errors.is_empty() && streams.moved.is_empty() && streams.exchanges > 100, "streams during the floods: {streams:?}");
    let s = status(&t);
    assert!(s["flows"]["entries"].as_u64().unwrap() >= 1004, "no established flow was evicted: {}", s["flows"]);

    {
        let _in = InNetns::enter(&t.client).unwrap();
        for (i, c) in idle.iter_mut().enumerate() {
            exchange(c, "blue", &format!("after the flood and the flip {i}")).unwrap_or_else(|e| panic!("idle connection {i} after the flood and the flip: {e}"));
        }
        assert_eq!(http_get(SocketAddr::new(VIP.parse().unwrap(), VIP_PORT)).unwrap(), "green", "new connections follow the flip");
    }
    assert_eq!(resets(&t) - resets0, 0, "no connection was reset");
}

/// RSTs with random sequence numbers from the client's address, from every source port to
/// both TCP services, right after a flip: its busy streams and keep-alive connections and its
/// idle connections survive, unreset and unmoved, also once the idle ones have been idle
/// longer than the closing timeout (an RST that marked them closing would have ended them).
#[test]
fn spoofed_rsts_across_every_source_port_break_no_live_connection() {
    let t = Topology::create(&tag()).unwrap();
    let config = t.config().replace("watch_window_secs = 30", "watch_window_secs = 30\nclosing_timeout_secs = 2");
    assert!(config.contains("closing_timeout_secs = 2"));
    std::fs::write(t.config_path(), config).unwrap();
    let _backends = t.start_backends().unwrap();
    let _agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    let resets0 = resets(&t);
    let mut idle = open_idle(&t, 20);
    let gw_mac = mac(&t.gw, "gw-c").unwrap();
    let stop = AtomicBool::new(false);
    let (sent, seen) = std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let (opened_tx, opened_rx) = std::sync::mpsc::channel();
        let held = s.spawn(|| bg_tests::live::hold(&t, "blue", 8, 4, opened_tx, &stop));
        opened_rx.recv_timeout(Duration::from_secs(20)).expect("connections opened");
        // After a flip, a flow whose state an RST erased would come back on green and be reset.
        t.bgctl(&["flip", "green"]).unwrap();
        let wire = Wire::open(&t.client, "eth0", gw_mac).unwrap();
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let client: std::net::Ipv4Addr = CLIENT.parse().unwrap();
        let mut sent = 0u64;
        for port in 1024..=65535u16 {
            for dport in [ECHO_PORT, VIP_PORT] {
                let f = Pkt::tcp(SocketAddrV4::new(client, port), SocketAddrV4::new(VIP.parse().unwrap(), dport), TCP_RST | if rng.next() % 2 == 0 { TCP_ACK } else { 0 })
                    .seq(rng.next())
                    .build();
                wire.send(&f).unwrap();
                sent += 1;
            }
        }
        // Longer than the closing timeout: an entry marked closing by an RST is over by now.
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        (sent, held.join().unwrap())
    });
    assert_eq!(sent, 2 * 64512);
    assert!(seen.errors.is_empty() && seen.moved.is_empty() && seen.rounds > 20, "busy connections after {sent} spoofed RSTs: {seen:?}");
    {
        let _in = InNetns::enter(&t.client).unwrap();
        for (i, c) in idle.iter_mut().enumerate() {
            exchange(c, "blue", &format!("still here {i}")).unwrap_or_else(|e| panic!("idle connection {i} after the RSTs: {e}"));
        }
    }
    assert_eq!(resets(&t) - resets0, 0, "no connection was reset");
}
