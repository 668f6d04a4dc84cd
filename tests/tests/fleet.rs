//! Fleet mode: three gateways behind an ECMP router switch as one through a real etcd
//! (Debian's etcd-server), with the backends' return path through one gateway only.
//! Topology: `bg_tests::fleet`.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use bg_tests::{
    fleet::{FleetTopology, GATEWAYS},
    live::{hold_from, StopOnDrop},
    netns::{InNetns, Proc},
    run::tag,
    topology::{http_get, vip, VIP_PORT},
};
use serde_json::Value;

/// A fleet with etcd, backends and every agent up, both colors healthy on every gateway and
/// every gateway live in etcd.
fn fleet_up(kind: &str) -> (FleetTopology, Vec<Proc>, Vec<Proc>) {
    fleet_up_with(kind, FleetTopology::start_etcd)
}

/// `fleet_up` with etcd started by `etcd`.
fn fleet_up_with(kind: &str, etcd: fn(&mut FleetTopology) -> anyhow::Result<()>) -> (FleetTopology, Vec<Proc>, Vec<Proc>) {
    let mut t = FleetTopology::create(&tag(kind)).expect("topology");
    etcd(&mut t).expect("etcd");
    let backends = t.start_backends().expect("backends");
    let agents: Vec<Proc> = (0..GATEWAYS).map(|i| t.start_agent(i).expect("agent")).collect();
    t.wait_healthy().expect("healthy");
    wait_fleet_healthy(&t);
    (t, backends, agents)
}

/// Waits until every gateway is live in etcd and reports both colors healthy there (what the
/// fleet-wide gate reads).
fn wait_fleet_healthy(t: &FleetTopology) {
    t.wait_for("every gateway live in etcd, seeing both colors healthy", Duration::from_secs(10), || {
        let s = t.fleet_status();
        let g = s["gateways"].as_array().cloned().unwrap_or_default();
        (g.len() == GATEWAYS && g.iter().all(|g| g["health"].as_array().unwrap().iter().all(|v| v["healthy"] == true))).then_some(s)
    });
}

