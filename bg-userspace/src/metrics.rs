//! The Prometheus endpoint (text exposition format 0.0.4), loopback by default. Every scrape
//! renders a fresh `Snapshot` the agent hands over; this module knows nothing of the agent.

use std::{fmt::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use bg_common::Color;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tracing::{info, warn};

use crate::{
    config::Service,
    dataplane::{Counters, Egress, FlowCounts},
    health::State as HState,
};

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// One metric family: HELP, TYPE and its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(Vec<(&str, String)>, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {v}");
        } else {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
            let _ = writeln!(out, "{name}{{{}}} {v}", l.join(","));
        }
    }
}

/// What one scrape shows. The agent takes it under its lock (copies of numbers, no walk of
/// the flow tables); it is rendered after the lock is let go. Metrics never see the agent.
pub struct Snapshot {
    pub counters: Counters,
    /// The flow sampler's last figures and their age (None before the first walk).
    pub flows: FlowCounts,
    pub flows_age: Option<Duration>,
    pub active: Color,
    pub canary_permille: u32,
    pub generation: u64,
    pub flips_total: u64,
    pub rollbacks_total: u64,
    pub auto_rollbacks_total: u64,
    pub last_flip_ns: u64,
    pub flow_table_size: u32,
    pub unconfirmed_table_size: u32,
    pub egress: Vec<Egress>,
    /// Each backend's state, in the order of `Labels::backends`.
    pub backends: Vec<HState>,
    /// The connection signals' last reading (cumulative, per backend in the order of
    /// `Labels::backends`; None before the first) and the last window's figures.
    pub signals: Option<crate::signals::Reading>,
    pub figures: Vec<crate::signals::Figures>,
    /// Fleet mode: the link to etcd.
    pub fleet: Option<crate::control::FleetStatus>,
}

/// The backends' labels, fixed for the agent's life (the config does not change under it).
pub struct Labels {
    /// (service, color, backend address), in config order: services, colors, backends.
    pub backends: Vec<(String, Color, String)>,
}

impl Labels {
    pub fn of(services: &[Service]) -> Labels {
        let mut backends = Vec::new();
        for s in services {
            for c in Color::ALL {
                for b in s.backends(c) {
                    backends.push((s.name.clone(), c, b.addr.to_string()));
                }
            }
        }
        Labels { backends }
    }
}

