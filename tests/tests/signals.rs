//! Rolling back on what real traffic sees (network tier, real servers, real `bgctl`): a green
//! whose health endpoint answers while its service resets or drops the clients' connections is
//! rolled back on the data path's connection signals; failures below the SLO trip nothing; a
//! bad canary ends; `flip --dry-run` changes nothing. Needs root.
//!
//! Green is made bad with nftables in its own namespace, for the clients' addresses only: the
//! agent's health checks come from the gateway and keep passing.

use std::{
    net::SocketAddr,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use bg_tests::{
    live::StopOnDrop,
    netns::Netns,
    paths,
    topology::{http_get, vip, Topology, PREVIEW_PORT, VIP_PORT},
};

fn tag() -> String {
    bg_tests::run::tag("s")
}




/// The automatic rollbacks in the audit log.
fn auto_rollbacks(t: &Topology) -> Vec<serde_json::Value> {
    t.history().into_iter().filter(|e| e["uid"] == "agent" && e["event"] == "rollback").collect()
}

/// The default SLO window (config `slo.window_secs`), as the README states it.
const SLO_WINDOW: Duration = Duration::from_secs(5);

/// What green does to the clients' connections to its web port (8080), with nftables in its
/// namespace: only sources in the client's subnet, so health checks from the gateway pass.
fn sabotage(green: &Netns, verdict: &str) {
    let rules = format!(
        "table inet bgtest {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  ip saddr 10.0.0.0/24 tcp dport 8080 {verdict}\n }}\n}}\n"
    );
    let path = std::env::temp_dir().join(format!("bg-sabotage-{}.nft", green.name));
    std::fs::write(&path, rules).unwrap();
    let out = green.exec(&["nft", "-f", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    out.expect("nft rules in green's namespace");
}

fn heal(green: &Netns) {
    green.exec(&["nft", "delete", "table", "inet", "bgtest"]).expect("removing the nft rules");
}

/// One connection attempt: when it started and what came of it.
#[derive(Debug)]
struct Attempt {
    at: Instant,
    answer: Result<String, String>,
}

/// New-connection HTTP GETs to `addr` from the client namespace, `threads` at once (each
/// thread one after another with `gap` between), until `stop` is set or 30 s have passed.
fn hammer(t: &Topology, addr: SocketAddr, threads: usize, gap: Duration, stop: &AtomicBool) -> Vec<Attempt> {
    let until = Instant::now() + Duration::from_secs(30);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let _inside = bg_tests::netns::InNetns::enter(&t.client).expect("enter the client namespace");
                    let mut v = Vec::new();
                    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                        let at = Instant::now();
                        v.push(Attempt { at, answer: http_get(addr).map_err(|e| format!("{e:#}")) });
                        std::thread::sleep(gap);
                    }
                    v
                })
            })
            .collect();
        let mut all: Vec<Attempt> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
        all.sort_by_key(|a| a.at);
        all
    })
}


