//! The control path where it gets heavy: `status`, scrapes and flips with a million live flows
//! in the table, and the agent at the documented maximum config (start, a flip, a health
//! change). Each figure is timed from the client's side, as an operator's tools see it.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context};
use aya::maps::{HashMap, MapData};
use bg_common::{FlowEntry, FlowKey4};
use bg_tests::{
    netns::InNetns,
    topology::{max_backend, Topology, BLUE, GREEN, VIP, VIP_PORT},
};
use bg_userspace::control::{self, Request, Response};
use serde_json::{json, Value};

use crate::report::pct;

/// Sorted microseconds → {p50, p99, n}.
fn summary(mut us: Vec<u64>) -> Value {
    us.sort_unstable();
    json!({"p50_us": pct(&us, 0.5), "p99_us": pct(&us, 0.99), "max_us": us.last().copied().unwrap_or(0), "n": us.len()})
}

fn flip(t: &Topology, color: &str) -> anyhow::Result<(u64, u64)> {
    let start = Instant::now();
    let r = control::call(&t.socket(), &Request::Flip { color: color.into(), drain_secs: None, percent: None, force: false, dry_run: false })?;
    let Response::Flipped(f) = r else { anyhow::bail!("flip to {color} failed: {r:?}") };
    Ok((start.elapsed().as_micros() as u64, f.total_ns / 1000))
}

fn status(t: &Topology) -> anyhow::Result<control::Status> {
    match control::call(&t.socket(), &Request::Status { count_flows: false })? {
        Response::Status(s) => Ok(s),
        r => anyhow::bail!("status failed: {r:?}"),
    }
}

/// One scrape of the agent's metrics (the caller is in the gateway's namespace).
fn scrape() -> anyhow::Result<usize> {
    let mut c = TcpStream::connect("127.0.0.1:9477").context("metrics endpoint")?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut body = Vec::new();
    c.read_to_end(&mut body)?;
    ensure!(body.starts_with(b"HTTP/1.1 200"), "scrape answered {:?}", String::from_utf8_lossy(&body[..body.len().min(40)]));
    Ok(body.len())
}

/// `n` established IPv4 flows written straight into the pinned table, half per color, from
/// clients no test host has (so no packet ever refers to them).
fn fill(t: &Topology, n: u32) -> anyhow::Result<Duration> {
    let map = MapData::from_pin(t.pin_dir().join(bg_common::pin::MAP_FLOWS4)).context("the pinned IPv4 flow table")?;
    let mut flows: HashMap<MapData, FlowKey4, FlowEntry> = HashMap::try_from(aya::maps::Map::from_map_data(map)?)?;
    let vip = u32::from_ne_bytes(VIP.parse::<Ipv4Addr>()?.octets());
    let backends = [BLUE, GREEN].map(|b| u32::from_ne_bytes(b.parse::<Ipv4Addr>().unwrap().octets()));
    let now = bg_userspace::dataplane::monotonic_ns();
    let start = Instant::now();
    for i in 0..n {
        let client = SocketAddrV4::new(Ipv4Addr::from(0x0a40_0000 + i / 50_000), 10_000 + (i % 50_000) as u16);
        let key = FlowKey4 { src: u32::from_ne_bytes(client.ip().octets()), dst: vip, sport: client.port().to_be(), dport: VIP_PORT.to_be(), proto: 6, _pad: [0; 3] };
        let color = (i % 2) as u8;
        let entry = FlowEntry { last_seen_ns: now, ..FlowEntry::to([backends[color as usize], 0, 0, 0], 8080u16.to_be(), color) };
        flows.insert(key, entry, 0).with_context(|| format!("inserting flow {i}"))?;
    }
    Ok(start.elapsed())
}

/// Flips `n` times, `gap` apart; (client µs, in-agent µs) of each.
fn flips(t: &Topology, n: usize, gap: Duration) -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
    let (mut client, mut agent) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (c, a) = flip(t, if i % 2 == 0 { "green" } else { "blue" })?;
        client.push(c);
        agent.push(a);
        std::thread::sleep(gap);
    }
    Ok((client, agent))
}

