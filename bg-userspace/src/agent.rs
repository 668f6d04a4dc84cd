//! `bgctl agent`: owns the control socket, health checks and decisions; the data plane it sets
//! up outlives it.
//!
//! Start-up applies nothing until the whole config is valid and every interface exists. Maps
//! and one XDP link per interface are pinned under `pin_dir`: if the agent is killed, traffic
//! keeps flowing as configured. A restarted agent adopts the pinned state (active color, canary,
//! flow table) after checking its layout, and swaps its own program in through the pinned links
//! (`bpf_link_update`: no moment without a program). On SIGINT/SIGTERM the agent removes its
//! socket and leaves the data plane as it is; `bgctl agent --cleanup` removes it.

use std::{
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context};
use bg_common::{slot_color, Color};
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
};
use tracing::{error, info, warn};

use crate::{
    config::{parse_color, Config, Forwarding},
    control::{
        BackendStatus, CanaryStatus, ColorHealth, DrainStatus, DryRun, FlipResult, SelectorView, RepublishStatus, Request, Response, ServiceStatus, Status,
        WatchStatus, MAX_BACKENDS_PAGE, MAX_LINE, STATUS_BACKENDS,
    },
    dataplane::{remove_pinned, require_embedded_object, Attachment, Dataplane},
    decisions::{self, Action, Decision, Decisions, FlipRequest, Kind, Plan, Verdict},
    health::{self, State as HState},
    metrics,
    state::{Persisted, Store},
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// The most (service, color) figures an audit event carries.
const AUDIT_SIGNALS: usize = 16;
/// The most (service, color) figures a status or dry-run answer lists.
const STATUS_SIGNALS: usize = 32;
/// The most audit events one `history` request returns (each answer must fit `MAX_LINE`).
pub const MAX_HISTORY: usize = 1_000;
/// Control connections served at once; more are answered with an error and closed.
pub const MAX_CONTROL_CONNECTIONS: usize = 64;
/// How long a client may take to read an answer.
const CONTROL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The flow sampler's shortest rest between walks.
const FLOW_SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Agent ticks (100 ms) between re-probes of the egress interfaces whose redirects failed.
const REPROBE_TICKS: u64 = 50;

/// Who asked for an action.
#[derive(Clone, Debug)]
pub enum Actor {
    /// A control-socket client with this uid.
    Uid(u32),
    /// An HTTP API client, as `api` names it (bearer token, or its certificate).
    Api(Arc<str>),
    /// The agent itself (automatic rollback, drain).
    Agent,
    /// The fleet's desired state in etcd (a switch decided on any gateway, or a CLI host).
    Fleet,
}

impl Actor {
    fn json(&self) -> serde_json::Value {
        match self {
            Actor::Uid(u) => json!(u),
            Actor::Api(a) => json!(&**a),
            Actor::Agent => json!("agent"),
            Actor::Fleet => json!("fleet"),
        }
    }

    /// In words, for the fleet's record of who switched.
    fn describe(&self) -> String {
        match self {
            Actor::Uid(u) => format!("uid {u}"),
            Actor::Api(a) => a.to_string(),
            Actor::Agent => "agent".into(),
            Actor::Fleet => "fleet".into(),
        }
    }
}

pub struct State {
    pub config: Config,
    pub dp: Dataplane,
    store: Store,
    pub health: health::Table,
    attachments: Vec<Attachment>,
    /// Held while the agent runs: no second agent on this pin directory.
    _pin_lock: PinLock,
    /// The flow sampler's last counts; and handles of the status requests' own to walk.
    pub flow_sample: FlowSample,
    pub flow_tables: Arc<crate::dataplane::FlowTables>,
    /// Handles of their own on the counter maps: scrapes and `stats` read them after the lock.
    counter_maps: Arc<crate::dataplane::CounterMaps>,
    /// The connection signals' sampler's last reading and window figures.
    signals: crate::signals::Shared,
    /// The switch state and its promises; the rules are in `decisions`. Its active color and
    /// canary share are what the selector in `dp` holds: both change together, in `carry_out`.
    pub dec: Decisions,
    /// `dec`'s clock: milliseconds since this instant.
    epoch: Instant,
    last_drain_removed: Option<u64>,
    /// Effective weights last published per color.
    published: [Vec<Vec<u32>>; 2],
    pub last_flip_ns: u64,
    /// The last republish after a health change, as status shows it.
    last_republish: Option<RepublishStatus>,
    /// Backend state changes the checkers reported, and how many `apply_health` has seen.
    health_changes: Arc<AtomicU64>,
    applied_changes: u64,
    /// Colors whose backends are all down (said once per transition).
    all_down_reported: [bool; 2],
    /// The state changed since it was last handed to the state file's writer.
    persist_due: bool,
    /// Fleet mode: the fleet's settings and this agent's link to etcd.
    pub fleet: Option<(crate::config::Fleet, crate::fleet::SharedLink)>,
    /// Automatic rollbacks decided in fleet mode (why, and the desired revision they undo):
    /// proposed to the fleet by the main loop, not carried out here.
    fleet_proposals: Vec<(String, i64)>,
}

pub fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(root) {
        // A custom location: it must already be on a bpffs.
        return Ok(());
    }
    let st = nix::sys::statfs::statfs(root).context("checking /sys/fs/bpf")?;
    if st.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        info!("mounting bpffs at /sys/fs/bpf");
        // Root only, as systemd mounts it: nobody else may plant pins beside bg's.
        nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), Some("mode=0700"))
            .context("mounting bpffs at /sys/fs/bpf (mount -t bpf -o mode=0700 bpf /sys/fs/bpf)")?;
    }
    Ok(())
}

/// Readies the host for an agent that runs as `user` with only its capabilities (the
/// package's unit runs this as root first, `ExecStartPre=+`): bpffs mounted, the way to
/// `pin_dir` searchable, `pin_dir` made (0700) and that user's, root's pins in it migrated
/// (an agent that ran as root before), and the files the agent must read readable by it.
/// It runs as root at every start: it follows no link and, in a `pin_dir` the user already
/// owns (where the user could have planted anything), touches nothing. The state and socket
/// directories are systemd's to make (StateDirectory=, RuntimeDirectory=); they are checked.
pub fn prepare(config: &Config, user: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let u = lookup_user(user)?;
    if u.uid.is_root() {
        bail!("--user {user} is root: an agent run as root needs no --prepare");
    }
    let pin = &config.pin_dir;
    ensure_bpffs(pin)?;
    check_pin_dir(pin, Some(u.uid.as_raw()))?;
    if !pin.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(pin).with_context(|| format!("creating pin directory {}", pin.display()))?;
    }
    let on_bpffs = |p: &Path| nix::sys::statfs::statfs(p).is_ok_and(|st| st.filesystem_type().0 == BPF_FS_MAGIC);
    if !on_bpffs(pin) {
        bail!("config field `pin_dir`: {} is not on a bpffs; an agent without root pins under /sys/fs/bpf", pin.display());
    }
    // Search (x), not listing, for others on the bpffs directories above pin_dir (systemd
    // mounts bpffs 0700). Pins keep their own modes (0600, the agent's user).
    let mut above: Vec<&Path> = pin.ancestors().skip(1).filter(|d| on_bpffs(d)).collect();
    above.reverse();
    for dir in above {
        add_mode(dir, 0o001)?;
    }
    let own = |p: &Path| {
        nix::unistd::fchownat(None, p, Some(u.uid), Some(u.gid), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .with_context(|| format!("chown {user} {}", p.display()))
    };
    if std::fs::symlink_metadata(pin)?.uid() == 0 {
        // Root's (check_pin_dir: no one else can write in it): its pins become the user's.
        // Only pins (regular files on bpffs), no link followed; the directory last.
        for e in std::fs::read_dir(pin).with_context(|| format!("reading {}", pin.display()))? {
            let path = e?.path();
            if std::fs::symlink_metadata(&path)?.file_type().is_file() {
                own(&path)?;
            } else {
                warn!(entry = %path.display(), "not a pin: left as it is");
            }
        }
        own(pin)?;
        std::fs::set_permissions(pin, std::fs::Permissions::from_mode(0o700))?;
        info!(pin_dir = %pin.display(), user, "pin directory (and its pins) given to the agent's user");
    }
    let reads = |field: &str, path: &Path| -> anyhow::Result<()> {
        let m = std::fs::metadata(path).with_context(|| format!("config field `{field}`: {}", path.display()))?;
        let mode = m.mode();
        let readable = (m.uid() == u.uid.as_raw() && mode & 0o400 != 0) || (m.gid() == u.gid.as_raw() && mode & 0o040 != 0) || mode & 0o004 != 0;
        if !readable {
            bail!(
                "config field `{field}`: {} (uid {} gid {} mode {:o}) is not readable by user {user}, who runs the agent; \
                 `chgrp {user} {p}; chmod 0640 {p}`",
                path.display(),
                m.uid(),
                m.gid(),
                mode & 0o7777,
                p = path.display()
            );
        }
        Ok(())
    };
    if let Some(a) = &config.api {
        if let Some(t) = &a.token_file {
            reads("api.token_file", t)?;
        }
        if let Some((c, k)) = &a.tls {
            reads("api.tls_cert", c)?;
            reads("api.tls_key", k)?;
        }
        if let Some(ca) = &a.client_ca {
            reads("api.client_ca", ca)?;
        }
    }
    if let Some(t) = config.fleet.as_ref().and_then(|f| f.tls.as_ref()) {
        reads("fleet.tls.ca", &t.ca)?;
        if let Some((c, k)) = &t.identity {
            reads("fleet.tls.cert", c)?;
            reads("fleet.tls.key", k)?;
        }
    }
    for (field, dir) in [("state_dir", config.state_dir.as_path()), ("socket", config.socket.parent().unwrap_or(Path::new("/")))] {
        let m = std::fs::symlink_metadata(dir);
        if !m.as_ref().is_ok_and(|m| m.is_dir() && m.uid() == u.uid.as_raw()) {
            bail!(
                "config field `{field}`: {} is not a directory of user {user}'s; under systemd the unit's StateDirectory=bg and \
                 RuntimeDirectory=bg make /var/lib/bg and /run/bg (the defaults), other places are read-only to the agent",
                dir.display()
            );
        }
    }
    // The failed-redirect watch (a tracepoint) reads its id from tracefs, root's (0700):
    // search on the way to it for others, the id file readable by the user's group.
    if let Err(e) = prepare_tracefs(u.gid) {
        warn!(error = %format!("{e:#}"), "the agent will not see failed XDP redirects: every interface takes the kernel path");
    }
    info!(user, pin_dir = %pin.display(), "host ready for an agent without root");
    Ok(())
}