/// The whole exposition.
pub fn render(st: &Snapshot, labels: &Labels) -> String {
    let mut out = String::new();
    let counters = &st.counters;
    let flows = st.flows;
    let color = |c: Color| vec![("color", c.name().to_owned())];
    let per_color = |f: &dyn Fn(usize) -> f64| -> Vec<(Vec<(&str, String)>, f64)> {
        Color::ALL.iter().map(|c| (color(*c), f(*c as usize))).collect()
    };
    family(&mut out, "bg_packets_total", "counter", "Packets rewritten for flows of each color.", &per_color(&|i| counters.colors[i].packets as f64));
    family(&mut out, "bg_bytes_total", "counter", "Bytes rewritten for flows of each color.", &per_color(&|i| counters.colors[i].bytes as f64));
    family(&mut out, "bg_new_flows_total", "counter", "New flows started on each color.", &per_color(&|i| counters.colors[i].new_flows as f64));
    family(&mut out, "bg_live_flows", "gauge", "Live (not expired) flows pinned to each color.", &per_color(&|i| flows.flows[i] as f64));
    family(&mut out, "bg_active_color", "gauge", "1 for the color new flows go to.", &per_color(&|i| (st.active as usize == i) as u8 as f64));
    family(&mut out, "bg_canary_ratio", "gauge", "Share of new flows sent to the other color by a canary.", &[(vec![], st.canary_permille as f64 / 1000.0)]);
    family(&mut out, "bg_generation", "gauge", "Switch generation.", &[(vec![], st.generation as f64)]);
    family(&mut out, "bg_flips_total", "counter", "Switches done by this agent (flips, canaries, rollbacks).", &[(vec![], st.flips_total as f64)]);
    family(
        &mut out,
        "bg_rollbacks_total",
        "counter",
        "Rollbacks done by this agent.",
        &[
            (vec![("kind", "manual".into())], st.rollbacks_total.saturating_sub(st.auto_rollbacks_total) as f64),
            (vec![("kind", "automatic".into())], st.auto_rollbacks_total as f64),
        ],
    );
    family(&mut out, "bg_last_flip_duration_seconds", "gauge", "Last switch, request to data plane switched.", &[(vec![], st.last_flip_ns as f64 / 1e9)]);
    family(&mut out, "bg_flow_table_entries", "gauge", "Established flow table entries in use (one per flow).", &[(vec![], flows.entries as f64)]);
    family(&mut out, "bg_flow_table_size", "gauge", "Established flow table capacity in entries.", &[(vec![], st.flow_table_size as f64)]);
    family(&mut out, "bg_flow_table_evictions_total", "counter", "Established entries the LRU evicted (confirmed - drained - present).", &[(vec![], flows.evicted as f64)]);
    family(&mut out, "bg_flow_sample_age_seconds", "gauge", "Age of the flow figures (the agent walks the flow tables in the background); -1 before the first walk.",
        &[(vec![], st.flows_age.map(|a| a.as_secs_f64()).unwrap_or(-1.0))]);
    family(&mut out, "bg_unconfirmed_entries", "gauge", "Unconfirmed flow table entries in use (no answer from the backend yet).", &[(vec![], flows.unconfirmed_entries as f64)]);
    family(&mut out, "bg_unconfirmed_table_size", "gauge", "Unconfirmed flow table capacity in entries.", &[(vec![], st.unconfirmed_table_size as f64)]);
    let reasons: Vec<_> = counters.reasons.iter().map(|(r, n)| (vec![("reason", r.clone())], *n as f64)).collect();
    family(&mut out, "bg_xdp_packets_total", "counter", "Packets by the XDP program's reason.", &reasons);
    let fwd: Vec<_> = counters.forwarding.iter().map(|(r, n)| (vec![("outcome", r.clone())], *n as f64)).collect();
    family(&mut out, "bg_forwarding_total", "counter", "Rewritten packets by forwarding outcome; flow entries created/removed.", &fwd);
    let path: Vec<_> = st.egress.iter().map(|e| (vec![("interface", e.interface.clone())], (e.path == "redirect") as u8 as f64)).collect();
    family(&mut out, "bg_egress_redirect", "gauge", "1 when packets leaving by this interface use XDP_REDIRECT, 0 when they go through the kernel.", &path);
    let errs: Vec<_> = st.egress.iter().map(|e| (vec![("interface", e.interface.clone())], e.redirect_errors as f64)).collect();
    family(&mut out, "bg_redirect_errors_total", "counter", "XDP redirects into this interface that failed (xdp:xdp_redirect_err).", &errs);
    let up: Vec<_> = labels
        .backends
        .iter()
        .zip(&st.backends)
        .map(|((service, c, backend), state)| {
            let v = match state {
                HState::Up => 1.0,
                HState::Down => 0.0,
                HState::Unknown => -1.0,
            };
            (vec![("service", service.clone()), ("color", c.name().into()), ("backend", backend.clone())], v)
        })
        .collect();
    family(&mut out, "bg_backend_up", "gauge", "Backend health: 1 up, 0 down, -1 not yet known.", &up);
    if let Some(r) = &st.signals {
        render_signals(&mut out, r, &st.figures, labels);
    }
    if let Some(f) = &st.fleet {
        let l = || vec![("fleet", f.name.clone()), ("gateway", f.gateway.clone())];
        family(&mut out, "bg_fleet_etcd_up", "gauge", "1 while this gateway is in touch with its fleet's etcd (lease renewed).", &[(l(), (f.etcd == "up") as u8 as f64)]);
        family(&mut out, "bg_fleet_etcd_state_seconds", "gauge", "Seconds since bg_fleet_etcd_up last changed.", &[(l(), f.etcd_for_secs as f64)]);
        family(&mut out, "bg_fleet_applied_revision", "gauge", "Mod revision of the fleet's desired state this gateway applied last.", &[(l(), f.applied_revision as f64)]);
        family(&mut out, "bg_fleet_fenced", "gauge", "1 while this gateway is fenced (cut off from etcd longer than fence_after_secs).", &[(l(), f.fenced as u8 as f64)]);
    }
    out
}

