//! Health checks of every backend of both colors: TCP connect or HTTP GET, with interval,
//! timeout, rise and fall. A backend changes state only after `rise` successes or `fall`
//! failures in a row; scattered failures below `fall` change nothing.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::config::{Health, HealthKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Not yet `rise` successes or `fall` failures since the agent started.
    Unknown,
    Up,
    Down,
}

/// One backend's checks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendHealth {
    pub state: State,
    pub successes: u32,
    pub failures: u32,
    /// The last check's result in words ("ok: HTTP 200 in 2 ms", "connect: Connection refused").
    pub last: String,
    #[serde(skip)]
    pub changed_at: Option<Instant>,
}

impl Default for BackendHealth {
    fn default() -> Self {
        BackendHealth { state: State::Unknown, successes: 0, failures: 0, last: "not checked yet".into(), changed_at: None }
    }
}

impl BackendHealth {
    /// Records one result; returns true when the state changed.
    pub fn record(&mut self, ok: bool, what: String, rise: u32, fall: u32) -> bool {
        self.last = what;
        let before = self.state;
        if ok {
            self.successes += 1;
            self.failures = 0;
            if self.successes >= rise {
                self.state = State::Up;
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            if self.failures >= fall {
                self.state = State::Down;
            }
        }
        if self.state != before {
            self.changed_at = Some(Instant::now());
            true
        } else {
            false
        }
    }
}

/// Results of all checks, by backend address. Shared between the checkers and the agent.
pub type Table = Arc<Mutex<BTreeMap<SocketAddr, BackendHealth>>>;

/// One check's outcome.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok(String),
    Failed(String),
    /// The check could not run for a reason on the agent's side (out of file descriptors,
    /// buffers or local ports): says nothing about the backend, so it is not recorded.
    Local(String),
}

/// Errors of the checker's own host, not of the backend.
fn is_local(e: &std::io::Error) -> bool {
    use nix::libc::{EADDRNOTAVAIL, EMFILE, ENFILE, ENOBUFS, ENOMEM};
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM | EADDRNOTAVAIL))
}

/// Runs one check.
pub async fn check(backend: SocketAddr, h: &Health) -> Outcome {
    let start = Instant::now();
    let addr = SocketAddr::new(backend.ip(), h.port.unwrap_or(backend.port()));
    let mut local = None;
    let result = tokio::time::timeout(h.timeout, async {
        let mut stream = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) if is_local(&e) => {
                local = Some(format!("connect: {e}"));
                return Err(String::new());
            }
            Err(e) => return Err(format!("connect: {e}")),
        };
        if h.kind == HealthKind::Tcp {
            return Ok("connected".to_owned());
        }
        let host = match addr {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        };
        let req = format!("GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bg-health\r\nConnection: close\r\n\r\n", h.path);
        stream.write_all(req.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
        // Read the whole answer (the server closes: `Connection: close`), so the connection ends
        // with FINs; closing with unread bytes would make the kernel reset it.
        let mut answer = Vec::new();
        (&mut stream).take(64 * 1024).read_to_end(&mut answer).await.map_err(|e| format!("receive: {e}"))?;
        let line = String::from_utf8_lossy(&answer[..answer.len().min(64)]);
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("not an HTTP answer: {:?}", line.lines().next().unwrap_or("")))?;
        if status == h.expect_status {
            Ok(format!("HTTP {status}"))
        } else {
            Err(format!("HTTP {status}, expected {}", h.expect_status))
        }
    })
    .await;
    let ms = start.elapsed().as_millis();
    if let Some(e) = local {
        return Outcome::Local(e);
    }
    match result {
        Ok(Ok(what)) => Outcome::Ok(format!("ok: {what} in {ms} ms")),
        Ok(Err(e)) => Outcome::Failed(e),
        Err(_) => Outcome::Failed(format!("timeout after {} ms", h.timeout.as_millis())),
    }
}

/// Checks in flight at once, whatever the number of backends: each holds a socket. The agent
/// raises its own open-file limit at start; this stays well inside the default 1024 too.
pub const MAX_CONCURRENT_CHECKS: usize = 512;

/// Starts one checker task per backend; each records into `table` and calls `changed` when a
/// backend changes state. The first checks are spread over one interval (not all at once), and
/// at most `MAX_CONCURRENT_CHECKS` run at any moment. A check that could not run for a local
/// reason is not recorded (and logged at most once a second).
pub fn spawn(backends: Vec<(SocketAddr, Health)>, table: Table, changed: Arc<dyn Fn(SocketAddr, State) + Send + Sync>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_CHECKS));
    let last_local_warning = Arc::new(Mutex::new(None::<Instant>));
    let n = backends.len().max(1) as u32;
    for (i, (addr, h)) in backends.into_iter().enumerate() {
        crate::lock(&table).entry(addr).or_default();
        let (table, changed, permits, warned) = (table.clone(), changed.clone(), permits.clone(), last_local_warning.clone());
        tokio::spawn(async move {
            let offset = h.interval / n * i as u32;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, h.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let outcome = {
                    let Ok(_permit) = permits.acquire().await else { return };
                    check(addr, &h).await
                };
                let (ok, what) = match outcome {
                    Outcome::Ok(w) => (true, w),
                    Outcome::Failed(w) => (false, w),
                    Outcome::Local(e) => {
                        let mut w = crate::lock(&warned);
                        if w.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1)) {
                            *w = Some(Instant::now());
                            tracing::warn!(backend = %addr, error = %e, "a health check could not run on this host (not counted against the backend)");
                        }
                        continue;
                    }
                };
                let new_state = {
                    let mut t = crate::lock(&table);
                    let b = t.entry(addr).or_default();
                    b.record(ok, what, h.rise, h.fall).then_some(b.state)
                };
                if let Some(s) = new_state {
                    changed(addr, s);
                }
            }
        });
    }
}

/// Whether `state` counts as healthy for the flip gate (confirmed up).
pub fn is_up(state: State) -> bool {
    state == State::Up
}

/// Whether a backend still takes new flows: everything but confirmed down.
pub fn takes_flows(state: State) -> bool {
    state != State::Down
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall_need_results_in_a_row() {
        let mut b = BackendHealth::default();
        assert!(!b.record(true, "ok".into(), 2, 3));
        assert_eq!(b.state, State::Unknown);
        assert!(b.record(true, "ok".into(), 2, 3));
        assert_eq!(b.state, State::Up);
        // Scattered failures below `fall` change nothing.
        for _ in 0..5 {
            assert!(!b.record(false, "x".into(), 2, 3));
            assert!(!b.record(false, "x".into(), 2, 3));
            assert!(!b.record(true, "ok".into(), 2, 3));
        }
        assert_eq!(b.state, State::Up);
        b.record(false, "x".into(), 2, 3);
        b.record(false, "x".into(), 2, 3);
        assert!(b.record(false, "refused".into(), 2, 3));
        assert_eq!((b.state, b.last.as_str()), (State::Down, "refused"));
        assert!(!b.record(true, "ok".into(), 2, 3));
        assert!(b.record(true, "ok".into(), 2, 3));
        assert_eq!(b.state, State::Up);
    }
}
