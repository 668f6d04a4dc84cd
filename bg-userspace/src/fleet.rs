//! Fleet mode: gateways behind ECMP switch as one, through etcd.
//!
//! Keys, under `/bg/fleet/NAME/`:
//! - `desired`: the fleet's switch state ([`Desired`]). Written only by a transaction that
//!   compares its mod revision with the one its writer decided on: of two concurrent switches,
//!   one wins and the other is told so.
//! - `gateways/ID`: what gateway ID has applied ([`GatewayState`]: the desired revision, its
//!   selector, its health view), attached to the gateway's lease: the key is there while its
//!   agent is alive and in touch.
//! - `members/ID`: every gateway that ever joined (no lease): a flip names the members that are
//!   not live.
//! - `history/GENERATION`: the fleet's last `history` switches.
//!
//! The data plane never waits on etcd: a gateway cut off keeps what it applied last, says so,
//! and after `fence_after_secs` runs its fence hook.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context};
use bg_common::Color;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    config::{parse_color, Fleet},
    decisions::{Decision, Decisions, FlipRequest, Kind, Plan, Verdict},
};

/// The most entries of a gateway's failing list carried in its key.
const MAX_FAILING: usize = 8;
/// How long a connection attempt, and each request, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// The fleet's keys in etcd.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(fleet: &str) -> Keys {
        Keys { prefix: format!("/bg/fleet/{fleet}/") }
    }
    pub fn desired(&self) -> String {
        format!("{}desired", self.prefix)
    }
    pub fn gateways(&self) -> String {
        format!("{}gateways/", self.prefix)
    }
    pub fn gateway(&self, id: &str) -> String {
        format!("{}gateways/{id}", self.prefix)
    }
    pub fn members(&self) -> String {
        format!("{}members/", self.prefix)
    }
    pub fn member(&self, id: &str) -> String {
        format!("{}members/{id}", self.prefix)
    }
    pub fn history(&self) -> String {
        format!("{}history/", self.prefix)
    }
    fn history_entry(&self, generation: u64) -> String {
        format!("{}history/{generation:020}", self.prefix)
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The fleet's switch state: what every gateway's selector must hold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    pub generation: u64,
    /// The color new flows go to.
    pub active: String,
    /// Share (per mille) of new flows sent to the other color.
    pub canary_permille: u32,
    /// The color a rollback returns to.
    pub previous: Option<String>,
    /// What made this state: flip, canary, rollback, canary_cancelled, or joined (the first
    /// gateway's own state).
    pub event: String,
    /// Switched with --force: automatic rollback is off for it.
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub forced: bool,
    #[serde(default)]
    pub drain_secs: Option<u64>,
    pub who: String,
    pub reason: String,
    pub at_unix_ms: u64,
}

impl Desired {
    pub fn active_color(&self) -> anyhow::Result<Color> {
        parse_color(&self.active).ok_or_else(|| anyhow!("the fleet's desired state names an unknown color `{}`", self.active))
    }

    /// The switch state a flipper decides on (no watch window: each gateway keeps its own).
    fn decisions(&self) -> anyhow::Result<Decisions> {
        Ok(Decisions::new(self.active_color()?, self.canary_permille, self.previous.as_deref().and_then(parse_color), self.generation, 0, 0))
    }

    /// The state after `plan`, decided on `self`.
    fn after(&self, plan: &Plan, who: &str, reason: &str) -> anyhow::Result<Desired> {
        let active = plan.active();
        let previous = if active != self.active_color()? { Some(self.active.clone()) } else { self.previous.clone() };
        Ok(Desired {
            generation: plan.generation,
            active: active.name().into(),
            canary_permille: plan.canary_permille(),
            previous,
            event: event_name(plan.kind).into(),
            force: plan.force,
            forced: plan.forced,
            drain_secs: plan.drain_secs,
            who: who.into(),
            reason: reason.into(),
            at_unix_ms: unix_ms(),
        })
    }

    /// What kind of switch made this state.
    pub fn kind(&self) -> Option<Kind> {
        match self.event.as_str() {
            "flip" => Some(Kind::Flip),
            "canary" => Some(Kind::Canary),
            "rollback" => Some(Kind::Rollback),
            "canary_cancelled" => Some(Kind::CanaryCancelled),
            _ => None,
        }
    }
}

fn event_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Flip => "flip",
        Kind::Canary => "canary",
        Kind::Rollback => "rollback",
        Kind::CanaryCancelled => "canary_cancelled",
    }
}

/// What one color looks like from one gateway.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ColorView {
    pub color: String,
    pub healthy: bool,
    pub failing: Vec<String>,
}

/// What a gateway has applied, and how it sees both colors: its key's value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GatewayState {
    pub gateway: String,
    /// The mod revision of the desired state it applied (0: none yet).
    pub revision: i64,
    pub generation: u64,
    pub active: String,
    pub canary_permille: u32,
    /// The selector value in its kernel map.
    pub selector: u32,
    pub health: Vec<ColorView>,
    pub at_unix_ms: u64,
}

impl GatewayState {
    pub fn view(&self, color: Color) -> Option<&ColorView> {
        self.health.iter().find(|v| v.color == color.name())
    }
}