/// Green resets (`reject`) or silently drops (`drop`) the clients' connections; its health
/// checks pass. A flip to it under load is rolled back once, on the signals, within the SLO
/// window + 1 s of its first failed handshake; new connections are back on blue; the audit
/// line carries the figures.
fn bad_green_is_rolled_back(verdict: &str, failed_as: &str) {
    let t = Topology::create(&tag()).unwrap();
    let _backends = t.start_backends().unwrap();
    let _agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    sabotage(&t.green, verdict);
    let stop = AtomicBool::new(false);
    let (attempts, flipped, rolled_back) = std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let load = s.spawn(|| hammer(&t, vip(VIP_PORT), 24, Duration::from_millis(50), &stop));
        std::thread::sleep(Duration::from_millis(500));
        let out = t.bgctl(&["flip", "green"]).unwrap();
        let flipped = Instant::now();
        assert!(String::from_utf8_lossy(&out.stdout).contains("automatic rollback: on"), "{}", String::from_utf8_lossy(&out.stdout));
        let rolled_back = t.wait_until("the automatic rollback", SLO_WINDOW + Duration::from_secs(8), |s| s["active"] == "blue");
        // Load goes on a while on blue: new connections must all be blue's.
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
        (load.join().unwrap(), flipped, rolled_back)
    });
    // Green's first failed handshake: the first connection started after the flip that failed
    // (a drop fails it at the client's first retransmission, 1 s on; its start is counted here).
    let first_failed = attempts.iter().filter(|a| a.at >= flipped - Duration::from_millis(50) && a.answer.is_err()).map(|a| a.at).next();
    let first_failed = first_failed.expect("green failed some connections after the flip");
    let took = rolled_back.saturating_duration_since(first_failed);
    eprintln!(
        "bad green ({verdict}): rolled back {:?} after green's first failed handshake ({:?} after the flip); {} attempts",
        took,
        rolled_back.duration_since(flipped),
        attempts.len()
    );
    let extra = if verdict == "drop" { Duration::from_secs(1) } else { Duration::ZERO };
    assert!(took <= SLO_WINDOW + Duration::from_secs(1) + extra, "rollback {took:?} after the first failed handshake");
    // New connections after the rollback (observed here a poll later) are all blue's.
    let after: Vec<&Attempt> = attempts.iter().filter(|a| a.at > rolled_back + Duration::from_millis(100)).collect();
    assert!(after.len() >= 20, "load went on after the rollback: {} attempts", after.len());
    let bad: Vec<_> = after.iter().filter(|a| a.answer.as_deref() != Ok("blue")).collect();
    assert!(bad.is_empty(), "new connections after the rollback not answered by blue: {bad:?}");
    // Exactly once, and audited with the figures.
    std::thread::sleep(Duration::from_millis(500));
    let s = t.status();
    assert_eq!((s["active"].as_str(), s["auto_rollbacks_total"].as_u64()), (Some("blue"), Some(1)), "{s}");
    let autos = auto_rollbacks(&t);
    assert_eq!(autos.len(), 1, "exactly one automatic rollback: {autos:?}");
    let reason = autos[0]["reason"].as_str().unwrap();
    assert!(reason.contains("SLO breach: service web on green") && reason.contains("handshakes failed"), "{reason}");
    let green = autos[0]["signals"].as_array().unwrap().iter().find(|f| f["service"] == "web" && f["color"] == "green").cloned();
    let green = green.unwrap_or_else(|| panic!("the audit line carries green's figures: {}", autos[0]));
    // Counted as what they were: refused (an RST to the SYN) or unanswered (no SYN-ACK), not
    // the other.
    let other = if failed_as == "refused" { "no_answer" } else { "refused" };
    assert!(green[failed_as].as_u64().unwrap() >= 20 && green[other] == 0 && green["breach"].is_string(), "figures that tripped it: {green}");
    let words = if failed_as == "refused" { "0 unanswered" } else { "(0 refused" };
    assert!(reason.contains(words), "the reason says how they failed: {reason}");
    heal(&t.green);
}

#[test]
fn a_green_that_resets_real_connections_is_rolled_back_on_the_signals() {
    bad_green_is_rolled_back("reject with tcp reset", "refused");
}

#[test]
fn a_green_that_drops_real_connections_is_rolled_back_on_the_signals() {
    bad_green_is_rolled_back("drop", "no_answer");
}

/// One connection in five refused (20%, under the default 50%) trips nothing over two windows;
/// the figures show the failures were counted.
#[test]
fn scattered_failures_below_the_slo_trip_nothing() {
    let t = Topology::create(&tag()).unwrap();
    let _backends = t.start_backends().unwrap();
    let _agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    sabotage(&t.green, "tcp flags & (syn | ack) == syn numgen inc mod 5 == 0 reject with tcp reset");
    t.bgctl(&["flip", "green"]).unwrap();
    let stop = AtomicBool::new(false);
    let mut shares = Vec::new();
    let attempts = std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let load = s.spawn(|| hammer(&t, vip(VIP_PORT), 4, Duration::from_millis(20), &stop));
        let until = Instant::now() + SLO_WINDOW * 2;
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(500));
            let st = t.status();
            assert_eq!((st["active"].as_str(), st["auto_rollbacks_total"].as_u64()), (Some("green"), Some(0)), "no trip: {st}");
            let web = st["signals"].as_array().unwrap().iter().find(|f| f["service"] == "web" && f["color"] == "green").cloned().unwrap();
            if web["judged"] == true {
                shares.push(web["failure_share"].as_f64().unwrap());
            }
            assert!(web["breach"].is_null(), "{web}");
        }
        stop.store(true, Ordering::Relaxed);
        load.join().unwrap()
    });
    let failed = attempts.iter().filter(|a| a.answer.is_err()).count();
    eprintln!("scattered failures: {failed} of {} attempts failed; green's failure share per poll {shares:?}", attempts.len());
    assert!(shares.len() >= 10, "the SLO judged green's traffic: {shares:?}");
    assert!(shares.iter().all(|s| (0.1..=0.35).contains(s)), "the failures were counted (about 20%): {shares:?}");
    assert!(auto_rollbacks(&t).is_empty());
}