type Samples<'a> = Vec<(Vec<(&'a str, String)>, f64)>;

/// The connection signals: per backend and per color (cumulative, from the data path), the
/// handshake latency histograms per service and color, and the last SLO window's figures.
fn render_signals(out: &mut String, r: &crate::signals::Reading, figures: &[crate::signals::Figures], labels: &Labels) {
    use bg_common::BackendSignals;
    let per_backend: Vec<&BackendSignals> = r.blocks.iter().flatten().collect();
    let lb = |i: usize| {
        let (service, c, backend) = &labels.backends[i];
        vec![("service", service.clone()), ("color", c.name().to_owned()), ("backend", backend.clone())]
    };
    let n = per_backend.len().min(labels.backends.len());
    let each = |f: &dyn Fn(&BackendSignals) -> u64| -> Samples { (0..n).map(|i| (lb(i), f(per_backend[i]) as f64)).collect() };
    family(out, "bg_backend_new_flows_total", "counter", "Flows started toward this backend (TCP SYNs, first UDP datagrams).", &each(&|b| b.new_flows));
    let mut hs: Samples = Vec::new();
    for i in 0..n {
        for (outcome, v) in [("answered", per_backend[i].answered), ("refused", per_backend[i].refused), ("no_answer", per_backend[i].no_answer)] {
            let mut l = lb(i);
            l.push(("outcome", outcome.into()));
            hs.push((l, v as f64));
        }
    }
    family(out, "bg_backend_handshakes_total", "counter",
        "Flows by how the backend answered: in time (SYN-ACK before a SYN retransmission; UDP: a reply), refused (RST to the SYN), no answer in time.", &hs);
    family(out, "bg_backend_resets_total", "counter", "Answered flows the backend reset (once per flow).", &each(&|b| b.resets));
    let mut bytes: Samples = Vec::new();
    for i in 0..n {
        for (dir, v) in [("to_backend", per_backend[i].bytes_to), ("from_backend", per_backend[i].bytes_from)] {
            let mut l = lb(i);
            l.push(("direction", dir.into()));
            bytes.push((l, v as f64));
        }
    }
    family(out, "bg_backend_bytes_total", "counter", "Bytes (whole frames) of this backend's flows, each way.", &bytes);
    // Per color, every service's backends summed.
    let mut colors = [BackendSignals::default(); 2];
    for (block, b) in r.blocks.iter().enumerate() {
        for x in b {
            crate::signals::add(&mut colors[block % 2], x);
        }
    }
    let mut ch: Samples = Vec::new();
    for c in Color::ALL {
        let t = &colors[c as usize];
        for (outcome, v) in [("answered", t.answered), ("refused", t.refused), ("no_answer", t.no_answer)] {
            ch.push((vec![("color", c.name().into()), ("outcome", outcome.into())], v as f64));
        }
    }
    family(out, "bg_color_handshakes_total", "counter", "Flows of each color by how their backend answered (see bg_backend_handshakes_total).", &ch);
    let cr: Samples = Color::ALL.iter().map(|c| (vec![("color", c.name().into())], colors[*c as usize].resets as f64)).collect();
    family(out, "bg_color_resets_total", "counter", "Answered flows of each color reset by their backend.", &cr);
    // The latency histograms, cumulative buckets in seconds.
    let name = "bg_handshake_latency_seconds";
    let _ = writeln!(out, "# HELP {name} TCP handshake latency (SYN to the backend's SYN-ACK, at the gateway) per service and color; log2 buckets. _sum is estimated from bucket midpoints.");
    let _ = writeln!(out, "# TYPE {name} histogram");
    let services: Vec<&String> = {
        let mut v: Vec<&String> = Vec::new();
        for (s, _, _) in &labels.backends {
            if v.last() != Some(&s) {
                v.push(s);
            }
        }
        v
    };
    for (block, h) in r.latency.iter().enumerate() {
        let (Some(service), Some(c)) = (services.get(block / 2), Color::from_u8((block % 2) as u8)) else { continue };
        let l = format!("service=\"{}\",color=\"{}\"", escape(service), c.name());
        let (mut cum, mut sum) = (0u64, 0f64);
        for (k, n) in h.iter().enumerate() {
            cum += n;
            let (lo, hi) = crate::signals::bucket_bounds(k);
            let unit = (1u64 << bg_common::LATENCY_SHIFT) as f64 / 1e9;
            sum += *n as f64 * (lo + hi) / 2.0 * unit;
            if k + 1 < h.len() {
                let _ = writeln!(out, "{name}_bucket{{{l},le=\"{}\"}} {cum}", hi * unit);
            }
        }
        let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {cum}");
        let _ = writeln!(out, "{name}_sum{{{l}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{l}}} {cum}");
    }
    let fl = |f: &crate::signals::Figures| vec![("service", f.service.clone()), ("color", f.color.clone())];
    let gauge = |g: &dyn Fn(&crate::signals::Figures) -> Option<f64>| -> Samples {
        figures.iter().filter_map(|f| g(f).map(|v| (fl(f), v))).collect()
    };
    family(out, "bg_slo_handshake_failure_share", "gauge", "Last SLO window: failed handshakes (refused, no answer) / decided ones.", &gauge(&|f| f.failure_share));
    family(out, "bg_slo_reset_share", "gauge", "Last SLO window: resets / answered flows.", &gauge(&|f| f.reset_share));
    family(out, "bg_slo_handshake_p95_seconds", "gauge", "Last SLO window: 95th percentile handshake latency.", &gauge(&|f| f.p95_ms.map(|m| m / 1000.0)));
    family(out, "bg_slo_decided_flows", "gauge", "Last SLO window: flows whose handshake was decided.", &gauge(&|f| Some(f.decided() as f64)));
    family(out, "bg_slo_breach", "gauge", "1 when the last SLO window breaches the service's SLO on this color.", &gauge(&|f| Some(f.breach.is_some() as u8 as f64)));
}