/// A gateway's health view from its verdicts.
pub fn color_views(verdict_of: &dyn Fn(Color) -> Verdict) -> Vec<ColorView> {
    Color::ALL
        .into_iter()
        .map(|c| {
            let v = verdict_of(c);
            ColorView { color: c.name().into(), healthy: v.healthy, failing: v.failing.into_iter().take(MAX_FAILING).collect() }
        })
        .collect()
}

/// Fleet-wide verdict on `color`: healthy only if healthy as seen from every live gateway.
pub fn fleet_verdict(gateways: &[GatewayState], color: Color) -> Verdict {
    let mut failing = Vec::new();
    for g in gateways {
        match g.view(color) {
            Some(v) if v.healthy => {}
            Some(v) => failing.push(format!("seen from {}: {}", g.gateway, v.failing.join("; "))),
            None => failing.push(format!("{} reports no view of {}", g.gateway, color.name())),
        }
    }
    if gateways.is_empty() {
        failing.push("no gateway of the fleet is live (no agent holds a lease)".into());
    }
    Verdict { healthy: failing.is_empty(), confirmed_down: !failing.is_empty(), failing }
}

/// Connects to the fleet's etcd (lazily: a cut-off etcd shows on the first request, after
/// `REQUEST_TIMEOUT`).
pub async fn connect(fleet: &Fleet) -> anyhow::Result<Client> {
    connect_from(fleet, std::process::id() as usize).await.map(|(c, _)| c)
}

/// How long one endpoint may take to answer a connection's first request before the next is
/// tried.
const ENDPOINT_TIMEOUT: Duration = Duration::from_secs(1);

/// `connect`, trying the endpoints from index `start` (mod their number) on; returns the
/// client and the index of the endpoint that answered.
async fn connect_from(fleet: &Fleet, start: usize) -> anyhow::Result<(Client, usize)> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        // etcd answers pings more often than its --grpc-keepalive-min-time (5 s by default)
        // with GOAWAY: 10 s. A dead etcd shows sooner anyway, at the lease renewals (every
        // lease_ttl_secs / 3, each with a REQUEST_TIMEOUT).
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    if let Some(t) = &fleet.tls {
        let ca = std::fs::read(&t.ca).with_context(|| format!("reading fleet.tls.ca {}", t.ca.display()))?;
        let mut tls = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca));
        if let Some((cert, key)) = &t.identity {
            let c = std::fs::read(cert).with_context(|| format!("reading fleet.tls.cert {}", cert.display()))?;
            let k = std::fs::read(key).with_context(|| format!("reading fleet.tls.key {}", key.display()))?;
            tls = tls.identity(etcd_client::Identity::from_pem(c, k));
        }
        if let Some(d) = &t.domain {
            tls = tls.domain_name(d.clone());
        }
        options = options.with_tls(tls);
    }
    // One endpoint at a time, the first that answers (from a different one per process, so a
    // fleet's agents spread over the cluster): a client balanced over all of them sends some
    // requests to a member that is down and fails them, instead of using another.
    let n = fleet.endpoints.len();
    let mut failed = Vec::new();
    for k in 0..n {
        let at = (start + k) % n;
        let endpoint = &fleet.endpoints[at];
        let attempt = async {
            let mut c = Client::connect([endpoint], Some(options.clone())).await?;
            c.status().await?;
            Ok::<_, etcd_client::Error>(c)
        };
        match tokio::time::timeout(ENDPOINT_TIMEOUT, attempt).await {
            Ok(Ok(c)) => return Ok((c, at)),
            Ok(Err(e)) => failed.push(format!("{endpoint}: {e}")),
            Err(_) => failed.push(format!("{endpoint}: no answer within {ENDPOINT_TIMEOUT:?}")),
        }
    }
    bail!("no etcd endpoint answered ({}); is etcd up and reachable from here?", failed.join("; "))
}

fn etcd_err(what: &str, endpoints: &[String]) -> impl FnOnce(etcd_client::Error) -> anyhow::Error {
    let (what, at) = (what.to_owned(), endpoints.join(", "));
    move |e| anyhow!("{what} in etcd at {at} failed: {e}; is etcd up and reachable from here?")
}

/// The fleet's desired state changed under a switch (another one was written first, or it
/// moved on from the revision the switch was decided on): nothing was written.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Raced(String);

/// A desired state in etcd that is not bg's JSON.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadDesired(String);

/// The desired state, its mod revision, and the store's revision when it was read.
pub struct DesiredRead {
    pub desired: Option<(Desired, i64)>,
    pub revision: i64,
}

pub async fn read_desired(client: &mut Client, fleet: &Fleet) -> anyhow::Result<DesiredRead> {
    let keys = Keys::new(&fleet.name);
    let r = client.get(keys.desired(), None).await.map_err(etcd_err("reading the desired state", &fleet.endpoints))?;
    let revision = r.header().map_or(0, |h| h.revision());
    let desired = match r.kvs().first() {
        None => None,
        Some(kv) => {
            let d: Desired = serde_json::from_slice(kv.value()).map_err(|e| {
                anyhow::Error::new(BadDesired(format!(
                    "the fleet's desired state at {} is not bg's JSON ({e}); every gateway keeps what it applied last. \
                     Fix it, or delete it (`etcdctl del {}`) and restart one agent, which writes its own state",
                    keys.desired(),
                    keys.desired()
                )))
            })?;
            Some((d, kv.mod_revision()))
        }
    };
    Ok(DesiredRead { desired, revision })
}

