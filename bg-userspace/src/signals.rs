//! Connection signals: what real traffic sees, per service and color, from the data path's
//! counters (`bg_common::BackendSignals`, the handshake latency histograms), and the SLOs
//! judged on them (README "Connection signals").
//!
//! A sampler thread reads the counters every `SAMPLE_EVERY` and keeps enough readings to
//! cover the longest SLO window; `figures` turns two readings into a window's figures and
//! `judge` says whether they breach a service's SLO. Both are pure: tested on the host.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use aya::maps::{MapData, PerCpuArray};
use bg_common::{signal_index, BackendSignals, Color, LatencyHist, LATENCY_BUCKETS, LATENCY_SHIFT};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::config::{Service, Slo};

/// How often the sampler reads the counters.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// One reading of every configured backend's counters (summed over CPUs) and of every
/// (service, color)'s latency histogram: `blocks[service * 2 + color][backend]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reading {
    pub blocks: Vec<Vec<BackendSignals>>,
    pub latency: Vec<[u64; LATENCY_BUCKETS]>,
}

impl Reading {
    /// Each (service, color)'s backends summed.
    pub fn sums(&self) -> Sums {
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                let mut t = BackendSignals::default();
                b.iter().for_each(|x| add(&mut t, x));
                t
            })
            .collect();
        Sums { blocks, latency: self.latency.clone() }
    }
}

/// A reading summed per (service, color): what windows are computed from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sums {
    pub blocks: Vec<BackendSignals>,
    pub latency: Vec<[u64; LATENCY_BUCKETS]>,
}

/// The `u64` counters a counter struct is made of (`BackendSignals`, `LatencyHist`, a
/// histogram's buckets): all of them, so a field added later is summed too.
fn counters<T: bytemuck::Pod>(t: &T) -> &[u64] {
    bytemuck::cast_slice(std::slice::from_ref(t))
}

/// `t += b`, counter by counter.
pub fn add<T: bytemuck::Pod>(t: &mut T, b: &T) {
    let t: &mut [u64] = bytemuck::cast_slice_mut(std::slice::from_mut(t));
    t.iter_mut().zip(counters(b)).for_each(|(x, y)| *x += y);
}

/// `new - old`, counter by counter (0 where a counter went back).
fn delta<T: bytemuck::Pod>(new: &T, old: &T) -> T {
    let mut d = *new;
    let out: &mut [u64] = bytemuck::cast_slice_mut(std::slice::from_mut(&mut d));
    out.iter_mut().zip(counters(old)).for_each(|(x, y)| *x = x.saturating_sub(*y));
    d
}

/// A latency in histogram units, in milliseconds.
fn units_ms(units: f64) -> f64 {
    units * (1u64 << LATENCY_SHIFT) as f64 / 1e6
}

/// Where bucket `k` starts and ends, in units (the last one is taken as twice its start).
pub fn bucket_bounds(k: usize) -> (f64, f64) {
    if k == 0 {
        (0.0, 1.0)
    } else {
        let lo = (1u64 << (k - 1)) as f64;
        (lo, lo * 2.0)
    }
}

/// The bucket holding the `q` quantile (0..1) of a histogram, and where inside it the
/// quantile's rank falls (0..1); None when the histogram is empty.
fn quantile_bucket(hist: &[u64; LATENCY_BUCKETS], q: f64) -> Option<(usize, f64)> {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (k, &n) in hist.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            return Some((k, ((rank - below as f64) / n as f64).clamp(0.0, 1.0)));
        }
        below += n;
    }
    Some((LATENCY_BUCKETS - 1, 1.0))
}

/// Where the `q` quantile's bucket starts, in milliseconds: a bound the quantile is surely
/// at or above (the latency SLO is judged on it, so log2 buckets cannot make a healthy
/// color look up to twice as slow as it is). None when the histogram is empty.
pub fn quantile_floor_ms(hist: &[u64; LATENCY_BUCKETS], q: f64) -> Option<f64> {
    quantile_bucket(hist, q).map(|(k, _)| units_ms(bucket_bounds(k).0))
}

