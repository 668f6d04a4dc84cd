//! The control socket protocol: one JSON object per line each way.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{anyhow, Context};
use serde::{Deserialize, Serialize};

use crate::{
    dataplane::{Attachment, Counters, Egress, FlowCounts},
    health::State as HealthState,
};

/// Largest request or response line accepted.
pub const MAX_LINE: usize = 4 << 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The agent's state. Flow figures are the background sampler's last walk of the flow
    /// tables (`flows_age_ms` old); with `count_flows`, the tables are walked for this answer
    /// (O(entries), outside the agent's lock: it delays no flip).
    Status {
        #[serde(default)]
        count_flows: bool,
    },
    Flip {
        color: String,
        /// Seconds after which the previous color's remaining flows are ended (see README).
        #[serde(default)]
        drain_secs: Option<u64>,
        /// A canary: this share of new flows to `color`, the rest stays where it is.
        #[serde(default)]
        percent: Option<u32>,
        /// Flip even when `color` is not healthy (recorded as forced); automatic rollback is
        /// off for this switch.
        #[serde(default)]
        force: bool,
        /// Run the gate and say what would happen; change nothing. (Sent only when set, so a
        /// newer bgctl still flips through an older agent.)
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        dry_run: bool,
    },
    Rollback {
        #[serde(default)]
        force: bool,
    },
    Stats,
    /// Every backend with its health, filtered and paged (`offset`, `limit` up to
    /// `MAX_BACKENDS_PAGE`).
    Backends {
        #[serde(default)]
        color: Option<String>,
        #[serde(default)]
        state: Option<HealthState>,
        #[serde(default)]
        offset: usize,
        #[serde(default)]
        limit: Option<usize>,
    },
    History {
        #[serde(default)]
        limit: Option<usize>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Status),
    Flipped(FlipResult),
    DryRun(DryRun),
    Stats(Counters),
    /// One page of `Request::Backends`: `total` backends match, these start at `offset`.
    Backends { total: usize, offset: usize, backends: Vec<BackendStatus> },
    History { events: Vec<serde_json::Value> },
    Error { message: String },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: String,
    pub preview_vip: Option<String>,
    pub protocol: String,
    /// Backends per color (the addresses: `bgctl backends`).
    pub blue: usize,
    pub green: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendStatus {
    pub service: String,
    pub backend: String,
    pub weight: u32,
    pub state: HealthState,
    pub last: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ColorHealth {
    pub color: String,
    /// Whether a flip to this color would pass the health gate.
    pub healthy: bool,
    /// Some service has every backend of this color down.
    pub all_down: bool,
    /// Backends of this color per health state.
    pub up: usize,
    pub down: usize,
    pub unknown: usize,
    /// Backends the data plane gives new flows to, as last published (a backend confirmed
    /// down stops counting here once its color's tables are republished without it).
    #[serde(default)]
    pub taking_flows: usize,
    /// What this color's real traffic breaches (its SLOs), one line per service; a breach
    /// makes it unhealthy for the gate and the watch window.
    #[serde(default)]
    pub slo_breaches: Vec<String>,
    /// The backends that are not up, at most `STATUS_BACKENDS` of them (the rest:
    /// `backends_not_listed`; every backend: `bgctl backends`).
    pub backends: Vec<BackendStatus>,
    #[serde(default)]
    pub backends_not_listed: usize,
}

/// At most this many backends per color are listed in a status answer.
pub const STATUS_BACKENDS: usize = 50;
/// At most this many backends in one `backends` answer (a page).
pub const MAX_BACKENDS_PAGE: usize = 5_000;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CanaryStatus {
    pub color: String,
    pub percent: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DrainStatus {
    pub color: String,
    /// Seconds until its remaining flows are ended.
    pub remaining_secs: u64,
    /// The drain's whole length (`--drain`).
    #[serde(default)]
    pub total_secs: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WatchStatus {
    /// The color the last switch went to; if it turns unhealthy now (a backend confirmed down,
    /// an SLO breach), the agent rolls back (a canary: ends it).
    pub color: String,
    /// Seconds left (0 for a canary's watch, which lasts until the next switch: `canary`).
    pub remaining_secs: u64,
    #[serde(default)]
    pub canary: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// The color new flows go to, as read back from the kernel map.
    pub active: String,
    /// The color a rollback returns to.
    pub previous: Option<String>,
    /// Increments with every switch.
    pub generation: u64,
    /// Seconds since the active color last changed (or since the agent started).
    pub active_for_secs: u64,
    pub canary: Option<CanaryStatus>,
    pub services: Vec<ServiceStatus>,
    /// [blue, green].
    pub health: Vec<ColorHealth>,
    pub interfaces: Vec<Attachment>,
    /// How packets leave by each interface bg knows: by redirect or through the kernel, and why.
    pub egress: Vec<Egress>,
    pub flows: FlowCounts,
    /// How old `flows` is (ms); None before the sampler's first walk.
    #[serde(default)]
    pub flows_age_ms: Option<u64>,
    pub flow_table_size: u32,
    #[serde(default)]
    pub unconfirmed_table_size: u32,
    pub pin_dir: String,
    /// A pending drain of the previous color, if any.
    pub drain: Option<DrainStatus>,
    /// Flow entries removed by the last completed drain.
    pub last_drain_removed: Option<u64>,
    /// The open automatic-rollback window, if any.
    pub watch: Option<WatchStatus>,
    pub flips_total: u64,
    pub rollbacks_total: u64,
    pub auto_rollbacks_total: u64,
    /// How long the last switch took from request to data plane switched, health gate included.
    pub last_flip_ns: u64,
    /// Whether this agent adopted a data plane an earlier agent left pinned.
    pub adopted: bool,
    /// The last republish of a color's backend tables after a health change.
    #[serde(default)]
    pub last_republish: Option<RepublishStatus>,
    /// Connection signals of the last SLO window per service and color where there was
    /// traffic or a breach (service-major, blue then green; at most 32), judged by each
    /// service's SLO; `signals_not_listed` more had traffic (`/metrics` has them all).
    #[serde(default)]
    pub signals: Vec<crate::signals::Figures>,
    #[serde(default)]
    pub signals_not_listed: usize,
    /// Fleet mode: the link to etcd and the revision applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetStatus>,
}

/// The selector as words and as the value in the map.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SelectorView {
    pub active: String,
    pub canary_percent: f64,
    /// The raw map value (`bg_common::Selector`).
    pub value: u32,
}

/// What `flip --dry-run` found. Nothing was changed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DryRun {
    /// "switch", "refused" or "unchanged".
    pub outcome: String,
    pub from: String,
    pub to: String,
    pub percent: Option<u32>,
    pub generation: u64,
    /// The gate's verdict on `to`: health and the SLOs on its recent traffic (preview or
    /// canary flows), with what fails.
    pub healthy: bool,
    pub failing: Vec<String>,
    pub selector_now: SelectorView,
    /// What the selector would become (the same when refused or unchanged).
    pub selector_after: SelectorView,
    /// Live flows per color [blue, green]: they stay where they are whatever happens.
    pub live_flows: [u64; 2],
    /// How old `live_flows` is (ms); None before the first walk of the flow tables.
    pub live_flows_age_ms: Option<u64>,
    /// Whether automatic rollback would guard the switch.
    pub auto_rollback: String,
    /// `to`'s connection signals of the last window, per service.
    pub signals: Vec<crate::signals::Figures>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RepublishStatus {
    pub color: String,
    /// From the verdict to the selector naming the new tables (grace wait included).
    pub took_us: u64,
    /// Maglev entries written (those that moved).
    pub ring_entries: u64,
    /// Republishes since the agent started, this one included.
    pub number: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlipResult {
    pub from: String,
    pub to: String,
    pub generation: u64,
    /// False when the requested state was already in place (nothing was written).
    pub changed: bool,
    /// Time the selector map write took, in nanoseconds.
    pub switch_ns: u64,
    /// Time from the request to the data plane switched, health gate included.
    pub total_ns: u64,
    /// When set, the previous color's remaining flows are ended this many seconds from now.
    pub drain_secs: Option<u64>,
    /// A canary's share; None for a full flip.
    pub percent: Option<u32>,
    /// Flipped with --force past a failing health gate.
    pub forced: bool,
    /// Whether automatic rollback guards this switch, in words.
    #[serde(default)]
    pub auto_rollback: String,
    /// Fleet mode: every gateway's acknowledgement (or not) of the switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<crate::fleet::FleetSwitch>,
}

impl FlipResult {
    /// The answer when `active` already was the state asked for: nothing written.
    pub fn unchanged(active: bg_common::Color, generation: u64, total_ns: u64) -> FlipResult {
        FlipResult {
            from: active.name().into(),
            to: active.name().into(),
            generation,
            changed: false,
            switch_ns: 0,
            total_ns,
            drain_secs: None,
            percent: None,
            forced: false,
            auto_rollback: "unchanged: nothing to guard".into(),
            fleet: None,
        }
    }
}

/// Fleet mode, as status shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FleetStatus {
    pub name: String,
    pub gateway: String,
    /// "up" (in touch, its lease renewed) or "down".
    pub etcd: String,
    /// Seconds since `etcd` last changed.
    pub etcd_for_secs: u64,
    /// The mod revision of the fleet's desired state this gateway applied last.
    pub applied_revision: i64,
    /// The fence hook ran for the current cut from etcd.
    pub fenced: bool,
    pub fence_after_secs: u64,
    pub last_error: Option<String>,
}

/// Sends one request to the agent and waits for its answer.
pub fn call(socket: &Path, request: &Request) -> anyhow::Result<Response> {
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => anyhow!(
            "no bg agent is listening on {}: start one with `bgctl agent --config bg.toml`, \
             or point at its socket with --socket",
            socket.display()
        ),
        std::io::ErrorKind::PermissionDenied => anyhow!(
            "permission denied on {}: the control socket is root-only; run bgctl as root",
            socket.display()
        ),
        _ => anyhow!("connecting to the agent at {}: {e}", socket.display()),
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).context("sending the request to the agent")?;
    let mut reader = BufReader::new(&stream).take(MAX_LINE as u64);
    let mut answer = String::new();
    reader.read_line(&mut answer).context("reading the agent's answer")?;
    if answer.is_empty() {
        return Err(anyhow!("the agent closed the connection without answering; see its log"));
    }
    serde_json::from_str(&answer).with_context(|| format!("the agent sent an answer bgctl cannot read: {answer}"))
}