/// Every live gateway's state (those whose agents hold a lease), and every member's id.
pub async fn read_gateways(client: &mut Client, fleet: &Fleet) -> anyhow::Result<(Vec<GatewayState>, Vec<String>)> {
    let keys = Keys::new(&fleet.name);
    let r = client
        .get(keys.gateways(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(etcd_err("reading the gateways", &fleet.endpoints))?;
    let mut live = Vec::new();
    for kv in r.kvs() {
        match serde_json::from_slice::<GatewayState>(kv.value()) {
            Ok(g) => live.push(g),
            Err(e) => warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "ignoring a gateway key that is not bg's JSON"),
        }
    }
    let m = client
        .get(keys.members(), Some(GetOptions::new().with_prefix().with_keys_only()))
        .await
        .map_err(etcd_err("reading the members", &fleet.endpoints))?;
    let members = m.kvs().iter().map(|kv| String::from_utf8_lossy(&kv.key()[keys.members().len()..]).into_owned()).collect();
    Ok((live, members))
}

/// A switch asked of the fleet.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Flip(FlipRequest),
    Rollback { force: bool },
}

/// One gateway's acknowledgement of a switch.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ack {
    pub gateway: String,
    /// The desired revision it reported applied (the switch's, or a later one).
    pub revision: i64,
    /// From the switch's commit in etcd to its ack seen by the flipper.
    pub apply_ms: f64,
}

/// A live gateway that had not applied the switch when the wait ended.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Lagging {
    pub gateway: String,
    /// The desired revision it last applied.
    pub applied_revision: i64,
}

/// What a fleet switch did, gateway by gateway.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FleetSwitch {
    pub fleet: String,
    /// The desired state's mod revision once written.
    pub revision: i64,
    pub acks: Vec<Ack>,
    pub lagging: Vec<Lagging>,
    /// Live when the switch was written, gone (lease expired) before they acknowledged it.
    pub lost: Vec<String>,
    /// Members of the fleet with no live agent when the switch was written.
    pub down: Vec<String>,
    /// Every live gateway applied the switch within `ack_timeout_secs`.
    pub complete: bool,
    /// The fleet was rolled back because the switch was not complete (`rollback_on_timeout`).
    #[serde(default)]
    pub rolled_back: Option<String>,
    /// Written, but the wait for the acks failed (etcd lost meanwhile): nothing is known of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A fleet switch's outcome: the local result's fields and the fleet's part.
pub struct Outcome {
    pub plan: Option<Plan>,
    pub from: Color,
    pub generation: u64,
    pub fleet: Option<FleetSwitch>,
}