fn prepare_tracefs(gid: nix::unistd::Gid) -> anyhow::Result<()> {
    crate::dataplane::ensure_tracefs()?;
    let root = Path::new(crate::dataplane::TRACEFS);
    let event = root.join("events/xdp/xdp_redirect_err");
    // aya looks for tracefs by listing its root: names only (o+r), every file keeps its mode.
    add_mode(root, 0o005)?;
    for dir in [root.join("events"), root.join("events/xdp"), event.clone()] {
        add_mode(&dir, 0o001)?;
    }
    let id = event.join("id");
    nix::unistd::chown(&id, None, Some(gid)).with_context(|| format!("chgrp {}", id.display()))?;
    add_mode(&id, 0o040)
}

/// Adds mode `bits` to `path` (not following a link) where it lacks them.
fn add_mode(path: &Path, bits: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mode = std::fs::symlink_metadata(path).with_context(|| format!("checking {}", path.display()))?.mode() & 0o7777;
    if mode & bits != bits {
        info!(path = %path.display(), "mode {mode:o} -> {:o} (for the agent's user)", mode | bits);
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | bits))
            .with_context(|| format!("chmod {:o} {}", mode | bits, path.display()))?;
    }
    Ok(())
}

/// The user an agent runs as (`--user`).
fn lookup_user(name: &str) -> anyhow::Result<nix::unistd::User> {
    nix::unistd::User::from_name(name)
        .with_context(|| format!("looking up user `{name}`"))?
        .ok_or_else(|| anyhow!("no user `{name}` on this host (--user); the package makes `bg` (useradd --system bg)"))
}

/// The pin directory is trusted with the data plane: it (and every directory on the way to it)
/// must not be a symlink, and when it exists it must be a directory owned by root (or by the
/// user the agent runs as: the package's `bg`) that no one else can write to. Checked before
/// anything is adopted or created.
pub fn check_pin_dir(pin_dir: &Path, agent_user: Option<u32>) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut at = std::path::PathBuf::new();
    for c in pin_dir.components() {
        at.push(c);
        let meta = match std::fs::symlink_metadata(&at) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("checking pin_dir {}", at.display())),
        };
        if meta.file_type().is_symlink() {
            bail!(
                "config field `pin_dir`: {} is a symbolic link; bg pins only into real directories \
                 (point pin_dir at the directory itself)",
                at.display()
            );
        }
        if at == pin_dir {
            if !meta.is_dir() {
                bail!("config field `pin_dir`: {} exists and is not a directory; remove it or choose another pin_dir", at.display());
            }
            let me = agent_user.unwrap_or(nix::unistd::geteuid().as_raw());
            if (meta.uid() != 0 && meta.uid() != me) || meta.mode() & 0o022 != 0 {
                bail!(
                    "config field `pin_dir`: {} is owned by uid {} with mode {:o}; bg adopts pinned state only from \
                     a directory owned by root or by the agent's own user (uid {me}) that group and others cannot write \
                     (check who made it, then `chown root {p}; chmod 0700 {p}`, or remove it; an agent run as another user: \
                     `bgctl agent --cleanup --user USER` and `--prepare --user USER` trust that user's)",
                    at.display(),
                    meta.uid(),
                    meta.mode() & 0o7777,
                    p = at.display(),
                );
            }
        }
    }
    Ok(())
}

/// Holds an exclusive `flock` on the pin directory for as long as it lives: one agent (or
/// cleanup) per pin directory, whatever socket each was given.
pub struct PinLock(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

pub fn lock_pin_dir(pin_dir: &Path) -> anyhow::Result<PinLock> {
    use nix::fcntl::{Flock, FlockArg};
    let dir = std::fs::File::open(pin_dir).with_context(|| format!("opening pin_dir {}", pin_dir.display()))?;
    match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(PinLock(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => bail!(
            "another bg agent (or cleanup) holds {}; stop it first, or give this one its own `pin_dir` and `socket`",
            pin_dir.display()
        ),
        Err((_, e)) => Err(e).with_context(|| format!("locking pin_dir {}", pin_dir.display())),
    }
}

fn check_interfaces(config: &Config) -> anyhow::Result<()> {
    for (i, name) in config.interfaces.iter().enumerate() {
        if nix::net::if_::if_nametoindex(name.as_str()).is_err() {
            bail!(
                "config field `interfaces[{i}]`: interface `{name}` does not exist in this network \
                 namespace; check `ip link` and fix the name"
            );
        }
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard one (health checks hold a socket each).
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                Ok(()) => info!(from = soft, to = hard, "raised the open-file limit"),
                Err(e) => warn!(error = %e, soft, "could not raise the open-file limit"),
            }
        }
    }
}

/// Refuses to start over a live agent; removes a stale socket left by a dead one.
fn claim_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "config field `socket`: {} exists and is not a socket; bg removes only a stale socket of its own there: \
                 move the file away or choose another `socket`",
                path.display()
            );
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another bg agent is already serving {}; stop it first (or give this one another \
                 `socket` and `pin_dir`)",
                path.display()
            );
        }
        warn!(socket = %path.display(), "removing stale control socket");
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    Ok(())
}

/// `bgctl agent --cleanup`: detaches bg and removes its pinned maps and socket. The state
/// directory (state file, audit log) is kept.
/// `user`: the user the agent ran as, when not this one (the package's `bg`).
pub fn cleanup(config: &Config, user: Option<&str>) -> anyhow::Result<()> {
    if config.socket.exists() && std::os::unix::net::UnixStream::connect(&config.socket).is_ok() {
        bail!("an agent is still serving {}; stop it first (SIGTERM), then clean up", config.socket.display());
    }
    let agent_user = user.map(lookup_user).transpose()?.map(|u| u.uid.as_raw());
    check_pin_dir(&config.pin_dir, agent_user)?;
    let _lock = match lock_pin_dir(&config.pin_dir) {
        Ok(l) => Some(l),
        Err(_) if !config.pin_dir.exists() => None,
        Err(e) => return Err(e),
    };
    let removed = remove_pinned(&config.pin_dir).with_context(|| format!("removing {}", config.pin_dir.display()))?;
    let _ = std::fs::remove_file(&config.socket);
    if removed.is_empty() {
        println!("nothing pinned in {}", config.pin_dir.display());
    } else {
        println!("removed {} (links detached, maps freed): {}", config.pin_dir.display(), removed.join(", "));
    }
    Ok(())
}

/// Every backend address once, with the health settings of the first service listing it.
fn all_backends(config: &Config) -> Vec<(SocketAddr, crate::config::Health)> {
    let mut v: Vec<(SocketAddr, crate::config::Health)> = Vec::new();
    for s in &config.services {
        for b in s.blue.iter().chain(&s.green) {
            if !v.iter().any(|(a, _)| *a == b.addr) {
                v.push((b.addr, s.health.clone()));
            }
        }
    }
    v
}

impl State {
    /// The color new flows go to.
    pub fn active(&self) -> Color {
        self.dec.active
    }

    /// Share (per mille) of new flows sent to the other color by a canary.
    pub fn canary_permille(&self) -> u32 {
        self.dec.canary_permille
    }

