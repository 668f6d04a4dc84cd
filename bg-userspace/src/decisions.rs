//! The agent's rules, apart from any I/O: the health gate, flips and canaries, the rollback
//! window and the automatic rollback (once), drains, and how backend health adds up to a
//! color's verdict and to the weights new flows see. Time comes in as milliseconds from the
//! caller's clock, so every rule is tested on the host with a fake one.
//!
//! The agent asks (`decide_flip`, `decide_rollback`, `tick`), carries out what it is told (a
//! selector write, a drain walk, an audit line), and only then `commit`s a switch: a switch
//! whose selector write failed leaves these rules where they were.

use std::net::SocketAddr;

use bg_common::Color;

use crate::{
    config::Service,
    health::{self, Backends, State as HState},
};

/// The longest `--drain`: a day.
pub const MAX_DRAIN_SECS: u64 = 86_400;

/// What is wrong with a flip's arguments on their own, whatever the state: checked before a
/// switch is accepted (the HTTP API's 400) and again when it is decided.
pub fn check_arguments(req: &FlipRequest) -> Result<(), String> {
    match (req.percent, req.drain_secs) {
        (Some(p), _) if !(1..=99).contains(&p) => Err(format!("--percent {p} is out of range; use 1 to 99 (a plain flip moves 100%)")),
        (Some(_), Some(_)) => Err("--drain with --percent: a canary keeps both colors live, so there is nothing to drain; \
             drain on the full flip (`bgctl flip COLOR --drain SECS`)"
            .into()),
        (_, Some(d)) if d > MAX_DRAIN_SECS => Err(format!("--drain {d} is out of range; use 0 to {MAX_DRAIN_SECS} seconds")),
        _ => Ok(()),
    }
}
/// `Window::until_ms` of a canary's watch: it lasts until the next switch.
pub const CANARY_WATCH: u64 = u64::MAX;

/// A backend's state in the health table (`Unknown` until its first checks).
pub fn state_of(table: &Backends, addr: &SocketAddr) -> HState {
    table.get(addr).map(|b| b.state).unwrap_or(HState::Unknown)
}

/// What health says about one color.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verdict {
    /// In every service, at least `healthy_share` of the color's backends are up.
    pub healthy: bool,
    /// Some backend of the color is confirmed down (`fall` failures in a row), as opposed to
    /// not known yet.
    pub confirmed_down: bool,
    /// The color's backends that are not up, in words ("10.1.0.2:8080 (down: refused)").
    pub failing: Vec<String>,
}

/// The gate's rule for one service: at least `share` of its `total` backends are up.
pub fn meets_share(up: usize, total: usize, share: f64) -> bool {
    up as f64 >= share * total as f64
}

/// The most backends a verdict names (a refusal, an audit line and a log line stay short at
/// any size); the rest are counted.
pub const VERDICT_BACKENDS: usize = crate::control::STATUS_BACKENDS;

/// Adds up the health of `color`'s backends over `services`.
pub fn verdict(services: &[Service], color: Color, table: &Backends) -> Verdict {
    let mut v = Verdict { healthy: true, ..Verdict::default() };
    let mut unnamed = 0usize;
    for s in services {
        let list = s.backends(color);
        let mut up = 0usize;
        for b in list {
            let h = table.get(&b.addr);
            let state = h.map_or(HState::Unknown, |h| h.state);
            v.confirmed_down |= state == HState::Down;
            if health::is_up(state) {
                up += 1;
            } else {
                if v.failing.len() < VERDICT_BACKENDS {
                    let last = h.map_or(health::NOT_CHECKED, |h| h.last.as_str());
                    v.failing.push(format!("{} ({state:?}: {last})", b.addr).to_lowercase());
                } else {
                    unnamed += 1;
                }
            }
        }
        v.healthy &= meets_share(up, list.len(), s.health.healthy_share);
    }
    if unnamed > 0 {
        v.failing.push(format!("and {unnamed} more not up (`bgctl backends --color {}` lists them)", color.name()));
    }
    v
}

/// A health verdict with what the color's real traffic breaches (`signals::View::breaches`):
/// a breach makes the color unhealthy for the gate and the watch window, as a backend
/// confirmed down does.
pub fn with_breaches(mut v: Verdict, breaches: Vec<String>) -> Verdict {
    if !breaches.is_empty() {
        v.healthy = false;
        v.confirmed_down = true;
        v.failing.extend(breaches.into_iter().map(|b| format!("SLO breach: {b}")));
    }
    v
}

/// Weights new flows see for `color`, per service and backend: the configured weight, or 0
/// for a backend confirmed down (one not known yet keeps its weight).
pub fn effective_weights(services: &[Service], color: Color, table: &Backends) -> Vec<Vec<u32>> {
    services
        .iter()
        .map(|s| s.backends(color).iter().map(|b| if health::takes_flows(state_of(table, &b.addr)) { b.weight } else { 0 }).collect())
        .collect()
}

/// A time-bound promise of the last switch: a watch window or a drain. Every switch replaces
/// both (`commit`), so one never outlives the switch that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// The color watched (a watch window) or to be ended (a drain).
    pub color: Color,
    pub until_ms: u64,
}