/// Decides `op` on the fleet's desired state with the fleet-wide health gate, writes it with a
/// compare-and-swap on the revision it decided on, and waits (up to `ack_timeout_secs`) until
/// every live gateway has applied it. `local`: this gateway's own state, fresher than its key.
/// `expect`: decide only on this revision of the desired state (an automatic rollback undoes
/// the switch its gateway applied, not whatever came after it).
pub async fn switch(fleet: &Fleet, op: Op, who: &str, reason: &str, local: Option<GatewayState>, expect: Option<i64>) -> anyhow::Result<Outcome> {
    let mut client = connect(fleet).await?;
    let read = read_desired(&mut client, fleet).await?;
    let Some((desired, mod_revision)) = read.desired else {
        bail!(
            "fleet `{}` has no desired state in etcd yet: start one of its agents first (the first to join writes its own state)",
            fleet.name
        );
    };
    if let Some(r) = expect.filter(|r| *r != mod_revision) {
        return Err(Raced(format!(
            "the fleet's desired state moved on (revision {mod_revision}, generation {}; this was decided on revision {r}): nothing written",
            desired.generation
        ))
        .into());
    }
    let (mut live, _) = read_gateways(&mut client, fleet).await?;
    if let Some(l) = local {
        live.retain(|g| g.gateway != l.gateway);
        live.push(l);
    }
    let dec = desired.decisions()?;
    let verdict_of = |c: Color| fleet_verdict(&live, c);
    let decision = match op {
        Op::Flip(req) => dec.decide_flip(&req, &verdict_of(req.to), 0),
        Op::Rollback { force } => dec.decide_rollback(force, &verdict_of, 0),
    }
    .map_err(|e| anyhow!(e))?;
    let from = dec.active;
    let plan = match decision {
        Decision::Unchanged => return Ok(Outcome { plan: None, from, generation: desired.generation, fleet: None }),
        Decision::Refused { to, failing } => bail!(
            "refused: {} is not healthy as seen from every live gateway of fleet `{}`: {}; fix it, or pass --force",
            to.name(),
            fleet.name,
            failing.join("; ")
        ),
        Decision::Switch(p) => p,
    };
    let next = desired.after(&plan, who, reason)?;
    if let Some(ms) = std::env::var("BG_FLEET_PAUSE_BEFORE_WRITE_MS").ok().and_then(|v| v.parse().ok()) {
        // For tests of concurrent switches: both sides decide on the same revision.
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let revision = write(&mut client, fleet, &next, mod_revision).await?;
    // Written: whatever fails from here on, the switch happened, and the answer says so.
    let mut result = match wait_acks(&mut client, fleet, revision, &next).await {
        Ok(r) => r,
        Err(e) => FleetSwitch {
            fleet: fleet.name.clone(),
            revision,
            acks: Vec::new(),
            lagging: Vec::new(),
            lost: Vec::new(),
            down: Vec::new(),
            complete: false,
            rolled_back: None,
            error: Some(format!("the switch was written, but waiting for the gateways' acks failed: {e:#}")),
        },
    };
    if !result.complete && fleet.rollback_on_timeout {
        // The same rollback `bgctl rollback --force` decides on the state just written.
        let back = if plan.kind == Kind::Canary { "the canary ended" } else { "rolled back" };
        let why = format!("rollback_on_timeout: generation {} not applied by {}", next.generation, names(&result));
        let undo = match next.decisions()?.decide_rollback(true, &verdict_of, 0).map_err(|e| anyhow!(e))? {
            Decision::Switch(p) => next.after(&p, who, &why)?,
            other => bail!("rollback_on_timeout: no rollback to write after generation {} ({other:?})", next.generation),
        };
        match write(&mut client, fleet, &undo, revision).await {
            Ok(r) => {
                let acked = match wait_acks(&mut client, fleet, r, &undo).await {
                    Ok(a) if a.complete => "applied by every live gateway".to_owned(),
                    Ok(a) => format!("NOT applied in time by {}", names(&a)),
                    Err(e) => format!("its acks unknown: {e:#}"),
                };
                result.rolled_back = Some(format!("{back}: back to generation {}'s state as generation {}, {acked}", desired.generation, undo.generation))
            }
            Err(e) => result.rolled_back = Some(format!("the rollback could not be written: {e:#}")),
        }
    }
    Ok(Outcome { plan: Some(plan), from, generation: next.generation, fleet: Some(result) })
}

fn names(r: &FleetSwitch) -> String {
    r.lagging.iter().map(|l| l.gateway.as_str()).chain(r.lost.iter().map(String::as_str)).collect::<Vec<_>>().join(", ")
}

/// Writes `next` if the desired state is still at `expected` (its mod revision; 0: absent),
/// with its history entry, and trims the history. Returns the new mod revision.
pub async fn write(client: &mut Client, fleet: &Fleet, next: &Desired, expected: i64) -> anyhow::Result<i64> {
    let keys = Keys::new(&fleet.name);
    let value = serde_json::to_vec(next)?;
    let compare =
        if expected == 0 { Compare::create_revision(keys.desired(), CompareOp::Equal, 0) } else { Compare::mod_revision(keys.desired(), CompareOp::Equal, expected) };
    let txn = Txn::new()
        .when([compare])
        .and_then([TxnOp::put(keys.desired(), value.clone(), None), TxnOp::put(keys.history_entry(next.generation), value, None)])
        .or_else([TxnOp::get(keys.desired(), None)]);
    let r = client.txn(txn).await.map_err(etcd_err("writing the desired state", &fleet.endpoints))?;
    if !r.succeeded() {
        let winner = r.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().and_then(|kv| serde_json::from_slice::<Desired>(kv.value()).ok()),
            _ => None,
        });
        return Err(Raced(match winner {
            Some(w) => format!(
                "another switch won the race: generation {} ({} to {}, by {}) was written first, and this one changed nothing; \
                 check `bgctl status` and switch again if still wanted",
                w.generation, w.event, w.active, w.who
            ),
            None => "another switch changed the fleet's desired state first, and this one changed nothing; check and retry".into(),
        })
        .into());
    }
    let revision = r.header().map_or(0, |h| h.revision());
    trim_history(client, &keys, fleet.history).await;
    Ok(revision)
}

/// Keeps the last `keep` history entries (best effort: a failure leaves a longer history).
async fn trim_history(client: &mut Client, keys: &Keys, keep: u32) {
    let Ok(r) = client.get(keys.history(), Some(GetOptions::new().with_prefix().with_keys_only())).await else { return };
    let n = r.kvs().len();
    if n <= keep as usize {
        return;
    }
    // Keys sort by their zero-padded generation: the first ones are the oldest.
    // Up to and including the newest entry to go.
    let mut end = r.kvs()[n - keep as usize - 1].key().to_vec();
    end.push(0);
    let _ = client.delete(keys.history(), Some(etcd_client::DeleteOptions::new().with_range(end))).await;
}

/// Waits until every live gateway reports `revision` (or a later one) applied, for at most
/// `ack_timeout_secs`.
/// The acks of one switch, as the gateways' key events come in. An ack counts only when the
/// gateway reports this revision (or a later one) with the state the switch asked for: a
/// gateway that kept a higher revision from a store since rebuilt is not taken for one that
/// applied it. A gateway whose key goes (its lease ended) is lost until it is back with the
/// switch applied (an agent that reconnected under a new lease).
struct AckWait {
    revision: i64,
    active: String,
    canary_permille: u32,
    acks: BTreeMap<String, (i64, f64)>,
    pending: BTreeMap<String, i64>,
    lost: Vec<String>,
    live_at_start: Vec<String>,
}

