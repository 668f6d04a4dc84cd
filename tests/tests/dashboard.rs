//! The Grafana dashboard in deploy/grafana against a real Prometheus (Debian's `prometheus`)
//! scraping a real agent that switched under real traffic: every expression of every panel
//! (but the fleet row's: tests/tests/fleet.rs), annotation and variable returns data. Needs
//! root.

use std::time::{Duration, Instant};

use bg_tests::{
    prom::{self, query, values},
    topology::Topology,
};
use serde_json::Value;

#[test]
fn prometheus_returns_data_for_every_expression_of_the_dashboard() {
    let d = prom::dashboard();
    let exprs = prom::expressions(&d);
    assert!(exprs.iter().filter(|e| !e.fleet).count() >= 15, "the dashboard has its panels");
    let t = Topology::create(&bg_tests::run::tag("d")).unwrap();
    let _backends = t.start_backends().unwrap();
    let _agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();
    let _prometheus = prom::start(&t.gw, &t.run_dir, &["127.0.0.1:9477"]).unwrap();

    // Traffic on blue, a flip to green, traffic on green, a rollback, traffic on blue: every
    // panel has something to show, and both annotations something to mark.
    let requests = |color: &str| {
        for _ in 0..15 {
            assert_eq!(t.get_vip().unwrap(), color);
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    requests("blue");
    t.bgctl(&["flip", "green"]).unwrap();
    requests("green");
    t.bgctl(&["rollback"]).unwrap();
    requests("blue");
    let generation = t.status()["generation"].as_f64().unwrap();
    // Scraped after the rollback, with samples on both sides of it.
    let start = Instant::now();
    while values(&query(&t.gw, "bg_generation")) != [generation] || values(&query(&t.gw, "count_over_time(bg_generation[1m])"))[0] < 8.0 {
        assert!(start.elapsed() < Duration::from_secs(30), "Prometheus did not scrape generation {generation}");
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_secs(2));

    let empty = prom::without_data(&t.gw, exprs.iter().filter(|e| !e.fleet));
    assert!(empty.is_empty(), "expressions without data:\n{}", empty.join("\n"));

    // The gateway variable lists the agent.
    let out = t.gw.exec(&["curl", "-sS", &format!("http://{}/api/v1/label/instance/values", prom::LISTEN), "--data-urlencode", "match[]=bg_generation", "-G"]).unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["data"], serde_json::json!(["127.0.0.1:9477"]), "{v}");
    // The switch annotation names the color switched to; the rollback's says manual.
    let annotation = |name: &str| exprs.iter().find(|e| e.place == format!("annotation `{name}`")).unwrap().promql();
    let a = query(&t.gw, &annotation("Switches"));
    assert_eq!(a["data"]["result"][0]["metric"]["color"], "blue", "{a}");
    let a = query(&t.gw, &annotation("Rollbacks"));
    assert_eq!(a["data"]["result"][0]["metric"]["kind"], "manual", "{a}");
}