    /// Milliseconds on the decisions' clock.
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Weights for `color` as health allows (one lock for the whole walk: tens of thousands
    /// of backends at the documented maximum).
    fn effective_weights(&self, color: Color) -> Vec<Vec<u32>> {
        decisions::effective_weights(&self.config.services, color, &crate::lock(&self.health))
    }

    /// What health and the SLOs say of `color`: the gate's and the watch window's verdict.
    fn verdict(&self, color: Color) -> Verdict {
        gate_verdict(&self.config.services, &self.health, &self.signals, color)
    }

    /// The last window's figures of `color` (or both) where there was traffic or a breach, at
    /// most `limit` (an answer or an audit line stays small at any number of services), and
    /// how many more there were.
    fn figures(&self, color: Option<Color>, limit: usize) -> (Vec<crate::signals::Figures>, usize) {
        let v = crate::lock(&self.signals);
        let mut busy = v.figures.iter().filter(|f| color.is_none_or(|c| f.color == c.name()) && f.busy());
        let listed: Vec<_> = busy.by_ref().take(limit).cloned().collect();
        (listed, busy.count())
    }

    /// Per color: counts per state and the backends not up (at most `STATUS_BACKENDS`), for
    /// audit lines that stay small at any number of backends.
    fn health_snapshot(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for h in self.color_statuses() {
            out.insert(h.color.clone(), json!({"up": h.up, "down": h.down, "unknown": h.unknown,
                "not_up": h.backends.iter().map(|b| json!({"service": b.service, "backend": b.backend, "state": b.state, "last": b.last})).collect::<Vec<_>>(),
                "not_listed": h.backends_not_listed}));
        }
        serde_json::Value::Object(out)
    }

    /// Every backend of `color` (or both) with its health, in config order.
    fn backend_statuses(&self, color: Option<Color>) -> Vec<BackendStatus> {
        let table = crate::lock(&self.health);
        let mut v = Vec::new();
        for c in Color::ALL.into_iter().filter(|c| color.is_none_or(|x| x == *c)) {
            for s in &self.config.services {
                for b in s.backends(c) {
                    let h = table.get(&b.addr).cloned().unwrap_or_default();
                    v.push(BackendStatus { service: s.name.clone(), backend: b.addr.to_string(), weight: b.weight, state: h.state, last: h.last });
                }
            }
        }
        v
    }

    /// Health per color: the gate's verdict, counts per state, the backends not up.
    fn color_statuses(&self) -> Vec<ColorHealth> {
        // One pass per color over the table (tens of thousands of backends at the maximum).
        let table = crate::lock(&self.health);
        Color::ALL
            .into_iter()
            .map(|c| {
                let (mut counts, mut not_up, mut not_listed, mut healthy) = ([0usize; 3], Vec::new(), 0, true);
                for s in &self.config.services {
                    let mut up = 0usize;
                    for b in s.backends(c) {
                        let h = table.get(&b.addr);
                        let state = h.map(|h| h.state).unwrap_or(HState::Unknown);
                        counts[state as usize] += 1;
                        if health::is_up(state) {
                            up += 1;
                            continue;
                        }
                        if not_up.len() == STATUS_BACKENDS {
                            not_listed += 1;
                            continue;
                        }
                        let last = h.map_or(health::NOT_CHECKED, |h| h.last.as_str()).to_owned();
                        not_up.push(BackendStatus { service: s.name.clone(), backend: b.addr.to_string(), weight: b.weight, state, last });
                    }
                    healthy &= decisions::meets_share(up, s.backends(c).len(), s.health.healthy_share);
                }
                let published = &self.published[c as usize];
                let slo_breaches = crate::lock(&self.signals).breaches(c);
                ColorHealth {
                    color: c.name().into(),
                    healthy: healthy && slo_breaches.is_empty(),
                    slo_breaches,
                    all_down: published.iter().any(|s| s.iter().all(|x| *x == 0)),
                    up: counts[HState::Up as usize],
                    down: counts[HState::Down as usize],
                    unknown: counts[HState::Unknown as usize],
                    taking_flows: published.iter().flatten().filter(|w| **w > 0).count(),
                    backends_not_listed: not_listed,
                    backends: not_up,
                }
            })
            .collect()
    }

    fn audit(&self, mut event: serde_json::Value) {
        if let Some(o) = event.as_object_mut() {
            o.insert("health".into(), self.health_snapshot());
            // The figures of the last window where there was traffic (at most
            // `AUDIT_SIGNALS`: an audit line stays small at any number of services).
            let (figures, more) = self.figures(None, AUDIT_SIGNALS);
            o.insert("signals".into(), json!(figures));
            if more > 0 {
                o.insert("signals_not_listed".into(), json!(more));
            }
        }
        if let Err(e) = self.store.audit(event) {
            error!(error = %e, "could not write the audit log");
        }
    }

    /// Marks the state for `state.json`; the agent's next tick (within 100 ms) hands it to the
    /// background writer, so a flip wakes no other thread on its way back to the client.
    fn persist(&mut self) {
        self.persist_due = true;
    }

    fn persist_now(&mut self) {
        self.persist_due = false;
        let p = Persisted {
            active: self.active().name().into(),
            previous: self.dec.previous.map(|c| c.name().into()),
            generation: self.dec.generation,
            canary_permille: self.canary_permille(),
        };
        self.store.save_in_background(p);
    }

    /// Probes the egresses marked as failing again; a fixed one (GRO turned on at the peer,
    /// say) gets redirects back.
    fn reprobe(&mut self) {
        match self.dp.reprobe_failing() {
            Ok(fixed) => {
                for i in fixed {
                    info!(ifindex = i, "XDP_REDIRECT into this interface works again; its packets leave by redirect");
                }
            }
            Err(e) => warn!(error = %format!("{e:#}"), "re-probing egress interfaces failed"),
        }
    }

    /// Republishes a color whose effective weights changed (a backend went down or came back).
    fn apply_health(&mut self) {
        // Weights depend on backend states alone: nothing to do unless one changed since.
        let changes = self.health_changes.load(Ordering::Acquire);
        if changes == self.applied_changes {
            return;
        }
        // Seen only once every color published: a failed republish is tried again next tick.
        let mut all_published = true;
        for color in Color::ALL {
            let w = self.effective_weights(color);
            let all_down = w.iter().any(|s| s.iter().all(|x| *x == 0));
            if all_down && !self.all_down_reported[color as usize] {
                error!(color = color.name(), "ALL backends of a service are down; new flows still go to them (nothing better to do)");
            }
            self.all_down_reported[color as usize] = all_down;
            if w == self.published[color as usize] {
                continue;
            }
            let (started, written) = (Instant::now(), self.dp.ring_entries_written());
            match self.dp.publish(color, &w) {
                Ok(()) => {
                    let (took, entries) = (started.elapsed(), self.dp.ring_entries_written() - written);
                    info!(color = color.name(), took_us = took.as_micros() as u64, ring_entries = entries, "backend tables republished after a health change");
                    self.published[color as usize] = w;
                    let number = self.last_republish.as_ref().map_or(1, |r| r.number + 1);
                    self.last_republish =
                        Some(RepublishStatus { color: color.name().into(), took_us: took.as_micros() as u64, ring_entries: entries, number });
                }
                Err(e) => {
                    all_published = false;
                    error!(color = color.name(), error = %format!("{e:#}"), "could not republish backend tables; trying again");
                }
            }
        }
        if all_published {
            self.applied_changes = changes;
        }
    }

    /// Switches new flows: a flip, or a canary (`req.percent`) to `req.to`, through the health
    /// gate (`decisions`). Publishes pending health changes first: a flip must not route new
    /// flows to a set older than the verdict its gate reads.
    fn flip(&mut self, req: FlipRequest, who: Actor) -> anyhow::Result<FlipResult> {
        let started = Instant::now();
        self.apply_health();
        let verdict = self.verdict(req.to);
        let decision = self.dec.decide_flip(&req, &verdict, self.now_ms()).map_err(|e| anyhow!(e))?;
        self.carry_out(decision, who, "requested", started)
    }

    /// What a flip would do, touching nothing (no republish, no selector write, no audit);
    /// the live flows are left for the caller to count outside the lock.
    fn dry_run(&self, req: FlipRequest) -> anyhow::Result<DryRun> {
        let verdict = self.verdict(req.to);
        let decision = self.dec.decide_flip(&req, &verdict, self.now_ms()).map_err(|e| anyhow!(e))?;
        let view = |s: bg_common::Selector| SelectorView {
            active: Color::from_u8(slot_color(s.primary())).unwrap_or(Color::Blue).name().into(),
            canary_percent: s.canary_permille() as f64 / 10.0,
            value: s.0,
        };
        let now = self.dp.current();
        let (outcome, after, auto_rollback, generation) = match &decision {
            Decision::Unchanged => ("unchanged", now, "unchanged: nothing to guard".to_owned(), self.dec.generation),
            Decision::Refused { .. } => ("refused", now, "refused: nothing to guard".to_owned(), self.dec.generation),
            Decision::Switch(p) => ("switch", self.dp.selector_for(p.active(), p.canary_permille()), p.auto_rollback(), p.generation),
        };
        Ok(DryRun {
            outcome: outcome.into(),
            from: self.active().name().into(),
            to: req.to.name().into(),
            percent: req.percent,
            generation,
            healthy: verdict.healthy,
            failing: verdict.failing,
            selector_now: view(now),
            selector_after: view(after),
            // Counted by `handle` once the lock is let go.
            live_flows: [0; 2],
            live_flows_age_ms: None,
            auto_rollback,
            signals: self.figures(Some(req.to), STATUS_SIGNALS).0,
        })
    }

    /// Undoes the last switch: ends a canary, or flips back to the previous color.
    fn rollback(&mut self, force: bool, who: Actor) -> anyhow::Result<FlipResult> {
        let started = Instant::now();
        self.apply_health();
        let decision = self.dec.decide_rollback(force, &|c| self.verdict(c), self.now_ms()).map_err(|e| anyhow!(e))?;
        self.carry_out(decision, who, "requested", started)
    }

    /// Carries out a decision: nothing, a refusal (audited), or a switch: the selector write,
    /// then the decisions' commit, the state file and the audit line.
    fn carry_out(&mut self, decision: Decision, who: Actor, reason: &str, started: Instant) -> anyhow::Result<FlipResult> {
        let plan = match decision {
            Decision::Unchanged => return Ok(FlipResult::unchanged(self.active(), self.dec.generation, started.elapsed().as_nanos() as u64)),
            Decision::Refused { to, failing } => {
                self.audit(json!({"event": "refused", "from": self.active().name(), "to": to.name(), "generation": self.dec.generation,
                    "uid": who.json(), "reason": format!("{} not healthy", to.name()), "failing": failing}));
                bail!(
                    "refused: {} is not healthy (each service needs its healthy_share of backends up): {}; fix it, or pass --force",
                    to.name(),
                    failing.join("; ")
                );
            }
            Decision::Switch(plan) => plan,
        };
        // Everything that can fail came before: the selector write is the switch.
        let switch = self.dp.route(plan.active(), plan.canary_permille())?;
        self.dec.commit(&plan, self.now_ms());
        self.last_flip_ns = started.elapsed().as_nanos() as u64;
        self.persist();
        self.audit_switch(&plan, &who, reason);
        info!(from = plan.from.name(), to = plan.to.name(), generation = plan.generation, percent = plan.percent, forced = plan.forced,
            switch_ns = switch.as_nanos() as u64, "switched");
        Ok(FlipResult {
            from: plan.from.name().into(),
            to: plan.to.name().into(),
            generation: plan.generation,
            changed: true,
            switch_ns: switch.as_nanos() as u64,
            total_ns: self.last_flip_ns,
            drain_secs: plan.drain_secs,
            percent: plan.percent,
            forced: plan.forced,
            auto_rollback: plan.auto_rollback(),
            fleet: None,
        })
    }

    fn audit_switch(&self, plan: &Plan, who: &Actor, reason: &str) {
        let reason = if plan.kind == Kind::CanaryCancelled {
            format!("{reason}: canary to {} cancelled", plan.from.other().name())
        } else {
            reason.to_owned()
        };
        self.audit(json!({"event": plan.kind.event(), "from": plan.from.name(), "to": plan.to.name(), "generation": plan.generation,
            "uid": who.json(), "reason": reason, "forced": plan.forced, "force": plan.force, "percent": plan.percent, "drain_secs": plan.drain_secs,
            "auto_rollback": plan.auto_rollback()}));
    }

    /// What time decides (`Decisions::tick`): an automatic rollback (once per switch, and
    /// only to a healthy color) and a drain that is due (returned: its walk runs without the
    /// agent's lock, `finish_drain` after).
    fn tick(&mut self) -> Option<(Color, crate::dataplane::FlowTables)> {
        let now = self.now_ms();
        let (services, health, signals) = (&self.config.services, &self.health, &self.signals);
        let actions = self.dec.tick(now, &|c| gate_verdict(services, health, signals, c));
        let mut drain = None;
        for action in actions {
            match action {
                Action::AutoRollback { plan: _, why } if self.fleet.is_some() => {
                    // The fleet rolls back as one: proposed to etcd by the main loop.
                    warn!("{why}; proposing it to the fleet");
                    let revision = self.fleet.as_ref().map_or(0, |(_, l)| crate::lock(l).applied_revision);
                    self.fleet_proposals.push((why, revision));
                }
                Action::AutoRollback { plan, why } => {
                    warn!("{why}");
                    let to = plan.to;
                    match self.carry_out(Decision::Switch(plan), Actor::Agent, &why, Instant::now()) {
                        Ok(_) => self.dec.commit_auto_rollback(),
                        Err(e) => error!(error = %format!("{e:#}"), to = to.name(), "automatic rollback failed"),
                    }
                }
                Action::AutoRollbackSkipped { from, to, why } => {
                    error!("{why}; NOT rolling back");
                    self.audit(json!({"event": "auto_rollback_skipped", "from": from.name(), "to": to.name(),
                        "generation": self.dec.generation, "uid": "agent", "reason": why}));
                }
                Action::Drain { color } => match self.dp.flow_tables() {
                    Ok(t) => drain = Some((color, t)),
                    Err(e) => warn!(color = color.name(), error = %format!("{e:#}"), "drain failed"),
                },
            }
        }
        drain
    }

    fn finish_drain(&mut self, color: Color, result: anyhow::Result<u64>) {
        match result {
            Ok(n) => {
                info!(color = color.name(), entries = n, "drain deadline reached: removed the remaining flow entries");
                self.last_drain_removed = Some(n);
                self.audit(json!({"event": "drain", "from": color.name(), "to": self.active().name(), "generation": self.dec.generation,
                    "uid": "agent", "reason": format!("drain deadline: {n} flow entries of {} removed", color.name())}));
            }
            Err(e) => warn!(color = color.name(), error = %format!("{e:#}"), "drain failed"),
        }
    }

    /// How packets leave by each interface, and why.
    pub fn egress(&self) -> anyhow::Result<Vec<crate::dataplane::Egress>> {
        let mut e = self.dp.egresses(&self.config.interfaces)?;
        if self.config.forwarding == Forwarding::Kernel {
            for x in &mut e {
                x.path = "kernel".into();
                x.why = "forwarding = \"kernel\" in the config".into();
            }
        }
        Ok(e)
    }

    /// What a scrape shows (`metrics::Snapshot`) but its counters: copies, no walk, no map
    /// read but the egress states; microseconds under the lock (and O(backends) for their
    /// states).
    fn metrics_snapshot(&self) -> anyhow::Result<metrics::Snapshot> {
        let sample = *crate::lock(&self.flow_sample);
        let table = crate::lock(&self.health);
        let backends = self
            .config
            .services
            .iter()
            .flat_map(|s| Color::ALL.into_iter().flat_map(move |c| s.backends(c)))
            .map(|b| decisions::state_of(&table, &b.addr))
            .collect();
        drop(table);
        let (signals, figures) = {
            let v = crate::lock(&self.signals);
            (v.latest.as_ref().map(|(_, r)| r.clone()), v.figures.clone())
        };
        Ok(metrics::Snapshot {
            counters: Default::default(),
            flows: sample.map(|(c, _)| c).unwrap_or_default(),
            flows_age: sample.map(|(_, at)| at.elapsed()),
            active: self.active(),
            canary_permille: self.canary_permille(),
            generation: self.dec.generation,
            flips_total: self.dec.flips_total,
            rollbacks_total: self.dec.rollbacks_total,
            auto_rollbacks_total: self.dec.auto_rollbacks_total,
            last_flip_ns: self.last_flip_ns,
            flow_table_size: self.config.flow_table_size,
            unconfirmed_table_size: self.config.unconfirmed_table_size,
            egress: self.egress()?,
            backends,
            signals,
            figures,
            fleet: self.fleet_status(),
        })
    }

    pub fn status(&self) -> anyhow::Result<Status> {
        let active = self.dp.active()?;
        let (signals, signals_not_listed) = self.figures(None, STATUS_SIGNALS);
        let sample = crate::lock(&self.flow_sample).clone();
        let now = self.now_ms();
        Ok(Status {
            active: active.name().into(),
            previous: self.dec.previous.map(|c| c.name().into()),
            generation: self.dec.generation,
            active_for_secs: now.saturating_sub(self.dec.active_since_ms) / 1000,
            canary: (self.canary_permille() != 0).then(|| CanaryStatus {
                color: self.active().other().name().into(),
                percent: self.canary_permille() as f64 / 10.0,
            }),
            services: self
                .config
                .services
                .iter()
                .map(|s| ServiceStatus {
                    name: s.name.clone(),
                    vip: s.vip.to_string(),
                    preview_vip: s.preview_vip.map(|p| p.to_string()),
                    protocol: s.protocol.name().into(),
                    blue: s.blue.len(),
                    green: s.green.len(),
                })
                .collect(),
            health: self.color_statuses(),
            interfaces: self.attachments.clone(),
            egress: self.egress()?,
            flows: sample.as_ref().map(|(c, _)| *c).unwrap_or_default(),
            flows_age_ms: sample.as_ref().map(|(_, at)| at.elapsed().as_millis() as u64),
            flow_table_size: self.config.flow_table_size,
            unconfirmed_table_size: self.config.unconfirmed_table_size,
            pin_dir: self.config.pin_dir.display().to_string(),
            drain: self.dec.drain.map(|w| DrainStatus {
                color: w.color.name().into(),
                remaining_secs: Decisions::remaining_secs(&w, now).unwrap_or(0),
                total_secs: self.dec.drain_secs,
            }),
            last_drain_removed: self.last_drain_removed,
            watch: self.dec.watch.map(|w| {
                let left = Decisions::remaining_secs(&w, now);
                WatchStatus { color: w.color.name().into(), remaining_secs: left.unwrap_or(0), canary: left.is_none() }
            }),
            flips_total: self.dec.flips_total,
            rollbacks_total: self.dec.rollbacks_total,
            auto_rollbacks_total: self.dec.auto_rollbacks_total,
            last_flip_ns: self.last_flip_ns,
            adopted: self.dp.adopted,
            last_republish: self.last_republish.clone(),
            signals,
            signals_not_listed,
            fleet: self.fleet_status(),
        })
    }
}

impl State {
    /// This gateway's state as its fleet key carries it.
    pub fn gateway_state(&self) -> crate::fleet::GatewayState {
        let (id, revision) = match &self.fleet {
            Some((f, l)) => (f.gateway.clone().unwrap_or_default(), crate::lock(l).applied_revision),
            None => (String::new(), 0),
        };
        crate::fleet::GatewayState {
            gateway: id,
            revision,
            generation: self.dec.generation,
            active: self.active().name().into(),
            canary_permille: self.canary_permille(),
            selector: self.dp.current().0,
            health: crate::fleet::color_views(&|c| self.verdict(c)),
            at_unix_ms: 0,
        }
    }