impl AckWait {
    fn new(revision: i64, next: &Desired, live: &[GatewayState], now_ms: f64) -> AckWait {
        let mut w = AckWait {
            revision,
            active: next.active.clone(),
            canary_permille: next.canary_permille,
            acks: BTreeMap::new(),
            pending: BTreeMap::new(),
            lost: Vec::new(),
            live_at_start: live.iter().map(|g| g.gateway.clone()).collect(),
        };
        for g in live {
            w.on_put(&g.gateway, g, now_ms);
        }
        w
    }

    fn applied(&self, g: &GatewayState) -> bool {
        g.revision > self.revision || (g.revision == self.revision && g.active == self.active && g.canary_permille == self.canary_permille)
    }

    fn on_put(&mut self, id: &str, g: &GatewayState, now_ms: f64) {
        if self.applied(g) {
            self.lost.retain(|l| l != id);
            self.pending.remove(id);
            self.acks.entry(id.to_owned()).or_insert((g.revision, now_ms));
        } else if !self.acks.contains_key(id) {
            self.pending.insert(id.to_owned(), g.revision);
        }
    }

    fn on_delete(&mut self, id: &str) {
        if self.pending.remove(id).is_some() {
            self.lost.push(id.to_owned());
        }
    }

    /// Some live gateway has not applied the switch (or is lost and may come back).
    fn waiting(&self) -> bool {
        !self.pending.is_empty() || !self.lost.is_empty()
    }

    fn finish(self, fleet: &str, members: Vec<String>) -> FleetSwitch {
        let down = members.into_iter().filter(|m| !self.live_at_start.contains(m) && !self.acks.contains_key(m)).collect();
        let lagging: Vec<Lagging> = self.pending.into_iter().map(|(gateway, applied_revision)| Lagging { gateway, applied_revision }).collect();
        FleetSwitch {
            fleet: fleet.to_owned(),
            revision: self.revision,
            complete: lagging.is_empty() && self.lost.is_empty(),
            acks: self.acks.into_iter().map(|(gateway, (revision, apply_ms))| Ack { gateway, revision, apply_ms }).collect(),
            lagging,
            lost: self.lost,
            down,
            rolled_back: None,
            error: None,
        }
    }
}

/// Waits until every live gateway reports the switch (`revision`, state `next`) applied, for at
/// most `ack_timeout_secs`.
async fn wait_acks(client: &mut Client, fleet: &Fleet, revision: i64, next: &Desired) -> anyhow::Result<FleetSwitch> {
    let started = Instant::now();
    let keys = Keys::new(&fleet.name);
    let mut watch = client
        .watch(keys.gateways(), Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1)))
        .await
        .map_err(etcd_err("watching the gateways", &fleet.endpoints))?;
    let (live, members) = read_gateways(client, fleet).await?;
    let ms = || started.elapsed().as_secs_f64() * 1000.0;
    let mut wait = AckWait::new(revision, next, &live, ms());
    let deadline = started + Duration::from_secs(fleet.ack_timeout_secs);
    while wait.waiting() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let msg = match tokio::time::timeout(left, watch.message()).await {
            Err(_) => break,
            Ok(m) => m.map_err(etcd_err("watching the gateways", &fleet.endpoints))?,
        };
        let Some(msg) = msg else { bail!("etcd ended the watch on the gateways while waiting for their acks") };
        if msg.canceled() {
            bail!("etcd cancelled the watch on the gateways: {}", msg.cancel_reason());
        }
        for ev in msg.events() {
            let Some(kv) = ev.kv() else { continue };
            let id = String::from_utf8_lossy(&kv.key()[keys.gateways().len()..]).into_owned();
            match ev.event_type() {
                EventType::Put => {
                    if let Ok(g) = serde_json::from_slice::<GatewayState>(kv.value()) {
                        wait.on_put(&id, &g, ms());
                    }
                }
                EventType::Delete => wait.on_delete(&id),
            }
        }
    }
    Ok(wait.finish(&fleet.name, members))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(id: &str, revision: i64, active: &str) -> GatewayState {
        GatewayState { gateway: id.into(), revision, generation: 1, active: active.into(), canary_permille: 0, selector: 0, health: vec![], at_unix_ms: 0 }
    }

    fn next(active: &str) -> Desired {
        Desired {
            generation: 2,
            active: active.into(),
            canary_permille: 0,
            previous: None,
            event: "flip".into(),
            force: false,
            forced: false,
            drain_secs: None,
            who: "t".into(),
            reason: "t".into(),
            at_unix_ms: 0,
        }
    }

    fn ids(v: &[Ack]) -> Vec<&str> {
        v.iter().map(|a| a.gateway.as_str()).collect()
    }

    #[test]
    fn acks_count_the_switch_applied_and_nothing_else() {
        let live = [gw("a", 10, "green"), gw("b", 9, "blue"), gw("c", 9, "blue")];
        let mut w = AckWait::new(10, &next("green"), &live, 0.0);
        assert!(w.waiting());
        // A health-only rewrite at the old revision is no ack; nor is the right revision with
        // another state (a store rebuilt below what the gateway kept).
        w.on_put("b", &gw("b", 9, "blue"), 1.0);
        w.on_put("c", &gw("c", 10, "blue"), 1.0);
        assert!(w.waiting());
        w.on_put("b", &gw("b", 10, "green"), 2.0);
        // c's lease ends: lost, still waited for; back under a new lease, applied: acked.
        w.on_delete("c");
        assert!(w.waiting());
        w.on_put("c", &gw("c", 11, "blue"), 3.0);
        // A gateway that joins during the wait at a later revision counts too.
        w.on_put("d", &gw("d", 12, "blue"), 4.0);
        assert!(!w.waiting());
        let r = w.finish("f", vec!["a".into(), "b".into(), "c".into(), "d".into(), "e".into()]);
        assert!(r.complete);
        assert_eq!(ids(&r.acks), ["a", "b", "c", "d"]);
        assert_eq!(r.acks.iter().map(|a| a.apply_ms).collect::<Vec<_>>(), [0.0, 2.0, 3.0, 4.0]);
        assert_eq!(r.down, ["e"], "a member never live is down");
    }

    #[test]
    fn a_gateway_gone_or_behind_at_the_deadline_makes_the_switch_incomplete() {
        let live = [gw("a", 10, "green"), gw("b", 9, "blue"), gw("c", 9, "blue")];
        let mut w = AckWait::new(10, &next("green"), &live, 0.0);
        w.on_delete("c");
        // A delete of a gateway that already acked changes nothing.
        w.on_delete("a");
        let r = w.finish("f", vec![]);
        assert!(!r.complete);
        assert_eq!(ids(&r.acks), ["a"]);
        assert_eq!(r.lagging.iter().map(|l| (l.gateway.as_str(), l.applied_revision)).collect::<Vec<_>>(), [("b", 9)]);
        assert_eq!(r.lost, ["c"]);
    }
}

