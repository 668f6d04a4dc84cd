//! A real Prometheus (Debian's `prometheus`) in a test's namespace, and the Grafana dashboard's
//! expressions as Grafana would send them: what the dashboard tests evaluate.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::netns::{Netns, Proc};

pub const LISTEN: &str = "127.0.0.1:9090";

/// What Grafana puts in place of the dashboard's variables when it runs a query.
pub const VARIABLES: &[(&str, &str)] = &[("$__rate_interval", "1m"), ("$__interval", "1m"), ("$instance", ".+")];

/// One PromQL expression of the dashboard.
pub struct Expr {
    /// Where it is: "panel `Title` A", "annotation `Name`".
    pub place: String,
    /// As in the dashboard, variables included.
    pub raw: String,
    /// In the dashboard's "Fleet" row (fleet mode only).
    pub fleet: bool,
}

impl Expr {
    /// With the variables put in.
    pub fn promql(&self) -> String {
        let mut e = self.raw.clone();
        for (var, value) in VARIABLES {
            e = e.replace(var, value);
        }
        e
    }
}

pub fn dashboard() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/bg-dashboard.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("the dashboard")).expect("the dashboard is JSON")
}

/// Every expression of every panel and annotation, in order.
pub fn expressions(d: &Value) -> Vec<Expr> {
    let mut out = Vec::new();
    let mut row = String::new();
    for p in d["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            row = p["title"].as_str().unwrap_or_default().to_owned();
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(Expr {
                place: format!("panel `{}` {}", p["title"].as_str().unwrap(), t["refId"].as_str().unwrap_or("?")),
                raw: t["expr"].as_str().unwrap().to_owned(),
                fleet: row == "Fleet",
            });
        }
    }
    for a in d["annotations"]["list"].as_array().unwrap() {
        if let Some(e) = a["expr"].as_str() {
            out.push(Expr { place: format!("annotation `{}`", a["name"].as_str().unwrap()), raw: e.to_owned(), fleet: false });
        }
    }
    out
}

/// Starts Prometheus in `ns`, scraping `targets` every second, its data under `dir`; returns
/// once it scraped every target.
pub fn start(ns: &Netns, dir: &Path, targets: &[&str]) -> anyhow::Result<Proc> {
    let config = dir.join("prometheus.yml");
    let list = targets.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", ");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: bg\n    static_configs:\n      - targets: [{list}]\n"),
    )?;
    let mut cmd = ns.command("prometheus");
    cmd.args([
        &format!("--config.file={}", config.display()),
        &format!("--storage.tsdb.path={}", dir.join("prometheus").display()),
        &format!("--web.listen-address={LISTEN}"),
        "--storage.tsdb.retention.time=1h",
        "--log.level=warn",
    ]);
    let p = Proc::spawn("prometheus", &mut cmd)?;
    // Ready first; its first scrape comes a few seconds later (target discovery is batched).
    let start = Instant::now();
    while values(&query(ns, "count(up{job=\"bg\"} == 1)")) != [targets.len() as f64] {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "Prometheus did not scrape {targets:?} within 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(p)
}

/// An instant query through Prometheus's HTTP API (from `ns`); Null when it does not answer.
pub fn query(ns: &Netns, expr: &str) -> Value {
    ns.exec(&["curl", "-sS", "--max-time", "10", &format!("http://{LISTEN}/api/v1/query"), "--data-urlencode", &format!("query={expr}")])
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or(Value::Null)
}

/// The sample values of an instant query's answer.
pub fn values(answer: &Value) -> Vec<f64> {
    answer["data"]["result"]
        .as_array()
        .map(|r| r.iter().filter_map(|s| s["value"][1].as_str().and_then(|v| v.parse().ok())).collect())
        .unwrap_or_default()
}

/// Evaluates `exprs`; returns those Prometheus refused or answered with no series or only NaN.
pub fn without_data<'a>(ns: &Netns, exprs: impl Iterator<Item = &'a Expr>) -> Vec<String> {
    let mut empty = Vec::new();
    for e in exprs {
        let q = e.promql();
        assert!(!q.contains('$'), "{}: a variable the tests do not know: {q}", e.place);
        let a = query(ns, &q);
        assert_eq!(a["status"], "success", "{}: Prometheus refused {q}: {a}", e.place);
        let v = values(&a);
        if v.is_empty() || v.iter().all(|x| x.is_nan()) {
            empty.push(format!("{}: {q} -> {}", e.place, a["data"]["result"]));
        }
    }
    empty
}