/// New-connection GETs from the client to the VIP (ECMP spreads them over the gateways),
/// back to back until `stop` (or 60 s): the answers per body, and the failures.
fn load(t: &FleetTopology, stop: &AtomicBool) -> (std::collections::BTreeMap<String, u64>, Vec<String>) {
    let _inside = InNetns::enter(&t.client).expect("enter the client namespace");
    let (mut answers, mut failures) = (std::collections::BTreeMap::new(), Vec::new());
    let until = Instant::now() + Duration::from_secs(60);
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        match http_get(vip(VIP_PORT)) {
            Ok(body) => *answers.entry(body).or_insert(0u64) += 1,
            Err(e) => failures.push(format!("request {i}: {e:#}")),
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    (answers, failures)
}

/// `count` new connections from the client; the bodies.
fn bodies(t: &FleetTopology, count: usize) -> Vec<String> {
    let _inside = InNetns::enter(&t.client).expect("enter the client namespace");
    (0..count).map(|_| http_get(vip(VIP_PORT)).unwrap_or_else(|e| format!("error: {e:#}"))).collect()
}

fn json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn twenty_fleet_flips_under_load_through_ecmp_are_acked_by_all_three_and_move_no_connection() {
    let (t, _backends, _agents) = fleet_up("fl");
    let stop = AtomicBool::new(false);
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let (mut flip_ms, mut apply_ms) = (Vec::new(), Vec::new());
    let (seen, (answers, failures)) = std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        // Long-lived connections opened on blue, exchanged on every 10 ms: each must stay on
        // blue, through whichever gateway ECMP hashed it to, across all 20 flips.
        let held = s.spawn(|| hold_from(&t.client, "blue", 6, 3, opened_tx, &stop));
        opened_rx.recv_timeout(Duration::from_secs(10)).expect("the long-lived connections opened");
        let load = s.spawn(|| load(&t, &stop));
        for n in 0..20 {
            let to = if n % 2 == 0 { "green" } else { "blue" };
            // From each gateway in turn, and from a host with only the CLI (the switch's).
            let out = match n % 4 {
                3 => t.fleet_cli(&t.sw, &["flip", to, "--json"]),
                i => t.bgctl(i, &["flip", to, "--json"]),
            }
            .unwrap_or_else(|e| panic!("flip {n} to {to}: {e:#}"));
            let r = json(&out);
            let f = &r;
            assert_eq!((f["result"].as_str(), f["to"].as_str()), (Some("flipped"), Some(to)), "flip {n}: {r}");
            let fleet = &f["fleet"];
            assert_eq!(fleet["complete"], true, "flip {n}: {r}");
            let acked: Vec<&str> = fleet["acks"].as_array().unwrap().iter().map(|a| a["gateway"].as_str().unwrap()).collect();
            assert_eq!(acked, ["gw0", "gw1", "gw2"], "flip {n}: every gateway acknowledges: {r}");
            let revision = fleet["revision"].as_i64().unwrap();
            assert!(fleet["acks"].as_array().unwrap().iter().all(|a| a["revision"].as_i64().unwrap() >= revision), "flip {n}: acked at its revision: {r}");
            // Returned once applied: every gateway's kernel selector already says so.
            for i in 0..GATEWAYS {
                let st = t.status(i);
                assert_eq!(st["active"], to, "flip {n}: gw{i}'s kernel selector as the flip returned: {st}");
            }
            flip_ms.push(f["total_ns"].as_f64().unwrap() / 1e6);
            apply_ms.extend(fleet["acks"].as_array().unwrap().iter().map(|a| a["apply_ms"].as_f64().unwrap()));
            // New connections follow the flip, whichever gateway they hash to.
            let b = bodies(&t, 6);
            assert!(b.iter().all(|x| x == to), "flip {n}: new connections after the flip to {to}: {b:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
        (held.join().unwrap(), load.join().unwrap())
    });
    flip_ms.sort_by(f64::total_cmp);
    apply_ms.sort_by(f64::total_cmp);
    eprintln!(
        "fleet of 3, 20 flips under load: flip (request to every ack) p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; \
         per-gateway apply p50 {:.1} ms, p99 {:.1} ms; {} requests {answers:?}; long-lived: {} exchanges in {} rounds",
        percentile(&flip_ms, 0.5),
        percentile(&flip_ms, 0.99),
        flip_ms[flip_ms.len() - 1],
        percentile(&apply_ms, 0.5),
        percentile(&apply_ms, 0.99),
        answers.values().sum::<u64>(),
        seen.exchanges,
        seen.rounds
    );
    assert!(failures.is_empty(), "new connections failed: {failures:?}");
    assert!(seen.errors.is_empty(), "long-lived connections broke: {:?}", seen.errors);
    assert!(seen.moved.is_empty(), "long-lived connections moved: {:?}", seen.moved);
    assert!(seen.rounds >= 20, "the long-lived connections were exchanged on throughout: {} rounds", seen.rounds);
    assert!(answers.get("blue").is_some_and(|n| *n > 0) && answers.get("green").is_some_and(|n| *n > 0), "{answers:?}");
    // The fleet's history in etcd has every flip, newest last.
    let h = json(&t.fleet_cli(&t.sw, &["history", "--json"]).unwrap());
    let events = h["events"].as_array().unwrap();
    assert_eq!(events.last().unwrap()["active"], "blue");
    assert_eq!(events.iter().filter(|e| e["event"] == "flip").count(), 20, "{h}");
}

/// Runs `cmd`, which is expected to fail; its stdout (JSON) and stderr.
fn failing(cmd: &mut std::process::Command) -> (Value, String) {
    let out = cmd.output().expect("run");
    assert!(!out.status.success(), "{cmd:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
    let stdout = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn gateways(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().map(|g| g["gateway"].as_str().or(g.as_str()).unwrap_or_default().to_owned()).collect()).unwrap_or_default()
}

#[test]
fn every_gateway_has_the_same_tables_and_a_flow_moved_between_gateways_keeps_its_backend() {
    let (t, _backends, _agents) = fleet_up("ft");
    // The same config gives the same Maglev tables and backend sets on every gateway.
    let first = t.tables(0).expect("gw0's tables");
    assert!(first.0.iter().any(|x| *x != first.0[0]), "a table over two backends names both");
    for i in 1..GATEWAYS {
        assert!(t.tables(i).expect("tables") == first, "gw{i}'s Maglev tables or backend sets differ from gw0's");
    }
    // Long-lived connections while the router moves every flow from gateway to gateway (no
    // flip): each lands on its backend again on the next gateway (two backends per color: a
    // wrong one would reset it), and its replies return through gw0 throughout.
    let stop = AtomicBool::new(false);
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let seen = std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let held = s.spawn(|| hold_from(&t.client, "blue", 8, 4, opened_tx, &stop));
        opened_rx.recv_timeout(Duration::from_secs(10)).expect("the long-lived connections opened");
        for only in [Some(1), Some(2), Some(0), Some(2), None] {
            t.route_via(only).expect("route");
            std::thread::sleep(Duration::from_millis(400));
        }
        stop.store(true, Ordering::Relaxed);
        held.join().unwrap()
    });
    eprintln!("moved between gateways: {} exchanges in {} rounds", seen.exchanges, seen.rounds);
    assert!(seen.errors.is_empty(), "connections broke when moved between gateways: {:?}", seen.errors);
    assert!(seen.moved.is_empty(), "connections changed color: {:?}", seen.moved);
    assert!(seen.rounds >= 10, "exchanged on throughout: {} rounds", seen.rounds);
}

