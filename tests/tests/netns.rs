//! Network tier: real namespaces, real TCP/HTTP servers and curl, the real `bgctl`. Needs root.

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use bg_tests::{
    live,
    netns::InNetns,
    paths,
    topology::{Topology, ECHO_PORT, VIP},
};

fn tag() -> String {
    bg_tests::run::tag("t")
}

fn xdp_attached(t: &Topology, iface: &str) -> bool {
    let out = t.gw.exec(&["ip", "link", "show", "dev", iface]).expect("ip link show");
    String::from_utf8_lossy(&out.stdout).contains("xdp")
}

fn status_json(t: &Topology) -> serde_json::Value {
    let out = t.bgctl(&["status", "--json", "--count-flows"]).expect("bgctl status --json");
    serde_json::from_slice(&out.stdout).expect("status is JSON")
}

#[test]
fn http_get_follows_flip_and_rollback_with_no_checksum_errors() {
    let t = Topology::create(&tag()).expect("topology");
    let _backends = t.start_backends().expect("backends");
    let mut agent = t.start_agent().expect("agent");
    t.wait_healthy().expect("both colors healthy");
    for iface in ["gw-c", "gw-b", "gw-g"] {
        assert!(xdp_attached(&t, iface), "XDP attached to {iface}");
    }
    // GRO on at every peer: the probe found redirects working everywhere.
    let s = status_json(&t);
    let paths: Vec<(&str, &str)> = s["egress"].as_array().unwrap().iter().map(|e| (e["interface"].as_str().unwrap(), e["path"].as_str().unwrap())).collect();
    for iface in ["gw-c", "gw-b", "gw-g"] {
        assert!(paths.contains(&(iface, "redirect")), "{iface} leaves by redirect: {paths:?}");
    }

    for _ in 0..3 {
        assert_eq!(t.get_vip().expect("GET via VIP"), "blue", "blue answers before the flip");
    }
    assert_eq!(t.get_vip6().expect("GET via the IPv6 VIP"), "blue", "blue answers on IPv6");
    let flip = t.bgctl(&["flip", "green"]).expect("bgctl flip green");
    let text = String::from_utf8_lossy(&flip.stdout);
    assert!(text.contains("blue -> green") && text.contains("generation 2"), "flip output: {text}");
    for _ in 0..3 {
        assert_eq!(t.get_vip().expect("GET via VIP"), "green", "green answers new connections after the flip");
    }
    assert_eq!(t.get_vip6().expect("GET via the IPv6 VIP"), "green", "green answers on IPv6 after the flip");
    assert_eq!(status_json(&t)["active"], "green");

    t.bgctl(&["rollback"]).expect("bgctl rollback");
    for _ in 0..3 {
        assert_eq!(t.get_vip().expect("GET via VIP"), "blue", "blue answers again after rollback");
    }
    let s = status_json(&t);
    assert_eq!(s["active"], "blue");
    assert_eq!(s["generation"], 3);
    assert_eq!(s["flows"]["flows"], serde_json::json!([7, 4]), "flows per color in the table");

    assert_eq!(t.csum_errors().unwrap(), 0, "receiving kernels counted checksum errors");

    // SIGTERM: the socket goes, the data plane stays and keeps serving.
    assert!(agent.stop(Duration::from_secs(5)), "agent exits on SIGTERM");
    assert!(!t.socket().exists(), "agent removed its socket");
    assert!(t.pin_dir().join("link_gw-c").exists(), "links stay pinned");
    assert_eq!(t.get_vip().expect("GET via VIP with no agent"), "blue", "traffic flows without the agent");
    // --cleanup removes it all.
    let out = t.cleanup().expect("bgctl agent --cleanup");
    assert!(String::from_utf8_lossy(&out.stdout).contains("links detached"));
    assert!(!t.pin_dir().exists(), "pins removed");
    for iface in ["gw-c", "gw-b", "gw-g"] {
        assert!(!xdp_attached(&t, iface), "XDP detached from {iface}");
    }
}

