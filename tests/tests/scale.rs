//! bg at its documented size (needs root). In a harness of its own: its 11k health checks a
//! second would crowd the timing of the tests beside it.

use std::time::Duration;

use bg_tests::topology::Topology;

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
    const SERVICES: usize = bg_tests::topology::MAX_SERVICES;
    const PER_COLOR: usize = bg_tests::topology::MAX_PER_COLOR;
    let t = Topology::create(&tag()).unwrap();
    let _servers = t.setup_max_config().unwrap();
    let log = t.run_dir.join("agent.log");
    let _agent = t.start_agent_with(&[], Some(&log)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut s = status(&t);
    while !(s["health"][0]["up"] == 16384 && s["health"][1]["up"] == 16384) {
        assert!(std::time::Instant::now() < deadline, "not every backend came up in 90 s: {}", s["health"]);
        let overflows = [&t.blue, &t.green].map(|ns| ns.counter("netstat", "TcpExt", "ListenOverflows").unwrap_or(0));
        assert_eq!(
            (s["health"][0]["down"].as_u64(), s["health"][1]["down"].as_u64()),
            (Some(0), Some(0)),
            "a backend was marked down (check servers' accept-queue overflows, blue and green: {overflows:?}): {}",
            s["health"]
        );
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