/// A 10% canary to a green that resets: the canary ends on the signals, and about 90% of the
/// connections never touched green (all answered by blue).
#[test]
fn a_canary_to_a_bad_green_ends_and_most_connections_never_touch_it() {
    let t = Topology::create(&tag()).unwrap();
    let _backends = t.start_backends().unwrap();
    let _agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    sabotage(&t.green, "reject with tcp reset");
    let stop = AtomicBool::new(false);
    let (attempts, started, ended) = std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let load = s.spawn(|| hammer(&t, vip(VIP_PORT), 8, Duration::from_millis(10), &stop));
        std::thread::sleep(Duration::from_millis(300));
        t.bgctl(&["flip", "green", "--percent", "10"]).unwrap();
        let started = Instant::now();
        let ended = t.wait_until("the canary's end", SLO_WINDOW + Duration::from_secs(8), |s| s["canary"].is_null());
        std::thread::sleep(Duration::from_millis(1000));
        stop.store(true, Ordering::Relaxed);
        (load.join().unwrap(), started, ended)
    });
    let during: Vec<&Attempt> = attempts.iter().filter(|a| a.at >= started && a.at <= ended).collect();
    let failed = during.iter().filter(|a| a.answer.is_err()).count();
    let blue = during.iter().filter(|a| a.answer.as_deref() == Ok("blue")).count();
    eprintln!("canary to a bad green: ended {:?} after it began; {failed} of {} connections during it reached green (reset), {blue} blue", ended - started, during.len());
    assert!(failed >= 1, "the canary sent some connections to green");
    assert_eq!(failed + blue, during.len(), "every connection was either reset by green or answered by blue");
    assert!(blue as f64 >= 0.8 * during.len() as f64, "about 90% never touched green: {blue} of {}", during.len());
    let after: Vec<&Attempt> = attempts.iter().filter(|a| a.at > ended + Duration::from_millis(100)).collect();
    assert!(!after.is_empty() && after.iter().all(|a| a.answer.as_deref() == Ok("blue")), "after the canary ended, blue only");
    let s = t.status();
    assert_eq!((s["active"].as_str(), s["auto_rollbacks_total"].as_u64()), (Some("blue"), Some(1)), "{s}");
    let autos = auto_rollbacks(&t);
    assert_eq!(autos.len(), 1);
    let reason = autos[0]["reason"].as_str().unwrap();
    assert!(reason.contains("SLO breach") && reason.contains("canary to green cancelled"), "{reason}");
}

fn bgctl_json(t: &Topology, args: &[&str]) -> (bool, serde_json::Value) {
    let out = Command::new(paths::bgctl()).arg("--socket").arg(t.socket()).args(args).arg("--json").output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("JSON from {args:?}: {out:?}"));
    (out.status.success(), v)
}

/// `hammer` for `dur`.
fn hammer_for(t: &Topology, addr: SocketAddr, threads: usize, gap: Duration, dur: Duration) -> Vec<Attempt> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let load = s.spawn(|| hammer(t, addr, threads, gap, &stop));
        std::thread::sleep(dur);
        stop.store(true, Ordering::Relaxed);
        load.join().unwrap()
    })
}