/// A flip or canary as asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlipRequest {
    pub to: Color,
    pub percent: Option<u32>,
    pub drain_secs: Option<u64>,
    pub force: bool,
}

/// What kind of switch a plan is, as the audit log names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Flip,
    Canary,
    /// Back to the previous color (manual or automatic).
    Rollback,
    /// A canary ended: the active color keeps every new flow.
    CanaryCancelled,
}

impl Kind {
    pub fn event(self) -> &'static str {
        match self {
            Kind::Flip => "flip",
            Kind::Canary => "canary",
            Kind::Rollback | Kind::CanaryCancelled => "rollback",
        }
    }
}

/// A switch to carry out: write the selector (`active()`, `canary_permille()`), then `commit`.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub kind: Kind,
    pub from: Color,
    pub to: Color,
    /// A canary's share of new flows to `to` (Some(0): a canary ended).
    pub percent: Option<u32>,
    pub drain_secs: Option<u64>,
    /// Past a failing gate with --force.
    pub forced: bool,
    /// --force was given: automatic rollback is off for this switch, whatever the gate said.
    pub force: bool,
    /// The generation once committed.
    pub generation: u64,
    pub drain: Option<Window>,
    pub watch: Option<Window>,
}

impl Plan {
    /// The color new flows go to once switched: a canary keeps the active one.
    pub fn active(&self) -> Color {
        if self.kind == Kind::Canary {
            self.from
        } else {
            self.to
        }
    }

    /// Whether automatic rollback guards this switch, in words (for the output and the audit).
    pub fn auto_rollback(&self) -> String {
        match (&self.watch, self.kind) {
            (Some(w), _) if w.until_ms == CANARY_WATCH => format!(
                "on while the canary runs: {} turning unhealthy (a backend confirmed down, an SLO breach) ends it",
                self.to.name()
            ),
            (Some(_), _) => format!("on for the watch window: {} turning unhealthy (a backend confirmed down, an SLO breach) rolls back once", self.to.name()),
            (None, _) if self.force => "off for this switch (--force)".into(),
            (None, Kind::Rollback) => "off (a rollback opens no watch window)".into(),
            (None, Kind::CanaryCancelled) => "off (the canary ended)".into(),
            (None, _) => "off (watch_window_secs = 0)".into(),
        }
    }

    /// The share (per mille) of new flows sent to the other color.
    pub fn canary_permille(&self) -> u32 {
        if self.kind == Kind::Canary {
            self.percent.unwrap_or(0) * 10
        } else {
            0
        }
    }
}

/// The answer to a flip or rollback.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Already so: nothing to write.
    Unchanged,
    /// The health gate said no (`failing`: the target's backends not up).
    Refused { to: Color, failing: Vec<String> },
    Switch(Plan),
}

/// What the agent's tick must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// The watched color turned unhealthy inside its window: roll back (the window is closed).
    AutoRollback { plan: Plan, why: String },
    /// ... but the color to go back to is unhealthy too: stay, and record it.
    AutoRollbackSkipped { from: Color, to: Color, why: String },
    /// A drain's deadline came with no switch since: end `color`'s remaining flows.
    Drain { color: Color },
}

/// The switch state and its promises.
#[derive(Clone, Debug)]
pub struct Decisions {
    pub active: Color,
    pub canary_permille: u32,
    /// The color a rollback returns to.
    pub previous: Option<Color>,
    pub generation: u64,
    /// When the active color last changed (ms on the caller's clock).
    pub active_since_ms: u64,
    pub watch: Option<Window>,
    pub drain: Option<Window>,
    /// The whole length of the pending drain (for a progress line).
    pub drain_secs: u64,
    watch_window_ms: u64,
    pub flips_total: u64,
    pub rollbacks_total: u64,
    pub auto_rollbacks_total: u64,
}

impl Decisions {
    /// The state a start (fresh, restored or adopted) begins from.
    pub fn new(active: Color, canary_permille: u32, previous: Option<Color>, generation: u64, watch_window_secs: u64, now_ms: u64) -> Decisions {
        Decisions {
            active,
            canary_permille,
            previous,
            generation,
            active_since_ms: now_ms,
            watch: None,
            drain: None,
            drain_secs: 0,
            watch_window_ms: watch_window_secs.saturating_mul(1000),
            flips_total: 0,
            rollbacks_total: 0,
            auto_rollbacks_total: 0,
        }
    }