    /// This gateway's state as the fleet's first desired state.
    fn initial_desired(&self) -> crate::fleet::Desired {
        let id = self.fleet.as_ref().and_then(|(f, _)| f.gateway.clone()).unwrap_or_default();
        crate::fleet::Desired {
            generation: self.dec.generation,
            active: self.active().name().into(),
            canary_permille: self.canary_permille(),
            previous: self.dec.previous.map(|c| c.name().into()),
            event: "joined".into(),
            force: false,
            forced: false,
            drain_secs: None,
            who: format!("gateway {id}"),
            reason: "the fleet had no desired state: the first gateway to join wrote its own".into(),
            at_unix_ms: crate::fleet::unix_ms(),
        }
    }

    /// Applies the fleet's desired state `d` (mod revision `revision`) to this gateway: the
    /// same selector write, commit, state file and audit line as a local switch. A revision
    /// already applied is a no-op.
    fn adopt(&mut self, d: &crate::fleet::Desired, revision: i64) -> anyhow::Result<()> {
        let Some((_, link)) = &self.fleet else { bail!("not in fleet mode") };
        let link = link.clone();
        if revision <= crate::lock(&link).applied_revision {
            return Ok(());
        }
        let active = d.active_color()?;
        if d.canary_permille > 990 || !d.canary_permille.is_multiple_of(10) {
            bail!("the fleet's desired state has canary_permille {}; bg writes whole percents 10 to 990", d.canary_permille);
        }
        if let Some(s) = d.drain_secs.filter(|s| *s > decisions::MAX_DRAIN_SECS) {
            bail!("the fleet's desired state has drain_secs {s}; bg writes 0 to {}", decisions::MAX_DRAIN_SECS);
        }
        // Windows run from the switch's time, not from when this gateway caught up with it: a
        // gateway back from a partition does not open a fresh watch window on an old flip.
        let age_ms = crate::fleet::unix_ms().saturating_sub(d.at_unix_ms);
        let plan = self.dec.adopt(active, d.canary_permille, d.kind(), d.force, d.forced, d.drain_secs, d.generation, self.now_ms(), age_ms);
        match plan {
            Some(plan) => {
                let reason = format!("fleet revision {revision}: {} by {}: {}", d.event, d.who, d.reason);
                self.carry_out(Decision::Switch(plan), Actor::Fleet, &reason, Instant::now())?;
            }
            None => {
                // Already in place (a restart, or this gateway's own first state).
                if self.dec.generation != d.generation {
                    self.dec.generation = d.generation;
                    self.persist();
                }
            }
        }
        self.dec.previous = d.previous.as_deref().and_then(parse_color).or(self.dec.previous);
        crate::lock(&link).applied_revision = revision;
        Ok(())
    }