/// The `q` quantile (0..1) of a histogram in milliseconds, interpolated linearly inside its
/// bucket (as Prometheus' `histogram_quantile` does); None when it is empty.
pub fn quantile_ms(hist: &[u64; LATENCY_BUCKETS], q: f64) -> Option<f64> {
    quantile_bucket(hist, q).map(|(k, within)| {
        let (lo, hi) = bucket_bounds(k);
        units_ms(lo + (hi - lo) * within)
    })
}

/// One (service, color)'s figures over a window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    pub service: String,
    pub color: String,
    /// The time the figures cover (the window, or less right after the agent started).
    pub secs: f64,
    pub new_flows: u64,
    pub answered: u64,
    pub refused: u64,
    pub no_answer: u64,
    pub resets: u64,
    pub bytes_to: u64,
    pub bytes_from: u64,
    /// Handshakes that entered the latency histogram (answered ones, late ones included).
    pub handshakes: u64,
    /// (refused + no answer) / (answered + refused + no answer); None with no such flow.
    pub failure_share: Option<f64>,
    /// resets / answered; None with no answered flow.
    pub reset_share: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    /// Where the p95's log2 bucket starts: the p95 is at least this (what the SLO judges).
    #[serde(default)]
    pub p95_floor_ms: Option<f64>,
    /// Whether enough flows were decided for the SLO to judge (`min_flows`).
    pub judged: bool,
    /// What the figures breach, in words; None when within the SLO (or not judged).
    pub breach: Option<String>,
}

impl Figures {
    /// Flows whose handshake was decided.
    pub fn decided(&self) -> u64 {
        self.answered + self.refused + self.no_answer
    }

    /// Whether the window saw traffic (or a breach): what status and audit lines list.
    pub fn busy(&self) -> bool {
        self.new_flows > 0 || self.decided() > 0 || self.handshakes > 0 || self.resets > 0 || self.breach.is_some()
    }
}

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

/// Figures between two readings of one block (`service * 2 + color`), judged by `slo`.
pub fn figures(service: &str, color: Color, block: usize, old: &Sums, new: &Sums, secs: f64, slo: &Slo) -> Figures {
    let zero = BackendSignals::default();
    let d = delta(new.blocks.get(block).unwrap_or(&zero), old.blocks.get(block).unwrap_or(&zero));
    let none = [0u64; LATENCY_BUCKETS];
    let hist = delta(new.latency.get(block).unwrap_or(&none), old.latency.get(block).unwrap_or(&none));
    let decided = d.answered + d.refused + d.no_answer;
    let mut f = Figures {
        service: service.to_owned(),
        color: color.name().to_owned(),
        secs,
        new_flows: d.new_flows,
        answered: d.answered,
        refused: d.refused,
        no_answer: d.no_answer,
        resets: d.resets,
        bytes_to: d.bytes_to,
        bytes_from: d.bytes_from,
        handshakes: hist.iter().sum(),
        failure_share: (decided > 0).then(|| (d.refused + d.no_answer) as f64 / decided as f64),
        reset_share: (d.answered > 0).then(|| (d.resets as f64 / d.answered as f64).min(1.0)),
        p50_ms: quantile_ms(&hist, 0.5),
        p95_ms: quantile_ms(&hist, 0.95),
        p95_floor_ms: quantile_floor_ms(&hist, 0.95),
        judged: false,
        breach: None,
    };
    judge(&mut f, slo);
    f
}

