//! `cargo xtask bench`: bg measured side by side with the floor and with what users would pick
//! instead, in one run. Writes `results.json` and `BENCHMARKS.md` (plus the charts' data) to
//! the output directory. `--smoke` runs every benchmark for seconds (CI), no thresholds.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use aya::{programs::Xdp, TestRun, TestRunOptions};
use bg_common::{Color, FlowEntry, FlowKey, Reason, FAMILY_V4};
use bg_tests::{
    packet::{self, TCP_ACK, TCP_SYN},
    paths,
};
use bg_userspace::{config::Config, dataplane::Dataplane};
use serde_json::{json, Value};

mod control;
mod network;
mod nft;
mod report;

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

/// An established (confirmed) flow entry toward `to`.
fn entry(to: SocketAddrV4) -> FlowEntry {
    FlowEntry {
        last_seen_ns: bg_userspace::dataplane::monotonic_ns(),
        isn: 0x0102_0303,
        seq_next: 0x0102_0304,
        ..FlowEntry::to(raw(*to.ip()), to.port().to_be(), 0)
    }
}

/// A config as a user would write it: the defaults (redirect forwarding, the new-flow rate
/// bound on), only the table size and the backends given.
fn config(backends: usize, table: u32) -> Config {
    config_with(backends, table, "redirect")
}

/// `config` with another forwarding mode (for one comparison row).
fn config_with(backends: usize, table: u32, forwarding: &str) -> Config {
    let list = |net: u8, port: u16| -> String {
        (0..backends).map(|i| format!("\"10.{net}.{}.{}:{port}\"", i / 250, 2 + i % 250)).collect::<Vec<_>>().join(", ")
    };
    let c = Config::parse(&format!(
        "interfaces = [\"bench0\"]\nflow_table_size = {table}\n{}\
         [[service]]\nname = \"web\"\nvip = \"10.100.0.1:80\"\nblue = [{}]\ngreen = [{}]\n",
        if forwarding == "redirect" { String::new() } else { format!("forwarding = \"{forwarding}\"\n") },
        list(1, 8080),
        list(2, 8080)
    ))
    .expect("bench config");
    assert!(c.max_new_flows_per_sec > 0, "the default config bounds the new-flow rate");
    c
}

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

/// Median ns per run of `input` with `repeat` repetitions, over `batches` batches; checks the
/// program's verdict on every batch.
fn per_run(prog: &Xdp, input: &[u8], repeat: u32, batches: usize, expect: u32, what: &str) -> anyhow::Result<f64> {
    let mut v = Vec::with_capacity(batches);
    for _ in 0..batches {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(input);
        opts.repeat = repeat;
        let r = prog.test_run(opts).context("test_run")?;
        anyhow::ensure!(r.return_value == expect, "{what}: the program returned {} instead of {expect}", r.return_value);
        v.push(r.duration.as_nanos() as f64);
    }
    Ok(median(v))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median ns of single runs (repeat 1), one per input, at most `per_sec` runs a second (so the
/// default new-flow rate bound never drops one); checks every verdict.
fn single_runs(prog: &Xdp, inputs: &[Vec<u8>], per_sec: u64, expect: u32, what: &str) -> anyhow::Result<f64> {
    let mut v = Vec::with_capacity(inputs.len());
    let started = Instant::now();
    for (n, i) in inputs.iter().enumerate() {
        if per_sec > 0 && n % 256 == 0 {
            let due = Duration::from_nanos(n as u64 * 1_000_000_000 / per_sec);
            // Spun, not slept: a CPU that idles between runs (a VM's vCPU halts) comes back
            // cold, and the floor it is compared with runs back to back.
            while started.elapsed() < due {
                std::hint::spin_loop();
            }
        }
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(i);
        let r = prog.test_run(opts).context("test_run")?;
        anyhow::ensure!(r.return_value == expect, "{what}: run {n} returned {} instead of {expect}", r.return_value);
        v.push(r.duration.as_nanos() as f64);
    }
    Ok(median(v))
}

/// Client `i` of a large population: distinct source addresses and ports.
fn client(i: usize) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(0x0b00_0000 + (i as u32 >> 14)), 1024 + (i & 0x3fff) as u16)
}

