//! Health checks of every backend of both colors: TCP connect or HTTP GET, with interval,
//! timeout, rise and fall. A backend changes state only after `rise` successes or `fall`
//! failures in a row; scattered failures below `fall` change nothing.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{watch, Semaphore},
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

/// What a backend's last check says before its first one.
pub const NOT_CHECKED: &str = "not checked yet";

impl Default for BackendHealth {
    fn default() -> Self {
        BackendHealth { state: State::Unknown, successes: 0, failures: 0, last: NOT_CHECKED.into(), changed_at: None }
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

/// Every backend's checks, by address (a hash map: the agent looks each backend of the config
/// up in it, tens of thousands at the documented maximum).
pub type Backends = HashMap<SocketAddr, BackendHealth>;

/// Results of all checks, shared between the checkers and the agent.
pub type Table = Arc<Mutex<Backends>>;

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

/// How long a timed-out HTTP check keeps reading the backend's late answer before it closes.
/// Closing with the answer still to come would make the checker's kernel reset the connection,
/// and the backend would count a reset for every slow check.
pub const LATE_ANSWER_GRACE: Duration = Duration::from_secs(1);

/// Timed-out checks reading late answers at once; past this, one is closed at once (reset).
const MAX_LATE_ANSWERS: u32 = 64;

/// Runs one check. A timed-out HTTP check gives its connection to `late` (when it has room)
/// to take the rest of the answer, so that the connection ends with FINs.
async fn check(backend: SocketAddr, h: &Health, late: &Arc<Semaphore>) -> Outcome {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + h.timeout;
    let addr = SocketAddr::new(backend.ip(), h.port.unwrap_or(backend.port()));
    let timed_out = || Outcome::Failed(format!("timeout after {} ms", h.timeout.as_millis()));
    let mut stream = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Err(_) => return timed_out(),
        Ok(Err(e)) if is_local(&e) => return Outcome::Local(format!("connect: {e}")),
        Ok(Err(e)) => return Outcome::Failed(format!("connect: {e}")),
        Ok(Ok(s)) => s,
    };
    if h.kind == HealthKind::Tcp {
        return Outcome::Ok(format!("ok: connected in {} ms", start.elapsed().as_millis()));
    }
    let host = match addr {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    };
    let req = format!("GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bg-health\r\nConnection: close\r\n\r\n", h.path);
    let mut answer = Vec::new();
    let exchange = tokio::time::timeout_at(deadline, async {
        stream.write_all(req.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
        // Read the whole answer (the server closes: `Connection: close`), so the connection
        // ends with FINs; closing with unread bytes would make the kernel reset it.
        (&mut stream).take(MAX_ANSWER).read_to_end(&mut answer).await.map_err(|e| format!("receive: {e}"))
    })
    .await;
    match exchange {
        Err(_) => {
            if let Ok(permit) = late.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(LATE_ANSWER_GRACE, tokio::io::copy(&mut stream.take(MAX_ANSWER), &mut tokio::io::sink())).await;
                    drop(permit);
                });
            }
            return timed_out();
        }
        Ok(Err(e)) => return Outcome::Failed(e),
        Ok(Ok(_)) => {}
    }
    let ms = start.elapsed().as_millis();
    let line = String::from_utf8_lossy(&answer[..answer.len().min(64)]);
    match line.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok()) {
        None => Outcome::Failed(format!("not an HTTP answer: {:?}", line.lines().next().unwrap_or(""))),
        Some(status) if status == h.expect_status => Outcome::Ok(format!("ok: HTTP {status} in {ms} ms")),
        Some(status) => Outcome::Failed(format!("HTTP {status}, expected {}", h.expect_status)),
    }
}

/// The most of an answer a check reads.
const MAX_ANSWER: u64 = 64 * 1024;

/// Checks in flight at once, whatever the number of backends: each holds a socket. The agent
/// raises its own open-file limit at start; this stays well inside the default 1024 too.
pub const MAX_CONCURRENT_CHECKS: usize = 512;

/// The running checkers (`spawn`); `stop` ends them.
pub struct Checkers {
    stop: watch::Sender<bool>,
    permits: Arc<Semaphore>,
    late: Arc<Semaphore>,
}

impl Checkers {
    /// Stops the checkers: no check starts from here, and this waits (at most `deadline`) for
    /// the checks in flight and the late answers being read, so that an agent stopping in the
    /// middle of a check leaves no reset on the backend. Returns whether all ended in time.
    pub async fn stop(self, deadline: Duration) -> bool {
        let _ = self.stop.send(true);
        tokio::time::timeout(deadline, async {
            let _checks = self.permits.acquire_many(MAX_CONCURRENT_CHECKS as u32).await;
            let _late = self.late.acquire_many(MAX_LATE_ANSWERS).await;
        })
        .await
        .is_ok()
    }
}

/// Starts one checker task per backend; each records into `table` and calls `changed` when a
/// backend changes state. The first checks are spread over one interval (not all at once), and
/// at most `MAX_CONCURRENT_CHECKS` run at any moment. A check that could not run for a local
/// reason is not recorded (and logged at most once a second).
pub fn spawn(backends: Vec<(SocketAddr, Health)>, table: Table, changed: Arc<dyn Fn(SocketAddr, State) + Send + Sync>) -> Checkers {
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_CHECKS));
    let late = Arc::new(Semaphore::new(MAX_LATE_ANSWERS as usize));
    let (stop, stopped) = watch::channel(false);
    let last_local_warning = Arc::new(Mutex::new(None::<Instant>));
    let n = backends.len().max(1) as u32;
    for (i, (addr, h)) in backends.into_iter().enumerate() {
        crate::lock(&table).entry(addr).or_default();
        let (table, changed, permits, late, warned) = (table.clone(), changed.clone(), permits.clone(), late.clone(), last_local_warning.clone());
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let offset = h.interval / n * i as u32;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, h.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // A stop (or the handle dropped) ends the task between checks, never inside one.
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => return,
                }
                let permit = tokio::select! {
                    p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                    _ = stopped.changed() => return,
                };
                if *stopped.borrow() {
                    return;
                }
                let outcome = check(addr, &h, &late).await;
                drop(permit);
                let (ok, what) = match outcome {
                    Outcome::Ok(w) => (true, w),
                    Outcome::Failed(w) => (false, w),
                    Outcome::Local(e) => {
                        let mut w = crate::lock(&warned);
                        if w.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
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
    Checkers { stop, permits, late }
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