/// `flip --dry-run` runs the gate (health, then the SLOs on green's preview traffic) and says
/// what the selector would become; selector, generation and live flows stay the same. The real
/// flip goes through the same gate.
#[test]
fn a_dry_run_changes_nothing_and_judges_preview_traffic() {
    let t = Topology::create(&tag()).unwrap();
    let _backends = t.start_backends().unwrap();
    let _agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    let stop = AtomicBool::new(false);
    let seen = std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        // Live connections on blue (a stream and a keep-alive HTTP one), held throughout.
        let (tx, rx) = std::sync::mpsc::channel();
        let held = s.spawn(|| bg_tests::live::hold(&t, "blue", 1, 1, tx, &stop));
        rx.recv_timeout(Duration::from_secs(10)).expect("the held connections opened");
        let before = t.status();
        let audited = t.history().len();
        let same = |what: &str| {
            let now = t.status();
            for k in ["active", "generation", "canary", "watch", "drain", "flips_total"] {
                assert_eq!(now[k], before[k], "{what}: {k} changed");
            }
            assert_eq!(t.history().len(), audited, "{what}: an audit line was written");
            // Blue's live flows are the held connections (green's are preview flows ending).
            assert_eq!(now["flows"]["flows"][0], before["flows"]["flows"][0], "{what}: blue's live flows changed");
        };
        assert_eq!(before["flows"]["flows"][0], 2, "the two held connections are blue's live flows: {before}");

        // Green healthy: it would switch; the selector it would write is named.
        let (ok, v) = bgctl_json(&t, &["flip", "green", "--dry-run"]);
        let d = &v;
        assert!(ok, "a dry run that would pass exits 0: {v}");
        assert_eq!(
            (d["outcome"].as_str(), d["selector_now"]["active"].as_str(), d["selector_after"]["active"].as_str()),
            (Some("switch"), Some("blue"), Some("green")),
            "{v}"
        );
        assert_ne!(d["selector_now"]["value"], d["selector_after"]["value"], "{v}");
        assert_eq!(d["live_flows"][0], 2, "the live flows that stay on blue: {v}");
        assert!(d["auto_rollback"].as_str().unwrap().starts_with("on for the watch window"), "{v}");
        same("a dry run that would switch");

        // Green resets its preview traffic: the dry run is refused on the SLO (exit 1).
        sabotage(&t.green, "reject with tcp reset");
        let preview = hammer_for(&t, vip(PREVIEW_PORT), 2, Duration::from_millis(20), Duration::from_millis(1500));
        assert!(preview.iter().filter(|a| a.answer.is_err()).count() >= 20, "green refused its preview traffic");
        std::thread::sleep(Duration::from_millis(400));
        let (ok, v) = bgctl_json(&t, &["flip", "green", "--dry-run"]);
        let d = &v;
        assert!(!ok, "a dry run that would be refused exits 1: {v}");
        assert_eq!(d["outcome"], "refused", "{v}");
        assert_eq!(d["selector_after"], d["selector_now"], "{v}");
        let failing = d["failing"].to_string();
        assert!(failing.contains("SLO breach: service web on green") && failing.contains("refused"), "{v}");
        same("a dry run that would be refused");
        // The real flip meets the same gate; --force passes it and turns automatic rollback off.
        let out = Command::new(paths::bgctl()).arg("--socket").arg(t.socket()).args(["flip", "green"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("SLO breach"), "{err}");
        let now = t.status();
        assert_eq!((&now["active"], &now["generation"]), (&before["active"], &before["generation"]), "a refused flip changes nothing");
        assert_eq!(t.history().last().unwrap()["event"], "refused", "a refused flip is audited (a dry run is not)");
        let out = t.bgctl(&["flip", "green", "--force"]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("automatic rollback: off for this switch (--force)"), "{text}");
        let last = t.history().last().cloned().unwrap();
        assert_eq!((last["event"].as_str(), last["force"].as_bool()), (Some("flip"), Some(true)), "{last}");
        assert!(last["auto_rollback"].as_str().unwrap().contains("off"), "{last}");
        std::thread::sleep(Duration::from_millis(300));
        assert!(t.status()["watch"].is_null(), "no watch window after --force");
        stop.store(true, Ordering::Relaxed);
        held.join().unwrap()
    });
    assert!(seen.errors.is_empty() && seen.moved.is_empty(), "the held connections went on on blue: {seen:?}");
    heal(&t.green);
}