/// Judges figures by an SLO: each threshold (0 is off) is judged only on at least
/// `min_flows` flows of its own kind (decided flows, answered ones, timed handshakes).
pub fn judge(f: &mut Figures, slo: &Slo) {
    let mut breaches = Vec::new();
    let decided = f.decided();
    f.judged = decided >= slo.min_flows;
    let window = format!("in the last {:.0} s", f.secs);
    if let Some(share) = f.failure_share.filter(|_| f.judged && slo.max_handshake_failure_share > 0.0) {
        if share > slo.max_handshake_failure_share {
            breaches.push(format!(
                "{} of {decided} handshakes failed {window} ({} refused, {} unanswered): {} > {}",
                f.refused + f.no_answer,
                f.refused,
                f.no_answer,
                pct(share),
                pct(slo.max_handshake_failure_share)
            ));
        }
    }
    if let Some(share) = f.reset_share.filter(|_| f.answered >= slo.min_flows && slo.max_reset_share > 0.0) {
        if share > slo.max_reset_share {
            breaches.push(format!(
                "{} of {} answered flows reset by the backend {window}: {} > {}",
                f.resets,
                f.answered,
                pct(share),
                pct(slo.max_reset_share)
            ));
        }
    }
    let max_ms = slo.max_p95_handshake.as_secs_f64() * 1000.0;
    if let Some(floor) = f.p95_floor_ms.filter(|_| f.handshakes >= slo.min_flows && max_ms > 0.0) {
        if floor > max_ms {
            breaches.push(format!(
                "p95 handshake at least {floor:.1} ms (about {:.1} ms) over {} handshakes {window}: > {max_ms:.0} ms",
                f.p95_ms.unwrap_or(floor),
                f.handshakes
            ));
        }
    }
    f.breach = (!breaches.is_empty()).then(|| format!("service {} on {}: {}", f.service, f.color, breaches.join("; ")));
}

/// The sampler's readings and the figures of the last window of every (service, color).
#[derive(Default)]
pub struct View {
    /// The latest reading (cumulative counters, for metrics) and when it was taken.
    pub latest: Option<(Instant, Reading)>,
    /// Per service, blue then green: `figures[service * 2 + color]`.
    pub figures: Vec<Figures>,
}

impl View {
    /// What `color` breaches, one line per service.
    pub fn breaches(&self, color: Color) -> Vec<String> {
        self.figures.iter().filter(|f| f.color == color.name()).filter_map(|f| f.breach.clone()).collect()
    }
}

pub type Shared = Arc<Mutex<View>>;

/// The signal maps on handles of their own, and where each configured backend's entry is.
pub struct Maps {
    pub signals: aya::maps::Map,
    pub latency: aya::maps::Map,
    /// Backends per (service, color), in config order.
    pub counts: Vec<usize>,
    /// Read with batch lookups (a few syscalls per reading; at the maximum config, tens of
    /// thousands of entries); off, or on a kernel without them: one lookup per entry.
    pub batch: bool,
}

impl Maps {
    /// Reads every configured backend's signals and every histogram, summed over CPUs.
    pub fn read(&self) -> anyhow::Result<Reading> {
        if self.batch {
            if let Some(r) = self.read_batched()? {
                return Ok(r);
            }
        }
        self.read_each()
    }

    /// `read` by batch lookups; None on a kernel without them.
    fn read_batched(&self) -> anyhow::Result<Option<Reading>> {
        let mut r = Reading {
            blocks: self.counts.iter().map(|&n| vec![BackendSignals::default(); n]).collect(),
            latency: vec![[0u64; LATENCY_BUCKETS]; self.counts.len()],
        };
        let entries = (self.counts.len() * bg_common::MAX_BACKENDS) as u32;
        let counts = &self.counts;
        let blocks = &mut r.blocks;
        let ok = crate::dataplane::percpu_batch::<BackendSignals>(&self.signals, entries, |i, v| {
            let (block, j) = (i as usize / bg_common::MAX_BACKENDS, i as usize % bg_common::MAX_BACKENDS);
            if j < counts.get(block).copied().unwrap_or(0) {
                add(&mut blocks[block][j], v);
            }
        })?;
        if !ok {
            return Ok(None);
        }
        let latency = &mut r.latency;
        crate::dataplane::percpu_batch::<LatencyHist>(&self.latency, counts.len() as u32, |i, v| {
            if let Some(h) = latency.get_mut(i as usize) {
                add(h, &v.buckets);
            }
        })?;
        Ok(Some(r))
    }