    /// A flip (`percent` None) or a canary to `req.to`. `to` is the health verdict on
    /// `req.to`. Errors name what was wrong with the request.
    pub fn decide_flip(&self, req: &FlipRequest, to: &Verdict, now_ms: u64) -> Result<Decision, String> {
        check_arguments(req)?;
        let from = self.active;
        if req.percent.is_some() && req.to == from {
            return Err(format!("{} is already active; a canary goes to the other color", req.to.name()));
        }
        if req.percent.is_none() && req.to == from && self.canary_permille == 0 {
            return Ok(Decision::Unchanged);
        }
        if !to.healthy && !req.force {
            return Ok(Decision::Refused { to: req.to, failing: to.failing.clone() });
        }
        let generation = self.generation.saturating_add(1);
        let forced = req.force && !to.healthy;
        let drain = req
            .drain_secs
            .map(|s| Ok::<_, String>(Window { color: from, until_ms: deadline(now_ms, s.saturating_mul(1000), "a drain")? }))
            .transpose()?;
        // --force opens no watch window: the operator overrides the automatic rollback (and
        // rolling back on the verdict a flip was forced past would undo the override). A
        // canary is watched for as long as it runs.
        let canary = req.percent.is_some();
        let watch = (self.watch_window_ms > 0 && !req.force)
            .then(|| {
                let until_ms = if canary { CANARY_WATCH } else { deadline(now_ms, self.watch_window_ms, "a watch window")? };
                Ok::<_, String>(Window { color: req.to, until_ms })
            })
            .transpose()?;
        Ok(Decision::Switch(Plan {
            kind: if req.percent.is_some() { Kind::Canary } else { Kind::Flip },
            from,
            to: req.to,
            percent: req.percent,
            drain_secs: req.drain_secs,
            forced,
            force: req.force,
            generation,
            drain,
            watch,
        }))
    }

    /// Undoes the last switch: ends a canary, or flips back to the previous color (through
    /// the gate on that color: `verdict_of` says what health says of it).
    pub fn decide_rollback(&self, force: bool, verdict_of: &dyn Fn(Color) -> Verdict, now_ms: u64) -> Result<Decision, String> {
        if self.canary_permille != 0 {
            return Ok(Decision::Switch(Plan {
                kind: Kind::CanaryCancelled,
                from: self.active,
                to: self.active,
                percent: Some(0),
                drain_secs: None,
                forced: false,
                force,
                generation: self.generation.saturating_add(1),
                drain: None,
                watch: None,
            }));
        }
        let Some(prev) = self.previous else {
            return Err("nothing to roll back: the active color has not changed since this state began".into());
        };
        let req = FlipRequest { to: prev, percent: None, drain_secs: None, force };
        Ok(match self.decide_flip(&req, &verdict_of(prev), now_ms)? {
            // A rollback opens no watch window: no back-and-forth.
            Decision::Switch(plan) => Decision::Switch(Plan { kind: Kind::Rollback, watch: None, ..plan }),
            other => other,
        })
    }

    /// Records a switch whose selector write succeeded.
    pub fn commit(&mut self, plan: &Plan, now_ms: u64) {
        if plan.active() != self.active {
            self.previous = Some(self.active);
            self.active_since_ms = now_ms;
        }
        self.active = plan.active();
        self.canary_permille = plan.canary_permille();
        self.generation = plan.generation;
        self.flips_total = self.flips_total.saturating_add(1);
        self.drain = plan.drain;
        self.drain_secs = plan.drain_secs.unwrap_or(0);
        self.watch = plan.watch;
        if matches!(plan.kind, Kind::Rollback | Kind::CanaryCancelled) {
            self.rollbacks_total = self.rollbacks_total.saturating_add(1);
        }
    }

    /// The switch that takes this state to a fleet's desired one (`active`, `canary_permille`,
    /// made by a switch of `kind`), decided elsewhere through the fleet-wide gate: this
    /// gateway opens its own watch window and drain for it, as for a switch of its own.
    /// None: already in place.
    #[allow(clippy::too_many_arguments)]
    /// `age_ms`: how long ago the switch was made; its watch window and drain run from then.
    pub fn adopt(
        &self,
        active: Color,
        canary_permille: u32,
        kind: Option<Kind>,
        force: bool,
        forced: bool,
        drain_secs: Option<u64>,
        generation: u64,
        now_ms: u64,
        age_ms: u64,
    ) -> Option<Plan> {
        if active == self.active && canary_permille == self.canary_permille {
            return None;
        }
        let (kind, from, to, percent) = if canary_permille != 0 {
            (Kind::Canary, active, active.other(), Some(canary_permille / 10))
        } else if kind == Some(Kind::CanaryCancelled) || (self.canary_permille != 0 && active == self.active) {
            (Kind::CanaryCancelled, active, active, Some(0))
        } else {
            (if kind == Some(Kind::Rollback) { Kind::Rollback } else { Kind::Flip }, self.active, active, None)
        };
        let drain = drain_secs
            .filter(|_| kind == Kind::Flip && self.active != active)
            .and_then(|s| deadline(now_ms, s.saturating_mul(1000).saturating_sub(age_ms), "a drain").ok())
            .map(|until_ms| Window { color: self.active, until_ms });
        let left_ms = self.watch_window_ms.saturating_sub(age_ms);
        let watch = (matches!(kind, Kind::Flip | Kind::Canary) && !force && left_ms > 0)
            .then(|| if kind == Kind::Canary { Some(CANARY_WATCH) } else { deadline(now_ms, left_ms, "a watch window").ok() })
            .flatten()
            .map(|until_ms| Window { color: to, until_ms });
        Some(Plan { kind, from, to, percent, drain_secs: drain.map(|_| drain_secs.unwrap_or(0)), forced, force, generation, drain, watch })
    }

    /// Records that an automatic rollback was carried out (after its `commit`).
    pub fn commit_auto_rollback(&mut self) {
        self.auto_rollbacks_total = self.auto_rollbacks_total.saturating_add(1);
    }