#[test]
fn bad_commands_get_clear_errors_and_change_nothing() {
    let t = Topology::create(&tag()).expect("topology");
    let _backends = t.start_backends().expect("backends");
    let _agent = t.start_agent().expect("agent");

    let out = Command::new(paths::bgctl())
        .arg("--socket").arg(t.socket())
        .args(["flip", "red"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown color `red`") && err.contains("blue") && err.contains("green"), "{err}");

    let out = Command::new(paths::bgctl()).arg("--socket").arg(t.socket()).arg("rollback").output().unwrap();
    assert!(!out.status.success(), "rollback with no flip must fail");
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to roll back"));

    // Bad control requests, each on a connection of its own: a JSON error naming what is wrong,
    // and nothing changes (checked below: same generation, same color, no audit event).
    use std::io::{BufRead, BufReader, Write};
    let ask = |raw: &[u8]| -> String {
        let mut s = std::os::unix::net::UnixStream::connect(t.socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(raw).unwrap();
        let mut line = String::new();
        let _ = BufReader::new(&s).read_line(&mut line);
        line
    };
    t.wait_healthy().expect("both colors healthy");
    let audit_before = t.bgctl(&["history", "--json", "-n", "1000"]).unwrap().stdout.len();
    let corpus: &[(&str, &str)] = &[
        ("{\"op\":\"explode\"}", "bad request"),
        ("not json", "bad request"),
        ("[]", "bad request"),
        ("{\"op\":null}", "bad request"),
        ("{\"op\":\"flip\"}", "missing field `color`"),
        ("{\"op\":\"flip\",\"color\":\"red\"}", "unknown color `red`"),
        ("{\"op\":\"flip\",\"color\":\"\"}", "unknown color ``"),
        ("{\"op\":\"flip\",\"color\":\"green\",\"percent\":0}", "--percent 0 is out of range"),
        ("{\"op\":\"flip\",\"color\":\"green\",\"percent\":100}", "--percent 100 is out of range"),
        ("{\"op\":\"flip\",\"color\":\"green\",\"percent\":4294967295}", "--percent 4294967295 is out of range"),
        ("{\"op\":\"flip\",\"color\":\"green\",\"percent\":4294967296}", "bad request"),
        ("{\"op\":\"flip\",\"color\":\"green\",\"percent\":-1}", "bad request"),
        ("{\"op\":\"flip\",\"color\":\"green\",\"percent\":10.5}", "bad request"),
        ("{\"op\":\"flip\",\"color\":\"green\",\"drain_secs\":18446744073709551615}", "--drain 18446744073709551615 is out of range"),
        ("{\"op\":\"flip\",\"color\":\"green\",\"drain_secs\":86401}", "--drain 86401 is out of range"),
        ("{\"op\":\"flip\",\"color\":\"green\",\"drain_secs\":-5}", "bad request"),
        ("{\"op\":\"flip\",\"color\":\"green\",\"percent\":10,\"drain_secs\":5}", "--drain with --percent"),
        ("{\"op\":\"flip\",\"color\":\"green\",\"force\":\"yes\"}", "bad request"),
        ("{\"op\":\"flip\",\"color\":\"green\",\"colour\":\"blue\"}", "unknown field `colour`"),
        ("{\"op\":\"history\",\"limit\":0}", "history limit 0 is out of range"),
        ("{\"op\":\"history\",\"limit\":18446744073709551615}", "history limit 18446744073709551615 is out of range"),
        ("{\"op\":\"status\",\"count_flows\":\"x\"}", "bad request"),
        ("{\"op\":\"rollback\"}", "nothing to roll back"),
        ("{\"op\":\"rollback\",\"force\":1}", "bad request"),
    ];
    for (req, want) in corpus {
        let line = ask(format!("{req}\n").as_bytes());
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{req}: no JSON answer ({e}): {line:?}"));
        assert_eq!(v["result"], "error", "{req}: {line}");
        assert!(v["message"].as_str().unwrap().contains(want), "{req}: expected `{want}` in {line}");
    }
    // Bytes that are not text, and a line longer than the protocol's 4 MiB: the connection
    // ends, the agent serves the next one.
    assert_eq!(ask(b"\xff\xfe\xfd\n"), "", "invalid UTF-8 ends its connection");
    let mut long = vec![b' '; (4 << 20) + 16];
    long.push(b'\n');
    let line = ask(&long);
    assert!(line.is_empty() || line.contains("bad request"), "an over-long line: {line:?}");
    // A client that connects and says nothing delays no one else's request.
    let silent = std::os::unix::net::UnixStream::connect(t.socket()).unwrap();
    let started = std::time::Instant::now();
    assert!(ask(b"{\"op\":\"status\"}\n").contains("\"result\":\"status\""));
    assert!(started.elapsed() < Duration::from_secs(5), "status waited on a silent client");
    drop(silent);
    assert_eq!(t.bgctl(&["history", "--json", "-n", "1000"]).unwrap().stdout.len(), audit_before, "refused requests wrote no audit event");

    let s = status_json(&t);
    assert_eq!(s["active"], "blue");
    assert_eq!(s["generation"], 1, "no generation was used by refused commands");
    assert_eq!(t.get_vip().unwrap(), "blue");

    // No agent at a socket: the error says how to start one.
    let out = Command::new(paths::bgctl())
        .args(["--socket", "/run/bg-test/none/bgctl.sock", "status"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bgctl agent --config"));
}

/// Fuzz of the control protocol (bounded: 1000 requests, fixed seed): ops, fields and values
/// drawn at random, some truncated or not JSON at all, several per connection. Every line gets
/// a JSON answer, the agent stays up, and the generation counts exactly the switches it
/// reported.
#[test]
fn random_control_requests_never_crash_the_agent() {
    use std::io::{BufRead, BufReader, Write};
    let t = Topology::create(&tag()).expect("topology");
    let _backends = t.start_backends().expect("backends");
    let _agent = t.start_agent().expect("agent");
    t.wait_healthy().expect("both colors healthy");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let ops = ["status", "flip", "flip", "flip", "rollback", "stats", "history", "backends", "explode", "", "FLIP"];
    // Each field with values at and beyond its bounds, of the wrong type, and a stray field.
    let fields: [(&str, &[&str]); 9] = [
        ("color", &["\"green\"", "\"green\"", "\"green\"", "\"blue\"", "\"blue\"", "\"blue\"", "\"red\"", "\"\"", "1"]),
        ("percent", &["1", "10", "50", "99", "1", "10", "50", "99", "0", "100", "-1", "4294967295", "1.5"]),
        ("drain_secs", &["0", "5", "86400", "0", "5", "86400", "86401", "18446744073709551615", "-1"]),
        ("force", &["true", "false", "true", "false", "true", "false", "1", "\"x\""]),
        ("limit", &["0", "1", "1000", "1001", "5000", "5001", "18446744073709551615"]),
        ("offset", &["0", "1", "18446744073709551615", "-1"]),
        ("state", &["\"up\"", "\"down\"", "\"unknown\"", "\"x\""]),
        ("count_flows", &["true", "false", "1"]),
        ("x", &["null", "[]", "{}"]),
    ];
    let (mut switched, mut answered) = (0u64, 0usize);
    for _ in 0..200 {
        let mut s = std::os::unix::net::UnixStream::connect(t.socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reader = BufReader::new(s.try_clone().unwrap());
        for _ in 0..5 {
            let op = ops[next(ops.len())];
            // Mostly the op's own fields (a stray one now and then).
            let own: &[&str] = match op {
                "flip" => &["color", "color", "color", "percent", "drain_secs", "force"],
                "rollback" => &["force"],
                "history" => &["limit"],
                "backends" => &["color", "state", "offset", "limit"],
                "status" => &["count_flows"],
                _ => &[],
            };
            let mut req = format!("{{\"op\":\"{op}\"");
            let mut used = Vec::new();
            for (name, pool) in fields {
                let wanted = own.iter().filter(|f| **f == name).count();
                if (wanted > 0 && next(4) < wanted) || next(80) == 0 {
                    if !used.contains(&name) {
                        used.push(name);
                        req += &format!(",\"{name}\":{}", pool[next(pool.len())]);
                    }
                }
            }
            req.push('}');
            if next(8) == 0 {
                req.truncate(next(req.len() + 1));
            }
            s.write_all(format!("{req}\n").as_bytes()).unwrap();
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{req}: not a JSON answer ({e}): {line:?}"));
            assert!(v["result"].is_string(), "{req}: {line}");
            if v["result"] == "flipped" && v["changed"] == true {
                switched += 1;
            }
            answered += 1;
        }
    }
    assert_eq!(answered, 1000);
    let st = status_json(&t);
    assert_eq!(st["generation"].as_u64(), Some(1 + switched), "the generation counts the {switched} switches answered");
}

#[test]
fn a_config_that_fails_half_way_leaves_nothing_applied() {
    let t = Topology::create(&tag()).expect("topology");
    // Loopback cannot run native (driver) XDP: gw-c attaches first, then lo fails.
    let config = t
        .config()
        .replace(r#"interfaces = ["gw-c", "gw-b", "gw-g"]"#, "xdp_mode = \"native\"\ninterfaces = [\"gw-c\", \"lo\"]");
    let cfg = t.run_dir.join("bad.toml");
    assert!(!t.pin_dir().exists());
    std::fs::write(&cfg, config).unwrap();
    let out = t.gw.nsenter(paths::bgctl().to_str().unwrap())
        .args(["agent", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success(), "agent must refuse");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`lo`") && err.contains("native"), "error names the interface and mode: {err}");
    assert!(!xdp_attached(&t, "gw-c"), "gw-c must be detached again");
    assert!(!t.pin_dir().exists(), "no pins left: {}", t.pin_dir().display());
    assert!(!t.socket().exists(), "no socket left");

    // A config naming a missing interface is refused before anything is loaded.
    let config = t.config().replace("\"gw-g\"", "\"gw-nope\"");
    std::fs::write(&cfg, config).unwrap();
    let out = t.gw.nsenter(paths::bgctl().to_str().unwrap())
        .args(["agent", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("interfaces[2]") && err.contains("gw-nope"), "{err}");
    assert!(!xdp_attached(&t, "gw-c") && !t.pin_dir().exists());

    // And a syntactically bad config names the field.
    std::fs::write(&cfg, t.config().replace("flow_table_size = 16384", "flow_table_size = \"big\"")).unwrap();
    let out = Command::new(paths::bgctl()).args(["check-config", cfg.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("flow_table_size"));
}

#[test]
fn a_second_agent_on_the_same_socket_is_refused() {
    let t = Topology::create(&tag()).expect("topology");
    let _agent = t.start_agent().expect("agent");
    let mut cmd = t.gw.nsenter(paths::bgctl().to_str().unwrap());
    cmd.args(["agent", "--config", t.config_path().to_str().unwrap()]);
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already serving"));
    // The first agent still answers and still owns its pins.
    assert!(t.bgctl(&["status"]).is_ok());
    assert!(t.pin_dir().exists());
}

/// The pin directory is trusted with the data plane: a symlink, a directory owned by another
/// user, or one others can write to is refused before anything is loaded or pinned; and while
/// an agent runs, a second one on the same pin directory (with another socket) is refused.
#[test]
fn untrusted_pin_dirs_and_a_second_agent_on_one_pin_dir_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let t = Topology::create(&tag()).expect("topology");
    let cfg = t.run_dir.join("pins.toml");
    std::fs::write(&cfg, t.config()).unwrap();
    // An agent that starts after all is stopped after 20 s, and the test fails.
    let refused = || -> String {
        let mut child = t.gw.nsenter(paths::bgctl().to_str().unwrap())
            .args(["agent", "--config", cfg.to_str().unwrap()])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the agent started");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "the agent started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let pins = t.pin_dir();
    let real = bg_tests::run::PinDir::new("real").unwrap();
    std::os::unix::fs::symlink(&real.0, &pins).unwrap();
    let err = refused();
    assert!(err.contains("`pin_dir`") && err.contains("is a symbolic link"), "{err}");
    assert_eq!(std::fs::read_dir(&real.0).unwrap().count(), 0, "nothing pinned through the link");
    std::fs::remove_file(&pins).unwrap();

    std::fs::create_dir(&pins).unwrap();
    std::fs::set_permissions(&pins, std::fs::Permissions::from_mode(0o700)).unwrap();
    nix::unistd::chown(&pins, Some(nix::unistd::Uid::from_raw(1000)), None).unwrap();
    let err = refused();
    assert!(err.contains("`pin_dir`") && err.contains("owned by uid 1000"), "{err}");
    nix::unistd::chown(&pins, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
    std::fs::set_permissions(&pins, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = refused();
    assert!(err.contains("`pin_dir`") && err.contains("mode 777"), "{err}");
    assert_eq!(std::fs::read_dir(&pins).unwrap().count(), 0, "nothing was pinned");
    std::fs::remove_dir(&pins).unwrap();

    // A `socket` path that holds something else is never removed to make room.
    std::fs::write(t.socket(), "not a socket").unwrap();
    let err = refused();
    assert!(err.contains("`socket`") && err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(t.socket()).unwrap(), "not a socket", "the file was left alone");
    std::fs::remove_file(t.socket()).unwrap();

    let _agent = t.start_agent().expect("agent");
    let other = t.run_dir.join("other.sock");
    std::fs::write(&cfg, t.config().replace(t.socket().to_str().unwrap(), other.to_str().unwrap())).unwrap();
    let err = refused();
    assert!(err.contains("another bg agent (or cleanup) holds") && err.contains(pins.to_str().unwrap()), "{err}");
    assert!(t.bgctl(&["status"]).is_ok(), "the first agent still answers");
}

#[test]
fn live_connections_stay_on_their_color_through_ten_flips_while_new_ones_follow() {
    let t = Topology::create(&tag()).expect("topology");
    let _backends = t.start_backends().expect("backends");
    let _agent = t.start_agent().expect("agent");
    t.wait_healthy().expect("both colors healthy");
    let resets_before = live::resets(&t);
    let stop = AtomicBool::new(false);
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();

    let seen = std::thread::scope(|s| {
        let _stop = live::StopOnDrop(&stop);
        // 20 line streams and 4 keep-alive HTTP connections, all opened while blue is active.
        let worker = s.spawn(|| live::hold(&t, "blue", 20, 4, opened_tx, &stop));
        opened_rx.recv_timeout(Duration::from_secs(20)).expect("connections opened");
        let mut new_connection_failures = Vec::new();
        for i in 0..10 {
            let color = if i % 2 == 0 { "green" } else { "blue" };
            t.bgctl(&["flip", color]).expect("flip");
            for _ in 0..3 {
                match t.get_vip() {
                    Ok(body) if body == color => {}
                    other => new_connection_failures.push(format!("flip {i} to {color}: {other:?}")),
                }
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        stop.store(true, Ordering::Relaxed);
        let seen = worker.join().expect("worker thread");
        assert!(new_connection_failures.is_empty(), "new connections must follow each flip: {new_connection_failures:?}");
        seen
    });

    eprintln!(
        "through 10 flips: {} rounds, {} exchanges on 24 blue connections, {} moved, {} errors",
        seen.rounds,
        seen.exchanges,
        seen.moved.len(),
        seen.errors.len()
    );
    assert!(seen.errors.is_empty(), "broken connections: {:?}", seen.errors);
    assert!(seen.moved.is_empty(), "connections moved off blue: {:?}", seen.moved);
    assert!(seen.rounds >= 10, "connections were used across the flips ({} rounds)", seen.rounds);
    assert_eq!(seen.exchanges, seen.rounds * 24, "every exchange on every connection answered by blue");
    assert_eq!(live::resets(&t), resets_before, "no TCP resets (EstabResets) in client, gateway, blue, green");
    assert_eq!(t.csum_errors().unwrap(), 0, "no checksum errors");
    let s = status_json(&t);
    assert_eq!(s["generation"], 11, "ten flips, ten generations");
}

#[test]
fn drain_ends_the_old_colors_flows_with_a_reset_at_the_deadline() {
    let t = Topology::create(&tag()).expect("topology");
    let _backends = t.start_backends().expect("backends");
    let _agent = t.start_agent().expect("agent");
    t.wait_healthy().expect("both colors healthy");
    std::thread::scope(|s| {
        s.spawn(|| {
            let _inside = InNetns::enter(&t.client).unwrap();
            let addr = std::net::SocketAddr::new(VIP.parse().unwrap(), ECHO_PORT);
            let c = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut c = BufReader::new(c);
            let mut exchange = |msg: &str| -> std::io::Result<String> {
                c.get_mut().write_all(format!("{msg}\n").as_bytes())?;
                let mut answer = String::new();
                if c.read_line(&mut answer)? == 0 {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
                }
                Ok(answer.trim().to_owned())
            };
            assert_eq!(exchange("a").unwrap(), "blue a");

            let out = t.bgctl(&["flip", "green", "--drain", "1"]).unwrap();
            assert!(String::from_utf8_lossy(&out.stdout).contains("blue's remaining flows will be ended in 1 s"));
            assert_eq!(exchange("b").unwrap(), "blue b", "before the deadline the flow stays on blue");
            let s = status_json(&t);
            assert_eq!(s["drain"]["color"], "blue");

            std::thread::sleep(Duration::from_millis(1700));
            let s = status_json(&t);
            assert_eq!(s["flows"]["flows"][0], 0, "no blue flows left after the drain");
            assert!(s["last_drain_removed"].as_u64().unwrap() >= 1, "the drain removed the stream's entry: {s}");
            // A reset, not an orderly close (EOF): the client must learn the connection is gone.
            match exchange("c") {
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "the drained connection ends with a reset, got {e}"),
                Ok(answer) => panic!("a drained connection must not be served, got {answer:?}"),
            }
        });
    });
    assert_eq!(t.get_vip().unwrap(), "green", "new connections go to green");
    assert_eq!(t.csum_errors().unwrap(), 0);
}

/// UDP end to end: request/response on IPv4 and IPv6 (the client's connected socket accepts
/// only answers from the VIP, so each answer proves the reverse rewrite), a datagram sent
/// without checksum (SO_NO_CHECK: it must stay without one and still be delivered), and one
/// socket's stream of datagrams staying on blue through a flip while a new socket follows it.
#[test]
fn udp_request_response_and_a_stream_through_the_vip() {
    use std::net::{SocketAddr, UdpSocket};
    use std::os::fd::AsRawFd;
    use bg_tests::topology::{UDP_PORT, VIP6};
    let t = Topology::create(&tag()).expect("topology");
    let _backends = t.start_backends().expect("backends");
    let _agent = t.start_agent().expect("agent");
    t.wait_healthy().expect("both colors healthy");
    let _inside = InNetns::enter(&t.client).unwrap();
    let vip4 = SocketAddr::new(VIP.parse().unwrap(), UDP_PORT);
    let vip6 = SocketAddr::new(VIP6.parse().unwrap(), UDP_PORT);
    let socket = |to: SocketAddr| {
        let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
        s.connect(to).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    };
    let ask = |s: &UdpSocket, q: &str| -> String {
        s.send(q.as_bytes()).unwrap();
        let mut buf = [0u8; 2048];
        let n = s.recv(&mut buf).unwrap_or_else(|e| panic!("no answer to {q:?} from {:?}: {e}", s.peer_addr()));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(ask(&socket(vip4), "q1"), "blue q1", "IPv4 request/response");
    assert_eq!(ask(&socket(vip6), "q1"), "blue q1", "IPv6 request/response");
    let no_csum = socket(vip4);
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option value of the size given.
    let rc = unsafe {
        libc::setsockopt(no_csum.as_raw_fd(), libc::SOL_SOCKET, libc::SO_NO_CHECK, &one as *const _ as *const libc::c_void, 4)
    };
    assert_eq!(rc, 0, "SO_NO_CHECK");
    assert_eq!(ask(&no_csum, "nocsum"), "blue nocsum", "a datagram without checksum");

    let stream = socket(vip4);
    for i in 0..60 {
        if i == 20 {
            t.bgctl(&["flip", "green"]).expect("flip");
            assert_eq!(ask(&socket(vip4), "new"), "green new", "a new socket follows the flip");
            assert_eq!(ask(&socket(vip6), "new"), "green new", "a new IPv6 socket follows the flip");
        }
        assert_eq!(ask(&stream, &format!("s{i}")), format!("blue s{i}"), "the stream stays on blue");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(_inside);
    assert_eq!(t.csum_errors().unwrap(), 0, "no checksum errors (UDP, UDP6 and TCP InCsumErrors)");
    let s = status_json(&t);
    assert!(s["flows"]["flows"][0].as_u64().unwrap() >= 4 && s["flows"]["flows"][1].as_u64().unwrap() >= 2, "UDP flows per color: {}", s["flows"]);
}

/// Path MTU discovery through the VIP when the gateway's routes toward the backends and toward
/// the clients have a smaller MTU (1280) than the links (1500), as with a tunnel on the way:
/// every host's MSS is 1460, so full-size segments reach the gateway, which must answer
/// "fragmentation needed" / "packet too big" in terms the sender knows: about client -> VIP for
/// the client, about backend -> client for the backend (the kernel's own answer would quote the
/// rewritten packet, which no socket of the sender matches). UDP with DF on IPv4 and IPv6 (the
/// socket's path MTU must drop to 1280), then TCP both ways (a 6000-byte line echoed back).
#[test]
fn path_mtu_discovery_works_through_the_vip_both_ways() {
    use std::net::{SocketAddr, UdpSocket};
    use std::os::fd::AsRawFd;
    use bg_tests::topology::{CLIENT, UDP_PORT, VIP6};
    let t = Topology::create(&tag()).expect("topology");
    for route in [
        "ip route replace 10.1.0.0/24 dev gw-b mtu lock 1280",
        "ip route replace 10.0.0.0/24 dev gw-c mtu lock 1280",
        "ip -6 route replace fd00:b::/64 dev gw-b mtu lock 1280 metric 256 proto kernel",
    ] {
        t.gw.exec(&route.split(' ').collect::<Vec<_>>()).unwrap();
    }
    let _backends = t.start_backends().expect("backends");
    let _agent = t.start_agent().expect("agent");
    t.wait_healthy().expect("both colors healthy");
    let answered = |t: &Topology| -> u64 {
        let v: serde_json::Value = serde_json::from_slice(&t.bgctl(&["stats", "--json"]).unwrap().stdout).unwrap();
        v["forwarding"].as_array().unwrap().iter().find(|r| r[0] == "fwd_too_big_answered").expect("fwd_too_big_answered counted")[1].as_u64().unwrap()
    };
    assert_eq!(answered(&t), 0);
    let inside = InNetns::enter(&t.client).unwrap();

    // UDP with DF set (IP_PMTUDISC_DO / IPV6_DONTFRAG): after a datagram too big for the
    // path, the socket's path MTU is the gateway's route MTU.
    let mut sends = 0u64;
    for (vip, level, discover, mtu_opt) in [
        (SocketAddr::new(VIP.parse().unwrap(), UDP_PORT), libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_MTU),
        (SocketAddr::new(VIP6.parse().unwrap(), UDP_PORT), libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_MTU),
    ] {
        let s = UdpSocket::bind(if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
        s.connect(vip).unwrap();
        let on: libc::c_int = libc::IP_PMTUDISC_DO;
        // SAFETY: a valid socket and a c_int option value of the size given.
        assert_eq!(unsafe { libc::setsockopt(s.as_raw_fd(), level, discover, &on as *const _ as *const libc::c_void, 4) }, 0);
        let mtu = |s: &UdpSocket| -> i32 {
            let mut v: libc::c_int = 0;
            let mut len: libc::socklen_t = 4;
            // SAFETY: as above; the kernel writes at most `len` bytes.
            let rc = unsafe { libc::getsockopt(s.as_raw_fd(), level, mtu_opt, &mut v as *mut _ as *mut libc::c_void, &mut len) };
            assert_eq!(rc, 0, "getsockopt MTU");
            v
        };
        assert_eq!(mtu(&s), 1500, "{vip}: the path MTU starts at the link's");
        // As an application would, send again until the path MTU is learned (a datagram can
        // be lost on a loaded machine); every one of them needs the gateway's answer.
        let mut sent = 0u64;
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while mtu(&s) != 1280 && std::time::Instant::now() < deadline {
            if s.send(&[0x55; 1400]).is_ok() {
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        sends += sent;
        if mtu(&s) != 1280 {
            let stats = String::from_utf8_lossy(&t.bgctl(&["stats"]).unwrap().stdout).into_owned();
            let routes = String::from_utf8_lossy(&t.gw.exec(&["sh", "-c", "ip route; ip -6 route"]).unwrap().stdout).into_owned()
                + &String::from_utf8_lossy(&t.client.exec(&["sh", "-c", "nstat -az | grep -iE 'icmp6In|IcmpIn|csum|InErr|Ip6In|IpIn|Discard|Drop' | awk '$2 != 0'; ethtool -S eth0 | grep -v ': 0$'"]).unwrap().stdout)
                + &String::from_utf8_lossy(&t.gw.exec(&["sh", "-c", "ethtool -S gw-c | grep -v ': 0$'"]).unwrap().stdout);
            panic!("{vip}: the client did not learn the path MTU from the gateway's answer ({sent} datagrams sent): stats:\n{stats}\nroutes:\n{routes}");
        }
        // A datagram that fits now goes through and is answered.
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        // (The ICMP error is also reported once on a connected socket: the first call may
        // return EMSGSIZE for the datagram before.)
        if let Err(e) = s.send(&[0x41; 1200]) {
            assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE), "{vip}: {e}");
            s.send(&[0x41; 1200]).unwrap();
        }
        let mut buf = [0u8; 2048];
        let n = s.recv(&mut buf).expect("an answer to a datagram that fits the path");
        assert!(n >= 1200, "{vip}: answer of {n} bytes");
    }
    let after_udp = answered(&t);
    assert!(after_udp >= 2 && after_udp <= sends, "one answer per too-big datagram, IPv4 and IPv6: {after_udp} answers to {sends} datagrams");

    // Forget what UDP taught the client about the VIP, so TCP must discover it again.
    drop(inside);
    t.client.exec(&["ip", "route", "flush", "cache"]).unwrap();
    let route = t.client.exec(&["ip", "route", "get", VIP]).unwrap();
    assert!(!String::from_utf8_lossy(&route.stdout).contains("mtu"), "cache flushed: {}", String::from_utf8_lossy(&route.stdout));
    let inside = InNetns::enter(&t.client).unwrap();
    let addr = std::net::SocketAddr::new(VIP.parse().unwrap(), ECHO_PORT);
    let c = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut c = BufReader::new(c);
    let line: String = (0..6000).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    c.get_mut().write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    let got = c.read_line(&mut answer);
    assert!(got.is_ok() && answer == format!("blue {line}\n"), "6000 bytes up and back through 1280-byte routes: {got:?}, {} bytes back", answer.len());
    drop(inside);
    assert!(answered(&t) >= after_udp + 2, "the gateway answered the client's and the backend's full-size segments");
    // The backend learned it too, about the client (its replies were too big the other way).
    let route = t.blue.exec(&["ip", "route", "get", CLIENT]).unwrap();
    assert!(String::from_utf8_lossy(&route.stdout).contains("mtu 1280"), "blue's route cache to the client: {}", String::from_utf8_lossy(&route.stdout));
    assert_eq!(t.csum_errors().unwrap(), 0, "no checksum errors");
}

/// The default config on a topology whose veth peers are as they come up (GRO off: nothing can
/// be redirected into them). bg must not blackhole: the probe at start sees that redirects into
/// each interface fail, so every packet takes the kernel path from the first one on, and status
/// says so per interface. When GRO is turned on at blue's end, the agent's re-probe gives that
/// interface redirects back.
#[test]
fn plain_veth_pairs_with_gro_off_carry_traffic_through_the_kernel_path() {
    let t = Topology::create_with(&tag(), false).expect("topology");
    let config = t.config();
    assert!(!config.contains("forwarding"), "the default forwarding (redirect)");
    let _backends = t.start_backends().expect("backends");
    let log = t.run_dir.join("agent.log");
    let _agent = t.start_agent_with(&[], Some(&log)).expect("agent");
    t.wait_healthy().expect("both colors healthy");
    let fwd = |t: &Topology, name: &str| -> u64 {
        let v: serde_json::Value = serde_json::from_slice(&t.bgctl(&["stats", "--json"]).unwrap().stdout).unwrap();
        v["forwarding"].as_array().unwrap().iter().find(|r| r[0] == name).unwrap_or_else(|| panic!("{name} counted"))[1].as_u64().unwrap()
    };
    let egress = |t: &Topology, iface: &str| -> serde_json::Value {
        status_json(t)["egress"].as_array().unwrap().iter().find(|e| e["interface"] == iface).unwrap_or_else(|| panic!("{iface} in status")).clone()
    };
    for iface in ["gw-c", "gw-b", "gw-g"] {
        let e = egress(&t, iface);
        assert_eq!(e["path"], "kernel", "{iface}: {e}");
        assert!(e["why"].as_str().unwrap().contains("EOPNOTSUPP"), "{iface}: the reason is named: {e}");
    }
    // Every request answered at once (no SYN retransmit): nothing was lost to a redirect.
    let syn_before = t.client.counter("netstat", "TcpExt", "TCPSynRetrans").unwrap();
    for _ in 0..20 {
        assert_eq!(t.get_vip().unwrap(), "blue");
    }
    t.bgctl(&["flip", "green"]).unwrap();
    for _ in 0..20 {
        assert_eq!(t.get_vip().unwrap(), "green");
    }
    assert_eq!(t.client.counter("netstat", "TcpExt", "TCPSynRetrans").unwrap(), syn_before, "no SYN needed a retransmit");
    assert_eq!(fwd(&t, "fwd_redirect"), 0, "no redirect into an interface that cannot take it");
    assert!(fwd(&t, "fwd_kernel_no_redirect") >= 40 * 4, "every packet took the kernel path");
    for iface in ["gw-c", "gw-b", "gw-g"] {
        assert_eq!(egress(&t, iface)["redirect_errors"], 1, "{iface}: only the probe's redirect failed");
    }
    let text = String::from_utf8_lossy(&t.bgctl(&["status"]).unwrap().stdout).into_owned();
    assert!(text.contains("out by gw-b") && text.contains("kernel"), "{text}");
    // The data plane's rare events reach the agent's log (aya-log): each egress turning to the
    // kernel path once, and a flood of strays (another port of the VIP) as one line, not 50.
    {
        let _inside = InNetns::enter(&t.client).unwrap();
        for _ in 0..50 {
            let _ = TcpStream::connect_timeout(&format!("{VIP}:81").parse().unwrap(), Duration::from_millis(1));
        }
    }
    let t0 = std::time::Instant::now();
    let strays = |text: &str| text.lines().filter(|l| l.contains("WARN") && l.contains("dropped a packet to a VIP: drop_stray")).count();
    let mut text = std::fs::read_to_string(&log).unwrap();
    while strays(&text) == 0 && t0.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(100));
        text = std::fs::read_to_string(&log).unwrap();
    }
    for iface in ["gw-c", "gw-b", "gw-g"] {
        let ifindex = t.gw.exec(&["cat", &format!("/sys/class/net/{iface}/ifindex")]).unwrap();
        let ifindex = String::from_utf8_lossy(&ifindex.stdout).trim().to_owned();
        let line = format!("XDP_REDIRECT into ifindex {ifindex} failed (errno 95)");
        assert_eq!(text.lines().filter(|l| l.contains("WARN") && l.contains(&line)).count(), 1, "{iface}: one warning ({line}) in the agent's log: {text}");
    }
    assert!((1..=2).contains(&strays(&text)), "50 strays in well under a second: one log line per CPU at most: {text}");

    // GRO on at green's end: within a re-probe (5 s), packets to green leave by redirect.
    t.green.exec(&["ethtool", "-K", "eth0", "gro", "on"]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    while egress(&t, "gw-g")["path"] != "redirect" {
        assert!(std::time::Instant::now() < deadline, "gw-g never got redirects back: {}", egress(&t, "gw-g"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let redirected = fwd(&t, "fwd_redirect");
    for _ in 0..10 {
        assert_eq!(t.get_vip().unwrap(), "green");
    }
    assert!(fwd(&t, "fwd_redirect") >= redirected + 10, "requests to green are redirected now");
    assert_eq!(egress(&t, "gw-c")["path"], "kernel", "the client's end still has GRO off");
    assert_eq!(t.csum_errors().unwrap(), 0);
}