    /// `read`, one lookup per entry.
    fn read_each(&self) -> anyhow::Result<Reading> {
        let signals: PerCpuArray<&MapData, BackendSignals> = PerCpuArray::try_from(&self.signals)?;
        let latency: PerCpuArray<&MapData, LatencyHist> = PerCpuArray::try_from(&self.latency)?;
        let mut r = Reading::default();
        for (block, &n) in self.counts.iter().enumerate() {
            let (service, color) = ((block / 2) as u32, (block % 2) as u32);
            let mut v = Vec::with_capacity(n);
            for j in 0..n as u32 {
                let mut t = BackendSignals::default();
                for c in signals.get(&signal_index(service, color, j), 0).context("reading a backend's signals")?.iter() {
                    add(&mut t, c);
                }
                v.push(t);
            }
            r.blocks.push(v);
            let mut h = [0u64; LATENCY_BUCKETS];
            for c in latency.get(&(block as u32), 0).context("reading a latency histogram")?.iter() {
                add(&mut h, &c.buckets);
            }
            r.latency.push(h);
        }
        Ok(r)
    }
}

/// Keeps readings for the longest window and computes every service's figures over its own.
pub struct Sampler {
    services: Vec<Service>,
    readings: VecDeque<(Instant, Sums)>,
    longest: Duration,
}

impl Sampler {
    pub fn new(services: Vec<Service>) -> Sampler {
        let longest = services.iter().map(|s| s.slo.window).max().unwrap_or_default();
        Sampler { services, readings: VecDeque::new(), longest }
    }

    /// Adds a reading taken at `at` and returns the figures of every window ending there.
    /// Readings are kept back to the latest one at least the longest window old.
    pub fn push(&mut self, at: Instant, r: Sums) -> Vec<Figures> {
        self.readings.push_back((at, r));
        while self.readings.get(1).is_some_and(|(t, _)| at.duration_since(*t) >= self.longest) {
            self.readings.pop_front();
        }
        let (_, new) = self.readings.back().expect("just pushed");
        let mut out = Vec::with_capacity(self.services.len() * 2);
        for (i, s) in self.services.iter().enumerate() {
            // The latest reading at least a window old (or the oldest one kept).
            let (t0, old) = self
                .readings
                .iter()
                .rev()
                .find(|(t, _)| at.duration_since(*t) >= s.slo.window)
                .unwrap_or_else(|| self.readings.front().expect("not empty"));
            let secs = at.duration_since(*t0).as_secs_f64();
            for c in Color::ALL {
                out.push(figures(&s.name, c, i * 2 + c as usize, old, new, secs, &s.slo));
            }
        }
        out
    }
}