    /// What time alone decides, at `now_ms`: a watch window that ends or trips (at most once
    /// per switch: it is closed whatever follows), a drain that is due.
    pub fn tick(&mut self, now_ms: u64, verdict_of: &dyn Fn(Color) -> Verdict) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(w) = self.watch {
            if now_ms > w.until_ms {
                self.watch = None;
            } else {
                let v = verdict_of(w.color);
                // Unhealthy for a reason health confirmed (not merely not known yet).
                if !v.healthy && v.confirmed_down {
                    self.watch = None;
                    let why = format!("automatic rollback: {} unhealthy within the watch window: {}", w.color.name(), v.failing.join("; "));
                    // Back to the active color (a canary ends) or the previous one; only if
                    // that one is healthy: going from one sick color to another helps nobody.
                    let to = if self.canary_permille != 0 { self.active } else { self.previous.unwrap_or(w.color.other()) };
                    let skipped = |why: String| Action::AutoRollbackSkipped { from: self.active, to, why };
                    actions.push(if !verdict_of(to).healthy {
                        skipped(format!("{why}; {} unhealthy too", to.name()))
                    } else {
                        match self.decide_rollback(false, verdict_of, now_ms) {
                            // The drain, if one is due, is left to the switch: its commit
                            // replaces it, as every switch does (the color rolled back to
                            // is not drained; a rollback that fails to write leaves it due).
                            Ok(Decision::Switch(plan)) => return vec![Action::AutoRollback { plan, why }],
                            Ok(Decision::Refused { .. }) => skipped(format!("{why}; {} unhealthy too", to.name())),
                            Ok(Decision::Unchanged) => skipped(format!("{why}; already on {}", to.name())),
                            Err(e) => skipped(format!("{why}; {e}")),
                        }
                    });
                }
            }
        }
        if let Some(d) = self.drain {
            if now_ms >= d.until_ms {
                self.drain = None;
                actions.push(Action::Drain { color: d.color });
            }
        }
        actions
    }

    /// Seconds left of a window at `now_ms` (None: a canary's, which lasts until the next
    /// switch).
    pub fn remaining_secs(w: &Window, now_ms: u64) -> Option<u64> {
        (w.until_ms != CANARY_WATCH).then(|| w.until_ms.saturating_sub(now_ms) / 1000)
    }
}

fn deadline(now_ms: u64, after_ms: u64, what: &str) -> Result<u64, String> {
    now_ms.checked_add(after_ms).ok_or_else(|| format!("{what} of {} s is too long for this host's clock", after_ms / 1000))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, health::BackendHealth};
    use std::time::Instant;

    use Color::{Blue, Green};

    const CONFIG: &str = r#"