#[test]
fn a_dead_agent_is_reported_the_others_flip_and_its_gateway_keeps_serving_its_last_state() {
    let (t, _backends, mut agents) = fleet_up("fd");
    bg_tests::fleet::kill(&mut agents[2]);
    // Its lease (2 s) runs out: it is no longer live, and is listed as down.
    t.wait_for("gw2 listed as down", Duration::from_secs(10), || {
        let s = t.fleet_status();
        (gateways(&s["gateways"]) == ["gw0", "gw1"] && s["down"] == serde_json::json!(["gw2"])).then_some(s)
    });
    let r = json(&t.bgctl(0, &["flip", "green", "--json"]).expect("a flip with one agent dead"));
    assert_eq!(r["fleet"]["complete"], true, "{r}");
    assert_eq!(gateways(&r["fleet"]["acks"]), ["gw0", "gw1"], "{r}");
    assert_eq!(r["fleet"]["down"], serde_json::json!(["gw2"]), "the dead one is reported: {r}");
    let human = String::from_utf8(t.bgctl(1, &["flip", "blue"]).unwrap().stdout).unwrap();
    assert!(human.contains("members without a live agent (not waited for): gw2"), "{human}");
    t.bgctl(1, &["flip", "green"]).unwrap();
    // Its data plane keeps serving the state it had (blue); the others serve green.
    for (only, color) in [(2, "blue"), (0, "green"), (1, "green")] {
        t.route_via(Some(only)).unwrap();
        let b = bodies(&t, 4);
        assert!(b.iter().all(|x| x == color), "through gw{only} only: {b:?}");
    }
    // Restarted, it reads the fleet's state before it answers anything: its very first status
    // says green, at the fleet's revision.
    let revision = t.fleet_status()["revision"].as_i64().unwrap();
    let (agent, first) = t.start_agent_first_status(2).expect("restart gw2's agent");
    agents[2] = agent;
    assert_eq!(first["active"], "green", "gw2's first answer after its restart: {first}");
    assert_eq!(first["fleet"]["applied_revision"], revision, "{first}");
    let b = bodies(&t, 4);
    assert!(b.iter().all(|x| x == "green"), "through gw2 after its restart: {b:?}");
    t.route_via(None).unwrap();
}

