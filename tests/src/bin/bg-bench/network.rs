//! Through the network: wrk against direct routing, bg, nftables DNAT and HAProxy (TCP mode) on
//! one namespace topology, rounds interleaved; and the cutover of bg, nftables and HAProxy,
//! each against the same nginx backends under the same load, each switched the same two ways
//! (its operator CLI, and its API from inside the benchmark).

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use bg_tests::{
    netns::{InNetns, Netns, Proc},
    topology::{http_get, Topology, BLUE, GREEN, VIP, VIP_PORT},
};
use bg_userspace::control;

use crate::nft;
use serde_json::{json, Value};

/// What keep-alive clients saw.
#[derive(Default)]
pub struct KeepAlive {
    pub requests: u64,
    pub errors: usize,
    /// Connections whose answers changed color (a moved connection).
    pub moved: u64,
}

fn keepalive_get(c: &mut BufReader<TcpStream>) -> anyhow::Result<String> {
    c.get_mut().write_all(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")?;
    let mut len = 0;
    let mut line = String::new();
    loop {
        line.clear();
        if c.read_line(&mut line)? == 0 {
            bail!("closed");
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse()?;
        }
    }
    let mut body = vec![0; len];
    std::io::Read::read_exact(c, &mut body)?;
    Ok(String::from_utf8_lossy(&body).trim().to_owned())
}

/// `n` keep-alive connections to `addr`, requests round-robin until `stop`.
pub fn keepalive_clients(addr: SocketAddr, n: usize, stop: &AtomicBool) -> KeepAlive {
    let mut k = KeepAlive::default();
    let mut conns: Vec<(BufReader<TcpStream>, Option<String>, bool)> = (0..n)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok())
        .map(|c| {
            c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            (BufReader::new(c), None, false)
        })
        .collect();
    k.errors += n - conns.len();
    while !stop.load(Ordering::Relaxed) {
        for (c, first, moved) in conns.iter_mut() {
            k.requests += 1;
            match keepalive_get(c) {
                Ok(body) => match first {
                    None => *first = Some(body),
                    Some(f) if *f != body && !*moved => {
                        *moved = true;
                        k.moved += 1;
                    }
                    _ => {}
                },
                Err(_) => k.errors += 1,
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    k
}

/// nginx in a backend namespace, answering with the color (a real server for the load runs).
fn nginx(ns: &Netns, addr: &str, color: &str, dir: &std::path::Path) -> anyhow::Result<Proc> {
    let conf = dir.join(format!("nginx-{color}.conf"));
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;\npid {d}/nginx-{color}.pid;\nerror_log {d}/nginx-{color}.err;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; keepalive_requests 1000000;\n\
               client_body_temp_path {d}/nb-{color}; proxy_temp_path {d}/np-{color}; fastcgi_temp_path {d}/nf-{color};\n\
               uwsgi_temp_path {d}/nu-{color}; scgi_temp_path {d}/ns-{color};\n\
               server {{ listen {addr}:8080 backlog=4096; listen {addr}:8081 backlog=4096; listen {addr}:8082 backlog=4096; listen {addr}:8083 backlog=4096;\n                 location / {{ default_type text/plain; return 200 \"{color}\\n\"; }} }} }}\n",
            d = dir.display()
        ),
    )?;
    let mut cmd = ns.command("nginx");
    cmd.args(["-c", conf.to_str().unwrap(), "-g", "daemon off;"]);
    let p = Proc::spawn(&format!("nginx {color}"), &mut cmd)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while ns.exec(&["bash", "-c", &format!("exec 3<>/dev/tcp/{addr}/8080")]).is_err() {
        if Instant::now() > deadline {
            bail!("nginx in {} did not start", ns.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(p)
}

/// A contender's data path set up on the gateway, removed on drop.
enum Switcher<'a> {
    Direct,
    Bg(&'a Topology, Proc),
    Nft(&'a Topology),
    Haproxy(&'a Topology, Proc),
}

impl Drop for Switcher<'_> {
    fn drop(&mut self) {
        match self {
            Switcher::Direct => {}
            Switcher::Bg(t, agent) => {
                agent.stop(Duration::from_secs(5));
                let _ = t.cleanup();
            }
            Switcher::Nft(t) => {
                let _ = t.gw.exec(&["nft", "delete", "table", "ip", "bgbench"]);
            }
            Switcher::Haproxy(t, p) => {
                p.stop(Duration::from_secs(5));
                let _ = t.gw.exec(&["ip", "addr", "del", &format!("{VIP}/32"), "dev", "lo"]);
            }
        }
    }
}

// Each contender reaches the backends on its own port (direct 8080, bg 8081, nftables 8082,
// HAProxy 8083): Linux offsets TCP timestamps per (source, destination) pair, so a client
// reaching the same backend 4-tuple once directly and once through a VIP looks like time going
// backwards to the backend's TIME_WAIT, and PAWS drops the SYN (TcpExtPAWSTimewait).
const NFT_MAP_BLUE: &str = "10.100.0.1 . 80 : 10.1.0.2 . 8082";
const NFT_MAP_GREEN: &str = "10.100.0.1 . 80 : 10.2.0.2 . 8082";

fn nft_rules() -> String {
    format!(
        "table ip bgbench {{\n  map backends {{ type ipv4_addr . inet_service : ipv4_addr . inet_service; elements = {{ {NFT_MAP_BLUE} }} }}\n\
         chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;\n    dnat ip to ip daddr . tcp dport map @backends\n  }}\n}}\n"
    )
}

fn setup<'a>(t: &'a Topology, which: &str) -> anyhow::Result<Switcher<'a>> {
    Ok(match which {
        "direct" => Switcher::Direct,
        "bg" => {
            let agent = t.start_agent()?;
            t.wait_healthy()?;
            Switcher::Bg(t, agent)
        }
        "nftables" => {
            let f = t.run_dir.join("nft.rules");
            std::fs::write(&f, nft_rules())?;
            t.gw.exec(&["nft", "-f", f.to_str().unwrap()])?;
            Switcher::Nft(t)
        }
        "haproxy" => {
            // A proxy opens its own connections to the backends; with new connections at this
            // rate its ephemeral ports sit in TIME_WAIT unless reuse is on, as on tuned proxies.
            t.gw.exec(&["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"])?;
            t.gw.exec(&["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            let map = t.run_dir.join("haproxy.map");
            std::fs::write(&map, "active be_blue\n")?;
            let cfg = t.run_dir.join("haproxy.cfg");
            std::fs::write(
                &cfg,
                format!(
                    "global\n  maxconn 4000\n  stats socket {sock} mode 600 level admin\n\
                     defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
                     frontend vip\n  bind {VIP}:{VIP_PORT}\n  use_backend %[str(active),map({map},be_blue)]\n\
                     backend be_blue\n  server blue {BLUE}:8083\n\
                     backend be_green\n  server green {GREEN}:8083\n",
                    sock = t.run_dir.join("haproxy.sock").display(),
                    map = map.display()
                ),
            )?;
            let mut cmd = t.gw.command("haproxy");
            cmd.args(["-db", "-f", cfg.to_str().unwrap()]);
            let p = Proc::spawn("haproxy", &mut cmd)?;
            let deadline = Instant::now() + Duration::from_secs(5);
            while t.client.exec(&["curl", "-s", "--max-time", "1", &format!("http://{VIP}:{VIP_PORT}/")]).is_err() {
                if Instant::now() > deadline {
                    bail!("haproxy did not start");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Switcher::Haproxy(t, p)
        }
        other => bail!("unknown contender {other}"),
    })
}

/// How a switch is driven: the command an operator runs (one process per switch: `bgctl
/// flip`, `nft -f`, `socat` to HAProxy's socket), or the contender's API called from inside
/// the benchmark (bg's control socket, libnftables, HAProxy's runtime socket).
#[derive(Clone, Copy, PartialEq)]
pub enum Via {
    Cli,
    Api,
}

/// A switcher's handle for its API column, made on the thread that switches (inside the
/// gateway's namespace).
enum Api {
    None,
    Nft(nft::Nft),
}

fn nft_flip(color: &str) -> String {
    let element = if color == "green" { NFT_MAP_GREEN } else { NFT_MAP_BLUE };
    format!("flush map ip bgbench backends\nadd element ip bgbench backends {{ {element} }}\n")
}

/// Switches a contender to `color` by `via`. Runs on a thread inside the gateway's namespace,
/// so every CLI is one process started directly (nft needs the namespace; bgctl and socat
/// only reach a socket file).
fn switch(s: &Switcher, api: &Api, via: Via, color: &str) -> anyhow::Result<()> {
    match (s, via) {
        (Switcher::Bg(t, _), Via::Cli) => {
            t.bgctl(&["flip", color])?;
        }
        (Switcher::Bg(t, _), Via::Api) => {
            let req = control::Request::Flip { color: color.into(), drain_secs: None, percent: None, force: false, dry_run: false };
            let r = control::call(&t.socket(), &req)?;
            anyhow::ensure!(matches!(r, control::Response::Flipped(_)), "flip failed: {r:?}");
        }
        (Switcher::Nft(t), Via::Cli) => {
            let f = t.run_dir.join("nft.flip");
            std::fs::write(&f, nft_flip(color))?;
            bg_tests::netns::run(Command::new("nft").arg("-f").arg(&f))?;
        }
        (Switcher::Nft(_), Via::Api) => match api {
            Api::Nft(n) => n.run(&nft_flip(color))?,
            Api::None => bail!("no libnftables context"),
        },
        (Switcher::Haproxy(t, _), Via::Cli) => {
            let mut child = Command::new("socat")
                .args(["-", &format!("UNIX-CONNECT:{}", t.run_dir.join("haproxy.sock").display())])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .context("socat")?;
            child.stdin.take().unwrap().write_all(haproxy_cmd(t, color).as_bytes())?;
            let out = child.wait_with_output()?;
            anyhow::ensure!(out.status.success(), "socat to haproxy failed");
            haproxy_answer_ok(&out.stdout)?;
        }
        (Switcher::Haproxy(t, _), Via::Api) => {
            let mut c = std::os::unix::net::UnixStream::connect(t.run_dir.join("haproxy.sock")).context("haproxy runtime socket")?;
            c.write_all(haproxy_cmd(t, color).as_bytes())?;
            // One command per connection: HAProxy answers and closes.
            let mut answer = Vec::new();
            std::io::Read::read_to_end(&mut c, &mut answer)?;
            haproxy_answer_ok(&answer)?;
        }
        (Switcher::Direct, _) => bail!("direct routing has nothing to switch"),
    }
    Ok(())
}

fn haproxy_cmd(t: &Topology, color: &str) -> String {
    format!("set map {} active be_{color}\n", t.run_dir.join("haproxy.map").display())
}

/// `set map` answers nothing but an empty line when it worked.
fn haproxy_answer_ok(answer: &[u8]) -> anyhow::Result<()> {
    let text = String::from_utf8_lossy(answer);
    anyhow::ensure!(text.trim().is_empty(), "haproxy refused the switch: {}", text.trim());
    Ok(())
}

/// The topology with nginx on both colors and a bg config serving only the IPv4 web service
/// (what nginx answers). The client and the backends keep no TIME_WAIT
/// (`tcp_max_tw_buckets = 0` in their namespaces). One client address opens every connection
/// of every contender, to the same VIP and port for three of them: its ephemeral ports come
/// round every few seconds, so TIME_WAIT entries left by one contender's run (or by earlier
/// seconds of the same run) meet new connections on the same 4-tuple, which hosts seeing many
/// peers would not; with them, port searches and PAWS checks of the harness rather than the
/// contender are measured (HAProxy fell from about 8k to under 1k new connections/s without a
/// single retransmit). The gateway is left as it is: what HAProxy's own TIME_WAIT costs is
/// part of HAProxy.
fn bench_topology(tag: &str) -> anyhow::Result<(Topology, Vec<Proc>)> {
    let t = Topology::create(tag)?;
    for ns in [&t.client, &t.blue, &t.green] {
        ns.exec(&["sysctl", "-q", "-w", "net.ipv4.tcp_max_tw_buckets=0"])?;
    }
    let servers = vec![nginx(&t.blue, BLUE, "blue", &t.run_dir)?, nginx(&t.green, GREEN, "green", &t.run_dir)?];
    let full = t.config();
    let web_only = full.split("[[service]]\nname = \"web6\"").next().context("topology config layout")?;
    // Sized like a gateway's table: at ~10k new connections/s a 16k-entry table evicts flows
    // still in their handshake.
    let mut cfg = web_only
        .replace("flow_table_size = 16384", "flow_table_size = 1048576")
        .replace(&format!("{BLUE}:8080"), &format!("{BLUE}:8081"))
        .replace(&format!("{GREEN}:8080"), &format!("{GREEN}:8081"));
    if let Ok(f) = std::env::var("BG_BENCH_FORWARDING") {
        cfg = cfg.replacen("interfaces =", &format!("forwarding = \"{f}\"\ninterfaces ="), 1);
    }
    std::fs::write(t.config_path(), cfg)?;
    Ok((t, servers))
}

/// SYN retransmits anywhere a connection of the load starts: the client, and the gateway
/// (HAProxy's own connections to the backends).
fn syn_retransmits(t: &Topology) -> anyhow::Result<u64> {
    Ok(tcpext(&t.client, "TCPSynRetrans")? + tcpext(&t.gw, "TCPSynRetrans")?)
}

/// SYNs the backends' listeners dropped (accept queue full).
fn listen_drops(t: &Topology) -> anyhow::Result<u64> {
    Ok(tcpext(&t.blue, "ListenDrops")? + tcpext(&t.green, "ListenDrops")?)
}

fn pct(v: &[u64], p: f64) -> u64 {
    crate::report::pct(v, p)
}

/// One switch as timed: when it returned, how long it took, to which color, how.
struct Switched {
    returned: Instant,
    took_ns: u64,
    color: &'static str,
    via: Via,
}

/// Cutover of every contender, one after the other, against the same nginx backends under the
/// same load (back-to-back new connections plus 8 keep-alive connections), each switched
/// `api_flips` times through its API and then `cli_flips` times through its CLI.
pub fn cutover(smoke: bool) -> anyhow::Result<Value> {
    let (t, _servers) = bench_topology(&bg_tests::run::tag("cut"))?;
    let (api_flips, cli_flips, pause) = if smoke { (6, 4, 150) } else { (100, 20, 200) };
    let mut out = serde_json::Map::new();
    for which in ["bg", "nftables", "haproxy"] {
        let sw = setup(&t, which)?;
        let stop = AtomicBool::new(false);
        let resets_before = Topology::tcp_counter(&t.client, "EstabResets")?;
        let syn_before = syn_retransmits(&t)?;
        let (answers, keep, switched) = std::thread::scope(|s| -> anyhow::Result<_> {
            let _stop = bg_tests::live::StopOnDrop(&stop);
            // New connections back to back, each stamped with when its answer arrived.
            let newconn = s.spawn(|| {
                let _in = InNetns::enter(&t.client).unwrap();
                let mut seen: Vec<(Instant, Result<String, String>)> = Vec::new();
                while !stop.load(Ordering::Relaxed) && seen.len() < 2_000_000 {
                    seen.push((Instant::now(), http_get(SocketAddr::new(VIP.parse().unwrap(), VIP_PORT)).map_err(|e| format!("{e:#}"))));
                }
                seen
            });
            // Keep-alive connections opened before the first switch: every answer must keep
            // its first color.
            let keep = s.spawn(|| {
                let _in = InNetns::enter(&t.client).unwrap();
                keepalive_clients(SocketAddr::new(VIP.parse().unwrap(), VIP_PORT), 8, &stop)
            });
            let _in = InNetns::enter(&t.gw)?;
            let api = if matches!(sw, Switcher::Nft(_)) { Api::Nft(nft::Nft::open()?) } else { Api::None };
            std::thread::sleep(Duration::from_millis(300));
            let mut switched = Vec::new();
            for i in 0..api_flips + cli_flips {
                let color = if i % 2 == 0 { "green" } else { "blue" };
                let via = if i < api_flips { Via::Api } else { Via::Cli };
                let start = Instant::now();
                switch(&sw, &api, via, color)?;
                let returned = Instant::now();
                switched.push(Switched { returned, took_ns: (returned - start).as_nanos() as u64, color, via });
                std::thread::sleep(Duration::from_millis(pause));
            }
            stop.store(true, Ordering::Relaxed);
            Ok((newconn.join().unwrap(), keep.join().unwrap(), switched))
        })?;
        let resets = Topology::tcp_counter(&t.client, "EstabResets")? - resets_before;
        let syn_retrans = syn_retransmits(&t)? - syn_before;
        let mut col = serde_json::Map::new();
        for via in [Via::Api, Via::Cli] {
            let mine: Vec<&Switched> = switched.iter().filter(|x| x.via == via).collect();
            let mut took: Vec<u64> = mine.iter().map(|x| x.took_ns).collect();
            took.sort();
            // For each switch: the first answer from the new color among answers after it
            // returned.
            let mut first: Vec<u64> = mine
                .iter()
                .filter_map(|x| {
                    answers.iter().find(|(at, r)| *at > x.returned && r.as_deref() == Ok(x.color)).map(|(at, _)| at.duration_since(x.returned).as_nanos() as u64)
                })
                .collect();
            first.sort();
            col.insert(
                if via == Via::Api { "api" } else { "cli" }.into(),
                json!({
                    "switches": mine.len(),
                    "switch_ns": {"p50": pct(&took, 0.5), "p99": pct(&took, 0.99), "max": pct(&took, 1.0)},
                    "first_new_on_new_color_ns": {"p50": pct(&first, 0.5), "p99": pct(&first, 0.99), "n": first.len()},
                }),
            );
        }
        let errors = answers.iter().filter(|(_, r)| r.is_err()).count() + keep.errors;
        eprintln!(
            "bench: {which} cutover: switch p50 {} us (API) / {} us (CLI), {} requests, {errors} errors, {resets} resets, {} moved, {syn_retrans} SYN retransmits",
            col["api"]["switch_ns"]["p50"].as_u64().unwrap_or(0) / 1000,
            col["cli"]["switch_ns"]["p50"].as_u64().unwrap_or(0) / 1000,
            answers.len() as u64 + keep.requests,
            keep.moved
        );
        col.insert("requests".into(), json!(answers.len() as u64 + keep.requests));
        col.insert("errors".into(), json!(errors));
        col.insert("resets".into(), json!(resets));
        col.insert("moved_connections".into(), json!(keep.moved));
        col.insert("syn_retransmits".into(), json!(syn_retrans));
        out.insert(which.into(), Value::Object(col));
        drop(sw);
    }
    Ok(json!({
        "method": format!("one topology, nginx backends; per contender: back-to-back new connections and 8 keep-alive connections from the client, {api_flips} switches through the API, then {cli_flips} through the CLI, {pause} ms apart; a switch is timed from the call to its return; the first new connection on the new color is the first answer from it after the switch returned"),
        "contenders": Value::Object(out),
    }))
}

/// A `TcpExt:` counter of /proc/net/netstat in `ns` (e.g. `TCPSynRetrans`).
fn tcpext(ns: &Netns, name: &str) -> anyhow::Result<u64> {
    ns.counter("netstat", "TcpExt", name)
}

/// One wrk run from the client namespace.
fn wrk(t: &Topology, target: &str, secs: u64, close: bool) -> anyhow::Result<Value> {
    let mut args = vec!["wrk", "-t", "2", "-c", "32", "-d"];
    let d = format!("{secs}s");
    args.push(&d);
    args.push("--latency");
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(target);
    let cpu0 = cpu_ticks()?;
    let syn0 = syn_retransmits(t)?;
    let drops0 = listen_drops(t)?;
    let out = t.client.exec(&args)?;
    let cpu1 = cpu_ticks()?;
    let syn_retrans = syn_retransmits(t)? - syn0;
    let drops = listen_drops(t)? - drops0;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let find = |prefix: &str| -> Option<String> {
        text.lines().find(|l| l.trim_start().starts_with(prefix)).map(|l| l.trim().to_owned())
    };
    let rps: f64 = find("Requests/sec:").and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).context("wrk printed no Requests/sec")?;
    let lat = |p: &str| -> f64 {
        find(p).and_then(|l| l.split_whitespace().nth(1).map(parse_duration_us)).unwrap_or(f64::NAN)
    };
    let errors = find("Socket errors:").unwrap_or_default();
    let non2xx = find("Non-2xx").unwrap_or_default();
    let requests = rps * secs as f64;
    let ticks = (cpu1 - cpu0) as f64 / 100.0; // USER_HZ
    Ok(json!({
        "rps": rps, "p50_us": lat("50%"), "p99_us": lat("99%"),
        "socket_errors": errors, "non_2xx": non2xx, "syn_retransmits": syn_retrans, "listen_drops": drops,
        "machine_cpu_s_per_100k": if requests > 0.0 { ticks / requests * 100_000.0 } else { f64::NAN },
    }))
}

fn parse_duration_us(s: &str) -> f64 {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_alphabetic()).unwrap_or(s.len()));
    let v: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => v,
        "ms" => v * 1000.0,
        "s" => v * 1e6,
        _ => f64::NAN,
    }
}

/// Busy CPU time of the whole machine in USER_HZ ticks (everything but idle and iowait).
fn cpu_ticks() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = cpu.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    Ok(v.iter().sum::<u64>() - v.get(3).copied().unwrap_or(0) - v.get(4).copied().unwrap_or(0))
}

/// Requests/s and latency for each contender, rounds interleaved.
pub fn throughput(smoke: bool) -> anyhow::Result<Value> {
    let (t, _servers) = bench_topology(&bg_tests::run::tag("net"))?;
    let (rounds, mut secs) = if smoke { (1, 2) } else { (3, 10) };
    // Knobs for looking into one contender: BG_BENCH_SECS (run length), BG_BENCH_CONTENDERS
    // (comma-separated subset; direct is always run, the ratios need it).
    if let Some(s) = std::env::var("BG_BENCH_SECS").ok().and_then(|s| s.parse().ok()) {
        secs = s;
    }
    let only = std::env::var("BG_BENCH_CONTENDERS").unwrap_or_default();
    let contenders: Vec<&str> = ["direct", "bg", "nftables", "haproxy"].into_iter().filter(|c| only.is_empty() || *c == "direct" || only.split(',').any(|o| o == *c)).collect();
    let mut runs: Vec<(String, String, Value)> = Vec::new();
    for round in 0..rounds {
        for &which in &contenders {
            let sw = setup(&t, which)?;
            let target = if which == "direct" { format!("http://{BLUE}:8080/") } else { format!("http://{VIP}:{VIP_PORT}/") };
            for (mode, close) in [("keepalive", false), ("new_connection", true)] {
                // bg's rate bound, at its default, must drop no new flow of a load this machine
                // can generate: counted around each run.
                let bound_drops = |t: &Topology| -> anyhow::Result<u64> {
                    let v: Value = serde_json::from_slice(&t.bgctl(&["stats", "--json"])?.stdout)?;
                    v["reasons"].as_array().and_then(|a| a.iter().find(|r| r[0] == "drop_new_flow_rate")).and_then(|r| r[1].as_u64()).context("drop_new_flow_rate in bgctl stats")
                };
                let drops0 = if which == "bg" { bound_drops(&t)? } else { 0 };
                let mut r = wrk(&t, &target, secs, close)?;
                if which == "bg" {
                    r["rate_bound_drops"] = json!(bound_drops(&t)? - drops0);
                }
                eprintln!("bench: round {round} {which:<9} {mode:<15} {:>9.0} req/s p50 {:>6.0} us p99 {:>7.0} us, {} SYN retransmits, {} listen drops", r["rps"].as_f64().unwrap_or(0.0), r["p50_us"].as_f64().unwrap_or(0.0), r["p99_us"].as_f64().unwrap_or(0.0), r["syn_retransmits"], r["listen_drops"]);
                if std::env::var_os("BG_BENCH_DEBUG").is_some() {
                    for ns in [&t.client, &t.gw, &t.blue] {
                        let out = ns.exec(&["sh", "-c", "nstat -az 2>/dev/null | grep -E 'PAWS|TimeWait|TW|ListenDrop|ListenOverflow|SynRetrans|OutRsts|InErrs|EstabResets|TCPChallengeACK|TCPAbortOnData|TCPSYNChallenge|TCPAckSkipped|ActiveOpens|PassiveOpens' | awk '$2 != 0'; ss -s | head -3"])?;
                        eprintln!("{} {which} {mode}:\n{}", ns.name, String::from_utf8_lossy(&out.stdout));
                    }
                }
                if which == "bg" && std::env::var_os("BG_BENCH_DEBUG").is_some() {
                    eprintln!("{}", String::from_utf8_lossy(&t.bgctl(&["stats"])?.stdout));
                    eprintln!("{}", String::from_utf8_lossy(&t.bgctl(&["status"])?.stdout));
                }
                runs.push((which.into(), mode.into(), r));
            }
            drop(sw);
        }
    }
    // Medians per contender and mode; ratios to direct routing.
    let mut summary = serde_json::Map::new();
    for mode in ["keepalive", "new_connection"] {
        let med = |which: &str, field: &str| -> f64 {
            let mut v: Vec<f64> = runs.iter().filter(|(w, m, _)| w == which && m == mode).filter_map(|(_, _, r)| r[field].as_f64()).collect();
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        let total = |which: &str, field: &str| -> u64 {
            runs.iter().filter(|(w, m, _)| w == which && m == mode).filter_map(|(_, _, r)| r[field].as_u64()).sum()
        };
        let direct = med("direct", "rps");
        let mut m = serde_json::Map::new();
        for &which in &contenders {
            // A contender whose connections needed SYN retransmits (each a 1 s stall) or whose
            // SYNs a backend dropped was not measured at its capacity: a broken setup.
            let (syn, drops) = (total(which, "syn_retransmits"), total(which, "listen_drops"));
            m.insert(
                which.into(),
                json!({
                    "rps": med(which, "rps"), "ratio_to_direct": med(which, "rps") / direct,
                    "p50_us": med(which, "p50_us"), "p99_us": med(which, "p99_us"),
                    "machine_cpu_s_per_100k": med(which, "machine_cpu_s_per_100k"),
                    "syn_retransmits": syn, "listen_drops": drops, "broken_setup": syn > 0 || drops > 0,
                }),
            );
        }
        summary.insert(mode.into(), Value::Object(m));
    }
    Ok(json!({
        "method": format!("wrk -t 2 -c 32 -d {secs}s --latency (new connection: -H 'Connection: close') from the client namespace; nginx backends keeping no TIME_WAIT; {rounds} interleaved round(s); medians; SYN retransmits counted on the client and the gateway, listen drops on the backends"),
        "summary": summary,
        "runs": runs.iter().map(|(w, m, r)| json!({"contender": w, "mode": m, "result": r})).collect::<Vec<_>>(),
    }))
}