/// Reads the signal maps every `SAMPLE_EVERY` on a thread of its own (no lock of the agent's
/// held while reading), resting at least four times as long as a read took.
pub fn spawn(maps: Maps, services: Vec<Service>) -> anyhow::Result<Shared> {
    let view: Shared = Arc::new(Mutex::new(View::default()));
    let out = view.clone();
    let mut sampler = Sampler::new(services);
    std::thread::Builder::new()
        .name("bg-signals".into())
        .spawn(move || loop {
            let started = Instant::now();
            match maps.read() {
                Ok(r) => {
                    let figures = sampler.push(started, r.sums());
                    let mut v = crate::lock(&out);
                    v.latest = Some((started, r));
                    v.figures = figures;
                }
                Err(e) => {
                    // No judgement on old figures: a breach must not outlive what showed it.
                    crate::lock(&out).figures.clear();
                    warn!(error = %format!("{e:#}"), "reading the connection signals failed; no SLO is judged until a reading succeeds");
                }
            }
            std::thread::sleep((started.elapsed() * 4).max(SAMPLE_EVERY));
        })
        .context("starting the signal sampler")?;
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slo() -> Slo {
        Slo {
            window: Duration::from_secs(5),
            min_flows: 20,
            max_handshake_failure_share: 0.5,
            max_reset_share: 0.5,
            max_p95_handshake: Duration::from_millis(1000),
        }
    }

    /// One block (service 0, blue) with these totals and histogram.
    fn reading(s: BackendSignals, hist: [u64; LATENCY_BUCKETS]) -> Sums {
        Reading { blocks: vec![vec![s], vec![]], latency: vec![hist, [0; LATENCY_BUCKETS]] }.sums()
    }

    fn sig(answered: u64, refused: u64, no_answer: u64, resets: u64) -> BackendSignals {
        BackendSignals { new_flows: answered + refused + no_answer, answered, refused, no_answer, resets, ..Default::default() }
    }

    fn judged(s: BackendSignals, hist: [u64; LATENCY_BUCKETS], slo: &Slo) -> Figures {
        figures("web", Color::Blue, 0, &Sums::default(), &reading(s, hist), 5.0, slo)
    }

    /// `n` handshakes all in the bucket of `ms`.
    fn hist_at(ms: f64, n: u64) -> [u64; LATENCY_BUCKETS] {
        let units = (ms * 1e6) as u64 >> LATENCY_SHIFT;
        let mut h = [0; LATENCY_BUCKETS];
        h[bg_common::latency_bucket(units as u32) as usize] = n;
        h
    }

    #[test]
    fn quantiles_interpolate_inside_log2_buckets() {
        let mut h = [0u64; LATENCY_BUCKETS];
        assert_eq!(quantile_ms(&h, 0.5), None);
        // 100 handshakes in bucket 10: [512, 1024) units = [0.524, 1.049) ms.
        h[10] = 100;
        let p50 = quantile_ms(&h, 0.5).unwrap();
        assert!((p50 - 0.786).abs() < 0.001, "p50 {p50}");
        let p95 = quantile_ms(&h, 0.95).unwrap();
        assert!((p95 - 1.022).abs() < 0.001, "p95 {p95}");
        // 90 fast (bucket 5), 10 slow (bucket 20: [0.537, 1.074) s): p50 fast, p95 slow.
        let mut h = [0u64; LATENCY_BUCKETS];
        h[5] = 90;
        h[20] = 10;
        assert!(quantile_ms(&h, 0.5).unwrap() < 0.05);
        let p95 = quantile_ms(&h, 0.95).unwrap();
        assert!((536.0..=1074.0).contains(&p95), "p95 {p95}");
    }

    #[test]
    fn healthy_traffic_breaches_nothing() {
        let f = judged(sig(1000, 0, 0, 2), hist_at(0.3, 1000), &slo());
        assert!(f.judged);
        assert_eq!(f.breach, None, "{f:?}");
        assert_eq!(f.failure_share, Some(0.0));
    }

    #[test]
    fn refused_and_unanswered_handshakes_breach_the_failure_share() {
        let f = judged(sig(5, 10, 10, 0), hist_at(0.3, 5), &slo());
        let b = f.breach.expect("breach");
        assert!(b.contains("20 of 25 handshakes failed") && b.contains("10 refused, 10 unanswered") && b.contains("80% > 50%"), "{b}");
        // Exactly at the threshold is within it.
        assert_eq!(judged(sig(10, 10, 0, 0), [0; LATENCY_BUCKETS], &slo()).breach, None);
    }

    #[test]
    fn too_few_flows_are_not_judged() {
        // 1 failure in 2 flows: 50%, 100% ... but on 19 flows nothing is judged.
        let f = judged(sig(0, 19, 0, 0), [0; LATENCY_BUCKETS], &slo());
        assert!(!f.judged);
        assert_eq!(f.breach, None);
        assert!(judged(sig(0, 20, 0, 0), [0; LATENCY_BUCKETS], &slo()).breach.is_some());
    }

    #[test]
    fn resets_of_answered_flows_breach_the_reset_share() {
        let f = judged(sig(40, 0, 0, 30), hist_at(0.3, 40), &slo());
        let b = f.breach.expect("breach");
        assert!(b.contains("30 of 40 answered flows reset") && b.contains("75% > 50%"), "{b}");
        assert_eq!(judged(sig(40, 0, 0, 20), hist_at(0.3, 40), &slo()).breach, None);
    }

    #[test]
    fn slow_handshakes_breach_the_latency_slo_and_fast_enough_ones_do_not() {
        let strict = Slo { max_p95_handshake: Duration::from_millis(150), ..slo() };
        // 300 ms handshakes: bucket [268, 537) ms.
        let f = judged(sig(50, 0, 0, 0), hist_at(300.0, 50), &strict);
        assert!(f.breach.as_deref().is_some_and(|b| b.contains("p95 handshake at least 268.4 ms")), "{f:?}");
        // 40 ms handshakes: bucket [33.6, 67.1) ms, under 150.
        assert_eq!(judged(sig(50, 0, 0, 0), hist_at(40.0, 50), &strict).breach, None);
        // A steady 540 ms against the default 1000 ms: its bucket [537, 1074) ms reaches past
        // the threshold, but the p95 is not known to be over it: no trip (the interpolated
        // estimate alone would say 1047 ms).
        let f = judged(sig(50, 0, 0, 0), hist_at(540.0, 50), &slo());
        assert!(f.p95_ms.unwrap() > 1000.0 && f.p95_floor_ms.unwrap() < 1000.0, "{f:?}");
        assert_eq!(f.breach, None);
    }

    #[test]
    fn a_threshold_of_zero_is_off() {
        let off = Slo { max_handshake_failure_share: 0.0, max_reset_share: 0.0, max_p95_handshake: Duration::ZERO, ..slo() };
        let f = judged(sig(20, 100, 100, 20), hist_at(3000.0, 20), &off);
        assert!(f.judged);
        assert_eq!(f.breach, None);
    }

    #[test]
    fn the_sampler_judges_each_service_over_its_own_window() {
        let cfg = crate::config::Config::parse(
            r#"
interfaces = ["eth0"]
[[service]]
name = "web"
vip = "10.100.0.1:80"
slo = { window_secs = 2 }
blue = ["10.1.0.2:8080"]
green = ["10.2.0.2:8080"]
[[service]]
name = "api"
vip = "10.100.0.2:80"
slo = { window_secs = 10 }
blue = ["10.1.0.3:8080"]
green = ["10.2.0.3:8080"]
"#,
        )
        .unwrap();
        let mut s = Sampler::new(cfg.services);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // The same 30 refusals on green in both services.
        let r = |refused: u64| {
            let green = vec![sig(0, refused, 0, 0)];
            Reading { blocks: vec![vec![sig(0, 0, 0, 0)], green.clone(), vec![sig(0, 0, 0, 0)], green], latency: vec![[0; LATENCY_BUCKETS]; 4] }
                .sums()
        };
        s.push(at(0), r(0));
        // 30 refusals on green within 1 s: a breach in both, judged on green only.
        let f = s.push(at(1000), r(30));
        assert_eq!(f.len(), 4);
        assert_eq!((f[0].breach.is_some(), f[1].breach.is_some(), f[2].breach.is_some(), f[3].breach.is_some()), (false, true, false, true), "{f:?}");
        // 3.5 s later with no more failures: web's window (2 s) has moved past them, api's
        // (10 s) has not.
        s.push(at(3000), r(30));
        let f = s.push(at(4500), r(30));
        assert_eq!((f[1].refused, f[3].refused), (0, 30), "{f:?}");
        assert_eq!(f[1].breach, None);
        assert!(f[3].breach.is_some());
        // web's measured from the reading at 1 s (the latest one at least its window old);
        // api's from the oldest kept (none is 10 s old yet).
        assert!((f[1].secs - 3.5).abs() < 0.01 && (f[3].secs - 4.5).abs() < 0.01, "{} {}", f[1].secs, f[3].secs);
        // Readings are kept back to the longest window only.
        for t in (5000..=20_000).step_by(500) {
            s.push(at(t), r(30));
        }
        assert!(s.readings.len() <= 10_000 / 500 + 2, "{} readings kept", s.readings.len());
        assert_eq!(s.push(at(20_500), r(30))[3].breach, None, "api's window moved past them too");
    }
}