fn syns(n: usize) -> Vec<Vec<u8>> {
    let vip: SocketAddrV4 = "10.100.0.1:80".parse().unwrap();
    (0..n).map(|i| packet::tcp(client(i), vip, TCP_SYN, b"")).collect()
}

/// The namespace the packet benchmarks run in: one route (default, via a neighbour that is
/// resolved) so that `bpf_fib_lookup` succeeds for every address and the program takes its
/// whole default path, up to and including `bpf_redirect`; and interfaces the timed programs
/// are attached to (`xa0`, `xf0`, `xk0`), which keeps them in the kernel's XDP dispatcher (see
/// `Dataplane::attach_for_bench`). No packet ever arrives on those.
fn packet_netns() -> anyhow::Result<bg_tests::netns::Netns> {
    let ns = bg_tests::netns::Netns::new(&bg_tests::run::tag("pkt"))?;
    for cmd in [
        "ip link add bench0 type veth peer name bench1",
        "ip addr add 10.9.0.1/24 dev bench0",
        "ip link set bench0 up",
        "ip link set bench1 up",
        "ip neigh replace 10.9.0.2 lladdr 02:00:00:00:00:bb dev bench0 nud permanent",
        "ip route add default via 10.9.0.2 dev bench0",
        "ip link add xa0 type veth peer name xa1",
        "ip link add xf0 type veth peer name xf1",
        "ip link add xk0 type veth peer name xk1",
        "sysctl -q -w net.ipv4.conf.all.forwarding=1",
        "sysctl -q -w net.ipv4.conf.lo.forwarding=1",
    ] {
        ns.exec(&cmd.split(' ').collect::<Vec<_>>())?;
    }
    Ok(ns)
}

/// What the packet figures hold, said once for the report.
const PACKET_SCOPE: &str = "Every figure is bg's XDP program on the default config (`forwarding = \"redirect\"`, the new-flow rate bound on at its default), run by BPF_PROG_TEST_RUN in a namespace where the FIB lookup succeeds, and every timed run was checked to return XDP_REDIRECT (XDP_PASS for the non-VIP packet). Inside the figure: parsing, the address filter, the flow-table lookup or inserts, Maglev, the rate window, the rewrite with incremental checksums, the counters, `bpf_fib_lookup`, the MAC rewrite and TTL decrement, and the `bpf_redirect` helper, which only records the target interface. Outside it: what the kernel does after the program returns XDP_REDIRECT (`xdp_do_redirect`: finding the device, converting the frame, the target's `ndo_xdp_xmit`, on veth the copy into the peer's ring), which BPF_PROG_TEST_RUN does not run outside live-frames mode, and the driver's own receive cost";