/// The floor under any Unix-socket control call on this machine: a thread that accepts, reads
/// one line and answers it, called `n` times `gap` apart exactly as the flips are.
fn unix_socket_floor(t: &Topology, n: usize, gap: Duration) -> anyhow::Result<Vec<u64>> {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::{UnixListener, UnixStream};
    let path = t.run_dir.join("floor.sock");
    let listener = UnixListener::bind(&path)?;
    let server = std::thread::spawn(move || {
        for _ in 0..n {
            let Ok((c, _)) = listener.accept() else { return };
            let mut line = String::new();
            let mut r = BufReader::new(&c);
            if r.read_line(&mut line).is_ok() {
                let _ = (&c).write_all(b"{\"result\":\"ok\"}\n");
            }
        }
    });
    let mut v = Vec::new();
    for _ in 0..n {
        let start = Instant::now();
        let mut c = UnixStream::connect(&path)?;
        c.write_all(b"{\"op\":\"flip\",\"color\":\"green\"}\n")?;
        let mut answer = String::new();
        BufReader::new(&c).read_line(&mut answer)?;
        v.push(start.elapsed().as_micros() as u64);
        std::thread::sleep(gap);
    }
    let _ = server.join();
    Ok(v)
}

/// `bgctl --version`: what starting the CLI costs before it does anything.
fn cli_start(n: usize) -> anyhow::Result<Vec<u64>> {
    let mut v = Vec::new();
    for _ in 0..n {
        let start = Instant::now();
        let out = std::process::Command::new(bg_tests::paths::bgctl()).arg("--version").output()?;
        ensure!(out.status.success(), "bgctl --version failed");
        v.push(start.elapsed().as_micros() as u64);
    }
    Ok(v)
}

fn million_flows(smoke: bool) -> anyhow::Result<Value> {
    let n: u32 = if smoke { 20_000 } else { 1_000_000 };
    let flip_count = if smoke { 10 } else { 100 };
    let gap = Duration::from_millis(20);
    let t = Topology::create("bm0")?;
    let table = n.next_power_of_two().max(16_384);
    std::fs::write(t.config_path(), t.config().replace("flow_table_size = 16384", &format!("flow_table_size = {table}")))?;
    let _backends = t.start_backends()?;
    let _agent = t.start_agent()?;
    t.wait_healthy()?;
    let filled = fill(&t, n)?;
    // The sampler walks the tables in the background: wait until it has seen them all.
    let sampled = Instant::now();
    loop {
        let s = status(&t)?;
        if s.flows.flows.iter().sum::<u64>() >= n as u64 {
            break;
        }
        ensure!(sampled.elapsed() < Duration::from_secs(120), "the flow sampler did not count {n} flows in 120 s: {:?}", s.flows);
        std::thread::sleep(Duration::from_millis(200));
    }
    let sample_wait = sampled.elapsed();
    let (quiet, quiet_agent) = flips(&t, flip_count, gap)?;
    // Now the same flips while one client loops `status` and another loops scrapes.
    let stop = AtomicBool::new(false);
    let (statuses, scrapes, (loaded, loaded_agent)) = std::thread::scope(|s| -> anyhow::Result<_> {
        let status_loop = s.spawn(|| -> anyhow::Result<Vec<u64>> {
            let mut v = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                status(&t)?;
                v.push(start.elapsed().as_micros() as u64);
            }
            Ok(v)
        });
        let scrape_loop = s.spawn(|| -> anyhow::Result<Vec<u64>> {
            let _in = InNetns::enter(&t.gw)?;
            let mut v = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                scrape()?;
                v.push(start.elapsed().as_micros() as u64);
            }
            Ok(v)
        });
        std::thread::sleep(Duration::from_millis(200));
        let flipped = flips(&t, flip_count, gap);
        stop.store(true, Ordering::Relaxed);
        let statuses = status_loop.join().map_err(|_| anyhow::anyhow!("status loop panicked"))??;
        let scrapes = scrape_loop.join().map_err(|_| anyhow::anyhow!("scrape loop panicked"))??;
        Ok((statuses, scrapes, flipped?))
    })?;
    let floor = unix_socket_floor(&t, flip_count, gap)?;
    let cli = cli_start(if smoke { 5 } else { 50 })?;
    let s = status(&t)?;
    eprintln!(
        "bench: {n} flows: status p50 {} us, scrape p50 {} us, flip p50 {} us quiet / {} us under status+scrape loops",
        pct_of(&statuses, 0.5),
        pct_of(&scrapes, 0.5),
        pct_of(&quiet, 0.5),
        pct_of(&loaded, 0.5)
    );
    Ok(json!({
        "flows": n, "flow_table_size": table, "fill_ms": filled.as_millis() as u64, "sampler_caught_up_ms": sample_wait.as_millis() as u64,
        "live_flows_in_status": s.flows.flows,
        "status": summary(statuses), "scrape": summary(scrapes),
        "flip_quiet": summary(quiet), "flip_quiet_in_agent": summary(quiet_agent),
        "flip_loaded": summary(loaded), "flip_loaded_in_agent": summary(loaded_agent),
        "unix_socket_floor": summary(floor), "cli_start": summary(cli),
        "method": format!("{n} established entries written into the pinned IPv4 table, half per color; once the agent's background sampler has counted them, {flip_count} flips {} ms apart through the control socket, then {flip_count} more while one client loops `status` (no --count-flows) and another loops GET /metrics back to back; every figure from the client's side", gap.as_millis()),
    }))
}