/// The link of one agent to its fleet, as status and metrics show it.
#[derive(Clone, Debug)]
pub struct Link {
    pub connected: bool,
    /// When `connected` last changed (or the agent started).
    pub since: Instant,
    /// The mod revision of the desired state last applied (0: none).
    pub applied_revision: i64,
    pub last_error: Option<String>,
    /// The fence hook ran for the current cut.
    pub fenced: bool,
    /// The lease of the current (or last) session: revoked by the next one, and at exit.
    pub lease: Option<i64>,
    /// The endpoint the current session uses (the next session starts after it when it fails).
    pub endpoint: usize,
}

pub type SharedLink = Arc<Mutex<Link>>;

pub fn new_link() -> SharedLink {
    Arc::new(Mutex::new(Link { connected: false, since: Instant::now(), applied_revision: 0, last_error: None, fenced: false, lease: None, endpoint: std::process::id() as usize }))
}

/// What an agent's session with etcd needs from the agent.
pub trait Gateway: Send + Sync + 'static {
    /// Applies the fleet's desired state (mod revision `revision`); a revision already
    /// applied is a no-op.
    fn apply(&self, desired: &Desired, revision: i64) -> anyhow::Result<()>;
    /// This gateway's state for its key (`at_unix_ms` left 0).
    fn state(&self) -> GatewayState;
    /// The state to write as the fleet's first desired state when it has none.
    fn initial(&self) -> Desired;
    /// etcd's store is below the revision this gateway applied last: it was restored or
    /// rebuilt. Forget the applied revision, so its states are applied again.
    fn store_went_back(&self);
    /// The desired revision applied last.
    fn applied_revision(&self) -> i64;
}

/// Reads the fleet's desired state once and applies it (an agent's start: before it answers
/// anything). Writes this gateway's state as the fleet's when the fleet has none.
pub async fn sync_once(fleet: &Fleet, gw: &dyn Gateway) -> anyhow::Result<i64> {
    let mut client = connect(fleet).await?;
    sync(&mut client, fleet, gw).await
}

/// Reads and applies the desired state; returns the store's revision read at. A desired state
/// this gateway cannot apply (not bg's JSON, values out of range) is logged and left: the
/// gateway keeps what it applied last, and stays in touch (its watch applies the next good one).
async fn sync(client: &mut Client, fleet: &Fleet, gw: &dyn Gateway) -> anyhow::Result<i64> {
    let mut read = match read_desired(client, fleet).await {
        Err(e) if e.downcast_ref::<BadDesired>().is_some() => {
            let r = client.get(Keys::new(&fleet.name).desired(), Some(GetOptions::new().with_keys_only())).await.map_err(etcd_err("reading the desired state", &fleet.endpoints))?;
            warn!(error = %format!("{e:#}"), "keeping the last applied state");
            return Ok(r.header().map_or(0, |h| h.revision()));
        }
        other => other?,
    };
    if read.revision < gw.applied_revision() {
        warn!(store = read.revision, applied = gw.applied_revision(), "etcd's revision went back (restored or rebuilt?): applying its desired state afresh");
        gw.store_went_back();
    }
    // A fleet without a desired state gets this gateway's, but only from an agent that has
    // applied none yet (a new fleet, or a restart after the key was deleted on purpose): a
    // running gateway does not re-seed a deleted key with its own, possibly stale, state.
    if read.desired.is_none() && gw.applied_revision() == 0 {
        let first = gw.initial();
        match write(client, fleet, &first, 0).await {
            Ok(_) => info!(fleet = %fleet.name, active = %first.active, "this gateway's state is the fleet's first desired state"),
            Err(e) if e.downcast_ref::<Raced>().is_some() => info!("another gateway wrote the fleet's first desired state"),
            Err(e) => return Err(e),
        }
        read = read_desired(client, fleet).await?;
    } else if read.desired.is_none() {
        warn!(key = %Keys::new(&fleet.name).desired(), "the fleet's desired state is missing from etcd; keeping the last applied state (restart one agent to write its own)");
    }
    if let Some((d, rev)) = &read.desired {
        if let Err(e) = gw.apply(d, *rev) {
            warn!(error = %format!("{e:#}"), revision = rev, "could not apply the fleet's desired state; keeping the last applied one");
        }
    }
    Ok(read.revision)
}