#[test]
fn a_gateway_cut_off_from_etcd_is_reported_fenced_and_converges_when_the_cut_heals() {
    let (t, _backends, _agents) = fleet_up("fp");
    t.cut(2).unwrap();
    let started = Instant::now();
    let mut flip = std::process::Command::new(bg_tests::paths::bgctl());
    flip.arg("--socket").arg(t.socket(0)).args(["flip", "green", "--json"]);
    let (r, err) = failing(&mut flip);
    let not_applied: Vec<String> = gateways(&r["fleet"]["lagging"]).into_iter().chain(gateways(&r["fleet"]["lost"])).collect();
    assert_eq!(not_applied, ["gw2"], "the flip reports the cut gateway: {r}");
    assert_eq!(gateways(&r["fleet"]["acks"]), ["gw0", "gw1"], "{r}");
    assert!(err.contains("not applied by every live gateway in time: gw2"), "{err}");
    // It says so, and is fenced once cut off for fence_after_secs (3 s): its hook ran.
    t.wait_for("gw2 fenced", Duration::from_secs(15), || {
        let s = t.status(2);
        (s["fleet"]["etcd"] == "down" && s["fleet"]["fenced"] == true).then_some(s)
    });
    // The hook runs beside the agent's loop, just after the state says fenced.
    t.wait_for("the fence hook's mark", Duration::from_secs(5), || t.fence_mark(2).exists().then_some(Value::Null));
    eprintln!("partition: gw2 fenced {:?} after the cut", started.elapsed());
    // Meanwhile it forwards with the last state it applied.
    t.route_via(Some(2)).unwrap();
    assert!(bodies(&t, 3).iter().all(|x| x == "blue"), "gw2 keeps blue while cut off");
    t.route_via(None).unwrap();
    // The fleet moves on without it (no longer live), and etcd compacts its history.
    for to in ["blue", "green"] {
        let r = json(&t.bgctl(1, &["flip", to, "--json"]).expect("flip without gw2"));
        assert_eq!(r["fleet"]["down"], serde_json::json!(["gw2"]), "{r}");
    }
    t.compact_etcd().expect("compact etcd");
    let revision = t.fleet_status()["revision"].as_i64().unwrap();
    t.heal(2).unwrap();
    let healed = Instant::now();
    t.wait_for("gw2 converged", Duration::from_secs(15), || {
        let s = t.status(2);
        (s["fleet"]["etcd"] == "up" && s["fleet"]["fenced"] == false && s["active"] == "green" && s["fleet"]["applied_revision"] == revision)
            .then_some(s)
    });
    eprintln!("partition healed: gw2 converged in {:?}", healed.elapsed());
    t.wait_for("the unfence hook removing the mark", Duration::from_secs(5), || (!t.fence_mark(2).exists()).then_some(Value::Null));
    t.route_via(Some(2)).unwrap();
    assert!(bodies(&t, 3).iter().all(|x| x == "green"), "gw2 serves the fleet's state again");
    t.route_via(None).unwrap();
    let events: Vec<String> = serde_json::from_slice::<Value>(&t.bgctl(2, &["history", "--json"]).unwrap().stdout).unwrap()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect();
    let at = |e: &str| events.iter().position(|x| x == e).unwrap_or_else(|| panic!("no {e} in gw2's audit log: {events:?}"));
    assert!(at("fence") < at("unfence"), "{events:?}");
}

#[test]
fn two_flips_started_at_once_from_two_hosts_exactly_one_wins() {
    let (t, _backends, _agents) = fleet_up("fc");
    let before = t.fleet_status();
    let generation = before["desired"]["generation"].as_u64().unwrap();
    // Both decide on the same revision (a pause between their read and their write), one
    // from the switch's host, one from a gateway's host: a flip and a canary.
    let spawn = |ns: &bg_tests::netns::Netns, args: &[&str]| {
        let mut c = t.fleet_command(ns, args);
        c.env("BG_FLEET_PAUSE_BEFORE_WRITE_MS", "1000");
        c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("spawn")
    };
    let a = spawn(&t.sw, &["flip", "green", "--json"]);
    let b = spawn(&t.gws[1], &["flip", "green", "--percent", "10", "--json"]);
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let won: Vec<bool> = [&a, &b].iter().map(|o| o.status.success()).collect();
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "exactly one wins: {a:?} {b:?}");
    let loser = if won[0] { &b } else { &a };
    let why = String::from_utf8_lossy(&loser.stderr);
    assert!(why.contains("another switch won the race"), "the loser is told: {why}");
    let after = t.fleet_status();
    assert_eq!(after["desired"]["generation"].as_u64().unwrap(), generation + 1, "one switch written: {after}");
    let (active, canary) = if won[0] { ("green", 0) } else { ("blue", 100) };
    assert_eq!((after["desired"]["active"].as_str().unwrap(), after["desired"]["canary_permille"].as_u64().unwrap()), (active, canary));
    let h = json(&t.fleet_cli(&t.sw, &["history", "--json"]).unwrap());
    let newer = h["events"].as_array().unwrap().iter().filter(|e| e["generation"].as_u64().unwrap() > generation).count();
    assert_eq!(newer, 1, "one history entry: {h}");
    for i in 0..GATEWAYS {
        let s = t.status(i);
        assert_eq!(s["active"], active, "gw{i}: {s}");
        assert_eq!(s["canary"].is_null(), canary == 0, "gw{i}: {s}");
    }
}

