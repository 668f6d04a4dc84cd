//! The Grafana dashboard in deploy/grafana against a real Prometheus (Debian's `prometheus`)
//! scraping a real agent that switched under real traffic: every expression of every panel,
//! annotation and variable returns data. Needs root.

use std::time::{Duration, Instant};

use bg_tests::{netns::Proc, topology::Topology};
use serde_json::Value;

const PROM: &str = "127.0.0.1:9090";

/// What Grafana puts in place of the dashboard's variables when it runs a query.
const VARIABLES: &[(&str, &str)] = &[("$__rate_interval", "1m"), ("$__interval", "1m"), ("$instance", ".+")];

fn dashboard() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/bg-dashboard.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("the dashboard")).expect("the dashboard is JSON")
}

/// Every PromQL expression in the dashboard, with where it is (panel targets, annotations).
fn expressions(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((format!("panel `{}` {}", p["title"].as_str().unwrap(), t["refId"]), t["expr"].as_str().unwrap().to_owned()));
        }
    }
    for a in d["annotations"]["list"].as_array().unwrap() {
        if let Some(e) = a["expr"].as_str() {
            out.push((format!("annotation `{}`", a["name"].as_str().unwrap()), e.to_owned()));
        }
    }
    out
}

/// An instant query through Prometheus's HTTP API (from the gateway's namespace).
fn query(t: &Topology, expr: &str) -> Value {
    let out = t
        .gw
        .exec(&["curl", "-sS", "--max-time", "10", &format!("http://{PROM}/api/v1/query"), "--data-urlencode", &format!("query={expr}")])
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("Prometheus answered {expr} with no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn values(answer: &Value) -> Vec<f64> {
    answer["data"]["result"]
        .as_array()
        .map(|r| r.iter().filter_map(|s| s["value"][1].as_str().and_then(|v| v.parse().ok())).collect())
        .unwrap_or_default()
}

#[test]
fn prometheus_returns_data_for_every_expression_of_the_dashboard() {
    let d = dashboard();
    let exprs = expressions(&d);
    assert!(exprs.len() >= 15, "the dashboard has its panels: {}", exprs.len());
    let t = Topology::create(&bg_tests::run::tag("d")).unwrap();
    let _backends = t.start_backends().unwrap();
    let _agent = t.start_agent().unwrap();
    t.wait_healthy().unwrap();

    let config = t.run_dir.join("prometheus.yml");
    std::fs::write(
        &config,
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: bg\n    static_configs:\n      - targets: ['127.0.0.1:9477']\n",
    )
    .unwrap();
    let mut cmd = t.gw.command("prometheus");
    cmd.args([
        &format!("--config.file={}", config.display()),
        &format!("--storage.tsdb.path={}", t.run_dir.join("prometheus").display()),
        &format!("--web.listen-address={PROM}"),
        "--storage.tsdb.retention.time=1h",
        "--log.level=warn",
    ]);
    let _prometheus = Proc::spawn("prometheus", &mut cmd).unwrap();
    let start = Instant::now();
    while t.gw.exec(&["curl", "-sf", "--max-time", "2", &format!("http://{PROM}/-/ready")]).is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "Prometheus was not ready within 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Its first scrape comes a few seconds after ready (target discovery is batched).
    let start = Instant::now();
    while values(&query(&t, "up{job=\"bg\"}")) != [1.0] {
        assert!(start.elapsed() < Duration::from_secs(30), "Prometheus did not scrape the agent within 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }

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
    while values(&query(&t, "bg_generation")) != [generation] || values(&query(&t, "count_over_time(bg_generation[1m])"))[0] < 8.0 {
        assert!(start.elapsed() < Duration::from_secs(30), "Prometheus did not scrape generation {generation}");
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_secs(2));

    let mut empty = Vec::new();
    for (place, expr) in &exprs {
        let mut e = expr.clone();
        for (var, value) in VARIABLES {
            e = e.replace(var, value);
        }
        assert!(!e.contains('$'), "{place}: a variable the test does not know: {e}");
        let a = query(&t, &e);
        assert_eq!(a["status"], "success", "{place}: Prometheus refused {e}: {a}");
        let v = values(&a);
        if v.is_empty() || v.iter().all(|x| x.is_nan()) {
            empty.push(format!("{place}: {e} -> {}", a["data"]["result"]));
        }
    }
    assert!(empty.is_empty(), "expressions without data:\n{}", empty.join("\n"));

    // The gateway variable lists the agent.
    let out = t.gw.exec(&["curl", "-sS", &format!("http://{PROM}/api/v1/label/instance/values"), "--data-urlencode", "match[]=bg_generation", "-G"]).unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["data"], serde_json::json!(["127.0.0.1:9477"]), "{v}");
    // The switch annotation names the color switched to; the rollback's says manual.
    let a = query(&t, &exprs.iter().find(|(p, _)| p == "annotation `Switches`").unwrap().1.replace("$__interval", "1m").replace("$instance", ".+"));
    assert_eq!(a["data"]["result"][0]["metric"]["color"], "blue", "{a}");
    let a = query(&t, &exprs.iter().find(|(p, _)| p == "annotation `Rollbacks`").unwrap().1.replace("$__interval", "1m").replace("$instance", ".+"));
    assert_eq!(a["data"]["result"][0]["metric"]["kind"], "manual", "{a}");
}