fn pct_of(v: &[u64], p: f64) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    pct(&v, p)
}

fn max_config() -> anyhow::Result<Value> {
    let t = Topology::create("bx0")?;
    let _servers = t.setup_max_config()?;
    let started = Instant::now();
    let _agent = t.start_agent()?;
    let answering = started.elapsed();
    let up = |s: &control::Status| s.health.iter().map(|h| h.up).sum::<usize>();
    let total = 2 * bg_tests::topology::MAX_SERVICES * bg_tests::topology::MAX_PER_COLOR;
    loop {
        let s = status(&t)?;
        if up(&s) == total {
            break;
        }
        ensure!(started.elapsed() < Duration::from_secs(120), "not every backend came up in 120 s: {:?}", s.health);
        std::thread::sleep(Duration::from_millis(200));
    }
    let all_up = started.elapsed();
    let (flip_client_us, flip_agent_us) = flip(&t, "green")?;
    let status_start = Instant::now();
    let status_bytes = serde_json::to_string(&status(&t)?)?.len();
    let status_us = status_start.elapsed().as_micros() as u64;
    // One blue host (now idle, one backend in each of the 64 services) stops answering its
    // checks; later it comes back. Each change republishes blue's tables: the first into a
    // slot this agent never wrote (written whole), the second into one it knows (only what moves).
    let host = max_backend(1, 0);
    let republished = |after: u64| -> anyhow::Result<control::RepublishStatus> {
        let since = Instant::now();
        loop {
            if let Some(r) = status(&t)?.last_republish.filter(|r| r.number > after) {
                ensure!(r.color == "blue", "republished {} instead of blue", r.color);
                return Ok(r);
            }
            ensure!(since.elapsed() < Duration::from_secs(60), "blue was not republished within 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let before = status(&t)?.last_republish.map_or(0, |r| r.number);
    t.gw.exec(&["ip", "route", "add", "prohibit", &format!("{host}/32")])?;
    let cut = Instant::now();
    let down = republished(before)?;
    let noticed = cut.elapsed();
    t.gw.exec(&["ip", "route", "del", "prohibit", &format!("{host}/32")])?;
    let back = republished(down.number)?;
    eprintln!(
        "bench: max config: answering in {} ms, all {total} up in {} ms, flip {} us ({} us in the agent); a host down: {} us writing {} ring entries; back: {} us writing {}",
        answering.as_millis(),
        all_up.as_millis(),
        flip_client_us,
        flip_agent_us,
        down.took_us,
        down.ring_entries,
        back.took_us,
        back.ring_entries
    );
    Ok(json!({
        "services": bg_tests::topology::MAX_SERVICES, "backends_per_color": bg_tests::topology::MAX_PER_COLOR,
        "start_to_answering_ms": answering.as_millis() as u64, "start_to_all_up_ms": all_up.as_millis() as u64,
        "flip_client_us": flip_client_us, "flip_in_agent_us": flip_agent_us,
        "status_us": status_us, "status_bytes": status_bytes,
        "host_down": {"host": host, "noticed_after_ms": noticed.as_millis() as u64, "republish_us": down.took_us, "ring_entries_written": down.ring_entries},
        "host_back": {"republish_us": back.took_us, "ring_entries_written": back.ring_entries},
        "method": "64 services × 256 backends × 2 colors, TCP checks every 3 s (rise 2, fall 3); start: from spawning the agent to its first `status` answer (maps created, every table written, program loaded and attached), then to every backend up; one flip to green; then one blue host (a backend in each of the 64 services) made unreachable from the gateway, and later reachable again: `noticed` is from the cut to blue's tables republished (three failed checks); each republish is the agent's own time for it (64 services' Maglev tables built twice, old and new) and the entries it wrote (a slot the agent has not written since it started is written whole, so a count near 64 × 16381 means that slot was fresh)",
    }))
}

pub fn control(smoke: bool) -> anyhow::Result<Value> {
    Ok(json!({"million_flows": million_flows(smoke)?, "max_config": max_config()?}))
}