#[test]
fn with_etcd_down_every_gateway_keeps_forwarding_and_says_so() {
    let (mut t, _backends, _agents) = fleet_up("fe");
    t.bgctl(0, &["flip", "green"]).expect("flip");
    t.kill_etcd();
    for i in 0..GATEWAYS {
        t.wait_for(&format!("gw{i} says etcd is down"), Duration::from_secs(15), || {
            let s = t.status(i);
            (s["fleet"]["etcd"] == "down").then_some(s)
        });
        let m = t.gws[i].exec(&["curl", "-sS", "http://127.0.0.1:9477/metrics"]).unwrap();
        let m = String::from_utf8_lossy(&m.stdout);
        assert!(m.lines().any(|l| l.starts_with("bg_fleet_etcd_up{") && l.ends_with(" 0")), "gw{i}'s metrics: bg_fleet_etcd_up 0");
    }
    // Every gateway keeps forwarding with the state it applied.
    for only in 0..GATEWAYS {
        t.route_via(Some(only)).unwrap();
        let b = bodies(&t, 3);
        assert!(b.iter().all(|x| x == "green"), "through gw{only} with etcd down: {b:?}");
    }
    t.route_via(None).unwrap();
    // A switch needs etcd: refused with the reason, nothing changed.
    let (_, err) = failing(std::process::Command::new(bg_tests::paths::bgctl()).arg("--socket").arg(t.socket(0)).args(["flip", "blue"]));
    assert!(err.contains("etcd"), "{err}");
    assert_eq!(t.status(0)["active"], "green");
    // etcd back (same data): every gateway is in touch again, at the same state.
    t.start_etcd().expect("etcd again");
    for i in 0..GATEWAYS {
        t.wait_for(&format!("gw{i} back in touch"), Duration::from_secs(15), || {
            let s = t.status(i);
            (s["fleet"]["etcd"] == "up" && s["active"] == "green").then_some(s)
        });
    }
}

#[test]
fn a_three_node_etcd_cluster_loses_a_member_and_the_fleet_still_flips_as_one() {
    let (mut t, _backends, _agents) = fleet_up_with("f3", FleetTopology::start_etcd_cluster);
    let flip = |t: &FleetTopology, to: &str| {
        let r = json(&t.bgctl(1, &["flip", to, "--json"]).unwrap_or_else(|e| panic!("flip to {to}: {e:#}")));
        assert_eq!((r["fleet"]["complete"].as_bool(), gateways(&r["fleet"]["acks"])), (Some(true), vec!["gw0".to_owned(), "gw1".into(), "gw2".into()]), "{r}");
    };
    flip(&t, "green");
    // One of three members down: the other two are a quorum; clients that talked to the dead
    // one move to another endpoint.
    t.kill_etcd_member(0);
    // Sessions on the killed member reconnect to another (after a new leader is elected, if it
    // led); their old keys go with their leases (2 s). Then every gateway is live again.
    std::thread::sleep(Duration::from_secs(3));
    let took = t.wait_for("every gateway live again with one etcd member down", Duration::from_secs(20), || {
        let s = t.fleet_cli(&t.sw, &["status", "--json"]).ok().map(|o| json(&o))?;
        let g = s["gateways"].as_array()?;
        (g.len() == GATEWAYS && g.iter().all(|g| g["revision"] == s["revision"])).then_some(s)
    });
    eprintln!("3-node etcd, one member killed: every gateway live again {:?} after the first 3 s", took);
    flip(&t, "blue");
    flip(&t, "green");
    for i in 0..GATEWAYS {
        let s = t.status(i);
        assert_eq!((s["active"].as_str(), s["fleet"]["etcd"].as_str()), (Some("green"), Some("up")), "gw{i}: {s}");
    }
}

#[test]
fn a_color_that_turns_unhealthy_after_a_fleet_flip_is_rolled_back_once_for_the_whole_fleet() {
    let (t, mut backends, _agents) = fleet_up("fr");
    let r = json(&t.bgctl(0, &["flip", "green", "--json"]).expect("flip"));
    let generation = r["generation"].as_u64().unwrap();
    // Green's servers stop (the last four: both green hosts' HTTP and stream servers): every
    // gateway's watch window sees it, each proposes the rollback, one write wins.
    backends.truncate(4);
    let stopped = Instant::now();
    for i in 0..GATEWAYS {
        t.wait_for(&format!("gw{i} back on blue"), Duration::from_secs(15), || {
            let s = t.status(i);
            (s["active"] == "blue").then_some(s)
        });
    }
    eprintln!("fleet automatic rollback: every gateway on blue {:?} after green's servers stopped", stopped.elapsed());
    // Give the losing proposals time to be told the fleet moved on; nothing more is written.
    std::thread::sleep(Duration::from_secs(2));
    let s = t.fleet_status();
    assert_eq!(s["desired"]["generation"].as_u64(), Some(generation + 1), "exactly one rollback written: {s}");
    assert_eq!((s["desired"]["event"].as_str(), s["desired"]["active"].as_str()), (Some("rollback"), Some("blue")), "{s}");
    assert!(s["desired"]["who"].as_str().unwrap().starts_with("agent of gateway gw"), "{s}");
    let automatic: u64 = (0..GATEWAYS).map(|i| t.status(i)["auto_rollbacks_total"].as_u64().unwrap()).sum();
    assert_eq!(automatic, 1, "one gateway's proposal won");
    assert!(bodies(&t, 6).iter().all(|b| b == "blue"));
}

