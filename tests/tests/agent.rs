//! The agent an operator trusts (network tier, real servers, real `bgctl`): health-gated
//! flips, automatic rollback, crash and upgrade survival, socket permissions, preview, canary,
//! metrics. Needs root.

use std::{
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use aya::programs::links::{FdLink, PinnedLink};
use bg_tests::{
    paths,
    topology::{load, vip, Topology, ECHO_PORT, PREVIEW_PORT, VIP, VIP_PORT},
};

fn tag() -> String {
    bg_tests::run::tag("a")
}




fn bgctl_fails(t: &Topology, args: &[&str]) -> String {
    let out = Command::new(paths::bgctl()).arg("--socket").arg(t.socket()).args(args).output().unwrap();
    assert!(!out.status.success(), "bgctl {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Polls `status` until `pred` holds; returns how long it took.
fn wait_for(t: &Topology, what: &str, limit: Duration, pred: impl Fn(&serde_json::Value) -> bool) -> Duration {
    let start = Instant::now();
    t.wait_until(what, limit, pred) - start
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
    // Checks are spread over the interval: every green backend is down within a few.
    wait_for(&t, "every green backend down", Duration::from_secs(6), |s| s["health"][1]["down"] == 5);
    let before = t.status();

    let err = bgctl_fails(&t, &["flip", "green"]);
    assert!(err.contains("refused: green is not healthy"), "{err}");
    assert!(err.contains("10.2.0.2:8080") && err.contains("connect"), "names the failing backend and its last result: {err}");
    assert!(err.contains("--force"), "says what to do: {err}");

    let after = t.status();
    assert_eq!((after["active"].clone(), after["generation"].clone()), (before["active"].clone(), before["generation"].clone()));
    assert_eq!(t.get_vip().unwrap(), "blue", "traffic still on blue");
    let h = t.history();
    let last = h.last().unwrap();
    assert_eq!((last["event"].as_str(), last["to"].as_str()), (Some("refused"), Some("green")), "{last}");
    assert_eq!(last["uid"], 0, "who asked: the peer uid");
    assert_eq!(last["health"]["green"]["not_up"][0]["state"], "down", "health snapshot in the audit entry: {last}");
    let total = |c: &str| ["up", "down", "unknown"].iter().map(|k| last["health"][c][k].as_u64().unwrap()).sum::<u64>();
    assert!(last["health"]["green"]["down"].as_u64().unwrap() >= 1 && total("green") == 5 && total("blue") == 5, "counts per state, 5 backends per color: {last}");

    // --force overrides and is recorded as forced.
    let out = t.bgctl(&["flip", "green", "--force"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("FORCED"));
    let last = t.history().last().unwrap().clone();
    assert_eq!((last["event"].as_str(), last["forced"].as_bool()), (Some("flip"), Some(true)));
    // A forced flip opens no automatic-rollback window: the override stands.
    std::thread::sleep(Duration::from_millis(500));
    let s = t.status();
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
    assert_eq!(t.status()["watch"]["color"], "green", "the watch window is open");

    for p in &mut backends.green {
        p.stop(Duration::from_secs(3));
    }
    let took = wait_for(&t, "automatic rollback", Duration::from_secs(10), |s| s["active"] == "blue");
    // fall (2) x interval (200 ms) + 1 s.
    eprintln!("automatic rollback {took:?} after green's servers were stopped");
    assert!(took <= Duration::from_millis(2 * 200 + 1000), "rollback took {took:?}");
    assert_eq!(t.get_vip().unwrap(), "blue", "new connections back on blue");

    let s = t.status();
    assert_eq!(s["auto_rollbacks_total"], 1);
    let generation = s["generation"].clone();
    let autos: Vec<_> = t.history().into_iter().filter(|e| e["uid"] == "agent" && e["event"] == "rollback").collect();
    assert_eq!(autos.len(), 1, "exactly one automatic rollback");
    let reason = autos[0]["reason"].as_str().unwrap();
    assert!(reason.contains("automatic rollback") && reason.contains("green unhealthy") && reason.contains("10.2.0.2"), "{reason}");

    assert!(t.status()["watch"].is_null(), "the rollback opens no watch window");

    // Green comes back; then blue, the color rolled back to, dies. No back-and-forth: the
    // rollback opened no window, so nothing flips by itself.
    backends.green = t.start_color("green").unwrap();
    wait_for(&t, "green healthy again", Duration::from_secs(5), |s| s["health"][1]["healthy"] == true);
    for p in &mut backends.blue {
        p.stop(Duration::from_secs(3));
    }
    wait_for(&t, "blue down", Duration::from_secs(5), |s| s["health"][0]["backends"][0]["state"] == "down");
    std::thread::sleep(Duration::from_millis(600));
    let s = t.status();
    assert_eq!((s["active"].as_str(), &s["generation"], &s["auto_rollbacks_total"]), (Some("blue"), &generation, &serde_json::json!(1)), "no second flip: {s}");
}

/// Opens the topology with `watch_window_secs` set, starts backends and agent, waits healthy.
fn with_window(secs: u64) -> (Topology, bg_tests::topology::Backends, bg_tests::netns::Proc) {
    let t = Topology::create(&tag()).unwrap();
    std::fs::write(t.config_path(), t.config().replace("watch_window_secs = 30", &format!("watch_window_secs = {secs}"))).unwrap();
    let backends = t.start_backends().unwrap();
    let agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    (t, backends, agent)
}

#[test]
fn no_automatic_rollback_once_the_watch_window_has_expired() {
    let (t, mut backends, _agent) = with_window(2);
    t.bgctl(&["flip", "green"]).unwrap();
    assert_eq!(t.status()["watch"]["color"], "green");
    std::thread::sleep(Duration::from_millis(2300));
    assert!(t.status()["watch"].is_null(), "the window closed after 2 s");
    for p in &mut backends.green {
        p.stop(Duration::from_secs(3));
    }
    wait_for(&t, "green down", Duration::from_secs(5), |s| s["health"][1]["healthy"] == false);
    std::thread::sleep(Duration::from_millis(600));
    let s = t.status();
    assert_eq!((s["active"].as_str(), s["generation"].as_u64(), s["auto_rollbacks_total"].as_u64()), (Some("green"), Some(2), Some(0)), "{s}");
    assert!(!t.history().iter().any(|e| e["uid"] == "agent" && e["event"] != "started"), "no automatic action after the window");
}

#[test]
fn automatic_rollback_is_skipped_and_recorded_when_the_previous_color_is_unhealthy() {
    let (t, mut backends, _agent) = with_window(30);
    t.bgctl(&["flip", "green"]).unwrap();
    for p in &mut backends.blue {
        p.stop(Duration::from_secs(3));
    }
    wait_for(&t, "blue down", Duration::from_secs(5), |s| s["health"][0]["healthy"] == false);
    for p in &mut backends.green {
        p.stop(Duration::from_secs(3));
    }
    wait_for(&t, "green down", Duration::from_secs(5), |s| s["health"][1]["healthy"] == false);
    std::thread::sleep(Duration::from_millis(600));
    let s = t.status();
    assert_eq!((s["active"].as_str(), s["generation"].as_u64(), s["auto_rollbacks_total"].as_u64()), (Some("green"), Some(2), Some(0)), "{s}");
    let skipped: Vec<_> = t.history().into_iter().filter(|e| e["event"] == "auto_rollback_skipped").collect();
    assert_eq!(skipped.len(), 1, "the skipped rollback is recorded once");
    let reason = skipped[0]["reason"].as_str().unwrap();
    assert!(reason.contains("green unhealthy") && reason.contains("blue unhealthy too"), "{reason}");
    assert_eq!((skipped[0]["from"].as_str(), skipped[0]["to"].as_str()), (Some("green"), Some("blue")));
}

#[test]
fn kill_9_of_the_agent_loses_no_request_and_the_restart_adopts_everything() {
    let t = Topology::create(&tag()).unwrap();
    let _backends = t.start_backends().unwrap();
    let mut agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    t.bgctl(&["flip", "green"]).unwrap();
    let generation = t.status()["generation"].clone();
    let stop = AtomicBool::new(false);

    let (result, stream_ok) = std::thread::scope(|s| {
        let _stop = bg_tests::live::StopOnDrop(&stop);
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
        let s = t.status();
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

/// The pinned link of gw-c: its id, and the id and tag of the program behind it.
fn link_program(t: &Topology) -> (u32, u32, u64) {
    let link = PinnedLink::from_pin(t.pin_dir().join("link_gw-c")).expect("pinned link");
    let fd: FdLink = link.into();
    let info = fd.info().unwrap();
    let prog = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == info.program_id())
        .expect("the linked program is loaded");
    (info.id(), info.program_id(), prog.tag())
}

/// The tag (hash of the instructions) the kernel gives the XDP program of an object file.
fn object_tag(path: &std::path::Path) -> u64 {
    let config = bg_userspace::config::Config::parse(
        "interfaces = [\"unused0\"]\n[[service]]\nname = \"web\"\nvip = \"10.100.0.1:80\"\nblue = [\"10.1.0.2:8080\"]\ngreen = [\"10.2.0.2:8080\"]\n",
    )
    .unwrap();
    let dp = bg_userspace::dataplane::Dataplane::open(&std::fs::read(path).unwrap(), &config, None, bg_common::Color::Blue).unwrap();
    dp.program().info().unwrap().tag()
}

/// An upgrade swaps a program that really differs (the `variant` build: other instructions,
/// same behaviour) in through the pinned link, and back, while 8 line streams and 4 keep-alive
/// connections pinned to blue keep exchanging after a flip to green and new connections keep
/// coming: none is reset or moved, the flow table is adopted (no packet of theirs is a lost
/// flow), and no request fails.
#[test]
fn upgrading_the_program_through_the_pinned_link_keeps_every_connection() {
    let (normal, variant) = (object_tag(&paths::ebpf_object()), object_tag(&paths::ebpf_variant_object()));
    assert_ne!(normal, variant, "the variant build must differ from the default one");
    let t = Topology::create(&tag()).unwrap();
    let _backends = t.start_backends().unwrap();
    let mut agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    let (link0, prog0, tag0) = link_program(&t);
    assert_eq!(tag0, normal, "the built-in program runs first");
    let resets_before = bg_tests::live::resets(&t);
    let stop = AtomicBool::new(false);
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let lost = |t: &Topology| -> u64 {
        let v: serde_json::Value = serde_json::from_slice(&t.bgctl(&["stats", "--json"]).unwrap().stdout).unwrap();
        v["reasons"].as_array().unwrap().iter().find(|r| r[0] == "lost_flow").unwrap()[1].as_u64().unwrap()
    };
    let (seen, load_result, steps) = std::thread::scope(|s| {
        let _stop = bg_tests::live::StopOnDrop(&stop);
        let held = s.spawn(|| bg_tests::live::hold(&t, "blue", 8, 4, opened_tx, &stop));
        opened_rx.recv_timeout(Duration::from_secs(20)).expect("connections opened");
        // New connections go to green from here on; the held ones stay on blue.
        t.bgctl(&["flip", "green"]).unwrap();
        let newconns = s.spawn(|| load(&t, vip(VIP_PORT), Duration::from_millis(5), 5000, &stop));
        std::thread::sleep(Duration::from_millis(300));
        let mut steps = Vec::new();
        for (object, want) in [(Some(paths::ebpf_variant_object()), variant), (None, normal)] {
            assert!(agent.stop(Duration::from_secs(5)), "the agent stops on SIGTERM");
            let extra: Vec<String> = object.iter().flat_map(|p| ["--xdp-object".to_owned(), p.display().to_string()]).collect();
            agent = t.start_agent_with(&extra.iter().map(String::as_str).collect::<Vec<_>>(), None).expect("restarted agent");
            let (link, prog, tag) = link_program(&t);
            let st = t.status();
            steps.push((link, prog, tag, want, st["adopted"].as_bool(), st["flows"]["flows"][0].as_u64().unwrap_or(0)));
            std::thread::sleep(Duration::from_millis(400));
        }
        stop.store(true, Ordering::Relaxed);
        (held.join().unwrap(), newconns.join().unwrap(), steps)
    });
    eprintln!(
        "upgrade: link {link0}, programs {prog0} -> {:?}; held connections: {} rounds, {} exchanges; new connections: {:?}, {} failures",
        steps.iter().map(|s| s.1).collect::<Vec<_>>(),
        seen.rounds,
        seen.exchanges,
        load_result.answers,
        load_result.failures.len()
    );
    for (i, (link, prog, tag, want, adopted, blue_flows)) in steps.iter().enumerate() {
        assert_eq!(*link, link0, "swap {i}: the same pinned link");
        assert_ne!(*prog, prog0, "swap {i}: another program behind it");
        assert_eq!(tag, want, "swap {i}: the program loaded is the one asked for");
        assert_eq!(*adopted, Some(true), "swap {i}: the pinned maps were adopted");
        assert!(*blue_flows >= 12, "swap {i}: the 12 held connections are still in the flow table on blue ({blue_flows})");
    }
    assert!(seen.errors.is_empty(), "broken connections: {:?}", seen.errors);
    assert!(seen.moved.is_empty(), "connections moved off blue: {:?}", seen.moved);
    assert!(seen.rounds >= 20, "the connections were used across both swaps ({} rounds)", seen.rounds);
    assert_eq!(seen.exchanges, seen.rounds * 12, "every exchange answered by blue");
    assert_eq!(lost(&t), 0, "no packet found its flow missing (the table was adopted, not rebuilt)");
    assert_eq!(bg_tests::live::resets(&t), resets_before, "no TCP resets (EstabResets) in client, gateway, blue, green");
    assert!(load_result.failures.is_empty(), "failed new connections: {:?}", load_result.failures);
    assert!(load_result.answers.get("green").copied().unwrap_or(0) > 50, "{:?}", load_result.answers);
    assert_eq!(load_result.answers.get("blue"), None, "new connections after the flip all on green");
}

/// Health checks are polite to backends: a check past its timeout reads the late answer before
/// it closes, and a stopping agent lets its checks in flight end, so neither leaves a reset
/// on the backend (a backend's reset counters are what its operators watch).
#[test]
fn late_health_answers_and_an_agent_stopped_mid_check_leave_no_reset_on_the_backends() {
    use bg_tests::topology::{BLUE, GREEN};
    const SLOW: u16 = 8090;
    let t = Topology::create(&tag()).unwrap();
    let _backends = t.start_backends().unwrap();
    let _slow: Vec<_> = [(&t.blue, "blue"), (&t.green, "green")]
        .into_iter()
        .map(|(ns, color)| {
            let mut cmd = ns.command(paths::testsrv().to_str().unwrap());
            cmd.args(["--listen", &format!("[::]:{SLOW}"), "--body", color, "--delay-ms", "300"]);
            bg_tests::netns::Proc::spawn_ready(&format!("{color} slow server"), &mut cmd, "listening", Duration::from_secs(10)).unwrap()
        })
        .collect();
    // Answers come 300 ms after a 100 ms timeout; a check starts every 250 ms, so one is almost
    // always in flight or reading its late answer.
    let slow_service = format!(
        "\n[[service]]\nname = \"slow\"\nvip = \"{VIP}:{SLOW}\"\nprotocol = \"tcp\"\n\
         health = {{ interval_ms = 250, timeout_ms = 100 }}\nblue = [\"{BLUE}:{SLOW}\"]\ngreen = [\"{GREEN}:{SLOW}\"]\n"
    );
    std::fs::write(t.config_path(), t.config() + &slow_service).unwrap();
    let resets = |t: &Topology| [&t.blue, &t.green].map(|ns| Topology::tcp_counter(ns, "EstabResets").unwrap());
    let before = resets(&t);
    let mut agent = t.start_agent().unwrap();
    let backends = || -> serde_json::Value { serde_json::from_slice(&t.bgctl(&["backends", "--json"]).unwrap().stdout).unwrap() };
    let start = Instant::now();
    loop {
        let b = backends();
        let slow: Vec<&serde_json::Value> = b.as_array().unwrap().iter().filter(|b| b["service"] == "slow").collect();
        if slow.len() == 2 && slow.iter().all(|b| b["state"] == "down") {
            assert!(slow.iter().all(|b| b["last"] == "timeout after 100 ms"), "{slow:?}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "the slow backends were not marked down for their timeouts: {slow:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Several more timed-out checks, then a stop in the middle of one.
    std::thread::sleep(Duration::from_millis(1300));
    assert!(agent.stop(Duration::from_secs(5)), "the agent stops on SIGTERM");
    // A reset would come with the late answer (300 ms after its request).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(resets(&t), before, "no reset (EstabResets) on the blue and green backends");
}

#[test]
fn the_socket_and_pins_are_root_only_and_a_non_root_client_is_refused() {
    use std::os::unix::fs::MetadataExt;
    let t = Topology::create(&tag()).unwrap();
    let _agent = t.start_agent().unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().mode();
    assert_eq!(mode(&t.socket()) & 0o7777, 0o600, "control socket mode");
    assert_eq!(mode(&t.socket()) & libc::S_IFMT, libc::S_IFSOCK, "a socket");
    assert_eq!(mode(&t.pin_dir()) & 0o7777, 0o700, "pin directory mode");
    assert_eq!(std::fs::metadata(t.pin_dir()).unwrap().uid(), 0, "pin directory owner");
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
    assert!(err.contains("uid 65534 is neither root nor the agent's own user"), "{err}");
    assert_eq!(t.status()["generation"], 1, "nothing changed");
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
    assert_eq!(t.status()["canary"]["percent"], 25.0);
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
    // Flow figures come from the agent's sampler (a walk every second or so): a scrape shows
    // the GET's flow within a few seconds.
    let scrape = || String::from_utf8_lossy(&t.gw.exec(&["curl", "-sS", "--fail", "--max-time", "5", "http://127.0.0.1:9477/metrics"]).unwrap().stdout).into_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut text = scrape();
    while !text.lines().any(|l| l == "bg_flow_table_entries 1") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        text = scrape();
    }
    let age = text.lines().find_map(|l| l.strip_prefix("bg_flow_sample_age_seconds ")).and_then(|v| v.parse::<f64>().ok());
    assert!(age.is_some_and(|a| (0.0..3.0).contains(&a)), "the sample's age is exported and recent: {age:?}");
    for line in [
        "bg_active_color{color=\"green\"} 1",
        "bg_active_color{color=\"blue\"} 0",
        "bg_generation 2",
        "bg_flips_total 1",
        "bg_new_flows_total{color=\"green\"} 1",
        "bg_backend_up{service=\"web\",color=\"green\",backend=\"10.2.0.2:8080\"} 1",
        "bg_flow_table_size 16384",
        "bg_rollbacks_total{kind=\"automatic\"} 0",
        "bg_egress_redirect{interface=\"gw-b\"} 1",
        "bg_redirect_errors_total{interface=\"gw-b\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
    }
    // Every family README.md lists, with its type.
    for (family, kind) in [
        ("bg_packets_total", "counter"),
        ("bg_bytes_total", "counter"),
        ("bg_new_flows_total", "counter"),
        ("bg_live_flows", "gauge"),
        ("bg_backend_up", "gauge"),
        ("bg_active_color", "gauge"),
        ("bg_canary_ratio", "gauge"),
        ("bg_generation", "gauge"),
        ("bg_flips_total", "counter"),
        ("bg_rollbacks_total", "counter"),
        ("bg_last_flip_duration_seconds", "gauge"),
        ("bg_flow_table_entries", "gauge"),
        ("bg_flow_table_size", "gauge"),
        ("bg_flow_table_evictions_total", "counter"),
        ("bg_flow_sample_age_seconds", "gauge"),
        ("bg_xdp_packets_total", "counter"),
        ("bg_forwarding_total", "counter"),
        ("bg_egress_redirect", "gauge"),
        ("bg_redirect_errors_total", "counter"),
        ("bg_backend_new_flows_total", "counter"),
        ("bg_backend_handshakes_total", "counter"),
        ("bg_backend_resets_total", "counter"),
        ("bg_backend_bytes_total", "counter"),
        ("bg_color_handshakes_total", "counter"),
        ("bg_color_resets_total", "counter"),
        ("bg_handshake_latency_seconds", "histogram"),
        ("bg_slo_handshake_failure_share", "gauge"),
        ("bg_slo_reset_share", "gauge"),
        ("bg_slo_handshake_p95_seconds", "gauge"),
        ("bg_slo_decided_flows", "gauge"),
        ("bg_slo_breach", "gauge"),
    ] {
        assert!(text.contains(&format!("# TYPE {family} {kind}\n")), "missing family {family} ({kind}) in:\n{text}");
    }
    let value = |line_start: &str| -> f64 {
        text.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no sample {line_start}"))
    };
    assert!(value("bg_packets_total{color=\"green\"}") >= 4.0, "the GET's packets were counted on green");
    assert!(value("bg_bytes_total{color=\"green\"}") >= 200.0);
    assert_eq!(value("bg_live_flows{color=\"green\"}"), 1.0, "the GET's flow (closing, not yet idle) is live");
    assert_eq!(value("bg_rollbacks_total{kind=\"manual\"}"), 0.0);
    assert!(value("bg_last_flip_duration_seconds") > 0.0);
    assert_eq!(value("bg_flow_table_entries"), 1.0, "one established entry for the one flow (confirmed by its SYN-ACK)");
    assert_eq!(value("bg_xdp_packets_total{reason=\"new_flow\"}"), 1.0);
    // The one GET's connection signals: one flow to green's web backend, answered in time,
    // one handshake in the histogram (under a second: on the +Inf and the 1.07 s buckets).
    let green_web = "service=\"web\",color=\"green\",backend=\"10.2.0.2:8080\"";
    assert_eq!(value(&format!("bg_backend_new_flows_total{{{green_web}}}")), 1.0);
    assert_eq!(value(&format!("bg_backend_handshakes_total{{{green_web},outcome=\"answered\"}}")), 1.0);
    assert_eq!(value(&format!("bg_backend_handshakes_total{{{green_web},outcome=\"refused\"}}")), 0.0);
    assert!(value(&format!("bg_backend_bytes_total{{{green_web},direction=\"from_backend\"}}")) >= 100.0, "the answer's bytes");
    assert_eq!(value("bg_color_handshakes_total{color=\"green\",outcome=\"answered\"}"), 1.0);
    assert_eq!(value("bg_handshake_latency_seconds_count{service=\"web\",color=\"green\"}"), 1.0);
    assert_eq!(value("bg_handshake_latency_seconds_bucket{service=\"web\",color=\"green\",le=\"1.073741824\"}"), 1.0);
    assert_eq!(value("bg_slo_breach{service=\"web\",color=\"green\"}"), 0.0);
    assert!(value("bg_forwarding_total{outcome=\"flow_entries_created\"}") >= 1.0);
}

#[test]
fn a_reboot_comes_back_on_the_persisted_color_and_a_foreign_layout_is_refused() {
    let t = Topology::create(&tag()).unwrap();
    let _backends = t.start_backends().unwrap();
    let mut agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    t.bgctl(&["flip", "green"]).unwrap();
    let generation = t.status()["generation"].as_u64().unwrap();

    // A pinned state this config does not fit is refused, and the running data plane stays.
    assert!(agent.stop(Duration::from_secs(5)));
    let config = std::fs::read_to_string(t.config_path()).unwrap();
    std::fs::write(t.config_path(), config.replace("flow_table_size = 16384", "flow_table_size = 32768")).unwrap();
    let out = t.gw.nsenter(paths::bgctl().to_str().unwrap())
        .args(["agent", "--config", t.config_path().to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("BG_FLOWS4_V1") && err.contains("flow_table_size differs") && err.contains("--cleanup"), "{err}");
    assert_eq!(t.get_vip().unwrap(), "green", "the refused start changed nothing");

    // A canary toward blue runs when the machine goes down.
    std::fs::write(t.config_path(), config).unwrap();
    let agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    t.bgctl(&["flip", "blue", "--percent", "30"]).unwrap();
    drop(agent);

    // "Reboot": bpffs is gone (cleanup), the state directory stays.
    t.cleanup().unwrap();
    assert!(!t.pin_dir().exists());
    let _agent = t.start_agent().unwrap();
    let s = t.status();
    assert_eq!((s["active"].as_str(), s["adopted"].as_bool()), (Some("green"), Some(false)), "back on green after the reboot");
    assert_eq!((s["canary"]["color"].as_str(), s["canary"]["percent"].as_f64()), (Some("blue"), Some(30.0)), "the canary resumed: {s}");
    assert!(s["generation"].as_u64().unwrap() > generation);
    t.wait_healthy().unwrap();
    let never = AtomicBool::new(false);
    let n = 400;
    let r = load(&t, vip(VIP_PORT), Duration::ZERO, n, &never);
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    let blue = *r.answers.get("blue").unwrap_or(&0) as f64 / n as f64;
    // Binomial sd at n = 400 is 2.3 points: ±8 points is over 3 sd.
    assert!((0.22..=0.38).contains(&blue), "canary share after the reboot {blue:.3}, wanted 0.30 ± 0.08: {r:?}");
}

/// Every map layout mismatch is refused before anything is loaded, naming the map and what
/// differs, and the pinned state is left as it was.
#[test]
fn foreign_pinned_layouts_are_refused_each_with_its_reason() {
    use bg_common::pin::{ALL_MAPS, MAP_ACTIVE, MAP_CONFIG, MAP_FLOWS4, MAP_FLOWS6, MAP_RATE};
    use bg_tests::bpf::{pin_map, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH};
    use bg_userspace::{config::Config, dataplane::Dataplane};
    let object = std::fs::read(paths::ebpf_object()).unwrap();
    let config = Config::parse(
        "interfaces = [\"unused0\"]\nflow_table_size = 4096\n[[service]]\nname = \"web\"\nvip = \"10.100.0.1:80\"\nblue = [\"10.1.0.2:8080\"]\ngreen = [\"10.2.0.2:8080\"]\n",
    )
    .unwrap();
    type Plant = fn(&std::path::Path) -> anyhow::Result<()>;
    let cases: [(&str, Plant, &[&str]); 6] = [
        ("wrong map type", |p| pin_map(p, BPF_MAP_TYPE_HASH, 4, 4, 1), &[MAP_ACTIVE, "Hash", "expected Array"]),
        ("wrong key size", |p| pin_map(p, BPF_MAP_TYPE_LRU_HASH, 36, 32, 4096), &[MAP_FLOWS6, "key 36 B", "key 40 B"]),
        ("the full key in the IPv4 table", |p| pin_map(p, BPF_MAP_TYPE_LRU_HASH, 40, 32, 4096), &[MAP_FLOWS4, "key 40 B", "key 16 B"]),
        ("wrong value size", |p| pin_map(p, BPF_MAP_TYPE_ARRAY, 4, 24, 1), &[MAP_CONFIG, "value 24 B", "value 40 B"]),
        ("missing pin", |_| Ok(()), &[MAP_RATE, "missing", "incomplete"]),
        // The right layout, holding a selector bg never writes (both slots of one color).
        ("a foreign selector", |p| pin_map(p, BPF_MAP_TYPE_ARRAY, 4, 4, 1), &[MAP_ACTIVE, "not one bg writes", "slots 0 and 0"]),
    ];
    for (what, plant, words) in cases {
        let pins = bg_tests::run::PinDir::new("lay").unwrap();
        let mut dp = Dataplane::open(&object, &config, Some(&pins.0), bg_common::Color::Blue).unwrap_or_else(|e| panic!("{what}: a fresh pinned data plane: {e:#}"));
        dp.mark_ready().unwrap();
        drop(dp);
        let victim = pins.0.join(words[0]);
        std::fs::remove_file(&victim).unwrap();
        plant(&victim).unwrap();
        let before: Vec<bool> = ALL_MAPS.iter().map(|m| pins.0.join(m).exists()).collect();
        let err = match Dataplane::open(&object, &config, Some(&pins.0), bg_common::Color::Blue) {
            Ok(_) => panic!("{what}: a foreign layout was adopted"),
            Err(e) => format!("{e:#}"),
        };
        for w in words {
            assert!(err.contains(w), "{what}: expected `{w}` in: {err}");
        }
        assert!(err.contains("--cleanup"), "{what}: says what to do: {err}");
        let after: Vec<bool> = ALL_MAPS.iter().map(|m| pins.0.join(m).exists()).collect();
        assert_eq!(before, after, "{what}: the refused start changed no pin");
    }
}

/// With `healthy_share = 0.5`, a color with one of its two backends down passes the gate
/// (with the default 1.0 it is refused), and its down backend gets no new flows.
#[test]
fn a_color_at_its_healthy_share_passes_the_gate_with_a_backend_down() {
    let t = Topology::create(&tag()).unwrap();
    let config = t.config().replace(
        &format!("green = [\"{}:8080\"]", bg_tests::topology::GREEN),
        &format!("green = [\"{0}:8080\", \"{0}:8082\"]", bg_tests::topology::GREEN),
    );
    assert!(config.contains(":8082") && !config.contains("healthy_share"));
    std::fs::write(t.config_path(), &config).unwrap();
    let _backends = t.start_backends().unwrap();
    // green's second backend (8082) never starts: it is down.
    let green2_down = |s: &serde_json::Value| {
        s["health"][1]["backends"].as_array().unwrap().iter().any(|b| b["backend"] == "10.2.0.2:8082" && b["state"] == "down")
    };
    let agent = t.start_agent().unwrap();
    wait_for(&t, "green's second backend down", Duration::from_secs(5), green2_down);
    let err = bgctl_fails(&t, &["flip", "green"]);
    assert!(err.contains("refused") && err.contains("10.2.0.2:8082"), "at the default share 1.0: {err}");
    drop(agent);

    std::fs::write(t.config_path(), config.replace("fall = 2\n", "fall = 2\nhealthy_share = 0.5\n")).unwrap();
    let _agent = t.start_agent().unwrap();
    wait_for(&t, "green at its share", Duration::from_secs(5), |s| green2_down(s) && s["health"][1]["healthy"] == true);
    let out = t.bgctl(&["flip", "green"]).expect("the gate passes at 1 of 2 up with healthy_share 0.5");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("FORCED"));
    let never = AtomicBool::new(false);
    let r = load(&t, vip(VIP_PORT), Duration::ZERO, 60, &never);
    assert_eq!(r.answers.get("green"), Some(&60), "every new flow on green's live backend: {r:?}");
}

/// Every backend of the active color down: status and watch say so, and new flows still go
/// to them (there is nothing better to do); the connections fail at the backend, not at bg.
#[test]
fn all_backends_of_the_active_color_down_is_reported_and_flows_still_go_there() {
    let t = Topology::create(&tag()).unwrap();
    let mut backends = t.start_backends().unwrap();
    let _agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    for p in &mut backends.blue {
        p.stop(Duration::from_secs(3));
    }
    wait_for(&t, "blue all down", Duration::from_secs(5), |s| s["health"][0]["all_down"] == true);
    let text = String::from_utf8_lossy(&t.bgctl(&["status"]).unwrap().stdout).into_owned();
    assert!(text.contains("blue (ALL BACKENDS OF A SERVICE DOWN)"), "{text}");
    let stats = |t: &Topology| -> serde_json::Value { serde_json::from_slice(&t.bgctl(&["stats", "--json"]).unwrap().stdout).unwrap() };
    let blue_new = |v: &serde_json::Value| v["colors"][0]["new_flows"].as_u64().unwrap();
    let before = blue_new(&stats(&t));
    let err = t.get_vip().expect_err("blue's servers are gone");
    assert!(format!("{err:#}").contains("refused") || format!("{err:#}").contains("Couldn't connect"), "the backend refuses: {err:#}");
    assert!(blue_new(&stats(&t)) > before, "the new flow still went to blue");
    assert_eq!(t.status()["active"], "blue", "nothing flips by itself outside a watch window");
}

#[test]
fn the_sample_config_passes_check_config() {
    let sample = paths::workspace_root().join("deploy/bg.toml");
    let out = Command::new(paths::bgctl()).args(["check-config", "--json"]).arg(&sample).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["services"][0]["name"], "web");
}

/// `bgctl completions SHELL` prints a completion script that knows the subcommands and their
/// flags; an unknown shell is refused naming the ones there are; `bgctl man` prints a roff
/// page with every subcommand.
#[test]
fn completions_and_the_man_page_cover_every_command() {
    let run = |args: &[&str]| Command::new(paths::bgctl()).args(args).output().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        for word in ["flip", "rollback", "status", "dry-run", "percent", "history"] {
            assert!(text.contains(word), "{shell} completions lack `{word}`");
        }
    }
    assert!(String::from_utf8_lossy(&run(&["completions", "bash"]).stdout).contains("complete -F"), "a bash completion function");
    let out = run(&["completions", "tcsh"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("tcsh") && err.contains("bash") && err.contains("zsh"), "{err}");
    let out = run(&["man"]);
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && man.contains(".TH bgctl 8"), "a roff page, section 8: {}", &man[..man.len().min(300)]);
    for word in ["flip", "rollback", "check\\-config", "watch", "completions"] {
        assert!(man.contains(word), "the man page lacks `{word}`");
    }
    // One page: every command with its options (no bgctl-flip(8) pages to go missing).
    for section in [".SS \"bgctl flip\"", ".SS \"bgctl agent\"", ".SS \"bgctl fleet status\"", ".SH FILES", ".SH EXIT STATUS", ".SH HTTP API"] {
        assert!(man.contains(section), "the man page lacks {section}");
    }
    for option in ["\\-\\-dry\\-run", "\\-\\-drain", "\\-\\-percent", "\\-\\-cleanup", "\\-\\-prepare", "\\-\\-count\\-flows"] {
        assert!(man.contains(option), "the man page lacks the option {option}");
    }
    assert!(!man.contains("bgctl\\-flip(8)"), "a reference to a page that is not shipped");
}

/// On a terminal, blue and green are printed in their colors; through a pipe, or with
/// NO_COLOR set, plain.
#[test]
fn colors_on_a_terminal_only() {
    let t = Topology::create(&tag()).unwrap();
    let _backends = t.start_backends().unwrap();
    let _agent = t.start_agent().unwrap();
    let bgctl = format!("{} --socket {} status", paths::bgctl().display(), t.socket().display());
    // `script` gives the command a terminal.
    let on_tty = |env: &[(&str, &str)]| {
        let mut c = Command::new("script");
        c.args(["-qec", &bgctl, "/dev/null"]).env_remove("NO_COLOR");
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let tty = on_tty(&[]);
    assert!(tty.contains("active: \x1b[1;34mblue\x1b[0m") && tty.contains("\x1b[1;32mgreen\x1b[0m"), "colored on a terminal: {tty:?}");
    assert!(!on_tty(&[("NO_COLOR", "1")]).contains('\x1b'), "NO_COLOR turns colors off");
    let piped = t.bgctl(&["status"]).unwrap();
    let piped = String::from_utf8_lossy(&piped.stdout);
    assert!(piped.contains("active: blue") && !piped.contains('\x1b'), "plain through a pipe: {piped:?}");
}

/// Loopback has no native XDP: `xdp_mode = "auto"` falls back to generic there, says so in
/// the log, and status shows the mode per interface.
#[test]
fn a_native_attach_failure_falls_back_to_generic_with_a_warning() {
    let t = Topology::create(&tag()).unwrap();
    std::fs::write(t.config_path(), t.config().replace(r#"interfaces = ["gw-c", "gw-b", "gw-g"]"#, r#"interfaces = ["gw-c", "gw-b", "gw-g", "lo"]"#)).unwrap();
    let log = t.run_dir.join("agent.log");
    let _backends = t.start_backends().unwrap();
    let _agent = t.start_agent_with(&[], Some(&log)).unwrap();
    t.wait_healthy().unwrap();
    let modes: Vec<(String, String)> = t.status()["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["interface"].as_str().unwrap().to_owned(), a["mode"].as_str().unwrap().to_owned()))
        .collect();
    assert!(modes.contains(&("gw-c".into(), "native".into())), "{modes:?}");
    assert!(modes.contains(&("lo".into(), "generic".into())), "{modes:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines().any(|l| l.contains("WARN") && l.contains("interface=\"lo\"") && l.contains("falling back to generic")),
        "the fallback is logged as a warning: {text}"
    );
    assert_eq!(t.get_vip().unwrap(), "blue");
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
    let gens: Vec<u64> = t.history()
        .iter()
        .filter(|e| e["event"] == "flip")
        .map(|e| e["generation"].as_u64().unwrap())
        .collect();
    // Each applied flip took the next generation, in the order the audit log recorded them:
    // 2, 3, 4, ... with no gap and none twice (flips to the color already active change
    // nothing and take none).
    assert!(!gens.is_empty(), "some flips applied");
    assert_eq!(gens, (2..2 + gens.len() as u64).collect::<Vec<_>>(), "generations in audit order");
    assert_eq!(t.status()["generation"].as_u64().unwrap(), 1 + gens.len() as u64);
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
    assert_eq!(t.status()["health"][0]["taking_flows"], 6, "every blue backend takes new flows");

    second.stop(Duration::from_secs(3));
    wait_for(&t, "blue2 down", Duration::from_secs(5), |s| {
        s["health"][0]["backends"].as_array().unwrap().iter().any(|b| b["backend"] == "10.1.0.2:8082" && b["state"] == "down")
    });
    // Blue's tables republished without it: 6 backends (one per service, two in web) less one.
    wait_for(&t, "blue republished", Duration::from_secs(5), |s| s["health"][0]["taking_flows"] == 5);
    let r = load(&t, vip(VIP_PORT), Duration::ZERO, 100, &never);
    assert_eq!(r.answers.get("blue"), Some(&100), "the down backend gets no new flows: {r:?}");
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!(t.status()["active"], "blue", "one bad backend of two does not move the color");
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
    assert!(text.contains("active blue  generation 1") && text.contains("new flows/s") && text.contains("blue             0.0") && text.contains("healthy (5/5 up)"), "{text}");
    let out = t.bgctl(&["watch", "--json", "--count", "1"]).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"]["active"], "blue");
    assert!(v["stats"]["reasons"].is_array());
    // A pending drain shows as a progress line, in watch and in status.
    t.bgctl(&["flip", "green", "--drain", "30"]).unwrap();
    let out = t.bgctl(&["watch", "--count", "1"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("draining blue [") && text.contains("s of 30 s left"), "{text}");
    let out = t.bgctl(&["status"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("draining blue [") && text.contains("of 30 s left"), "{text}");
}

/// 2000 connections to the metrics endpoint that never send a request: the agent holds at
/// most its cap of them (its open files stay bounded), flips keep working meanwhile, and
/// scrapes work again once the idle connections are gone.
#[test]
fn idle_metrics_connections_are_capped_and_flips_go_on() {
    let t = Topology::create(&tag()).unwrap();
    let _backends = t.start_backends().unwrap();
    let agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", agent.pid())).unwrap().count();
    let base = fds();
    let mut held = Vec::new();
    {
        let _inside = bg_tests::netns::InNetns::enter(&t.gw).unwrap();
        for _ in 0..2000 {
            held.push(std::net::TcpStream::connect_timeout(&"127.0.0.1:9477".parse().unwrap(), Duration::from_secs(5)).unwrap());
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let during = fds();
    assert!(during <= base + bg_userspace::metrics::MAX_METRICS_CONNECTIONS + 4, "the agent holds {during} fds (was {base}) with 2000 idle metrics connections");
    for i in 0..20 {
        let color = if i % 2 == 0 { "green" } else { "blue" };
        let out = t.bgctl(&["flip", color, "--json"]).unwrap();
        let f: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(f["to"], color, "{f}");
    }
    assert_eq!(t.status()["generation"], 21, "every flip got its generation");
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = t.gw.exec(&["curl", "-sS", "--max-time", "2", "http://127.0.0.1:9477/metrics"]);
        if out.as_ref().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("bg_generation 21")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no scrape after the idle connections went: {out:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `kill -9` at every step of a fresh start (maps pinned, settings written, backend sets
/// written, selector written, program attached), then a plain restart: every time the restart
/// sees that the start did not finish, redoes it instead of adopting half-made state, and the
/// data plane works. Once a start has finished, a restart adopts it.
#[test]
fn a_start_killed_at_any_step_is_redone_by_the_next_one() {
    let t = Topology::create(&tag()).unwrap();
    let _backends = t.start_backends().unwrap();
    std::fs::write(t.config_path(), t.config()).unwrap();
    for step in ["maps-pinned", "config", "sets", "selector", "attached"] {
        let out = t.gw.nsenter(paths::bgctl().to_str().unwrap())
            .args(["agent", "--config", t.config_path().to_str().unwrap()])
            .env("BG_FAILPOINT", step)
            .env("BG_LOG", "warn")
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(9), "{step}: the agent was killed there: {out:?}");
        assert!(t.pin_dir().join(bg_common::pin::MAP_CONFIG).exists(), "{step}: pins were left behind");
        let log = t.run_dir.join(format!("restart-{step}.log"));
        let mut agent = t.start_agent_with(&[], Some(&log)).unwrap();
        t.wait_healthy().unwrap();
        let s = t.status();
        assert_eq!(s["adopted"], false, "{step}: the unfinished state was redone, not adopted");
        assert!(std::fs::read_to_string(&log).unwrap().contains("did not finish"), "{step}: the redo is logged");
        assert_eq!(t.get_vip().unwrap(), "blue", "{step}: the redone data plane forwards");
        assert!(agent.stop(Duration::from_secs(5)));
        // The finished start is adopted by the next agent.
        let _agent = t.start_agent().unwrap();
        assert_eq!(t.status()["adopted"], true, "{step}: a finished start is adopted");
        assert_eq!(t.get_vip().unwrap(), "blue");
        drop(_agent);
        assert!(t.cleanup().unwrap().status.success(), "{step}: cleanup");
    }
}
