//! The agent an operator trusts (network tier, real servers, real `bgctl`): health-gated
//! flips, automatic rollback, crash and upgrade survival, socket permissions, preview, canary,
//! metrics. Needs root.

use std::{
    net::SocketAddr,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use aya::programs::links::{FdLink, PinnedLink};
use bg_tests::{
    paths,
    topology::{load, Topology, ECHO_PORT, PREVIEW_PORT, VIP, VIP_PORT},
};

fn tag() -> String {
    bg_tests::run::tag("a")
}

fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), port)
}

fn status(t: &Topology) -> serde_json::Value {
    serde_json::from_slice(&t.bgctl(&["status", "--json"]).expect("status").stdout).expect("status JSON")
}

fn history(t: &Topology) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(&t.bgctl(&["history", "--json", "-n", "100"]).unwrap().stdout).unwrap();
    v["events"].as_array().unwrap().clone()
}

fn bgctl_fails(t: &Topology, args: &[&str]) -> String {
    let out = Command::new(paths::bgctl()).arg("--socket").arg(t.socket()).args(args).output().unwrap();
    assert!(!out.status.success(), "bgctl {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Polls `status` until `pred` holds; returns how long it took.
fn wait_for(t: &Topology, what: &str, limit: Duration, pred: impl Fn(&serde_json::Value) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let s = status(t);
        if pred(&s) {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what} did not happen within {limit:?}: {s}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn a_flip_to_an_unhealthy_green_is_refused_and_changes_nothing() {
    let t = Topology::create(&tag()).unwrap();
    let mut backends = t.start_backends().unwrap();
    let _agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    for p in &mut backends.green {
        p.stop(Duration::from_secs(3));
    }
    wait_for(&t, "green unhealthy", Duration::from_secs(5), |s| s["health"][1]["healthy"] == false);
    let before = status(&t);

    let err = bgctl_fails(&t, &["flip", "green"]);
    assert!(err.contains("refused: green is not healthy"), "{err}");
    assert!(err.contains("10.2.0.2:8080") && err.contains("connect"), "names the failing backend and its last result: {err}");
    assert!(err.contains("--force"), "says what to do: {err}");

    let after = status(&t);
    assert_eq!((after["active"].clone(), after["generation"].clone()), (before["active"].clone(), before["generation"].clone()));
    assert_eq!(t.get_vip().unwrap(), "blue", "traffic still on blue");
    let h = history(&t);
    let last = h.last().unwrap();
    assert_eq!((last["event"].as_str(), last["to"].as_str()), (Some("refused"), Some("green")), "{last}");
    assert_eq!(last["uid"], 0, "who asked: the peer uid");
    assert_eq!(last["health"]["green"][0]["state"], "down", "health snapshot in the audit entry");

    // --force overrides and is recorded as forced.
    let out = t.bgctl(&["flip", "green", "--force"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("FORCED"));
    let last = history(&t).last().unwrap().clone();
    assert_eq!((last["event"].as_str(), last["forced"].as_bool()), (Some("flip"), Some(true)));
    // A forced flip opens no automatic-rollback window: the override stands.
    std::thread::sleep(Duration::from_millis(500));
    let s = status(&t);
    assert_eq!((s["active"].as_str(), s["watch"].is_null()), (Some("green"), true), "{s}");
}

#[test]
fn green_dying_in_the_watch_window_rolls_back_once() {
    let t = Topology::create(&tag()).unwrap();
    let mut backends = t.start_backends().unwrap();
    let _agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    t.bgctl(&["flip", "green"]).unwrap();
    assert_eq!(t.get_vip().unwrap(), "green");
    assert_eq!(status(&t)["watch"]["color"], "green", "the watch window is open");

    for p in &mut backends.green {
        p.stop(Duration::from_secs(3));
    }
    let took = wait_for(&t, "automatic rollback", Duration::from_secs(10), |s| s["active"] == "blue");
    // fall (2) x interval (200 ms) + 1 s.
    eprintln!("automatic rollback {took:?} after green's servers were stopped");
    assert!(took <= Duration::from_millis(2 * 200 + 1000), "rollback took {took:?}");
    assert_eq!(t.get_vip().unwrap(), "blue", "new connections back on blue");

    let s = status(&t);
    assert_eq!(s["auto_rollbacks_total"], 1);
    let generation = s["generation"].clone();
    let autos: Vec<_> = history(&t).into_iter().filter(|e| e["uid"] == "agent" && e["event"] == "rollback").collect();
    assert_eq!(autos.len(), 1, "exactly one automatic rollback");
    let reason = autos[0]["reason"].as_str().unwrap();
    assert!(reason.contains("automatic rollback") && reason.contains("green unhealthy") && reason.contains("10.2.0.2"), "{reason}");

    // Green comes back and dies again: no back-and-forth, nothing more happens by itself.
    backends.green = t.start_color("green").unwrap();
    std::thread::sleep(Duration::from_millis(800));
    for p in &mut backends.green {
        p.stop(Duration::from_secs(3));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let s = status(&t);
    assert_eq!((s["active"].as_str(), &s["generation"]), (Some("blue"), &generation), "no second flip");
}

#[test]
fn kill_9_of_the_agent_loses_no_request_and_the_restart_adopts_everything() {
    let t = Topology::create(&tag()).unwrap();
    let _backends = t.start_backends().unwrap();
    let mut agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    t.bgctl(&["flip", "green"]).unwrap();
    let generation = status(&t)["generation"].clone();
    let stop = AtomicBool::new(false);

    let (result, stream_ok) = std::thread::scope(|s| {
        let worker = s.spawn(|| load(&t, vip(VIP_PORT), Duration::from_millis(10), 2000, &stop));
        // A long-lived connection opened before the crash must survive it.
        let stream = s.spawn(|| {
            let _inside = bg_tests::netns::InNetns::enter(&t.client).unwrap();
            use std::io::{BufRead, BufReader, Write};
            let c = std::net::TcpStream::connect_timeout(&vip(ECHO_PORT), Duration::from_secs(2)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut c = BufReader::new(c);
            let mut ok = 0;
            for i in 0..30 {
                c.get_mut().write_all(format!("{i}\n").as_bytes()).unwrap();
                let mut line = String::new();
                c.read_line(&mut line).unwrap();
                assert_eq!(line, format!("green {i}\n"));
                ok += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            ok
        });
        std::thread::sleep(Duration::from_millis(300));
        agent.child.as_mut().unwrap().kill().unwrap(); // SIGKILL
        agent.child.as_mut().unwrap().wait().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let restarted = t.start_agent().expect("restart");
        std::thread::sleep(Duration::from_millis(300));
        let s = status(&t);
        assert_eq!(s["active"], "green", "same color after the restart");
        assert_eq!(s["generation"], generation, "same generation after the restart");
        assert_eq!(s["adopted"], true, "the pinned data plane was adopted");
        assert!(s["flows"]["flows"][1].as_u64().unwrap() >= 1, "the flow table kept the live flows: {}", s["flows"]);
        stop.store(true, Ordering::Relaxed);
        let r = worker.join().unwrap();
        let ok = stream.join().unwrap();
        drop(restarted);
        (r, ok)
    });
    eprintln!("kill -9: {:?} answers, {} failures; stream exchanges {stream_ok}", result.answers, result.failures.len());
    assert!(result.failures.is_empty(), "failed requests: {:?}", result.failures);
    assert!(result.answers.get("green").copied().unwrap_or(0) > 20, "{:?}", result.answers);
    assert_eq!(stream_ok, 30);
}

fn link_ids(t: &Topology) -> (u32, u32) {
    let link = PinnedLink::from_pin(t.pin_dir().join("link_gw-c")).expect("pinned link");
    let fd: FdLink = link.into();
    let info = fd.info().unwrap();
    (info.id(), info.program_id())
}

#[test]
fn upgrading_the_agent_swaps_the_program_through_the_pinned_link_under_load() {
    let t = Topology::create(&tag()).unwrap();
    let _backends = t.start_backends().unwrap();
    let mut agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    let (link_before, prog_before) = link_ids(&t);
    let stop = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        let worker = s.spawn(|| load(&t, vip(VIP_PORT), Duration::from_millis(5), 3000, &stop));
        std::thread::sleep(Duration::from_millis(300));
        assert!(agent.stop(Duration::from_secs(5)), "old agent stops on SIGTERM");
        let _new = t.start_agent().expect("new agent");
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        worker.join().unwrap()
    });
    let (link_after, prog_after) = link_ids(&t);
    eprintln!("upgrade: link {link_before} -> {link_after}, program {prog_before} -> {prog_after}; {:?}, {} failures", result.answers, result.failures.len());
    assert_eq!(link_after, link_before, "the same pinned link");
    assert_ne!(prog_after, prog_before, "a new program behind it");
    assert!(result.failures.is_empty(), "failed requests: {:?}", result.failures);
    assert!(result.answers["blue"] > 50);
}

#[test]
fn a_non_root_client_is_refused() {
    let t = Topology::create(&tag()).unwrap();
    let _agent = t.start_agent().unwrap();
    let nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(paths::bgctl())
            .arg("--socket")
            .arg(t.socket())
            .args(args)
            .output()
            .unwrap()
    };
    let out = nobody(&["status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied") && err.contains("root"), "{err}");
    // Even past the file mode, the agent checks the peer's uid.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(t.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(t.socket().parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(t.run_dir.parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = nobody(&["flip", "green"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("uid 65534 is not root"), "{err}");
    assert_eq!(status(&t)["generation"], 1, "nothing changed");
}

#[test]
fn preview_reaches_the_idle_color_and_a_canary_splits_new_flows() {
    let t = Topology::create(&tag()).unwrap();
    let _backends = t.start_backends().unwrap();
    let _agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    let never = AtomicBool::new(false);
    let count = |port: u16, n: u64| load(&t, vip(port), Duration::ZERO, n, &never);

    let r = count(PREVIEW_PORT, 20);
    assert_eq!(r.answers.get("green"), Some(&20), "the preview port reaches green: {r:?}");
    let r = count(VIP_PORT, 20);
    assert_eq!(r.answers.get("blue"), Some(&20), "the VIP still reaches blue: {r:?}");

    let out = t.bgctl(&["flip", "green", "--percent", "25"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("25% of new flows go to green"));
    assert_eq!(status(&t)["canary"]["percent"], 25.0);
    let n = 600;
    let r = count(VIP_PORT, n);
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    let green = *r.answers.get("green").unwrap_or(&0) as f64 / n as f64;
    eprintln!("canary 25%: {:.1}% of {n} new connections went to green", green * 100.0);
    // Binomial sd at n = 600 is 1.8 points: ±6 points is over 3 sd.
    assert!((0.19..=0.31).contains(&green), "canary share {green:.3}, wanted 0.25 ± 0.06");

    t.bgctl(&["rollback"]).unwrap();
    let r = count(VIP_PORT, 50);
    assert_eq!(r.answers.get("blue"), Some(&50), "rollback cancels the canary: {r:?}");

    t.bgctl(&["flip", "green", "--percent", "10"]).unwrap();
    t.bgctl(&["flip", "green"]).unwrap();
    let r = count(VIP_PORT, 50);
    assert_eq!(r.answers.get("green"), Some(&50), "a plain flip completes the move: {r:?}");
    let r = count(PREVIEW_PORT, 20);
    assert_eq!(r.answers.get("blue"), Some(&20), "the preview now reaches the idle blue: {r:?}");
}

#[test]
fn metrics_are_served_on_loopback() {
    let t = Topology::create(&tag()).unwrap();
    let _backends = t.start_backends().unwrap();
    let _agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    t.bgctl(&["flip", "green"]).unwrap();
    assert_eq!(t.get_vip().unwrap(), "green");
    let out = t.gw.exec(&["curl", "-sS", "--fail", "--max-time", "5", "http://127.0.0.1:9477/metrics"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "bg_active_color{color=\"green\"} 1",
        "bg_active_color{color=\"blue\"} 0",
        "bg_generation 2",
        "bg_flips_total 1",
        "bg_new_flows_total{color=\"green\"} 1",
        "bg_backend_up{service=\"web\",color=\"green\",backend=\"10.2.0.2:8080\"} 1",
        "bg_flow_table_size 16384",
        "bg_rollbacks_total{kind=\"automatic\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
    }
    assert!(text.contains("# TYPE bg_packets_total counter"));
}

#[test]
fn a_reboot_comes_back_on_the_persisted_color_and_a_foreign_layout_is_refused() {
    let t = Topology::create(&tag()).unwrap();
    let _backends = t.start_backends().unwrap();
    let mut agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    t.bgctl(&["flip", "green"]).unwrap();
    let generation = status(&t)["generation"].as_u64().unwrap();

    // A pinned state this config does not fit is refused, and the running data plane stays.
    assert!(agent.stop(Duration::from_secs(5)));
    let config = std::fs::read_to_string(t.config_path()).unwrap();
    std::fs::write(t.config_path(), config.replace("flow_table_size = 16384", "flow_table_size = 32768")).unwrap();
    let out = t.gw.nsenter(paths::bgctl().to_str().unwrap())
        .args(["agent", "--config", t.config_path().to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("BG_FLOWS_V1") && err.contains("flow_table_size differs") && err.contains("--cleanup"), "{err}");
    assert_eq!(t.get_vip().unwrap(), "green", "the refused start changed nothing");

    // "Reboot": bpffs is gone (cleanup), the state directory stays.
    std::fs::write(t.config_path(), config).unwrap();
    t.cleanup().unwrap();
    assert!(!t.pin_dir().exists());
    let _agent = t.start_agent().unwrap();
    let s = status(&t);
    assert_eq!((s["active"].as_str(), s["adopted"].as_bool()), (Some("green"), Some(false)), "back on green after the reboot");
    assert!(s["generation"].as_u64().unwrap() >= generation);
    t.wait_healthy().unwrap();
    assert_eq!(t.get_vip().unwrap(), "green");
}

#[test]
fn concurrent_flips_are_serialized_each_with_its_own_generation() {
    let t = Topology::create(&tag()).unwrap();
    let _backends = t.start_backends().unwrap();
    let _agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    std::thread::scope(|s| {
        for i in 0..8 {
            let t = &t;
            s.spawn(move || t.bgctl(&["flip", if i % 2 == 0 { "green" } else { "blue" }]).unwrap());
        }
    });
    let gens: Vec<u64> = history(&t)
        .iter()
        .filter(|e| e["event"] == "flip")
        .map(|e| e["generation"].as_u64().unwrap())
        .collect();
    let mut sorted = gens.clone();
    sorted.dedup();
    assert_eq!(gens, sorted, "strictly increasing, no generation twice: {gens:?}");
    assert_eq!(status(&t)["generation"].as_u64().unwrap(), 1 + gens.len() as u64);
}

#[test]
fn unhealthy_backends_of_the_active_color_get_no_new_flows() {
    let t = Topology::create(&tag()).unwrap();
    // Blue's web service gets a second backend (port 8082, answering "blue2").
    let config = t.config().replace(
        &format!("blue = [\"{}:8080\"]", bg_tests::topology::BLUE),
        &format!("blue = [\"{0}:8080\", \"{0}:8082\"]", bg_tests::topology::BLUE),
    );
    assert!(config.contains(":8082"));
    std::fs::write(t.config_path(), config).unwrap();
    let _backends = t.start_backends().unwrap();
    let mut second = bg_tests::netns::Proc::spawn_ready(
        "blue2",
        t.blue.command(paths::testsrv().to_str().unwrap()).args(["--listen", "[::]:8082", "--body", "blue2"]),
        "listening",
        Duration::from_secs(10),
    )
    .unwrap();
    let _agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    let never = AtomicBool::new(false);
    let r = load(&t, vip(VIP_PORT), Duration::ZERO, 100, &never);
    assert!(r.answers.get("blue2").copied().unwrap_or(0) > 20, "both blue backends take flows: {r:?}");

    second.stop(Duration::from_secs(3));
    wait_for(&t, "blue2 down", Duration::from_secs(5), |s| {
        s["health"][0]["backends"].as_array().unwrap().iter().any(|b| b["backend"] == "10.1.0.2:8082" && b["state"] == "down")
    });
    std::thread::sleep(Duration::from_millis(300));
    let r = load(&t, vip(VIP_PORT), Duration::ZERO, 100, &never);
    assert_eq!(r.answers.get("blue"), Some(&100), "the down backend gets no new flows: {r:?}");
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!(status(&t)["active"], "blue", "one bad backend of two does not move the color");
}

#[test]
fn watch_draws_a_live_view() {
    let t = Topology::create(&tag()).unwrap();
    let _backends = t.start_backends().unwrap();
    let _agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    let out = t.bgctl(&["watch", "--count", "2", "--interval-ms", "200"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("\x1b[H\x1b[2J").count(), 2, "redraws in place");
    assert!(text.contains("active blue  generation 1") && text.contains("new flows/s") && text.contains("healthy (3/3 up)"), "{text}");
    let out = t.bgctl(&["watch", "--json", "--count", "1"]).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"]["active"], "blue");
    assert!(v["stats"]["reasons"].is_array());
}
