//! The HTTP API's client side in tests: curl in a namespace, its answer parsed, and a switch
//! driven the way a Spinnaker webhook stage drives it.

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::netns::Netns;

/// Writes a bearer token file as an operator would (mode 0600).
pub fn write_token(path: &Path, token: &str) {
    std::fs::write(path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

pub struct Reply {
    pub code: u16,
    /// Header lines, lower-cased names.
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// curl in `ns` (where the API listens on loopback). `body` is sent as JSON; `extra`: more
/// curl arguments (headers, TLS files).
pub fn curl(ns: &Netns, method: &str, url: &str, body: Option<&str>, extra: &[&str]) -> Reply {
    let mut args = vec!["curl", "-sS", "-i", "--max-time", "30", "-X", method];
    args.extend_from_slice(extra);
    if let Some(b) = body {
        args.extend_from_slice(&["-H", "Content-Type: application/json", "--data-raw", b]);
    }
    args.push(url);
    let out = ns.exec(&args).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP answer from {url}: {text}"));
    let mut lines = head.lines();
    let code = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = serde_json::from_str(rest).unwrap_or_else(|_| Value::String(rest.to_owned()));
    Reply { code, headers, body }
}

/// What a Spinnaker webhook stage with "wait for completion" does against the API at `api`
/// (e.g. "http://127.0.0.1:9478"): POST `path`, take the status URL from the Location
/// header, GET it until `$.status` is a success or terminal status; returns the operation.
pub fn spinnaker_stage(ns: &Netns, api: &str, token: &str, path: &str, payload: &str) -> Value {
    let auth = format!("Authorization: Bearer {token}");
    let r = curl(ns, "POST", &format!("{api}{path}"), Some(payload), &["-H", &auth]);
    assert_eq!(r.code, 202, "POST {path} is accepted: {}", r.body);
    let location = r.header("location").expect("a Location header").to_owned();
    assert!(location.starts_with(&format!("{api}/v1/operations/")), "an absolute status URL: {location}");
    assert_eq!(r.body["status_url"], location.as_str(), "the body names the same URL: {}", r.body);
    let start = Instant::now();
    loop {
        let op = curl(ns, "GET", &location, None, &["-H", &auth]);
        assert_eq!(op.code, 200, "{}", op.body);
        match op.body["status"].as_str() {
            Some("pending") => {}
            Some("done" | "failed") => return op.body,
            other => panic!("status {other:?} is none of pending, done, failed: {}", op.body),
        }
        assert!(start.elapsed() < Duration::from_secs(40), "still pending after 40 s: {}", op.body);
        std::thread::sleep(Duration::from_millis(50));
    }
}