/// Packet cost under BPF_PROG_TEST_RUN.
fn packet_cost(o: &Opts) -> anyhow::Result<Value> {
    let object = std::fs::read(paths::ebpf_object())?;
    let ns = packet_netns()?;
    let _inside = bg_tests::netns::InNetns::enter(&ns)?;
    // Repeat mode runs again on the rewritten buffer, and every run decrements the TTL: 200
    // repetitions of a packet sent with TTL 255 all take the full path.
    const REPEAT: u32 = 200;
    let (batches, singles) = if o.smoke { (50, 2_000) } else { (5_000, 100_000) };
    let cpus = aya::util::nr_cpus().unwrap_or(1).max(1) as u64;
    let client0: SocketAddrV4 = "10.0.0.2:40000".parse()?;
    let vip: SocketAddrV4 = "10.100.0.1:80".parse()?;
    let blue: SocketAddrV4 = "10.1.0.2:8080".parse()?;

    let mut dp = Dataplane::open(&object, &config(1, 1 << 16), None, Color::Blue)?;
    dp.attach_for_bench("xa0", false)?;
    dp.attach_for_bench("xf0", true)?;
    // Paced below the per-CPU share of the default bound, whichever CPU a run lands on.
    let pace = (config(1, 1 << 16).max_new_flows_per_sec as u64 / cpus) * 8 / 10;
    let floor_pkt = packet::Pkt::tcp(client0, "10.9.9.9:80".parse()?, TCP_ACK).ttl(255).build();
    let floor = per_run(dp.floor_program()?, &floor_pkt, REPEAT, batches, XDP_PASS, "floor")?;
    let floor_single = single_runs(dp.floor_program()?, &syns(singles), 0, XDP_PASS, "floor (single runs)")?;

    let non_vip = per_run(dp.program(), &floor_pkt, REPEAT, batches, XDP_PASS, "non-VIP")?;
    // Established, hot key: an entry that rewrites to the packet's own address and port
    // (identity NAT), so the rewritten buffer takes the same path on every repetition; the work
    // (lookup, incremental checksums, FIB lookup, counters) is that of any such packet.
    dp.insert_flow(&key(client0, vip), &entry(vip))?;
    let established_pkt = packet::Pkt::tcp(client0, vip, TCP_ACK).ttl(255).build();
    let established = per_run(dp.program(), &established_pkt, REPEAT, batches, XDP_REDIRECT, "established")?;
    // Replies are rewritten by the static backend → VIP map: after one run the buffer is from
    // the VIP, so they are timed as single runs.
    let reply_pkt = packet::Pkt::tcp(blue, client0, TCP_ACK).ttl(255).build();
    let reply = single_runs(dp.program(), &vec![reply_pkt; singles], 0, XDP_REDIRECT, "reply")?;
    // The same established packet with `forwarding = "kernel"` (no FIB lookup, no redirect):
    // what the redirect's own share of the figure is.
    let established_kernel = {
        let mut k = Dataplane::open(&object, &config_with(1, 1 << 16, "kernel"), None, Color::Blue)?;
        k.attach_for_bench("xk0", false)?;
        k.insert_flow(&key(client0, vip), &entry(vip))?;
        per_run(k.program(), &established_pkt, REPEAT, batches, XDP_PASS, "established, kernel forwarding")?
    };
    // New flows: a fresh 5-tuple per run (repeat = 1), against the floor measured the same way.
    // As many as the default unconfirmed table (8192 entries) holds, so none evicts another.
    let new_flows = singles.min(8_000);
    let new_before = dp.reason_count(Reason::NewFlow)?;
    let new_flow = single_runs(dp.program(), &syns(new_flows), pace, XDP_REDIRECT, "new flow")?;
    anyhow::ensure!(dp.reason_count(Reason::NewFlow)? - new_before == new_flows as u64, "every timed SYN was a new flow");
    anyhow::ensure!(dp.reason_count(Reason::DropNewFlowRate)? == 0, "the pacing kept every SYN under the rate bound");
    drop(dp);

    // Flow-table sweep: the established table sized 1k, 64k and 1M entries and filled (one
    // entry per flow), established packets of distinct flows in shuffled order, one single run each, so
    // cache and TLB misses show; next to one hot flow timed the same way.
    let sizes: &[u32] = if o.smoke { &[1 << 10, 1 << 16] } else { &[1 << 10, 1 << 16, 1 << 20] };
    let mut by_table = Vec::new();
    for &size in sizes {
        let mut dp = Dataplane::open(&object, &config(1, size), None, Color::Blue)?;
        dp.attach_for_bench("xa0", false)?;
        let flows = size as usize;
        for i in 0..flows {
            dp.insert_flow(&key(client(i), vip), &entry(blue))?;
        }
        let present = dp.flow_counts()?.entries;
        let timed = flows.min(singles);
        // A fixed permutation (multiplicative, odd step): every flow once, no locality.
        let step = 2_654_435_761usize | 1;
        let distinct: Vec<Vec<u8>> = (0..timed).map(|n| packet::tcp(client(n.wrapping_mul(step) % flows), vip, TCP_ACK, b"")).collect();
        let to_backend = dp.reason_count(Reason::ToBackend)?;
        let ns_distinct = single_runs(dp.program(), &distinct, 0, XDP_REDIRECT, "established, distinct flows")?;
        let found = dp.reason_count(Reason::ToBackend)? - to_backend;
        let hot = vec![packet::tcp(client(0), vip, TCP_ACK, b""); timed];
        let ns_hot = single_runs(dp.program(), &hot, 0, XDP_REDIRECT, "established, one flow")?;
        eprintln!("bench: table of {size} entries ({present} present): established {ns_distinct:.1} ns over {timed} distinct flows ({found} found), {ns_hot:.1} ns for one flow");
        by_table.push(json!({"table_size": size, "entries_present": present, "timed_flows": timed, "found_their_entry": found,
            "distinct_flows_ns": ns_distinct, "one_flow_ns": ns_hot}));
    }
    let mut by_backends = Vec::new();
    for b in [1usize, 16, 256] {
        let mut dp = Dataplane::open(&object, &config(b, 1 << 16), None, Color::Blue)?;
        dp.attach_for_bench("xa0", false)?;
        let ns = single_runs(dp.program(), &syns(new_flows), pace, XDP_REDIRECT, "new flow")?;
        eprintln!("bench: new flow with {b} backends per color: {ns:.1} ns");
        by_backends.push(json!({"backends": b, "new_flow_ns": ns}));
    }
    Ok(json!({
        "scope": PACKET_SCOPE,
        "method": format!("floor, non-VIP and established: medians of {batches} batches of {REPEAT} repetitions (TTL 255, an identity-NAT entry keeps every repetition on the timed path); replies, new flows and the table sweep: medians of single runs (repeat 1), against the floor measured the same way; new flows paced to {pace}/s"),
        "repeat": REPEAT, "batches": batches, "single_runs": singles, "new_flow_runs": new_flows,
        "floor_ns": floor, "floor_single_ns": floor_single,
        "non_vip_ns": non_vip, "established_ns": established, "established_kernel_forwarding_ns": established_kernel, "reply_ns": reply, "new_flow_ns": new_flow,
        "by_table_size": by_table, "by_backends": by_backends,
    }))
}