/// How a scrape gets its snapshot (the agent's side).
pub type Snapshotter = Arc<dyn Fn() -> anyhow::Result<Snapshot> + Send + Sync>;

/// Scrapes served at once; connections beyond are closed at once.
pub const MAX_METRICS_CONNECTIONS: usize = 32;
/// A scrape's request must arrive, and its answer be taken, within this.
const METRICS_DEADLINE: Duration = Duration::from_secs(5);

/// Serves GET /metrics on `addr` until the process exits.
pub async fn serve(addr: SocketAddr, labels: Labels, snapshot: Snapshotter) -> anyhow::Result<()> {
    let labels = Arc::new(labels);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {addr} (config `metrics_listen`, or \"off\")"))?;
    info!(%addr, "metrics at http://{addr}/metrics");
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let mut conn = match listener.accept().await {
                Ok((conn, _)) => conn,
                Err(e) => {
                    // Out of file descriptors, say: back off instead of spinning.
                    warn!(error = %e, "accept on the metrics endpoint failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Over the cap: closed at once (a scraper retries; idle connections hold nothing).
            let Ok(permit) = permits.clone().try_acquire_owned() else { continue };
            let (snapshot, labels) = (snapshot.clone(), labels.clone());
            tokio::spawn(async move {
                let _permit = permit;
                // The whole request within the deadline, at most 4 KiB.
                let mut buf = Vec::with_capacity(4096);
                let read = tokio::time::timeout(METRICS_DEADLINE, async {
                    let mut chunk = [0u8; 1024];
                    while buf.len() < 4096 && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => buf.extend_from_slice(&chunk[..n.min(4096 - buf.len())]),
                        }
                    }
                    true
                })
                .await;
                if !matches!(read, Ok(true)) {
                    return;
                }
                let req = String::from_utf8_lossy(&buf);
                let response = if req.starts_with("GET /metrics ") {
                    match tokio::task::spawn_blocking(move || snapshot().map(|s| render(&s, &labels))).await {
                        Ok(Ok(body)) => format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        ),
                        Ok(Err(e)) => {
                            warn!(error = %e, "metrics scrape failed");
                            "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
                        }
                        Err(_) => return,
                    }
                } else {
                    let body = "try GET /metrics\n";
                    format!("HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                };
                let _ = tokio::time::timeout(METRICS_DEADLINE, conn.write_all(response.as_bytes())).await;
            });
        }
    });
    Ok(())
}