#[test]
fn a_fleet_over_mutual_tls_flips_as_one_and_etcd_refuses_a_client_without_a_certificate() {
    let (t, _backends, _agents) = fleet_up_with("fs", FleetTopology::start_etcd_tls);
    let r = json(&t.bgctl(0, &["flip", "green", "--json"]).expect("flip over TLS"));
    assert_eq!((r["fleet"]["complete"].as_bool(), gateways(&r["fleet"]["acks"])), (Some(true), vec!["gw0".to_owned(), "gw1".into(), "gw2".into()]), "{r}");
    let ca = t.tls_dir().unwrap().join("ca.pem");
    // The server's certificate is good (curl trusts it with the CA), but without a client
    // certificate etcd ends the handshake.
    let url = format!("https://{}:{}/v3/kv/range", bg_tests::fleet::ETCD, bg_tests::fleet::ETCD_PORT);
    let no_cert = t.sw.command("curl").args(["-sS", "--fail", "--max-time", "5", "--cacert", ca.to_str().unwrap(), "-X", "POST", &url, "-d", r#"{"key":"AA=="}"#]).output().unwrap();
    assert!(!no_cert.status.success(), "etcd answered a client without a certificate: {}", String::from_utf8_lossy(&no_cert.stdout));
    // And a bgctl given only the CA is refused, saying where.
    let only_ca = t.run_dir.join("ca-only.toml");
    std::fs::write(&only_ca, format!("[fleet]\nname = \"{}\"\netcd = [\"https://{}:{}\"]\n[fleet.tls]\nca = \"{}\"\n", t.tag, bg_tests::fleet::ETCD, bg_tests::fleet::ETCD_PORT, ca.display())).unwrap();
    let mut cmd = t.sw.nsenter(bg_tests::paths::bgctl().to_str().unwrap());
    cmd.args(["fleet", "--config", only_ca.to_str().unwrap(), "status"]);
    let (_, err) = failing(&mut cmd);
    assert!(err.contains("no etcd endpoint answered") && err.contains("https://10.60.0.100:2379"), "{err}");
}

#[test]
fn a_flip_not_applied_everywhere_in_time_is_rolled_back_with_rollback_on_timeout() {
    let (t, _backends, mut agents) = fleet_up("fo");
    // gw0's agent flips with rollback_on_timeout, and serves the HTTP API; gw2 is cut off from etcd.
    let token = t.run_dir.join("api-token");
    bg_tests::http::write_token(&token, API_TOKEN);
    agents[0].stop(Duration::from_secs(5));
    agents[0] = t.start_agent_with(0, &format!("rollback_on_timeout = true\n\n[api]\ntoken_file = \"{}\"\n", token.display())).expect("gw0 again");
    wait_fleet_healthy(&t);
    let before = t.fleet_status()["desired"]["generation"].as_u64().unwrap();
    t.cut(2).unwrap();
    let mut flip = std::process::Command::new(bg_tests::paths::bgctl());
    flip.arg("--socket").arg(t.socket(0)).args(["flip", "green", "--json"]);
    let (r, err) = failing(&mut flip);
    let not_applied: Vec<String> = gateways(&r["fleet"]["lagging"]).into_iter().chain(gateways(&r["fleet"]["lost"])).collect();
    assert_eq!(not_applied, ["gw2"], "{r}");
    let back = r["fleet"]["rolled_back"].as_str().unwrap_or_default();
    assert!(back.contains("rolled back") && back.contains("applied by every live gateway"), "{r}");
    assert!(err.contains("rolled back"), "{err}");
    // The fleet is back on blue, two generations on (the flip and its undo), on every gateway in touch.
    let s = t.fleet_status();
    assert_eq!((s["desired"]["active"].as_str(), s["desired"]["generation"].as_u64()), (Some("blue"), Some(before + 2)), "{s}");
    assert!(s["desired"]["reason"].as_str().unwrap().contains("rollback_on_timeout"), "{s}");
    for i in 0..2 {
        assert_eq!(t.status(i)["active"], "blue", "gw{i}");
    }
    // gw2, cut off all along, kept blue; healed, it stays there (the fleet's state).
    t.heal(2).unwrap();
    t.wait_for("gw2 in touch again", Duration::from_secs(15), || {
        let st = t.status(2);
        (st["fleet"]["etcd"] == "up" && st["fleet"]["applied_revision"] == s["revision"]).then_some(st)
    });
    assert_eq!(t.status(2)["active"], "blue");

    // The same through gw0's HTTP API, as a Spinnaker stage: with gw2 cut off the operation
    // fails (not applied everywhere, rolled back) though the switch was written; healed, it is done on all three.
    t.cut(2).unwrap();
    let op = api_flip(&t, r#"{"color":"green"}"#);
    assert_eq!(op["status"], "failed", "{op}");
    assert!(op["error"].as_str().unwrap().contains("gw2") && op["error"].as_str().unwrap().contains("rolled back"), "{op}");
    assert_eq!(op["result"]["fleet"]["complete"], false, "the figures are there too: {op}");
    t.heal(2).unwrap();
    t.wait_for("gw2 in touch again", Duration::from_secs(15), || {
        let st = t.status(2);
        (st["fleet"]["etcd"] == "up" && st["fleet"]["applied_revision"] == t.fleet_status()["revision"]).then_some(st)
    });
    let op = api_flip(&t, r#"{"color":"green"}"#);
    assert_eq!(op["status"], "done", "{op}");
    assert_eq!(op["result"]["fleet"]["complete"], true, "{op}");
    assert_eq!(gateways(&op["result"]["fleet"]["acks"]), ["gw0", "gw1", "gw2"], "{op}");
    for i in 0..3 {
        assert_eq!(t.status(i)["active"], "green", "gw{i}");
    }
    assert!(t.fleet_status()["desired"]["who"].as_str().unwrap().starts_with("api (bearer token) from 127.0.0.1 on gateway gw0"), "{}", t.fleet_status());
}

const API_TOKEN: &str = "5d0c2e4a6b8f1d3c5e7a9b0c2d4e6f8a";

/// A flip through gw0's HTTP API as a Spinnaker stage makes it: POST, then the Location URL
/// polled until the operation is done or failed.
fn api_flip(t: &FleetTopology, payload: &str) -> Value {
    bg_tests::http::spinnaker_stage(&t.gws[0], "http://127.0.0.1:9478", API_TOKEN, "/v1/flip", payload)
}

#[test]
fn the_dashboards_fleet_row_has_data_on_a_fleet_gateway() {
    let (t, _backends, _agents) = fleet_up("fd");
    let _prometheus = bg_tests::prom::start(&t.gws[0], &t.run_dir, &["127.0.0.1:9477"]).unwrap();
    t.fleet_cli(&t.sw, &["flip", "green"]).expect("fleet flip");
    let applied = t.status(0)["fleet"]["applied_revision"].as_f64().unwrap();
    let start = Instant::now();
    while bg_tests::prom::values(&bg_tests::prom::query(&t.gws[0], "bg_fleet_applied_revision")) != [applied] {
        assert!(start.elapsed() < Duration::from_secs(15), "Prometheus did not scrape gw0's applied revision {applied}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let exprs = bg_tests::prom::expressions(&bg_tests::prom::dashboard());
    assert!(exprs.iter().filter(|e| e.fleet).count() >= 4, "the dashboard has its fleet row");
    let empty = bg_tests::prom::without_data(&t.gws[0], exprs.iter().filter(|e| e.fleet));
    assert!(empty.is_empty(), "fleet expressions without data:\n{}", empty.join("\n"));
    let behind = exprs.iter().find(|e| e.place.starts_with("panel `Revisions behind`")).unwrap().promql();
    let a = bg_tests::prom::query(&t.gws[0], &behind);
    assert_eq!((a["data"]["result"][0]["metric"]["gateway"].as_str(), bg_tests::prom::values(&a)), (Some("gw0"), vec![0.0]), "{a}");
}