    /// Fence or unfence when the link to etcd says so (the hook runs off the lock).
    fn fence_due(&mut self) -> Option<(String, &'static str)> {
        let (f, link) = self.fleet.as_ref()?;
        let mut l = crate::lock(link);
        if !l.connected && !l.fenced && l.since.elapsed() >= Duration::from_secs(f.fence_after_secs) {
            l.fenced = true;
            let why = format!("cut off from etcd for {} s (fence_after_secs = {})", l.since.elapsed().as_secs(), f.fence_after_secs);
            drop(l);
            error!("{why}: fencing this gateway");
            self.audit(json!({"event": "fence", "to": self.active().name(), "generation": self.dec.generation, "uid": "agent", "reason": why}));
            return f.fence_command.clone().map(|c| (c, "fence"));
        }
        if l.connected && l.fenced {
            l.fenced = false;
            drop(l);
            info!("in touch with etcd again: unfencing this gateway");
            self.audit(json!({"event": "unfence", "to": self.active().name(), "generation": self.dec.generation, "uid": "agent",
                "reason": "in touch with etcd again"}));
            return f.unfence_command.clone().map(|c| (c, "unfence"));
        }
        None
    }

    fn fleet_status(&self) -> Option<crate::control::FleetStatus> {
        let (f, link) = self.fleet.as_ref()?;
        let l = crate::lock(link);
        Some(crate::control::FleetStatus {
            name: f.name.clone(),
            gateway: f.gateway.clone().unwrap_or_default(),
            etcd: if l.connected { "up" } else { "down" }.into(),
            etcd_for_secs: l.since.elapsed().as_secs(),
            applied_revision: l.applied_revision,
            fenced: l.fenced,
            fence_after_secs: f.fence_after_secs,
            last_error: l.last_error.clone(),
        })
    }
}

/// The agent as its fleet session sees it.
struct AgentGateway(Arc<Mutex<State>>);

impl crate::fleet::Gateway for AgentGateway {
    fn apply(&self, desired: &crate::fleet::Desired, revision: i64) -> anyhow::Result<()> {
        crate::lock(&self.0).adopt(desired, revision)
    }
    fn state(&self) -> crate::fleet::GatewayState {
        crate::lock(&self.0).gateway_state()
    }
    fn initial(&self) -> crate::fleet::Desired {
        crate::lock(&self.0).initial_desired()
    }
    fn store_went_back(&self) {
        if let Some((_, l)) = &crate::lock(&self.0).fleet {
            crate::lock(l).applied_revision = 0;
        }
    }
    fn applied_revision(&self) -> i64 {
        crate::lock(&self.0).fleet.as_ref().map_or(0, |(_, l)| crate::lock(l).applied_revision)
    }
}

/// The longest a fence or unfence hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs fence and unfence hooks one at a time, in the order they were due (an unfence never
/// overtakes the fence before it), each `sh -c` with the fleet, gateway and event in its
/// environment (`BG_HOOK_FLEET`, `BG_HOOK_GATEWAY`, `BG_HOOK_EVENT`) and killed after
/// `HOOK_TIMEOUT`.
fn spawn_hook_runner() -> std::sync::mpsc::Sender<(String, &'static str, String, String)> {
    let (tx, rx) = std::sync::mpsc::channel::<(String, &'static str, String, String)>();
    let _ = std::thread::Builder::new().name("bg-hooks".into()).spawn(move || {
        for (command, event, fleet, gateway) in rx {
            let child = std::process::Command::new("sh")
                .args(["-c", &command])
                .env("BG_HOOK_FLEET", &fleet)
                .env("BG_HOOK_GATEWAY", &gateway)
                .env("BG_HOOK_EVENT", event)
                .stdin(std::process::Stdio::null())
                .spawn();
            let mut child = match child {
                Ok(c) => c,
                Err(e) => {
                    error!(event, command = %command, error = %e, "hook could not be started");
                    continue;
                }
            };
            let deadline = Instant::now() + HOOK_TIMEOUT;
            let status = loop {
                match child.try_wait() {
                    Ok(Some(s)) => break Some(s),
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break None;
                    }
                }
            };
            match status {
                Some(s) if s.success() => info!(event, command = %command, "hook ran"),
                Some(s) => error!(event, command = %command, status = %s, "hook failed"),
                None => error!(event, command = %command, timeout_secs = HOOK_TIMEOUT.as_secs(), "hook killed: it ran too long"),
            }
        }
    });
    tx
}

/// How long an automatic rollback keeps being proposed to a fleet that refuses it (etcd out
/// of reach, the gate not yet passing everywhere), while the fleet's state is still the one it
/// would undo.
const PROPOSE_FOR: Duration = Duration::from_secs(60);

/// Proposes an automatic rollback to the fleet: written only if the desired state is still
/// the one this gateway applied (another gateway may have rolled back first). Retried every
/// second for `PROPOSE_FOR` while that holds. `fleet`, `local`: read by the caller, which holds
/// the agent's lock (taken again here only from the task, once it is let go).
fn propose_rollback(state: Arc<Mutex<State>>, fleet: crate::config::Fleet, local: crate::fleet::GatewayState, why: String, revision: i64) {
    tokio::spawn(async move {
        let who = format!("agent of gateway {}", local.gateway);
        let started = Instant::now();
        loop {
            match crate::fleet::switch(&fleet, crate::fleet::Op::Rollback { force: false }, &who, &why, Some(local.clone()), Some(revision)).await {
                Ok(o) if o.plan.is_some() => {
                    info!(generation = o.generation, "the fleet rolled back on this gateway's proposal");
                    crate::lock(&state).dec.commit_auto_rollback();
                    return;
                }
                Ok(_) => return info!("automatic rollback: the fleet's state already matched"),
                Err(e) => {
                    // Raced: another gateway's proposal (or a switch) came first; nothing to retry.
                    let raced = e.downcast_ref::<crate::fleet::Raced>().is_some();
                    let e = format!("{e:#}");
                    if raced || started.elapsed() >= PROPOSE_FOR {
                        warn!(error = %e, "automatic rollback not written to the fleet");
                        let st = crate::lock(&state);
                        st.audit(json!({"event": "auto_rollback_skipped", "from": st.active().name(), "to": st.active().other().name(),
                            "generation": st.dec.generation, "uid": "agent", "reason": format!("{why}; not written to the fleet: {e}")}));
                        return;
                    }
                    warn!(error = %e, "automatic rollback not written to the fleet yet; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
}

/// A flip or rollback in fleet mode: decided on the fleet's desired state with the fleet-wide
/// gate, written to etcd, and answered once every live gateway applied it (this one included:
/// it applies through its own watch, like the others).
async fn fleet_request(state: &Arc<Mutex<State>>, req: Request, who: Actor) -> Response {
    let started = Instant::now();
    let (fleet, local, window) = {
        let mut st = crate::lock(state);
        st.apply_health();
        let Some((f, _)) = &st.fleet else { return Response::Error { message: "not in fleet mode".into() } };
        (f.clone(), st.gateway_state(), st.config.watch_window_secs)
    };
    let op = match req {
        Request::Flip { color, drain_secs, percent, force, .. } => match parse_color(&color) {
            None => return Response::Error { message: format!("unknown color `{color}`; use `blue` or `green`") },
            Some(to) => crate::fleet::Op::Flip(FlipRequest { to, percent, drain_secs, force }),
        },
        Request::Rollback { force } => crate::fleet::Op::Rollback { force },
        _ => return Response::Error { message: "not a switch".into() },
    };
    let by = format!("{} on gateway {}", who.describe(), local.gateway);
    match crate::fleet::switch(&fleet, op, &by, "requested", Some(local), None).await {
        Ok(o) => Response::Flipped(fleet_flip_result(o, Some(window), started)),
        Err(e) => {
            let message = format!("{e:#}");
            if message.starts_with("refused") {
                let st = crate::lock(state);
                st.audit(json!({"event": "refused", "from": st.active().name(), "generation": st.dec.generation, "uid": who.json(), "reason": message}));
            }
            Response::Error { message }
        }
    }
}

/// A fleet switch's outcome as a flip's answer. `window`: this gateway's watch window (None:
/// asked from a host without an agent).
pub fn fleet_flip_result(o: crate::fleet::Outcome, window: Option<u64>, started: Instant) -> FlipResult {
    let total_ns = started.elapsed().as_nanos() as u64;
    let Some(p) = o.plan else { return FlipResult::unchanged(o.from, o.generation, total_ns) };
    let to = p.to.name();
    // The plan was decided without a watch window (each gateway opens its own): where one
    // guards it, say so fleet-wide; where none does (--force, a rollback), the plan's words.
    let auto_rollback = match p.kind {
        Kind::Flip | Kind::Canary if p.force => p.auto_rollback(),
        Kind::Flip | Kind::Canary if window == Some(0) => "off on this gateway (watch_window_secs = 0)".into(),
        Kind::Canary => format!("on while the canary runs: {to} turning unhealthy as seen from any gateway ends it fleet-wide"),
        Kind::Flip => format!(
            "on for each gateway's watch window{}: {to} turning unhealthy as seen from any gateway rolls the fleet back once",
            window.map(|w| format!(" (this one's: {w} s)")).unwrap_or_default()
        ),
        Kind::Rollback | Kind::CanaryCancelled => p.auto_rollback(),
    };
    FlipResult {
        from: p.from.name().into(),
        to: to.into(),
        generation: p.generation,
        changed: true,
        switch_ns: 0,
        total_ns,
        drain_secs: p.drain_secs,
        percent: p.percent,
        forced: p.forced,
        auto_rollback,
        fleet: o.fleet,
    }
}

/// What health and the SLOs say of `color` (`decisions::verdict` with the signal view's
/// breaches).
fn gate_verdict(services: &[crate::config::Service], health: &health::Table, signals: &crate::signals::Shared, color: Color) -> Verdict {
    let v = decisions::verdict(services, color, &crate::lock(health));
    decisions::with_breaches(v, crate::lock(signals).breaches(color))
}

/// The flow sampler's last counts and when they were taken.
pub type FlowSample = Arc<Mutex<Option<(crate::dataplane::FlowCounts, Instant)>>>;

/// Walks the flow tables on a thread of its own, holding no lock of the agent's (status and
/// scrapes read the last sample; a walk at a million flows takes seconds). It rests at least
/// as long as each walk took, and at least `FLOW_SAMPLE_EVERY`: half a core at most.
fn spawn_flow_sampler(tables: Arc<crate::dataplane::FlowTables>) -> anyhow::Result<FlowSample> {
    let sample: FlowSample = Arc::new(Mutex::new(None));
    let out = sample.clone();
    std::thread::Builder::new()
        .name("bg-flow-sampler".into())
        .spawn(move || loop {
            let started = Instant::now();
            match tables.counts() {
                Ok(c) => *crate::lock(&out) = Some((c, Instant::now())),
                Err(e) => warn!(error = %format!("{e:#}"), "walking the flow tables failed"),
            }
            std::thread::sleep(started.elapsed().max(FLOW_SAMPLE_EVERY));
        })
        .context("starting the flow sampler")?;
    Ok(sample)
}

/// Forwards the data plane's log records (aya-log, a ring buffer) to this agent's log as they
/// arrive.
fn spawn_data_plane_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns the ring buffer's fd; it moves into the AsyncFd and stays open,
    // the same fd, until the AsyncFd drops it.
    let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    match fd {
        Ok(mut fd) => {
            tokio::spawn(async move {
                loop {
                    let Ok(mut guard) = fd.readable_mut().await else { return };
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        Err(e) => warn!(error = %e, "cannot watch the data plane's log records"),
    }
}

/// Before the program is attached: watch for failed redirects and probe every interface, so
/// an egress that cannot take redirects (a fresh veth pair: GRO off at the peer) goes through
/// the kernel from the first packet on instead of dropping it. Without the watch (tracefs not
/// available), every interface takes the kernel path: slower, never a blackhole.
fn check_redirects(dp: &mut Dataplane, config: &Config) {
    let ifindexes: Vec<(String, u32)> = config.interfaces.iter().map(|i| (i.clone(), crate::dataplane::ifindex(i))).collect();
    if let Err(e) = dp.watch_redirects() {
        warn!(error = %format!("{e:#}"), "cannot watch XDP redirects; every interface takes the kernel path (XDP_PASS)");
        for (_, i) in &ifindexes {
            let _ = dp.mark_no_redirect(*i);
        }
        return;
    }
    for (name, ifindex) in ifindexes {
        match dp.probe_egress(ifindex) {
            Ok(true) => info!(interface = %name, "XDP_REDIRECT into it works"),
            Ok(false) => warn!(interface = %name,
                "XDP_REDIRECT into it fails (for a veth: its peer needs GRO, `ethtool -K PEER gro on`, or an XDP program); \
                 packets leaving by it take the kernel path (XDP_PASS), slower but delivered"),
            Err(e) => {
                warn!(interface = %name, error = %format!("{e:#}"), "redirect probe failed; this interface takes the kernel path");
                let _ = dp.mark_no_redirect(ifindex);
            }
        }
    }
}

/// Runs the agent. `object`: an XDP object file to load instead of the one built into this
/// bgctl (`bgctl agent --xdp-object`, for trying a build before shipping it).
/// Runs the agent until SIGTERM/SIGINT: the control socket, the tick and the decisions on the
/// calling runtime; health checks and the metrics endpoint on `background`.
pub async fn run(config: Config, object: Option<&Path>, background: tokio::runtime::Handle) -> anyhow::Result<()> {
    let from_file;
    let object: &[u8] = match object {
        Some(path) => {
            from_file = std::fs::read(path)
                .with_context(|| format!("reading the XDP object {} (--xdp-object)", path.display()))?;
            info!(object = %path.display(), "loading the XDP object from a file instead of the built-in one");
            &from_file
        }
        None => require_embedded_object()?,
    };
    check_interfaces(&config)?;
    raise_open_file_limit();
    claim_socket(&config.socket)?;
    // Bound (its token and TLS files read) before anything is loaded: a bad [api] stops the
    // start with nothing done.
    let api = match &config.api {
        Some(a) => Some(crate::api::Listener::bind(a).await?),
        None => None,
    };
    ensure_bpffs(&config.pin_dir)?;
    let store = Store::open(&config.state_dir)?;
    let persisted = store.load()?;

    check_pin_dir(&config.pin_dir, None)?;
    let fresh = !config.pin_dir.exists();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.pin_dir)
        .with_context(|| format!("creating pin directory {}", config.pin_dir.display()))?;
    std::fs::set_permissions(&config.pin_dir, std::fs::Permissions::from_mode(0o700))?;
    let pin_lock = lock_pin_dir(&config.pin_dir)?;
    // Undo a fresh start that fails half-way: nothing pinned stays behind.
    let undo = |e: anyhow::Error| {
        if fresh {
            let _ = remove_pinned(&config.pin_dir);
        }
        e
    };
    let initial = persisted
        .as_ref()
        .and_then(|p| parse_color(&p.active))
        .unwrap_or(config.initial_color);
    let mut dp = Dataplane::open(object, &config, Some(&config.pin_dir), initial).map_err(undo)?;
    if let Some(logger) = dp.take_logger() {
        spawn_data_plane_log(logger);
    }
    if config.forwarding == Forwarding::Redirect {
        check_redirects(&mut dp, &config);
    }
    let attachments = dp.attach(&config.interfaces, config.xdp_mode, &config.pin_dir).map_err(undo)?;
    for a in &attachments {
        info!(interface = %a.interface, mode = %a.mode, "XDP program attached");
    }
    crate::dataplane::failpoint("attached");

    // Who is active: the kernel when adopting; the persisted state (or config) when fresh.
    let selector = dp.selector()?;
    let active = Color::from_u8(slot_color(selector.primary())).unwrap_or(Color::Blue);
    let (mut generation, mut previous) = (1, None);
    if let Some(p) = &persisted {
        generation = p.generation.max(1);
        previous = p.previous.as_deref().and_then(parse_color);
        if parse_color(&p.active) != Some(active) {
            warn!(kernel = active.name(), file = %p.active, "the data plane's active color differs from the state file; the data plane wins");
            generation = generation.saturating_add(1);
            previous = Some(active.other());
        }
    }
    // After a reboot, a canary that was running resumes.
    if let Some(p) = persisted.as_ref().filter(|p| !dp.adopted && p.canary_permille != 0) {
        dp.route(active, p.canary_permille)?;
    }
    // The last step of a start: from here on a restart adopts this state instead of redoing it.
    dp.mark_ready()?;

    let health_table: health::Table = Arc::new(Mutex::new(health::Backends::new()));
    let health_changes = Arc::new(AtomicU64::new(0));
    let published = [Color::Blue, Color::Green].map(|c| {
        config.services.iter().map(|s| s.backends(c).iter().map(|b| b.weight).collect()).collect()
    });
    let flow_tables = Arc::new(dp.flow_tables()?);
    let flow_sample = spawn_flow_sampler(flow_tables.clone())?;
    let canary = dp.current().canary_permille();
    let counter_maps = Arc::new(dp.counter_maps()?);
    let signals = crate::signals::spawn(dp.signal_maps()?, config.services.clone())?;
    let mut state = State {
        counter_maps,
        signals,
        flow_sample,
        flow_tables,
        dp,
        store,
        health: health_table.clone(),
        attachments,
        _pin_lock: pin_lock,
        dec: Decisions::new(active, canary, previous, generation, config.watch_window_secs, 0),
        epoch: Instant::now(),
        last_drain_removed: None,
        published,
        last_flip_ns: 0,
        last_republish: None,
        health_changes: health_changes.clone(),
        applied_changes: 0,
        all_down_reported: [false; 2],
        persist_due: false,
        fleet: config.fleet.clone().map(|f| (f, crate::fleet::new_link())),
        fleet_proposals: Vec::new(),
        config,
    };
    state.persist_now();
    state.audit(json!({"event": "started", "to": active.name(), "generation": generation, "uid": "agent",
        "reason": if state.dp.adopted { "adopted pinned data plane state" } else { "fresh data plane" }}));
    info!(socket = %state.config.socket.display(), active = active.name(), generation, adopted = state.dp.adopted,
        services = state.config.services.len(), "bg agent ready");
    let state = Arc::new(Mutex::new(state));

    // Fleet mode: the fleet's desired state is read and applied before anything is answered;
    // with etcd out of reach, the last applied state (pinned, and in the state file) serves.
    let fleet = crate::lock(&state).config.fleet.clone();
    if let Some(f) = fleet {
        let gw: Arc<dyn crate::fleet::Gateway> = Arc::new(AgentGateway(state.clone()));
        let link = crate::lock(&state).fleet.as_ref().map(|(_, l)| l.clone()).expect("fleet link");
        let failed = match tokio::time::timeout(FLEET_START_SYNC, crate::fleet::sync_once(&f, gw.as_ref())).await {
            Ok(Ok(_)) => {
                info!(fleet = %f.name, "applied the fleet's desired state");
                None
            }
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(_) => Some(format!("etcd did not answer within {FLEET_START_SYNC:?}")),
        };
        let mut l = crate::lock(&link);
        l.connected = failed.is_none();
        if let Some(e) = failed {
            warn!(error = %e, "could not read the fleet's desired state at start; serving the last applied state until etcd answers");
            l.last_error = Some(e);
        }
        drop(l);
        tokio::spawn(crate::fleet::keep_member(f, gw, link));
    }
    let listener = {
        let st = crate::lock(&state);
        let listener = UnixListener::bind(&st.config.socket)
            .with_context(|| format!("binding control socket {}", st.config.socket.display()))?;
        std::fs::set_permissions(&st.config.socket, std::fs::Permissions::from_mode(0o600))?;
        listener
    };

    let (checkers, stop_checks_deadline) = {
        let _on = background.enter();
        let backends = all_backends(&crate::lock(&state).config);
        // A check in flight at exit may take its timeout, then the grace for a late answer.
        let longest = backends.iter().map(|(_, h)| h.timeout).max().unwrap_or_default();
        let deadline = (longest + health::LATE_ANSWER_GRACE + Duration::from_millis(100)).min(MAX_STOP_CHECKS);
        let changes = health_changes.clone();
        let checkers = health::spawn(
            backends,
            health_table,
            Arc::new(move |addr, s| {
                changes.fetch_add(1, Ordering::Release);
                info!(backend = %addr, state = ?s, "backend health changed")
            }),
        );
        (checkers, deadline)
    };
    // Read out first: the lock must not be held across the await.
    let metrics_listen = crate::lock(&state).config.metrics_listen;
    if let Some(addr) = metrics_listen {
        let labels = metrics::Labels::of(&crate::lock(&state).config.services);
        let state = state.clone();
        let snapshot: metrics::Snapshotter = Arc::new(move || {
            // The lock for copies only; the counter maps are read after it is let go.
            let (snapshot, counters) = {
                let st = crate::lock(&state);
                (st.metrics_snapshot(), st.counter_maps.clone())
            };
            let mut snapshot = snapshot?;
            snapshot.counters = counters.read()?;
            Ok(snapshot)
        });
        background.spawn(metrics::serve(addr, labels, snapshot)).await.map_err(|e| anyhow!("the metrics task failed: {e}"))??;
    }

    let api = api.map(|api| api.serve(state.clone(), &background));

    let hooks = spawn_hook_runner();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONTROL_CONNECTIONS));
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let mut st = crate::lock(&state);
                ticks += 1;
                if ticks % REPROBE_TICKS == 0 {
                    if st.config.forwarding == Forwarding::Redirect {
                        st.reprobe();
                    }
                    if let Err(e) = st.dp.refresh_local_addrs() {
                        warn!(error = %format!("{e:#}"), "could not refresh the gateway's own addresses");
                    }
                }
                st.apply_health();
                if let Some((color, mut tables)) = st.tick() {
                    // The walk (O(flows)) runs on the blocking pool, holding no lock.
                    let state = state.clone();
                    tokio::spawn(async move {
                        let result = tokio::task::spawn_blocking(move || tables.remove_flows_of(color))
                            .await
                            .unwrap_or_else(|e| Err(anyhow!("the drain task failed: {e}")));
                        crate::lock(&state).finish_drain(color, result);
                    });
                }
                for (why, revision) in std::mem::take(&mut st.fleet_proposals) {
                    if let Some((f, _)) = &st.fleet {
                        propose_rollback(state.clone(), f.clone(), st.gateway_state(), why, revision);
                    }
                }
                if let Some((command, event)) = st.fence_due() {
                    let (f, _) = st.fleet.as_ref().expect("fleet mode");
                    let _ = hooks.send((command, event, f.name.clone(), f.gateway.clone().unwrap_or_default()));
                }
                if st.persist_due {
                    st.persist_now();
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((mut stream, _)) => {
                    let state = state.clone();
                    let Ok(permit) = connections.clone().try_acquire_owned() else {
                        // Over the cap: said, and closed, without waiting on the client.
                        tokio::spawn(async move {
                            let r = Response::Error { message: format!(
                                "too many control connections open (at most {MAX_CONTROL_CONNECTIONS}); close some and retry") };
                            let line = format!("{}\n", serde_json::to_string(&r).unwrap_or_default());
                            let _ = tokio::time::timeout(CONTROL_WRITE_TIMEOUT, stream.write_all(line.as_bytes())).await;
                        });
                        continue;
                    };
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream, state).await {
                            warn!(error = %format!("{e:#}"), "control connection failed");
                        }
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Out of fds, say: back off instead of spinning on the error.
                    warn!(error = %e, "accept on control socket failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = term.recv() => { info!("SIGTERM"); break; }
            _ = int.recv() => { info!("SIGINT"); break; }
        }
    }
    drop(listener);
    if let Some(api) = api {
        api.abort();
    }
    // Checks in flight end first: cut by the exit, each would leave a reset on its backend.
    if !checkers.stop(stop_checks_deadline).await {
        warn!(deadline_ms = stop_checks_deadline.as_millis() as u64, "health checks still in flight at exit were cut");
    }
    let fleet = crate::lock(&state).fleet.clone();
    if let Some((f, link)) = fleet {
        crate::fleet::leave(&f, &link).await;
    }
    let mut st = crate::lock(&state);
    if st.persist_due {
        st.persist_now();
    }
    st.store.flush();
    let _ = std::fs::remove_file(&st.config.socket);
    info!(
        pin_dir = %st.config.pin_dir.display(),
        "bg agent stopped; the data plane stays attached and keeps forwarding as configured \
         (`bgctl agent --cleanup --config ...` removes it)"
    );
    Ok(())
}

/// The longest a fleet agent's start waits for etcd before it serves its last applied state.
const FLEET_START_SYNC: Duration = Duration::from_secs(5);

/// The longest a stopping agent waits for its health checks in flight (their longest timeout
/// plus `health::LATE_ANSWER_GRACE`, but no more than this).
const MAX_STOP_CHECKS: Duration = Duration::from_secs(15);

async fn serve(stream: UnixStream, state: Arc<Mutex<State>>) -> anyhow::Result<()> {
    let uid = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(MAX_LINE as u64 + 1)).lines();
    // Root, or the user the agent runs as (the package runs it as `bg`, not root).
    let me = nix::unistd::geteuid().as_raw();
    if uid != 0 && uid != me {
        // Take the request first, so the refusal is what the client reads (not a broken pipe).
        let _ = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await;
        let r = Response::Error {
            message: format!("permission denied: uid {uid} is neither root nor the agent's own user (uid {me}); run bgctl as root"),
        };
        write.write_all(format!("{}\n", serde_json::to_string(&r)?).as_bytes()).await?;
        warn!(uid, "refused a control connection from a non-root peer");
        return Ok(());
    }
    while let Some(line) = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await?? {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(req) => answer(&state, req, Actor::Uid(uid)).await,
            Err(e) => Response::Error {
                message: format!(
                    "bad request ({e}); send one JSON object per line such as {{\"op\":\"status\"}}, \
                     {{\"op\":\"flip\",\"color\":\"green\"}}, {{\"op\":\"rollback\"}}, {{\"op\":\"stats\"}} or {{\"op\":\"history\"}}"
                ),
            },
        };
        let mut out = serde_json::to_string(&response)?;
        out.push('\n');
        // A client that does not read its answer loses its connection, not the agent's time.
        tokio::time::timeout(CONTROL_WRITE_TIMEOUT, write.write_all(out.as_bytes()))
            .await
            .context("the client did not read its answer")??;
    }
    Ok(())
}

/// One request, from either transport (the control socket or the HTTP API): the one path
/// every request takes.
pub async fn answer(state: &Arc<Mutex<State>>, req: Request, who: Actor) -> Response {
    let fleet = crate::lock(state).fleet.is_some();
    match req {
        req @ (Request::Flip { dry_run: false, .. } | Request::Rollback { .. }) if fleet => fleet_request(state, req, who).await,
        // Flips, rollbacks, status and stats take microseconds under the lock (no table walk,
        // no file read): answered here, without a hop to another thread. Reading the audit
        // log and walking the flow tables go to the blocking pool.
        req @ (Request::History { .. } | Request::Status { count_flows: true } | Request::Flip { dry_run: true, .. }) => {
            let state = state.clone();
            tokio::task::spawn_blocking(move || handle(&state, req, who))
                .await
                .unwrap_or_else(|e| Response::Error { message: format!("the request's task failed: {e}") })
        }
        req => handle(state, req, who),
    }
}

/// One request. The state lock serializes flips: each gets its own generation.
fn handle(state: &Mutex<State>, req: Request, who: Actor) -> Response {
    let mut st = crate::lock(state);
    let result = match req {
        Request::Status { count_flows: false } => st.status().map(Response::Status),
        Request::Status { count_flows: true } => {
            // Walked after the lock is let go: a walk of any length delays no flip.
            let status = st.status();
            let tables = st.flow_tables.clone();
            drop(st);
            status
                .and_then(|mut s| {
                    s.flows = tables.counts()?;
                    s.flows_age_ms = Some(0);
                    Ok(s)
                })
                .map(Response::Status)
        }
        Request::Stats => {
            let counters = st.counter_maps.clone();
            drop(st);
            counters.read().map(Response::Stats)
        }
        Request::Backends { color, state, offset, limit } => {
            let limit = limit.unwrap_or(MAX_BACKENDS_PAGE);
            let color = match color.as_deref() {
                None => Ok(None),
                Some(c) => parse_color(c).map(Some).ok_or_else(|| anyhow!("unknown color `{c}`; use `blue` or `green`")),
            };
            match color {
                Err(e) => Err(e),
                Ok(_) if !(1..=MAX_BACKENDS_PAGE).contains(&limit) => {
                    Err(anyhow!("limit {limit} is out of range; use 1 to {MAX_BACKENDS_PAGE} backends per page"))
                }
                Ok(c) => {
                    let matching: Vec<BackendStatus> =
                        st.backend_statuses(c).into_iter().filter(|b| state.is_none_or(|x| x == b.state)).collect();
                    let total = matching.len();
                    Ok(Response::Backends { total, offset, backends: matching.into_iter().skip(offset).take(limit).collect() })
                }
            }
        }
        Request::History { limit } => match limit.unwrap_or(50) {
            n @ 1..=MAX_HISTORY => {
                // Read after the lock is let go: a long log delays no flip.
                let path = st.store.audit_path();
                drop(st);
                crate::state::read_history(&path, n).map(|events| Response::History { events })
            }
            n => Err(anyhow!("history limit {n} is out of range; use 1 to {MAX_HISTORY} events")),
        },
        Request::Flip { color, drain_secs, percent, force, dry_run } => match parse_color(&color) {
            None => Err(anyhow!("unknown color `{color}`; use `blue` or `green`")),
            Some(to) if dry_run => {
                // The live flows are counted after the lock is let go (a walk of any length
                // delays no flip); this runs on the blocking pool (`serve`).
                let d = st.dry_run(FlipRequest { to, percent, drain_secs, force });
                let tables = st.flow_tables.clone();
                drop(st);
                d.and_then(|mut d| {
                    d.live_flows = tables.counts()?.flows;
                    d.live_flows_age_ms = Some(0);
                    Ok(Response::DryRun(d))
                })
            }
            Some(to) => st.flip(FlipRequest { to, percent, drain_secs, force }, who).map(Response::Flipped),
        },
        Request::Rollback { force } => st.rollback(force, who).map(Response::Flipped),
    };
    result.unwrap_or_else(|e| Response::Error { message: format!("{e:#}") })
}
