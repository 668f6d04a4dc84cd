//! bg at its documented size (needs root). In a harness of its own: its 11k health checks a
//! second would crowd the timing of the tests beside it.

use std::time::Duration;

use bg_tests::{paths, topology::Topology};

fn tag() -> String {
    bg_tests::run::tag("s")
}

fn status(t: &Topology) -> serde_json::Value {
    serde_json::from_slice(&t.bgctl(&["status", "--json"]).expect("status").stdout).expect("status JSON")
}

/// The documented maximum, 64 services × 256 backends × 2 colors, checked every 3 s (the
/// default timeout, rise and fall): every one of the 32768 backends is checked and comes up (no check is lost to the
/// agent's own open-file limit), `status` stays small and readable, every backend can still be
/// listed (paged), and a flip passes its gate without `--force`.
#[test]
fn the_documented_maximum_is_checked_whole_and_flips_unforced() {
    const SERVICES: usize = 64;
    const PER_COLOR: usize = 256;
    const CHECK_PORT: u16 = 8081;
    let t = Topology::create(&tag()).unwrap();
    let addr = |color: u8, j: usize| format!("10.{color}.{}.{}", 100 + j / 200, 1 + j % 200);
    let mut servers = Vec::new();
    for (ns, color, gw_if, host) in [(&t.blue, 1u8, "gw-b", "10.1.0.2"), (&t.green, 2u8, "gw-g", "10.2.0.2")] {
        let batch = t.run_dir.join(format!("addrs-{color}"));
        let lines: String = (0..PER_COLOR).map(|j| format!("addr add {}/32 dev eth0\n", addr(color, j))).collect();
        std::fs::write(&batch, lines).unwrap();
        ns.exec(&["ip", "-batch", batch.to_str().unwrap()]).unwrap();
        t.gw.exec(&["ip", "route", "add", &format!("10.{color}.100.0/23"), "via", host, "dev", gw_if]).unwrap();
        let mut cmd = ns.command(paths::testsrv().to_str().unwrap());
        cmd.args(["--listen", &format!("0.0.0.0:{CHECK_PORT}"), "--body", "x", "--accept-close"]);
        servers.push(bg_tests::netns::Proc::spawn_ready("check target", &mut cmd, "listening", Duration::from_secs(10)).unwrap());
    }
    let head = t.config();
    let head = &head[..head.find("[health]").unwrap()];
    // Every 3 s (11k checks a second): the tests beside this one share the two CPUs.
    let mut config = format!("{head}[health]\nport = {CHECK_PORT}\ninterval_ms = 3000\n");
    for i in 0..SERVICES {
        let list = |color: u8| (0..PER_COLOR).map(|j| format!("\"{}:{}\"", addr(color, j), 9000 + i)).collect::<Vec<_>>().join(", ");
        config += &format!("\n[[service]]\nname = \"s{i}\"\nvip = \"10.100.1.{}:80\"\nblue = [{}]\ngreen = [{}]\n", i + 1, list(1), list(2));
    }
    std::fs::write(t.config_path(), config).unwrap();
    let log = t.run_dir.join("agent.log");
    let _agent = t.start_agent_with(&[], Some(&log)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut s = status(&t);
    while !(s["health"][0]["up"] == 16384 && s["health"][1]["up"] == 16384) {
        assert!(std::time::Instant::now() < deadline, "not every backend came up in 90 s: {}", s["health"]);
        assert_eq!((s["health"][0]["down"].as_u64(), s["health"][1]["down"].as_u64()), (Some(0), Some(0)), "a backend was marked down: {}", s["health"]);
        std::thread::sleep(Duration::from_millis(500));
        s = status(&t);
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("could not run on this host") && !text.contains("Too many open files"), "checks ran out of local resources: {text}");
    let raw = t.bgctl(&["status", "--json"]).unwrap().stdout;
    assert!(raw.len() < 64 << 10, "status stays small: {} bytes", raw.len());
    let human = t.bgctl(&["status"]).unwrap();
    assert!(String::from_utf8_lossy(&human.stdout).contains("16384 up, 0 down, 0 unknown"), "{}", String::from_utf8_lossy(&human.stdout));
    let all: serde_json::Value = serde_json::from_slice(&t.bgctl(&["backends", "--color", "green", "--json"]).unwrap().stdout).unwrap();
    assert_eq!(all.as_array().unwrap().len(), SERVICES * PER_COLOR, "every green backend listed, over several pages");
    let out = t.bgctl(&["flip", "green", "--json"]).unwrap();
    let f: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((f["changed"].as_bool(), f["forced"].as_bool(), f["to"].as_str()), (Some(true), Some(false), Some("green")), "{f}");
    eprintln!("max config: flip {} us in the agent, {} us map write", f["total_ns"].as_u64().unwrap() / 1000, f["switch_ns"].as_u64().unwrap() / 1000);
}