/// The selector map write alone (bg's switch without its control path).
fn map_write(o: &Opts) -> anyhow::Result<Value> {
    let object = std::fs::read(paths::ebpf_object())?;
    let mut dp = Dataplane::open(&object, &config(16, 1 << 16), None, Color::Blue)?;
    let n = if o.smoke { 1_000 } else { 100_000 };
    let mut writes: Vec<u64> = (0..n)
        .map(|i| dp.route(if i % 2 == 0 { Color::Green } else { Color::Blue }, 0).map(|d| d.as_nanos() as u64))
        .collect::<anyhow::Result<_>>()?;
    writes.sort();
    Ok(json!({"p50": report::pct(&writes, 0.5), "p99": report::pct(&writes, 0.99), "n": writes.len()}))
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut o = Opts { smoke: false, out: PathBuf::from("target/bench"), only: None };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--smoke" => o.smoke = true,
            "--out" => o.out = PathBuf::from(args.next().context("--out needs a directory")?),
            "--only" => o.only = Some(args.next().context("--only needs a section: packet, map_write, cutover, control, network")?),
            // Rewrites the report from a results.json without measuring anything.
            "--report" => {
                let path = PathBuf::from(args.next().context("--report needs a results.json")?);
                let all: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
                std::fs::create_dir_all(&o.out)?;
                std::fs::write(o.out.join("BENCHMARKS.md"), report::markdown(&all))?;
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
    section("map_write", &|| map_write(&o));
    section("cutover", &|| network::cutover(o.smoke));
    section("control", &|| control::control(o.smoke));
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
    let md = report::markdown(&all);
    std::fs::write(o.out.join("BENCHMARKS.md"), md)?;
    // Errors, resets, moved connections and SYN retransmits are correctness, not noise: the
    // smoke run (CI) fails on any of them; a full run reports them next to the figures.
    let violations = report::violations(&all);
    let verdict = if failed.is_empty() && violations.is_empty() {
        "every section ran; 0 errors, 0 resets, 0 moved connections, 0 SYN retransmits, 0 listen drops".to_owned()
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