/// Keeps this agent in its fleet until the process ends: a lease (its gateway key lives as long
/// as it is renewed), the watch on the desired state (each change applied, then acknowledged),
/// and its key rewritten when its health view changes. A lost session is retried; every new one
/// re-reads the desired state first (a watch from a compacted revision cannot be resumed).
pub async fn keep_member(fleet: Fleet, gw: Arc<dyn Gateway>, link: SharedLink) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        let err = session(&fleet, gw.as_ref(), &link).await.err().unwrap_or_else(|| anyhow!("the session ended"));
        // A session that ran for a while was a good one: retry the next failure quickly.
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(200);
        }
        let msg = format!("{err:#}");
        {
            let mut l = crate::lock(&link);
            if l.connected {
                l.connected = false;
                l.since = Instant::now();
                warn!(error = %msg, "lost etcd; this gateway keeps its last applied state and retries");
            }
            l.last_error = Some(msg);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// How often a gateway's key is rewritten for a change in wording only (a failing list's
/// figures move every SLO window): etcd keeps every revision until compacted.
const STATE_REWRITE: Duration = Duration::from_secs(5);

/// The part of a gateway's state a flip decides and waits on.
fn material(g: &GatewayState) -> (i64, u64, &str, u32, u32, Vec<bool>) {
    (g.revision, g.generation, &g.active, g.canary_permille, g.selector, g.health.iter().map(|v| v.healthy).collect())
}

async fn session(fleet: &Fleet, gw: &dyn Gateway, link: &SharedLink) -> anyhow::Result<()> {
    let id = fleet.gateway.clone().context("fleet.gateway is not set")?;
    let keys = Keys::new(&fleet.name);
    // After a failed session, from the next endpoint on (the one it used may be the one down).
    let from = crate::lock(link).endpoint + 1;
    let (mut client, at) = connect_from(fleet, from).await?;
    crate::lock(link).endpoint = at;
    // The last session's lease (a blip shorter than its TTL leaves it alive): revoked, so its
    // key goes now, not when it times out.
    let previous = crate::lock(link).lease.take();
    if let Some(old) = previous {
        let _ = client.lease_revoke(old).await;
    }
    let lease = client.lease_grant(fleet.lease_ttl_secs as i64, None).await.map_err(etcd_err("taking a lease", &fleet.endpoints))?.id();
    crate::lock(link).lease = Some(lease);
    let (mut keeper, mut renewals) = client.lease_keep_alive(lease).await.map_err(etcd_err("renewing the lease", &fleet.endpoints))?;
    client
        .put(keys.member(&id), serde_json::to_vec(&serde_json::json!({"gateway": id, "joined_unix_ms": unix_ms()}))?, None)
        .await
        .map_err(etcd_err("registering this gateway", &fleet.endpoints))?;
    let at = sync(&mut client, fleet, gw).await?;
    let mut watch = client
        .watch(keys.desired(), Some(WatchOptions::new().with_start_revision(at + 1)))
        .await
        .map_err(etcd_err("watching the desired state", &fleet.endpoints))?;
    // `state()` leaves `at_unix_ms` 0, so states compare by content; the time is stamped here.
    let put_state = |client: &mut Client, s: &GatewayState| {
        let mut client = client.clone();
        let (key, value) = (keys.gateway(&id), serde_json::to_vec(&GatewayState { at_unix_ms: unix_ms(), ..s.clone() }));
        async move {
            client.put(key, value?, Some(PutOptions::new().with_lease(lease))).await.map_err(etcd_err("writing this gateway's state", &fleet.endpoints))?;
            anyhow::Ok(())
        }
    };
    // The gateway's key is this agent's alone: another live agent with the same id (a copied
    // config) is refused, not merged with this one.
    let mut written = gw.state();
    let first = serde_json::to_vec(&GatewayState { at_unix_ms: unix_ms(), ..written.clone() })?;
    let claim = Txn::new()
        .when([Compare::create_revision(keys.gateway(&id), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(keys.gateway(&id), first, Some(PutOptions::new().with_lease(lease)))])
        .or_else([TxnOp::get(keys.gateway(&id), None)]);
    let claimed = client.txn(claim).await.map_err(etcd_err("registering this gateway", &fleet.endpoints))?;
    if !claimed.succeeded() {
        bail!(
            "gateway id `{id}` is live in fleet `{}` under another agent's lease: is `fleet.gateway` the same on two gateways? \
             Each needs its own (if this gateway's previous agent was killed, its key expires within lease_ttl_secs = {})",
            fleet.name,
            fleet.lease_ttl_secs
        );
    }
    {
        let mut l = crate::lock(link);
        l.connected = true;
        l.since = Instant::now();
        l.last_error = None;
    }
    info!(fleet = %fleet.name, gateway = %id, "in touch with etcd; following the fleet's desired state");
    let mut renew = tokio::time::interval(Duration::from_millis((fleet.lease_ttl_secs * 1000 / 3).max(300)));
    let mut look = tokio::time::interval(Duration::from_millis(500));
    let mut last_write = Instant::now();
    loop {
        tokio::select! {
            msg = watch.message() => {
                let msg = msg.map_err(etcd_err("watching the desired state", &fleet.endpoints))?
                    .ok_or_else(|| anyhow!("etcd ended the watch on the desired state"))?;
                if msg.canceled() {
                    bail!("etcd cancelled the watch on the desired state (compacted at revision {}): {}; re-reading it", msg.compact_revision(), msg.cancel_reason());
                }
                for ev in msg.events() {
                    let Some(kv) = ev.kv() else { continue };
                    match ev.event_type() {
                        EventType::Put => match serde_json::from_slice::<Desired>(kv.value()) {
                            Ok(d) => {
                                if let Err(e) = gw.apply(&d, kv.mod_revision()) {
                                    warn!(error = %format!("{e:#}"), revision = kv.mod_revision(), "could not apply the fleet's desired state");
                                }
                            }
                            Err(e) => warn!(error = %e, "the fleet's desired state is not bg's JSON; keeping the last applied one"),
                        },
                        EventType::Delete => warn!("the fleet's desired state was deleted from etcd; keeping the last applied one"),
                    }
                }
                let now = gw.state();
                if now != written {
                    put_state(&mut client, &now).await?;
                    written = now;
                }
            }
            _ = renew.tick() => {
                keeper.keep_alive().await.map_err(etcd_err("renewing the lease", &fleet.endpoints))?;
                let answer = tokio::time::timeout(REQUEST_TIMEOUT, renewals.message()).await
                    .map_err(|_| anyhow!("etcd did not answer a lease renewal within {REQUEST_TIMEOUT:?}"))?
                    .map_err(etcd_err("renewing the lease", &fleet.endpoints))?;
                if answer.is_none_or(|a| a.ttl() <= 0) {
                    bail!("this gateway's lease expired (etcd unreachable for longer than lease_ttl_secs = {})", fleet.lease_ttl_secs);
                }
            }
            _ = look.tick() => {
                // What a flip reads (revision, selector, healthy or not) is written at once;
                // a change in the failing list's wording at most every STATE_REWRITE.
                let now = gw.state();
                if material(&now) != material(&written) || (now != written && last_write.elapsed() >= STATE_REWRITE) {
                    put_state(&mut client, &now).await?;
                    written = now;
                    last_write = Instant::now();
                }
            }
        }
    }
}

/// The fleet as `bgctl fleet status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FleetView {
    pub fleet: String,
    pub desired: Option<Desired>,
    /// The desired state's mod revision.
    pub revision: i64,
    pub gateways: Vec<GatewayState>,
    /// Members with no live agent.
    pub down: Vec<String>,
}

pub async fn status(fleet: &Fleet) -> anyhow::Result<FleetView> {
    let mut client = connect(fleet).await?;
    let read = read_desired(&mut client, fleet).await?;
    let (gateways, members) = read_gateways(&mut client, fleet).await?;
    let down = members.into_iter().filter(|m| !gateways.iter().any(|g| &g.gateway == m)).collect();
    let (desired, revision) = match read.desired {
        Some((d, r)) => (Some(d), r),
        None => (None, 0),
    };
    Ok(FleetView { fleet: fleet.name.clone(), desired, revision, gateways, down })
}

/// The fleet's history in etcd, oldest first.
pub async fn history(fleet: &Fleet) -> anyhow::Result<Vec<Desired>> {
    let mut client = connect(fleet).await?;
    let keys = Keys::new(&fleet.name);
    let r = client.get(keys.history(), Some(GetOptions::new().with_prefix())).await.map_err(etcd_err("reading the history", &fleet.endpoints))?;
    Ok(r.kvs().iter().filter_map(|kv| serde_json::from_slice(kv.value()).ok()).collect())
}

/// Revokes this agent's lease at exit: its gateway key goes now, so flips right after do not
/// wait for a stopped agent.
pub async fn leave(fleet: &Fleet, link: &SharedLink) {
    let Some(lease) = crate::lock(link).lease.take() else { return };
    let revoke = async {
        let mut client = connect(fleet).await?;
        client.lease_revoke(lease).await.map_err(etcd_err("revoking the lease", &fleet.endpoints))?;
        anyhow::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(1), revoke).await {
        Ok(Ok(())) => info!("left the fleet: lease revoked"),
        Ok(Err(e)) => warn!(error = %format!("{e:#}"), "could not revoke the lease at exit; it expires within lease_ttl_secs"),
        Err(_) => warn!("etcd did not answer the lease revocation at exit; it expires within lease_ttl_secs"),
    }
}