interfaces = ["eth0"]
[[service]]
name = "web"
vip = "10.100.0.1:80"
blue = ["10.1.0.2:8080", "10.1.0.3:8080"]
green = ["10.2.0.2:8080", "10.2.0.3:8080"]
[[service]]
name = "api"
vip = "10.100.0.2:80"
health = { healthy_share = 0.5 }
blue = ["10.1.1.2:8080", "10.1.1.3:8080"]
green = ["10.2.1.2:8080", { address = "10.2.1.3:8080", weight = 3 }]
"#;

    fn services() -> Vec<Service> {
        Config::parse(CONFIG).unwrap().services
    }

    fn h(state: HState) -> BackendHealth {
        BackendHealth { state, successes: 0, failures: 0, last: "x".into(), changed_at: Some(Instant::now()) }
    }

    /// A health table with every listed backend in `state`.
    fn table(entries: &[(&str, HState)]) -> Backends {
        entries.iter().map(|(a, s)| (a.parse().unwrap(), h(*s))).collect()
    }

    fn all(state: HState) -> Backends {
        let s = services();
        s.iter().flat_map(|s| s.blue.iter().chain(&s.green)).map(|b| (b.addr, h(state))).collect()
    }

    fn healthy() -> Verdict {
        Verdict { healthy: true, confirmed_down: false, failing: vec![] }
    }

    fn sick() -> Verdict {
        Verdict { healthy: false, confirmed_down: true, failing: vec!["10.2.0.2:8080 (down: refused)".into()] }
    }

    fn unknown() -> Verdict {
        Verdict { healthy: false, confirmed_down: false, failing: vec!["10.2.0.2:8080 (unknown: not checked yet)".into()] }
    }

    fn flip(to: Color) -> FlipRequest {
        FlipRequest { to, percent: None, drain_secs: None, force: false }
    }

    fn plan(d: Result<Decision, String>) -> Plan {
        match d {
            Ok(Decision::Switch(p)) => p,
            other => panic!("expected a switch, got {other:?}"),
        }
    }

    /// 30 s window, blue active, generation 1, at t = 0.
    fn fresh() -> Decisions {
        Decisions::new(Blue, 0, None, 1, 30, 0)
    }

    /// Flips and commits at `now`; returns the plan.
    fn flipped(d: &mut Decisions, req: FlipRequest, v: &Verdict, now: u64) -> Plan {
        let p = plan(d.decide_flip(&req, v, now));
        d.commit(&p, now);
        p
    }

    #[test]
    fn a_fleet_state_is_adopted_as_the_switch_that_makes_it_with_this_gateways_windows() {
        let d = fresh();
        // Already in place: nothing to write.
        assert_eq!(d.adopt(Blue, 0, Some(Kind::Flip), false, false, None, 5, 1000, 0), None);
        // A flip: this gateway's own 30 s watch window and the drain of what it had.
        let p = d.adopt(Green, 0, Some(Kind::Flip), false, false, Some(20), 2, 1000, 0).unwrap();
        assert_eq!((p.kind, p.from, p.to, p.active(), p.generation), (Kind::Flip, Blue, Green, Green, 2));
        assert_eq!(p.watch, Some(Window { color: Green, until_ms: 31_000 }));
        assert_eq!((p.drain, p.drain_secs), (Some(Window { color: Blue, until_ms: 21_000 }), Some(20)));
        // Forced: no watch window. A rollback: none either.
        assert_eq!(d.adopt(Green, 0, Some(Kind::Flip), true, true, None, 2, 0, 0).unwrap().watch, None);
        let r = d.adopt(Green, 0, Some(Kind::Rollback), false, false, None, 3, 0, 0).unwrap();
        assert_eq!((r.kind, r.watch), (Kind::Rollback, None));
        // A canary keeps the active color and sends its share to the other, watched while it runs.
        let c = d.adopt(Blue, 100, Some(Kind::Canary), false, false, None, 4, 0, 0).unwrap();
        assert_eq!((c.kind, c.active(), c.to, c.canary_permille()), (Kind::Canary, Blue, Green, 100));
        assert_eq!(c.watch.map(|w| w.until_ms), Some(CANARY_WATCH));
        // Caught up 20 s after the flip: 10 s of the 30 s window left; 40 s after: none.
        let late = d.adopt(Green, 0, Some(Kind::Flip), false, false, Some(25), 2, 1000, 20_000).unwrap();
        assert_eq!((late.watch.map(|w| w.until_ms), late.drain.map(|w| w.until_ms)), (Some(11_000), Some(6_000)));
        assert_eq!(d.adopt(Green, 0, Some(Kind::Flip), false, false, None, 2, 1000, 40_000).unwrap().watch, None);
        // A gateway that missed the canary's start still lands on the fleet's state.
        let mut g = fresh();
        g.commit(&c, 0);
        let end = g.adopt(Blue, 0, Some(Kind::CanaryCancelled), false, false, None, 5, 0, 0).unwrap();
        assert_eq!((end.kind, end.active(), end.canary_permille()), (Kind::CanaryCancelled, Blue, 0));
        let moved_on = g.adopt(Green, 0, None, false, false, None, 6, 0, 0).unwrap();
        assert_eq!((moved_on.kind, moved_on.active(), moved_on.canary_permille()), (Kind::Flip, Green, 0));
    }

    #[test]
    fn a_color_is_healthy_when_every_service_has_its_share_up() {
        let s = services();
        let v = verdict(&s, Green, &all(HState::Up));
        assert_eq!((v.healthy, v.confirmed_down, v.failing.len()), (true, false, 0));
        // web needs both (share 1.0): one down makes green unhealthy, and says which.
        let mut t = all(HState::Up);
        t.insert("10.2.0.3:8080".parse().unwrap(), h(HState::Down));
        let v = verdict(&s, Green, &t);
        assert_eq!((v.healthy, v.confirmed_down), (false, true));
        assert_eq!(v.failing, vec!["10.2.0.3:8080 (down: x)".to_owned()]);
        // api needs half: one of two down is still healthy, though listed as failing.
        let mut t = all(HState::Up);
        t.insert("10.2.1.2:8080".parse().unwrap(), h(HState::Down));
        let v = verdict(&s, Green, &t);
        assert_eq!((v.healthy, v.confirmed_down, v.failing.len()), (true, true, 1));
        // A long list is cut at VERDICT_BACKENDS, the rest counted.
        let many: Vec<Service> = (0..30).flat_map(|_| services()).collect();
        let v = verdict(&many, Green, &Backends::new());
        assert_eq!(v.failing.len(), VERDICT_BACKENDS + 1);
        assert_eq!(v.failing.last().unwrap(), "and 70 more not up (`bgctl backends --color green` lists them)");
        // Not yet checked: not healthy, but nothing confirmed down.
        let v = verdict(&s, Green, &Backends::new());
        assert_eq!((v.healthy, v.confirmed_down, v.failing.len()), (false, false, 4));
        // Blue is judged on blue's backends alone.
        let t = table(&[("10.1.0.2:8080", HState::Up), ("10.1.0.3:8080", HState::Up), ("10.1.1.2:8080", HState::Up)]);
        assert!(verdict(&s, Blue, &t).healthy);
        assert!(!verdict(&s, Green, &t).healthy);
    }

    #[test]
    fn backends_confirmed_down_get_weight_zero_and_unknown_ones_keep_theirs() {
        let s = services();
        assert_eq!(effective_weights(&s, Green, &Backends::new()), vec![vec![1, 1], vec![1, 3]]);
        let t = table(&[("10.2.1.3:8080", HState::Down), ("10.2.0.2:8080", HState::Up)]);
        assert_eq!(effective_weights(&s, Green, &t), vec![vec![1, 1], vec![1, 0]]);
        assert_eq!(effective_weights(&s, Blue, &t), vec![vec![1, 1], vec![1, 1]]);
    }

    #[test]
    fn a_flip_passes_the_gate_switches_and_opens_a_window() {
        let mut d = fresh();
        let p = flipped(&mut d, flip(Green), &healthy(), 1_000);
        assert_eq!((p.kind, p.from, p.to, p.active(), p.canary_permille(), p.generation), (Kind::Flip, Blue, Green, Green, 0, 2));
        assert_eq!(p.watch, Some(Window { color: Green, until_ms: 31_000 }));
        assert_eq!((d.active, d.previous, d.generation, d.active_since_ms, d.flips_total), (Green, Some(Blue), 2, 1_000, 1));
        // The same flip again: nothing to write, nothing counted.
        assert_eq!(d.decide_flip(&flip(Green), &healthy(), 2_000), Ok(Decision::Unchanged));
    }

    #[test]
    fn the_gate_refuses_an_unhealthy_or_unknown_color_unless_forced() {
        let d = fresh();
        for v in [sick(), unknown()] {
            match d.decide_flip(&flip(Green), &v, 0) {
                Ok(Decision::Refused { to: Green, failing }) => assert_eq!(failing, v.failing),
                other => panic!("{other:?}"),
            }
        }
        let p = plan(d.decide_flip(&FlipRequest { force: true, ..flip(Green) }, &sick(), 0));
        assert!(p.forced, "forced past the gate");
        assert_eq!(p.watch, None, "a forced flip opens no watch window");
        // --force on a healthy color passes no failing gate, but still turns automatic
        // rollback off for this switch: the operator overrides it.
        let p = plan(d.decide_flip(&FlipRequest { force: true, ..flip(Green) }, &healthy(), 0));
        assert!(!p.forced && p.force && p.watch.is_none());
        assert_eq!(p.auto_rollback(), "off for this switch (--force)");
        let p = plan(d.decide_flip(&flip(Green), &healthy(), 0));
        assert!(p.auto_rollback().starts_with("on for the watch window"), "{}", p.auto_rollback());
    }

    #[test]
    fn bad_requests_are_refused_with_what_to_do() {
        let d = fresh();
        let err = |req: FlipRequest| d.decide_flip(&req, &healthy(), 0).unwrap_err();
        assert!(err(FlipRequest { percent: Some(0), ..flip(Green) }).contains("--percent 0 is out of range; use 1 to 99"));
        assert!(err(FlipRequest { percent: Some(100), ..flip(Green) }).contains("--percent 100 is out of range"));
        assert!(err(FlipRequest { percent: Some(10), drain_secs: Some(5), ..flip(Green) }).contains("nothing to drain"));
        assert!(err(FlipRequest { drain_secs: Some(MAX_DRAIN_SECS + 1), ..flip(Green) }).contains("--drain 86401 is out of range"));
        assert!(err(FlipRequest { percent: Some(10), ..flip(Blue) }).contains("blue is already active; a canary goes to the other color"));
        // A clock near its end: the deadline would overflow, so nothing is planned.
        let e = d.decide_flip(&FlipRequest { drain_secs: Some(10), ..flip(Green) }, &healthy(), u64::MAX - 5).unwrap_err();
        assert!(e.contains("a drain of 10 s is too long for this host's clock"), "{e}");
        let e = d.decide_flip(&flip(Green), &healthy(), u64::MAX - 5).unwrap_err();
        assert!(e.contains("a watch window of 30 s"), "{e}");
    }

    #[test]
    fn a_canary_keeps_the_active_color_and_a_flip_or_rollback_ends_it() {
        let mut d = fresh();
        let p = flipped(&mut d, FlipRequest { percent: Some(25), ..flip(Green) }, &healthy(), 0);
        assert_eq!((p.kind, p.active(), p.canary_permille()), (Kind::Canary, Blue, 250));
        assert_eq!(p.watch, Some(Window { color: Green, until_ms: CANARY_WATCH }), "the canary's color is watched while it runs");
        assert_eq!(Decisions::remaining_secs(p.watch.as_ref().unwrap(), 0), None);
        assert_eq!((d.active, d.canary_permille, d.previous), (Blue, 250, None));
        // Rollback ends the canary: blue keeps every new flow.
        let r = plan(d.decide_rollback(false, &|_| sick(), 10));
        assert_eq!((r.kind, r.active(), r.canary_permille(), r.watch), (Kind::CanaryCancelled, Blue, 0, None));
        d.commit(&r, 10);
        assert_eq!((d.canary_permille, d.rollbacks_total, d.generation), (0, 1, 3));
        // A canary, then a plain flip to blue (already active): ends the canary, not a no-op.
        flipped(&mut d, FlipRequest { percent: Some(10), ..flip(Green) }, &healthy(), 20);
        let p = flipped(&mut d, flip(Blue), &healthy(), 30);
        assert_eq!((p.active(), p.canary_permille(), d.canary_permille), (Blue, 0, 0));
        // A canary then a full flip to green.
        flipped(&mut d, FlipRequest { percent: Some(10), ..flip(Green) }, &healthy(), 40);
        let p = flipped(&mut d, flip(Green), &healthy(), 50);
        assert_eq!((p.active(), d.active, d.previous, d.canary_permille), (Green, Green, Some(Blue), 0));
    }

    #[test]
    fn a_rollback_goes_back_through_the_gate_and_opens_no_window() {
        let mut d = fresh();
        assert!(d.decide_rollback(false, &|_| healthy(), 0).unwrap_err().contains("nothing to roll back"));
        flipped(&mut d, flip(Green), &healthy(), 0);
        // Blue sick: refused, unless forced.
        assert!(matches!(d.decide_rollback(false, &|_| sick(), 5), Ok(Decision::Refused { to: Blue, .. })));
        let r = plan(d.decide_rollback(true, &|_| sick(), 5));
        assert_eq!((r.kind, r.active(), r.forced, r.watch), (Kind::Rollback, Blue, true, None));
        d.commit(&r, 5);
        assert_eq!((d.active, d.previous, d.watch, d.rollbacks_total), (Blue, Some(Green), None, 1));
    }

    #[test]
    fn the_watched_color_failing_inside_its_window_rolls_back_once() {
        let mut d = fresh();
        flipped(&mut d, flip(Green), &healthy(), 0);
        // Healthy, or unknown without anything confirmed down: nothing happens.
        assert_eq!(d.tick(1_000, &|_| healthy()), vec![]);
        assert_eq!(d.tick(2_000, &|c| if c == Green { unknown() } else { healthy() }), vec![]);
        assert!(d.watch.is_some());
        // Green confirmed down at 29.9 s, blue healthy: one rollback to blue.
        let actions = d.tick(29_900, &|c| if c == Green { sick() } else { healthy() });
        let [Action::AutoRollback { plan, why }] = actions.as_slice() else { panic!("{actions:?}") };
        assert_eq!((plan.kind, plan.active(), plan.watch), (Kind::Rollback, Blue, None));
        assert!(why.contains("green unhealthy within the watch window: 10.2.0.2:8080 (down: refused)"), "{why}");
        d.commit(plan, 29_900);
        d.commit_auto_rollback();
        assert_eq!((d.active, d.auto_rollbacks_total, d.rollbacks_total, d.watch), (Blue, 1, 1, None));
        // Blue dies too afterwards: no window is open, so no flip back to green.
        assert_eq!(d.tick(30_000, &|_| sick()), vec![]);
        assert_eq!(d.active, Blue);
    }

    #[test]
    fn the_window_expires_and_a_later_switch_makes_it_moot() {
        let mut d = fresh();
        flipped(&mut d, flip(Green), &healthy(), 0);
        // At the last millisecond it still counts; one past, it is gone.
        let mut e = d.clone();
        assert_eq!(e.tick(30_000, &|c| if c == Green { sick() } else { healthy() }).len(), 1);
        assert_eq!(d.tick(30_001, &|c| if c == Green { sick() } else { healthy() }), vec![]);
        assert_eq!((d.watch, d.active), (None, Green));
        // A switch since (a canary back to blue) replaces the window: green failing later
        // trips nothing of the old flip's.
        let mut d = fresh();
        flipped(&mut d, flip(Green), &healthy(), 0);
        let p = flipped(&mut d, FlipRequest { percent: Some(10), ..flip(Blue) }, &healthy(), 1_000);
        assert_eq!(p.watch.map(|w| w.color), Some(Blue));
        assert_eq!(d.tick(2_000, &|c| if c == Green { sick() } else { healthy() }), vec![]);
        // A window of 0 s opens nothing.
        let mut d = Decisions::new(Blue, 0, None, 1, 0, 0);
        assert_eq!(flipped(&mut d, flip(Green), &healthy(), 0).watch, None);
    }

    #[test]
    fn an_automatic_rollback_to_an_unhealthy_color_is_skipped_and_said() {
        let mut d = fresh();
        flipped(&mut d, flip(Green), &healthy(), 0);
        let actions = d.tick(1_000, &|_| sick());
        assert_eq!(
            actions,
            vec![Action::AutoRollbackSkipped {
                from: Green,
                to: Blue,
                why: "automatic rollback: green unhealthy within the watch window: 10.2.0.2:8080 (down: refused); blue unhealthy too".into()
            }]
        );
        // Once: the window is closed, and blue coming back later changes nothing.
        assert_eq!(d.tick(2_000, &|c| if c == Green { sick() } else { healthy() }), vec![]);
        assert_eq!(d.active, Green);
    }

    #[test]
    fn a_canary_whose_color_fails_is_ended_automatically() {
        let mut d = fresh();
        flipped(&mut d, FlipRequest { percent: Some(10), ..flip(Green) }, &healthy(), 0);
        let actions = d.tick(500, &|c| if c == Green { sick() } else { healthy() });
        let [Action::AutoRollback { plan, .. }] = actions.as_slice() else { panic!("{actions:?}") };
        assert_eq!((plan.kind, plan.active(), plan.canary_permille()), (Kind::CanaryCancelled, Blue, 0));
    }

    #[test]
    fn an_slo_breach_trips_the_watch_window_and_ends_a_canary_past_the_window() {
        let breach = || with_breaches(healthy(), vec!["service web on green: 20 of 20 handshakes failed".into()]);
        assert!(!breach().healthy && breach().confirmed_down);
        assert_eq!(breach().failing, vec!["SLO breach: service web on green: 20 of 20 handshakes failed".to_owned()]);
        assert_eq!(with_breaches(healthy(), vec![]), healthy());
        // A flip: the breach rolls back once, and the audit's reason carries the figures.
        let mut d = fresh();
        flipped(&mut d, flip(Green), &healthy(), 0);
        let actions = d.tick(3_000, &|c| if c == Green { breach() } else { healthy() });
        let [Action::AutoRollback { plan, why }] = actions.as_slice() else { panic!("{actions:?}") };
        assert_eq!(plan.active(), Blue);
        assert!(why.contains("SLO breach: service web on green: 20 of 20 handshakes failed"), "{why}");
        // A canary an hour in (far past the 30 s window): the breach still ends it.
        let mut d = fresh();
        flipped(&mut d, FlipRequest { percent: Some(10), ..flip(Green) }, &healthy(), 0);
        let actions = d.tick(3_600_000, &|c| if c == Green { breach() } else { healthy() });
        let [Action::AutoRollback { plan, .. }] = actions.as_slice() else { panic!("{actions:?}") };
        assert_eq!((plan.kind, plan.canary_permille()), (Kind::CanaryCancelled, 0));
        // Forced: nothing watches it.
        let mut d = fresh();
        flipped(&mut d, FlipRequest { force: true, ..flip(Green) }, &healthy(), 0);
        assert_eq!(d.tick(1_000, &|c| if c == Green { breach() } else { healthy() }), vec![]);
        assert_eq!(d.active, Green);
    }

    #[test]
    fn a_failing_canary_is_kept_when_the_active_color_is_unhealthy_too() {
        let mut d = fresh();
        flipped(&mut d, FlipRequest { percent: Some(10), ..flip(Green) }, &healthy(), 0);
        let actions = d.tick(500, &|_| sick());
        assert!(matches!(actions.as_slice(), [Action::AutoRollbackSkipped { to: Blue, .. }]), "{actions:?}");
        assert_eq!(d.canary_permille, 100);
    }

    #[test]
    fn a_drain_is_due_at_its_deadline_unless_another_switch_came() {
        let mut d = fresh();
        let p = flipped(&mut d, FlipRequest { drain_secs: Some(5), ..flip(Green) }, &healthy(), 100);
        assert_eq!(p.drain, Some(Window { color: Blue, until_ms: 5_100 }));
        assert_eq!(d.tick(5_099, &|_| healthy()), vec![]);
        assert_eq!(d.tick(5_100, &|_| healthy()), vec![Action::Drain { color: Blue }]);
        assert_eq!((d.tick(9_000, &|_| healthy()), d.drain), (vec![], None), "once");
        // A drain overtaken by another switch (of any kind) is dropped.
        let mut d = fresh();
        flipped(&mut d, FlipRequest { drain_secs: Some(5), ..flip(Green) }, &healthy(), 0);
        let p = plan(d.decide_flip(&FlipRequest { percent: Some(10), ..flip(Blue) }, &healthy(), 1_000));
        assert_eq!(p.drain, None);
        d.commit(&p, 1_000);
        assert_eq!(d.tick(6_000, &|_| healthy()), vec![]);
        // --drain 0 ends the old color's flows at the next tick.
        let mut d = fresh();
        flipped(&mut d, FlipRequest { drain_secs: Some(0), ..flip(Green) }, &healthy(), 7);
        assert_eq!(d.tick(7, &|_| healthy()), vec![Action::Drain { color: Blue }]);
    }

    #[test]
    fn a_rollback_in_the_tick_a_drain_falls_due_drains_nothing() {
        let mut d = fresh();
        flipped(&mut d, FlipRequest { drain_secs: Some(0), ..flip(Green) }, &healthy(), 0);
        let actions = d.tick(0, &|c| if c == Green { sick() } else { healthy() });
        let [Action::AutoRollback { plan, .. }] = actions.as_slice() else { panic!("a rollback to blue and no drain of blue: {actions:?}") };
        d.commit(plan, 0);
        assert_eq!(d.drain, None);
        assert_eq!(d.tick(1, &|_| healthy()), vec![], "nor one later");
    }

    #[test]
    fn counters_and_the_generation_saturate() {
        let mut d = Decisions::new(Blue, 0, None, u64::MAX, 30, 0);
        d.flips_total = u64::MAX;
        let p = flipped(&mut d, flip(Green), &healthy(), 0);
        assert_eq!((p.generation, d.generation, d.flips_total), (u64::MAX, u64::MAX, u64::MAX));
        assert_eq!(Decisions::remaining_secs(&p.watch.unwrap(), 40_000), Some(0));
        assert_eq!(Decisions::remaining_secs(&p.watch.unwrap(), 500), Some(29));
    }
}