/// Routes green's packets to the clients' subnet through a delay line (`bg-testsrv --tun`,
/// since this kernel has no netem): locally sent packets to 10.0.0.0/24 go into the TUN
/// device, come back `ms` later and are forwarded out as before. Health checks (to the
/// gateway's address) are not delayed. Write a number of ms to the process's stdin to change it.
fn slow_down(green: &Netns, ms: u64) -> bg_tests::netns::Proc {
    let mut cmd = green.command(paths::testsrv().to_str().unwrap());
    cmd.args(["--tun", "bgdelay", "--delay-ms", &ms.to_string()]).stdin(std::process::Stdio::piped());
    let p = bg_tests::netns::Proc::spawn_ready("delay line", &mut cmd, "listening", Duration::from_secs(10)).unwrap();
    for argv in [
        &["ip", "link", "set", "bgdelay", "up"][..],
        &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
        &["sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=0"],
        &["sysctl", "-q", "-w", "net.ipv4.conf.bgdelay.rp_filter=0"],
        &["sysctl", "-q", "-w", "net.ipv4.conf.bgdelay.accept_local=1"],
        &["ip", "route", "replace", "default", "dev", "bgdelay", "table", "100"],
        &["ip", "rule", "add", "iif", "lo", "to", "10.0.0.0/24", "lookup", "100", "pref", "100"],
    ] {
        green.exec(argv).unwrap_or_else(|e| panic!("{argv:?}: {e:#}"));
    }
    p
}

/// With a latency SLO of 150 ms: a green whose handshakes take 30 ms more trips nothing over
/// two windows; the same green at 300 ms more is rolled back on the p95.
#[test]
fn a_slower_green_within_the_latency_slo_stays_and_one_beyond_it_is_rolled_back() {
    let t = Topology::create(&tag()).unwrap();
    std::fs::write(t.config_path(), t.config().replace("[health]", "[slo]\nmax_p95_handshake_ms = 150\n\n[health]")).unwrap();
    let _backends = t.start_backends().unwrap();
    let _agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    let mut delay = slow_down(&t.green, 30);
    assert_eq!(t.get_vip().unwrap(), "blue");
    let stop = AtomicBool::new(false);
    let (p95s, slowed, rolled_back) = std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let load = s.spawn(|| hammer(&t, vip(VIP_PORT), 6, Duration::from_millis(20), &stop));
        t.bgctl(&["flip", "green"]).unwrap();
        let mut p95s = Vec::new();
        let until = Instant::now() + SLO_WINDOW * 2;
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(500));
            let st = t.status();
            assert_eq!((st["active"].as_str(), st["auto_rollbacks_total"].as_u64()), (Some("green"), Some(0)), "30 ms slower trips nothing: {st}");
            let web = st["signals"].as_array().unwrap().iter().find(|f| f["service"] == "web" && f["color"] == "green").cloned().unwrap();
            if web["handshakes"].as_u64().unwrap() >= 20 {
                p95s.push(web["p95_ms"].as_f64().unwrap());
            }
        }
        use std::io::Write;
        delay.child.as_mut().unwrap().stdin.as_mut().unwrap().write_all(b"300\n").unwrap();
        let slowed = Instant::now();
        let rolled_back = t.wait_until("the rollback on the p95", SLO_WINDOW + Duration::from_secs(6), |s| s["active"] == "blue");
        stop.store(true, Ordering::Relaxed);
        load.join().unwrap();
        (p95s, slowed, rolled_back)
    });
    eprintln!("latency SLO: green's p95 at +30 ms per poll {p95s:?}; at +300 ms rolled back {:?} after the slowdown", rolled_back - slowed);
    assert!(p95s.len() >= 10, "green's handshakes were timed: {p95s:?}");
    assert!(p95s.iter().all(|p| (30.0..150.0).contains(p)), "p95 of 30 ms handshakes, log2 buckets: {p95s:?}");
    assert!(rolled_back - slowed <= SLO_WINDOW + Duration::from_secs(1) + Duration::from_millis(300), "{:?}", rolled_back - slowed);
    let autos = auto_rollbacks(&t);
    assert_eq!(autos.len(), 1, "{autos:?}");
    let reason = autos[0]["reason"].as_str().unwrap();
    assert!(reason.contains("SLO breach: service web on green") && reason.contains("p95 handshake") && reason.contains("> 150 ms"), "{reason}");
}
