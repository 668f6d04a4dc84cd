//! `cargo xtask bench`: bg measured side by side with the floor and with what users would pick
//! instead, in one run. Writes `results.json` and `BENCHMARKS.md` (plus the charts' data) to
//! the output directory. `--smoke` runs every benchmark for seconds (CI), no thresholds.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context;
use aya::{programs::Xdp, TestRun, TestRunOptions};
use bg_common::{Color, FlowKey, NatEntry, FAMILY_V4, NAT_FROM_BACKEND, NAT_TO_BACKEND};
use bg_tests::{
    packet::{self, TCP_ACK, TCP_SYN},
    paths,
    topology::{http_get, Topology, VIP, VIP_PORT},
};
use bg_userspace::{config::Config, control, dataplane::Dataplane};
use serde_json::{json, Value};

mod network;

struct Opts {
    smoke: bool,
    out: PathBuf,
    only: Option<String>,
}

fn raw(ip: Ipv4Addr) -> [u32; 4] {
    [u32::from_ne_bytes(ip.octets()), 0, 0, 0]
}

fn key(src: SocketAddrV4, dst: SocketAddrV4) -> FlowKey {
    FlowKey {
        src: raw(*src.ip()),
        dst: raw(*dst.ip()),
        sport: src.port().to_be(),
        dport: dst.port().to_be(),
        proto: 6,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

fn entry(to: SocketAddrV4, kind: u8) -> NatEntry {
    NatEntry {
        addr: raw(*to.ip()),
        last_seen_ns: bg_userspace::dataplane::monotonic_ns(),
        port: to.port().to_be(),
        kind,
        color: 0,
        flags: 0,
        _pad: [0; 3],
    }
}

fn config(backends: usize, table: u32) -> Config {
    let list = |net: u8, port: u16| -> String {
        (0..backends).map(|i| format!("\"10.{net}.{}.{}:{port}\"", i / 250, 2 + i % 250)).collect::<Vec<_>>().join(", ")
    };
    Config::parse(&format!(
        "interfaces = [\"unused0\"]\nforwarding = \"kernel\"\nmax_new_flows_per_sec = 0\nflow_table_size = {table}\n\
         [[service]]\nname = \"web\"\nvip = \"10.100.0.1:80\"\nblue = [{}]\ngreen = [{}]\n",
        list(1, 8080),
        list(2, 8080)
    ))
    .expect("bench config")
}

/// Median ns per run of `input` with `repeat` repetitions, over `batches` batches.
fn per_run(prog: &Xdp, input: &[u8], repeat: u32, batches: usize) -> f64 {
    let mut v: Vec<f64> = (0..batches)
        .map(|_| {
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(input);
            opts.repeat = repeat;
            prog.test_run(opts).expect("test_run").duration.as_nanos() as f64
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Median ns of single runs over a sequence of distinct inputs (each run is a new flow).
fn single_runs(prog: &Xdp, inputs: &[Vec<u8>]) -> f64 {
    let mut v: Vec<f64> = inputs
        .iter()
        .map(|i| {
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(i);
            prog.test_run(opts).expect("test_run").duration.as_nanos() as f64
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn syns(n: usize) -> Vec<Vec<u8>> {
    let vip: SocketAddrV4 = "10.100.0.1:80".parse().unwrap();
    (0..n)
        .map(|i| {
            let client = SocketAddrV4::new(Ipv4Addr::from(0x0b00_0000 + (i as u32 >> 14)), 1024 + (i & 0x3fff) as u16);
            packet::tcp(client, vip, TCP_SYN, b"")
        })
        .collect()
}

/// Packet cost under BPF_PROG_TEST_RUN.
fn packet_cost(o: &Opts) -> anyhow::Result<Value> {
    let object = std::fs::read(paths::ebpf_object())?;
    let (repeat, batches, singles) = if o.smoke { (10_000, 3, 2_000) } else { (1_000_000, 7, 100_000) };
    let client: SocketAddrV4 = "10.0.0.2:40000".parse()?;
    let vip: SocketAddrV4 = "10.100.0.1:80".parse()?;
    let blue: SocketAddrV4 = "10.1.0.2:8080".parse()?;

    let mut dp = Dataplane::open(&object, &config(1, 1 << 21), None, Color::Blue)?;
    let floor_pkt = packet::tcp(client, "10.9.9.9:80".parse()?, TCP_SYN, b"");
    let floor = per_run(dp.floor_program()?, &floor_pkt, repeat, batches);
    let floor_single = single_runs(dp.floor_program()?, &syns(singles));

    let non_vip = per_run(dp.program(), &floor_pkt, repeat, batches);
    // Established and reply: entries that rewrite to the packet's own address and port
    // (identity NAT), so the rewritten buffer takes the same path on every repetition; the
    // work (lookup, incremental checksums, counters) is that of any established packet.
    dp.insert_flow(&key(client, vip), &entry(vip, NAT_TO_BACKEND))?;
    let established_pkt = packet::tcp(client, vip, TCP_ACK, b"");
    let established = per_run(dp.program(), &established_pkt, repeat, batches);
    dp.insert_flow(&key(blue, client), &entry(blue, NAT_FROM_BACKEND))?;
    let reply = per_run(dp.program(), &packet::tcp(blue, client, TCP_ACK, b""), repeat, batches);
    // New flows: a fresh 5-tuple per run (repeat = 1), compared with the floor measured the
    // same way.
    let new_flow = single_runs(dp.program(), &syns(singles));
    drop(dp);

    // Scaling: established with 1k / 100k / 1M live entries; new flow with 1 / 16 / 256 backends.
    let sizes: &[u32] = if o.smoke { &[1_000, 10_000] } else { &[1_000, 100_000, 1_000_000] };
    let mut by_table = Vec::new();
    for &n in sizes {
        let mut dp = Dataplane::open(&object, &config(1, (2 * n).max(1 << 21)), None, Color::Blue)?;
        for i in 0..n {
            let c = SocketAddrV4::new(Ipv4Addr::from(0x0c00_0000 + i), 5000);
            dp.insert_flow(&key(c, vip), &entry(blue, NAT_TO_BACKEND))?;
        }
        dp.insert_flow(&key(client, vip), &entry(vip, NAT_TO_BACKEND))?;
        let ns = per_run(dp.program(), &established_pkt, repeat, batches);
        eprintln!("bench: established with {n} live entries: {ns:.1} ns");
        by_table.push(json!({"entries": n, "established_ns": ns}));
    }
    let mut by_backends = Vec::new();
    for b in [1usize, 16, 256] {
        let dp = Dataplane::open(&object, &config(b, 1 << 21), None, Color::Blue)?;
        let ns = single_runs(dp.program(), &syns(singles.min(50_000)));
        eprintln!("bench: new flow with {b} backends per color: {ns:.1} ns");
        by_backends.push(json!({"backends": b, "new_flow_ns": ns}));
    }
    Ok(json!({
        "method": "BPF_PROG_TEST_RUN; repeat-mode medians of batches for floor, non-VIP, established and reply (identity-NAT entries keep every repetition on the timed path); new flows as the median of single runs over distinct 5-tuples, against the floor measured the same way",
        "repeat": repeat, "batches": batches, "single_runs": singles,
        "floor_ns": floor, "floor_single_ns": floor_single,
        "non_vip_ns": non_vip, "established_ns": established, "reply_ns": reply, "new_flow_ns": new_flow,
        "by_table_size": by_table, "by_backends": by_backends,
    }))
}

/// Cutover: the map write, the flip round trip, and the first new connection on green, under
/// load; errors, resets and moved connections over many flips.
fn cutover(o: &Opts) -> anyhow::Result<Value> {
    // The map write alone.
    let object = std::fs::read(paths::ebpf_object())?;
    let mut dp = Dataplane::open(&object, &config(16, 1 << 16), None, Color::Blue)?;
    let n = if o.smoke { 1_000 } else { 100_000 };
    let mut writes: Vec<u64> = (0..n)
        .map(|i| dp.route(if i % 2 == 0 { Color::Green } else { Color::Blue }, 0).unwrap().as_nanos() as u64)
        .collect();
    writes.sort();
    drop(dp);

    let t = Topology::create(&bg_tests::run::tag("bench"))?;
    let _backends = t.start_backends()?;
    let _agent = t.start_agent()?;
    t.wait_healthy()?;
    let flips = if o.smoke { 6 } else { 100 };
    let stop = AtomicBool::new(false);
    let resets_before = Topology::tcp_counter(&t.client, "EstabResets")?;
    let mut round_trips = Vec::new();
    let mut cli_round_trips = Vec::new();
    let mut first_new = Vec::new();
    let (answers, keepalive) = std::thread::scope(|s| -> anyhow::Result<_> {
        // New connections back to back, each stamped with when its answer arrived.
        let newconn = s.spawn(|| {
            let _in = bg_tests::netns::InNetns::enter(&t.client).unwrap();
            let mut seen: Vec<(Instant, Result<String, String>)> = Vec::new();
            while !stop.load(Ordering::Relaxed) && seen.len() < 2_000_000 {
                let r = http_get(SocketAddr::new(VIP.parse().unwrap(), VIP_PORT)).map_err(|e| format!("{e:#}"));
                seen.push((Instant::now(), r));
            }
            seen
        });
        // Keep-alive connections opened on blue: every answer must stay blue.
        let keep = s.spawn(|| {
            let _in = bg_tests::netns::InNetns::enter(&t.client).unwrap();
            network::keepalive_clients(SocketAddr::new(VIP.parse().unwrap(), VIP_PORT), 8, &stop)
        });
        std::thread::sleep(Duration::from_millis(300));
        for i in 0..flips {
            let color = if i % 2 == 0 { "green" } else { "blue" };
            let req = control::Request::Flip { color: color.into(), drain_secs: None, percent: None, force: false };
            let start = Instant::now();
            let r = control::call(&t.socket(), &req)?;
            let returned = Instant::now();
            anyhow::ensure!(matches!(r, control::Response::Flipped(_)), "flip failed: {r:?}");
            round_trips.push((returned - start).as_nanos() as u64);
            first_new.push((returned, color));
            std::thread::sleep(Duration::from_millis(if o.smoke { 150 } else { 200 }));
        }
        // The CLI itself (process start included), a few times.
        for i in 0..if o.smoke { 2 } else { 10 } {
            let color = if (flips + i) % 2 == 0 { "green" } else { "blue" };
            let start = Instant::now();
            t.bgctl(&["flip", color])?;
            cli_round_trips.push(start.elapsed().as_nanos() as u64);
            first_new.push((Instant::now(), color));
            std::thread::sleep(Duration::from_millis(150));
        }
        stop.store(true, Ordering::Relaxed);
        Ok((newconn.join().unwrap(), keep.join().unwrap()))
    })?;
    let resets = Topology::tcp_counter(&t.client, "EstabResets")? - resets_before;
    // For each flip: the first answer from the new color among answers after it returned.
    let mut to_green = Vec::new();
    for (returned, color) in &first_new {
        if let Some((at, _)) = answers.iter().find(|(at, r)| at > returned && r.as_deref() == Ok(*color)) {
            to_green.push(at.duration_since(*returned).as_nanos() as u64);
        }
    }
    to_green.sort();
    round_trips.sort();
    cli_round_trips.sort();
    let errors = answers.iter().filter(|(_, r)| r.is_err()).count() + keepalive.errors;
    let pct = |v: &[u64], p: f64| v.get(((v.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(0);
    eprintln!(
        "bench: flip round trip p50 {} us, first new connection on the new color p50 {} us; {} requests, {errors} errors, {resets} resets, {} moved",
        pct(&round_trips, 0.5) / 1000,
        pct(&to_green, 0.5) / 1000,
        answers.len() + keepalive.requests as usize,
        keepalive.moved
    );
    Ok(json!({
        "map_write_ns": {"p50": pct(&writes, 0.5), "p99": pct(&writes, 0.99), "n": writes.len()},
        "flip_round_trip_ns": {"p50": pct(&round_trips, 0.5), "p99": pct(&round_trips, 0.99), "max": pct(&round_trips, 1.0), "n": round_trips.len()},
        "cli_round_trip_ns": {"p50": pct(&cli_round_trips, 0.5), "max": pct(&cli_round_trips, 1.0), "n": cli_round_trips.len()},
        "first_new_connection_after_return_ns": {"p50": pct(&to_green, 0.5), "p99": pct(&to_green, 0.99), "max": pct(&to_green, 1.0), "n": to_green.len()},
        "flips_under_load": flips,
        "requests": answers.len() as u64 + keepalive.requests,
        "errors": errors,
        "resets": resets,
        "moved_connections": keepalive.moved,
    }))
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut o = Opts { smoke: false, out: PathBuf::from("target/bench"), only: None };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--smoke" => o.smoke = true,
            "--out" => o.out = PathBuf::from(args.next().context("--out needs a directory")?),
            "--only" => o.only = Some(args.next().context("--only needs a section: packet, cutover, cutover_others, network")?),
            // Rewrites the report from a results.json without measuring anything.
            "--report" => {
                let path = PathBuf::from(args.next().context("--report needs a results.json")?);
                let all: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
                std::fs::create_dir_all(&o.out)?;
                std::fs::write(o.out.join("BENCHMARKS.md"), network::markdown(&all))?;
                println!("bench: report written to {}", o.out.join("BENCHMARKS.md").display());
                return Ok(());
            }
            other => anyhow::bail!("unknown argument `{other}`; usage: bg-bench [--smoke] [--out DIR] [--only SECTION] [--report results.json]"),
        }
    }
    std::fs::create_dir_all(&o.out)?;
    let started = std::time::SystemTime::now();
    let mut results = BTreeMap::new();
    // A section that fails is reported as such; the others still run.
    let mut failed = Vec::new();
    let only = o.only.clone();
    let mut section = |name: &'static str, run: &dyn Fn() -> anyhow::Result<Value>| {
        if only.as_deref().is_some_and(|s| s != name) {
            return;
        }
        let v = run().unwrap_or_else(|e| {
            eprintln!("bench: {name} FAILED: {e:#}");
            failed.push(name);
            json!({"error": format!("{e:#}")})
        });
        results.insert(name, v);
    };
    section("packet", &|| packet_cost(&o));
    section("cutover", &|| cutover(&o));
    section("cutover_others", &|| network::cutover_others(o.smoke));
    section("network", &|| network::throughput(o.smoke));
    let meta = json!({
        "date": humantime::format_rfc3339_seconds(started).to_string(),
        "smoke": o.smoke,
        "kernel": String::from_utf8_lossy(&std::process::Command::new("uname").arg("-r").output()?.stdout).trim(),
        "cpus": aya::util::nr_cpus().unwrap_or(0),
    });
    let all = json!({"meta": meta, "results": results});
    let path = o.out.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&all)?)?;
    println!("bench: results in {}", path.display());
    let md = network::markdown(&all);
    std::fs::write(o.out.join("BENCHMARKS.md"), md)?;
    // Errors, resets, moved connections and SYN retransmits are correctness, not noise: the
    // smoke run (CI) fails on any of them; a full run reports them next to the figures.
    let violations = network::violations(&all);
    let verdict = if failed.is_empty() && violations.is_empty() {
        "every section ran; 0 errors, 0 resets, 0 moved connections, 0 SYN retransmits".to_owned()
    } else {
        let mut v = violations.clone();
        v.extend(failed.iter().map(|f| format!("section {f} failed")));
        v.join("; ")
    };
    std::fs::write(o.out.join("verdict.txt"), format!("{verdict}\n"))?;
    println!("bench: {verdict}");
    if !failed.is_empty() {
        anyhow::bail!("benchmark sections failed: {}", failed.join(", "));
    }
    if o.smoke && !violations.is_empty() {
        anyhow::bail!("the smoke run counted what must never happen: {}", violations.join("; "));
    }
    Ok(())
}
