//! The kernel side as the agent sees it: load the XDP object, create or adopt its pinned maps,
//! attach through pinned links (or upgrade the program behind them), publish backend tables,
//! flip.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context};
use aya::{
    maps::{Array, HashMap, MapData, MapInfo, MapType, PerCpuArray},
    programs::{links::FdLink, links::PinnedLink, xdp::XdpLink, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use bg_common::{
    maglev,
    pin::{
        ALL_MAPS, MAP_ACTIVE, MAP_BACKEND_SETS, MAP_COLOR_STATS, MAP_CONFIG, MAP_EMBRYO4, MAP_EMBRYO6, MAP_FLOWS4, MAP_FLOWS6, MAP_FWD_STATS, MAP_GATE,
        MAP_LOCAL_ADDRS, MAP_LOCAL_FILTER, MAP_PREVIEW_REPLIES, MAP_REPLIES,
        MAP_ADDR_FILTER, MAP_EGRESS, MAP_LATENCY, MAP_PROG_IDS, MAP_RATE, MAP_RINGS, MAP_SERVICES, MAP_SIGNALS, MAP_STATS, MAP_VIP_ADDRS,
        PROBE_PROGRAM, PROGRAM, REDIRECT_ERR_PROGRAM,
    },
    addr_filter_bit, ADDR_FILTER_WORDS,
    ring_base, slot_color, Backend, BackendKey, BackendSet, BackendSignals, Color, ColorStats, LatencyHist, DpConfig, EgressState, FlowEntry, FlowKey, FlowKey4,
    Fwd, PreviewReply, ReplyNat, MAX_BACKENDS, MAX_LOCAL_ADDRS, REPLY_HAS_PREVIEW,
    RateWindow, Reason, Selector, ServiceInfo, VipAddr, VipKey, DP_FLAG_REDIRECT, DP_READY, FAMILY_V4, FAMILY_V6,
    EGRESS_NO_REDIRECT, MAX_EGRESS, MAX_SERVICES, PROBE_ETHERTYPE, RING_SIZE, SERVICE_HAS_PREVIEW, SERVICE_PREVIEW, SLOTS,
    STAT_SLOTS,
};
use bytemuck::Zeroable;
use tracing::{info, warn};

use crate::config::{BackendAddr, Config, Forwarding, Service, XdpModeSetting};

/// The XDP object built by `cargo xtask build-ebpf`, when this binary was built after it.
#[cfg(bg_embedded_object)]
pub fn embedded_object() -> Option<&'static [u8]> {
    Some(aya::include_bytes_aligned!(env!("BG_EBPF_OBJECT")))
}

#[cfg(not(bg_embedded_object))]
pub fn embedded_object() -> Option<&'static [u8]> {
    None
}

/// The embedded object, or an error that says how to get one.
pub fn require_embedded_object() -> anyhow::Result<&'static [u8]> {
    embedded_object().ok_or_else(|| {
        anyhow!(
            "this bgctl was built without the XDP object; build it with `cargo xtask build` \
             (which runs `cargo xtask build-ebpf` first)"
        )
    })
}

/// Runs a program load again when the verifier was interrupted: it gives up with EAGAIN when a
/// signal is pending for the loading thread (libbpf retries the same way, up to 5 times).
fn retry_interrupted(mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>) -> Result<(), aya::programs::ProgramError> {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
    let mut attempt = 0;
    loop {
        // The verifier gives up with EAGAIN when a signal is pending for the loading thread
        // (a busy process gets SIGCHLD after SIGCHLD): signals wait on this thread while it
        // loads, and go to another thread meanwhile.
        let mut old = SigSet::empty();
        let blocked = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), Some(&mut old)).is_ok();
        let result = load();
        if blocked {
            let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
        }
        match result {
            Err(aya::programs::ProgramError::LoadError { io_error, .. }) if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < 4 => {
                attempt += 1;
                warn!(attempt, "the kernel verifier was interrupted (EAGAIN); loading again");
            }
            other => return other,
        }
    }
}

/// How long a slot that stopped being selectable waits before it is rewritten. XDP programs
/// run for microseconds under RCU; a packet that read the old selector is long done by then.
pub const SLOT_GRACE: Duration = Duration::from_millis(50);

/// An address as map keys hold it: network order words, IPv4 in word 0.
pub fn raw_addr(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

pub fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        FAMILY_V4
    } else {
        FAMILY_V6
    }
}

fn vip_key(vip: &SocketAddr, service: &Service) -> VipKey {
    VipKey {
        addr: raw_addr(vip.ip()),
        port: vip.port().to_be(),
        proto: service.protocol.number(),
        family: family(vip.ip()),
    }
}

fn backend_set(color: Color, backends: &[BackendAddr]) -> BackendSet {
    let mut set = BackendSet::zeroed();
    set.count = backends.len() as u32;
    set.color = color as u32;
    for (slot, b) in set.backends.iter_mut().zip(backends) {
        *slot = Backend { addr: raw_addr(b.addr.ip()), port: b.addr.port().to_be(), _pad: 0 };
    }
    set
}

/// A backend's identity for Maglev: its address and port bytes, so its place in the table does
/// not depend on the other backends.
fn maglev_id(addr: &SocketAddr) -> Vec<u8> {
    let mut id = match addr.ip() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    id.extend_from_slice(&addr.port().to_be_bytes());
    id
}

/// The Maglev table of one color's backends of one service, with these weights (the
/// configured ones, or 0 for backends health checks took out).
pub fn maglev_table_weighted(backends: &[BackendAddr], weights: &[u32]) -> anyhow::Result<Vec<u32>> {
    let ids: Vec<Vec<u8>> = backends.iter().map(|b| maglev_id(&b.addr)).collect();
    let members: Vec<maglev::Member<'_>> =
        ids.iter().zip(weights).map(|(id, w)| maglev::Member { id, weight: *w }).collect();
    maglev::build(&members, RING_SIZE).ok_or_else(|| anyhow!("no backend has a positive weight"))
}

/// The Maglev table with the configured weights.
pub fn maglev_table(backends: &[BackendAddr]) -> anyhow::Result<Vec<u32>> {
    let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
    maglev_table_weighted(backends, &weights)
}

/// The data path's settings from the config.
pub fn dp_config(config: &Config) -> DpConfig {
    DpConfig {
        services: config.services.len() as u32,
        // One budget for the whole gateway, shared by every CPU (see the program's `over_rate`).
        new_flows_per_sec: config.max_new_flows_per_sec,
        udp_idle_ns: config.udp_idle_timeout_secs * 1_000_000_000,
        closing_idle_ns: config.closing_timeout_secs * 1_000_000_000,
        flags: if config.forwarding == Forwarding::Redirect { DP_FLAG_REDIRECT } else { 0 },
        ready: 0,
        unconfirmed_idle_ns: config.unconfirmed_timeout_secs * 1_000_000_000,
    }
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Entries of the signal map: a block of `MAX_BACKENDS` per (service, color).
fn signal_entries(config: &Config) -> u32 {
    config.services.len() as u32 * 2 * MAX_BACKENDS as u32
}

/// The layout a pinned map must have to be adopted.
fn expected_layout(name: &str, config: &Config) -> (MapType, u32, u32, u32) {
    use std::mem::size_of;
    let n = config.services.len() as u32;
    match name {
        MAP_CONFIG => (MapType::Array, 4, size_of::<DpConfig>() as u32, 1),
        MAP_ACTIVE => (MapType::Array, 4, 4, 1),
        MAP_SERVICES => (MapType::Hash, size_of::<VipKey>() as u32, size_of::<ServiceInfo>() as u32, MAX_SERVICES),
        MAP_VIP_ADDRS => (MapType::Hash, size_of::<VipAddr>() as u32, 4, MAX_SERVICES),
        MAP_BACKEND_SETS => (MapType::Array, 4, size_of::<BackendSet>() as u32, SLOTS * MAX_SERVICES),
        MAP_RINGS => (MapType::Array, 4, 4, SLOTS * n * RING_SIZE),
        MAP_FLOWS4 => (MapType::LruHash, size_of::<FlowKey4>() as u32, size_of::<FlowEntry>() as u32, config.flow_table_size),
        MAP_FLOWS6 => (MapType::LruHash, size_of::<FlowKey>() as u32, size_of::<FlowEntry>() as u32, config.flow_table_size),
        MAP_EMBRYO4 => (MapType::LruHash, size_of::<FlowKey4>() as u32, size_of::<FlowEntry>() as u32, config.unconfirmed_table_size),
        MAP_EMBRYO6 => (MapType::LruHash, size_of::<FlowKey>() as u32, size_of::<FlowEntry>() as u32, config.unconfirmed_table_size),
        MAP_REPLIES => (MapType::Hash, size_of::<BackendKey>() as u32, size_of::<ReplyNat>() as u32, MAX_SERVICES * 2 * MAX_BACKENDS as u32),
        MAP_PREVIEW_REPLIES => (MapType::LruHash, size_of::<FlowKey>() as u32, size_of::<PreviewReply>() as u32, config.unconfirmed_table_size),
        MAP_GATE => (MapType::Array, 4, 8, 1),
        MAP_LOCAL_ADDRS => (MapType::Hash, size_of::<VipAddr>() as u32, 4, MAX_LOCAL_ADDRS),
        MAP_LOCAL_FILTER => (MapType::Array, 4, 8, ADDR_FILTER_WORDS),
        MAP_STATS => (MapType::PerCpuArray, 4, 8, STAT_SLOTS),
        MAP_FWD_STATS => (MapType::PerCpuArray, 4, 8, STAT_SLOTS),
        MAP_COLOR_STATS => (MapType::PerCpuArray, 4, size_of::<ColorStats>() as u32, 2),
        MAP_RATE => (MapType::Array, 4, size_of::<RateWindow>() as u32, 1),
        MAP_ADDR_FILTER => (MapType::Array, 4, 8, ADDR_FILTER_WORDS),
        MAP_EGRESS => (MapType::Hash, 4, size_of::<EgressState>() as u32, MAX_EGRESS),
        MAP_PROG_IDS => (MapType::Array, 4, 4, 2),
        MAP_SIGNALS => (MapType::PerCpuArray, 4, size_of::<BackendSignals>() as u32, signal_entries(config)),
        MAP_LATENCY => (MapType::PerCpuArray, 4, size_of::<LatencyHist>() as u32, MAX_SERVICES * 2),
        other => unreachable!("unknown map {other}"),
    }
}

/// Tests only: `BG_FAILPOINT=NAME` kills this process (SIGKILL, as `kill -9` would) at the
/// step of a start named NAME: `maps-pinned`, `config`, `sets`, `selector`, `attached`.
pub fn failpoint(name: &str) {
    if std::env::var("BG_FAILPOINT").is_ok_and(|f| f == name) {
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Whether the pinned state's start finished (`DpConfig::ready`). When it did not (an agent
/// was killed half-way through a fresh start), the pins are removed so the start is redone
/// from the beginning rather than adopted half-made.
fn finished_start(dir: &Path) -> anyhow::Result<bool> {
    let map = aya::maps::Map::Array(MapData::from_pin(dir.join(MAP_CONFIG)).context("opening the pinned settings")?);
    let cfg: Array<&MapData, DpConfig> = Array::try_from(&map)?;
    if cfg.get(&0, 0)?.ready == DP_READY {
        return Ok(true);
    }
    warn!(pin_dir = %dir.display(), "the pinned state is from a start that did not finish (agent killed half-way?); removing it and starting afresh");
    remove_pins_in(dir).with_context(|| format!("removing the unfinished pinned state in {}", dir.display()))?;
    Ok(false)
}

/// Whether `dir` holds pinned bg state; if so, checks that every map has the layout this
/// version and config expect, and says precisely what does not match.
pub fn check_pinned_layout(dir: &Path, config: &Config) -> anyhow::Result<bool> {
    let present: Vec<&str> = ALL_MAPS.iter().copied().filter(|m| dir.join(m).exists()).collect();
    if present.is_empty() {
        return Ok(false);
    }
    let cleanup = "keep the settings the pinned state was made with, or remove it with `bgctl agent --cleanup --config ...` \
         (this detaches bg and drops the live flows' state)";
    if present.len() != ALL_MAPS.len() {
        let missing: Vec<&str> = ALL_MAPS.iter().copied().filter(|m| !present.contains(m)).collect();
        bail!(
            "pinned state in {} is incomplete or from another bg version (missing {}); {cleanup}",
            dir.display(),
            missing.join(", ")
        );
    }
    for name in ALL_MAPS {
        let info = MapInfo::from_pin(dir.join(name)).with_context(|| format!("reading pinned map {name}"))?;
        let (ty, key, value, entries) = expected_layout(name, config);
        let got_ty = info.map_type().with_context(|| format!("type of pinned map {name}"))?;
        if got_ty != ty || info.key_size() != key || info.value_size() != value {
            bail!(
                "pinned map {} has a layout this bgctl does not know ({got_ty:?}, key {} B, value {} B; \
                 expected {ty:?}, key {key} B, value {value} B): it was made by another bg version; {cleanup}",
                dir.join(name).display(),
                info.key_size(),
                info.value_size()
            );
        }
        if info.max_entries() != entries {
            let hint = match name {
                MAP_FLOWS4 | MAP_FLOWS6 => "flow_table_size differs from the config",
                MAP_EMBRYO4 | MAP_EMBRYO6 | MAP_PREVIEW_REPLIES => "unconfirmed_table_size differs from the config",
                MAP_RINGS | MAP_SIGNALS => "the number of services differs from the config",
                _ => "it was made by another bg version",
            };
            bail!(
                "pinned map {} has {} entries, the config needs {entries} ({hint}); {cleanup}",
                dir.join(name).display(),
                info.max_entries()
            );
        }
    }
    Ok(true)
}

/// How the program is attached to one interface.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    pub interface: String,
    /// "native" or "generic", or "pinned" for a link adopted from an earlier agent.
    pub mode: String,
}

/// Flow table occupancy.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct FlowCounts {
    /// Live flows (established or unconfirmed, not expired) per color: [blue, green].
    pub flows: [u64; 2],
    /// Entries in the established table (one per flow), expired ones included (the LRU
    /// recycles those when it needs room).
    pub entries: u64,
    /// Entries in the unconfirmed table.
    #[serde(default)]
    pub unconfirmed_entries: u64,
    /// Entries (of both tables) that are over by the idle rules but not yet recycled.
    pub expired: u64,
    /// Established entries the LRU evicted to make room: confirmed − drained − present. An
    /// eviction of a live flow makes its next packet a `lost_flow`.
    pub evicted: u64,
}

/// Counters read from the per-CPU maps, summed over CPUs.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Packets per `Reason` name.
    pub reasons: Vec<(String, u64)>,
    /// Rewritten packets per forwarding outcome, and flow entries created/removed.
    pub forwarding: Vec<(String, u64)>,
    /// [blue, green].
    pub colors: [ColorCounters; 2],
}

#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ColorCounters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

pub fn link_pin_path(pin_dir: &Path, interface: &str) -> PathBuf {
    pin_dir.join(format!("link_{interface}"))
}

pub struct Dataplane {
    ebpf: Ebpf,
    services: Vec<Service>,
    /// The selector last written.
    selector: Selector,
    /// When each slot stopped being named by the selector (None: never named, or named now).
    released: [Option<Instant>; SLOTS as usize],
    /// The weights each slot's tables were last written with by this process, per service
    /// (None: not known).
    slot_weights: [Option<Vec<Vec<u32>>>; SLOTS as usize],
    /// Maglev entries written (see `write_slot`).
    ring_writes: u64,
    /// Write Maglev tables with `BPF_MAP_UPDATE_BATCH` (off: one update per entry, as on a
    /// kernel without batch operations for arrays).
    batch_writes: bool,
    /// Pinned links, one per interface, held open for the agent's lifetime (the pins keep them
    /// after it exits).
    links: Vec<FdLink>,
    /// Flow entries removed from userspace (drains), for the eviction arithmetic.
    removed_by_agent: Arc<AtomicU64>,
    /// Whether the maps were adopted from pinned state.
    pub adopted: bool,
}

impl Dataplane {
    /// Loads the object and its program. With `pin_dir`, the maps are pinned there: adopted
    /// when pinned state exists (checked first, see `check_pinned_layout`), created and pinned
    /// otherwise. Services and both colors' full tables are published; when fresh, `initial` is
    /// the active color, when adopted the kernel's selector decides.
    pub fn open(object: &[u8], config: &Config, pin_dir: Option<&Path>, initial: Color) -> anyhow::Result<Dataplane> {
        let adopted = match pin_dir {
            Some(dir) => check_pinned_layout(dir, config)? && finished_start(dir)?,
            None => false,
        };
        let rings = SLOTS * config.services.len() as u32 * RING_SIZE;
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAP_FLOWS4, config.flow_table_size)
            .map_max_entries(MAP_FLOWS6, config.flow_table_size)
            .map_max_entries(MAP_EMBRYO4, config.unconfirmed_table_size)
            .map_max_entries(MAP_EMBRYO6, config.unconfirmed_table_size)
            .map_max_entries(MAP_PREVIEW_REPLIES, config.unconfirmed_table_size)
            .map_max_entries(MAP_RINGS, rings)
            .map_max_entries(MAP_SIGNALS, signal_entries(config));
        let paths: Vec<(&str, PathBuf)> = match pin_dir {
            Some(dir) => ALL_MAPS.iter().map(|m| (*m, dir.join(m))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(object)
            .context("loading the bg XDP object into the kernel (are you root, with BPF enabled?)")?;
        failpoint("maps-pinned");
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| anyhow!("the XDP object has no program `{PROGRAM}`"))?
            .try_into()?;
        retry_interrupted(|| prog.load()).context("the kernel verifier rejected the bg XDP program")?;
        let mut dp = Dataplane {
            ebpf,
            services: config.services.clone(),
            selector: Selector::new(0, 1, 0),
            released: [None; SLOTS as usize],
            slot_weights: Default::default(),
            ring_writes: 0,
            batch_writes: true,
            links: Vec::new(),
            removed_by_agent: Arc::new(AtomicU64::new(0)),
            adopted,
        };
        if adopted {
            // Checked before anything is written: a selector bg could not have written is
            // refused, and the pinned state stays as it was.
            let sel = dp.read_selector()?;
            let ok = sel.primary() < SLOTS
                && sel.secondary() < SLOTS
                && slot_color(sel.primary()) != slot_color(sel.secondary())
                && sel.canary_permille() <= 990;
            if !ok {
                bail!(
                    "the pinned selector ({MAP_ACTIVE}) {:#x} is not one bg writes (slots {} and {}, canary {} per mille); the pinned state was \
                     changed by something else: remove it with `bgctl agent --cleanup --config ...` and start again",
                    sel.0,
                    sel.primary(),
                    sel.secondary(),
                    sel.canary_permille()
                );
            }
        }
        {
            let mut c = dp_config(config);
            if adopted {
                c.ready = DP_READY;
            }
            let mut cfg: Array<&mut MapData, DpConfig> = Array::try_from(dp.map_mut(MAP_CONFIG)?)?;
            cfg.set(0, c, 0).context("writing the data path settings")?;
        }
        failpoint("config");
        if adopted {
            dp.selector = dp.read_selector()?;
            let now = Instant::now();
            // Slots no longer named may still be read by a packet that began a moment ago.
            for s in 0..SLOTS {
                if s != dp.selector.primary() && s != dp.selector.secondary() {
                    dp.released[s as usize] = Some(now);
                }
            }
            let active = Color::from_u8(slot_color(dp.selector.primary())).unwrap_or(Color::Blue);
            info!(active = active.name(), selector = dp.selector.0, "adopted pinned data plane state");
        } else {
            // Fresh: blue in slot 0, green in slot 1, written before anything can read them.
            let (primary, secondary) = (initial as u32, initial.other() as u32);
            dp.selector = Selector::new(primary, secondary, 0);
        }
        dp.install_services()?;
        dp.refresh_local_addrs()?;
        let full: Vec<Vec<u32>> = config.services.iter().map(|s| s.blue.iter().map(|b| b.weight).collect()).collect();
        let full_green: Vec<Vec<u32>> = config.services.iter().map(|s| s.green.iter().map(|b| b.weight).collect()).collect();
        if adopted {
            // Rebuild both colors from this config in their spare slots, then switch to them in
            // one selector write (same active color, same canary share).
            dp.publish(Color::Blue, &full)?;
            dp.publish(Color::Green, &full_green)?;
        } else {
            for color in Color::ALL {
                let w = if color == Color::Blue { &full } else { &full_green };
                dp.write_slot(color as u32, color, w)?;
            }
            failpoint("sets");
            dp.write_selector(dp.selector)?;
            failpoint("selector");
        }
        Ok(dp)
    }

    /// Marks a fresh start finished (the last step, after the links are pinned): from now on
    /// the pinned state is adopted by a restarted agent instead of redone.
    pub fn mark_ready(&mut self) -> anyhow::Result<()> {
        let mut cfg: Array<&mut MapData, DpConfig> = Array::try_from(self.map_mut(MAP_CONFIG)?)?;
        let mut c = cfg.get(&0, 0)?;
        c.ready = DP_READY;
        cfg.set(0, c, 0).context("marking the data plane's start finished")
    }

    pub fn program(&self) -> &Xdp {
        self.ebpf.program(PROGRAM).expect("checked at load").try_into().expect("checked at load")
    }

    fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf.program_mut(PROGRAM).expect("checked at load").try_into().expect("checked at load")
    }

    fn map_mut(&mut self, name: &str) -> anyhow::Result<&mut aya::maps::Map> {
        self.ebpf.map_mut(name).ok_or_else(|| anyhow!("the XDP object has no map `{name}`"))
    }

    fn map(&self, name: &str) -> anyhow::Result<&aya::maps::Map> {
        self.ebpf.map(name).ok_or_else(|| anyhow!("the XDP object has no map `{name}`"))
    }

    /// Writes the services (and their preview VIPs) and the VIP address list; removes entries
    /// an adopted table has for services no longer configured.
    fn install_services(&mut self) -> anyhow::Result<()> {
        let services = self.services.clone();
        let mut wanted = Vec::new();
        for (i, s) in services.iter().enumerate() {
            let has_preview = if s.preview_vip.is_some() { SERVICE_HAS_PREVIEW } else { 0 };
            wanted.push((vip_key(&s.vip, s), ServiceInfo { index: i as u32, flags: has_preview }));
            if let Some(p) = &s.preview_vip {
                wanted.push((vip_key(p, s), ServiceInfo { index: i as u32, flags: SERVICE_PREVIEW }));
            }
        }
        {
            let mut map: HashMap<&mut MapData, VipKey, ServiceInfo> = HashMap::try_from(self.map_mut(MAP_SERVICES)?)?;
            let stale: Vec<VipKey> =
                map.keys().filter_map(|k| k.ok()).filter(|k| !wanted.iter().any(|(w, _)| w == k)).collect();
            for (k, v) in &wanted {
                map.insert(*k, *v, 0).context("writing a service")?;
            }
            for k in stale {
                map.remove(&k).context("removing a service no longer configured")?;
            }
        }
        // The static reply map: every backend of both colors → its service's VIP (the config
        // allows a backend address:port in one service and one color only).
        {
            let mut wanted_replies: Vec<(BackendKey, ReplyNat)> = Vec::new();
            for (i, s) in services.iter().enumerate() {
                let vk = vip_key(&s.vip, s);
                for color in Color::ALL {
                    for (j, b) in s.backends(color).iter().enumerate() {
                        let bk = vip_key(&b.addr, s);
                        let flags = if s.preview_vip.is_some() { REPLY_HAS_PREVIEW } else { 0 };
                        let signal = bg_common::signal_index(i as u32, color as u32, j as u32);
                        wanted_replies.push((bk, ReplyNat { vip: vk.addr, vip_port: vk.port, color: color as u8, flags, signal }));
                    }
                }
            }
            let mut map: HashMap<&mut MapData, BackendKey, ReplyNat> = HashMap::try_from(self.map_mut(MAP_REPLIES)?)?;
            let stale: Vec<BackendKey> =
                map.keys().filter_map(|k| k.ok()).filter(|k| !wanted_replies.iter().any(|(w, _)| w == k)).collect();
            for (k, v) in &wanted_replies {
                map.insert(*k, *v, 0).context("writing the reply map")?;
            }
            for k in stale {
                map.remove(&k).context("removing a backend no longer configured from the reply map")?;
            }
        }
        // The address filter: every VIP and every backend of both colors. Bits are only ever
        // added while the program runs (a stale bit costs a lookup, a missing one loses flows).
        {
            let mut words: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
            let addrs = services.iter().flat_map(|s| {
                std::iter::once(s.vip.ip())
                    .chain(s.preview_vip.map(|p| p.ip()))
                    .chain(s.blue.iter().chain(&s.green).map(|b| b.addr.ip()))
            });
            for a in addrs {
                let bit = addr_filter_bit(&raw_addr(a));
                *words.entry(bit >> 6).or_default() |= 1u64 << (bit & 63);
            }
            let mut filter: Array<&mut MapData, u64> = Array::try_from(self.map_mut(MAP_ADDR_FILTER)?)?;
            for (w, bits) in words {
                let old = filter.get(&w, 0)?;
                filter.set(w, old | bits, 0).context("writing the address filter")?;
            }
        }
        let mut addrs: HashMap<&mut MapData, VipAddr, u32> = HashMap::try_from(self.map_mut(MAP_VIP_ADDRS)?)?;
        let wanted_addrs: Vec<VipAddr> = wanted
            .iter()
            .map(|(k, _)| VipAddr { addr: k.addr, family: k.family as u32 })
            .collect();
        let stale: Vec<VipAddr> =
            addrs.keys().filter_map(|k| k.ok()).filter(|k| !wanted_addrs.contains(k)).collect();
        for a in &wanted_addrs {
            addrs.insert(*a, 1, 0).context("writing a VIP address")?;
        }
        for a in stale {
            addrs.remove(&a).context("removing a VIP address no longer configured")?;
        }
        Ok(())
    }

    /// Fills `slot` with `color`'s backends and Maglev tables for every service. The caller
    /// guarantees no selector names the slot (and none did during the grace period).
    /// Writes `color`'s tables with `weights` into `slot` (one not selectable now). Only what
    /// differs from the slot's known contents is written: a service whose weights are the same
    /// is skipped, and in the others only the Maglev entries that change (a backend going down
    /// or coming back moves about 1/N of the ring, so a flap costs that many writes, not the
    /// ring). A slot whose contents are not known (never written by this process) is written
    /// whole; so is one after a failed write.
    fn write_slot(&mut self, slot: u32, color: Color, weights: &[Vec<u32>]) -> anyhow::Result<()> {
        let services = self.services.clone();
        let n = services.len() as u32;
        let known = self.slot_weights[slot as usize].take();
        // All out (every backend failed its checks): keep them all rather than drop the
        // service; the agent says so loudly.
        let table = |backends: &[BackendAddr], w: &[u32]| {
            if w.iter().all(|w| *w == 0) {
                maglev_table(backends)
            } else {
                maglev_table_weighted(backends, w)
            }
        };
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for (i, s) in services.iter().enumerate() {
            let backends = s.backends(color);
            let old = known.as_ref().map(|k| k[i].as_slice());
            if old == Some(weights[i].as_slice()) {
                continue;
            }
            let context = || format!("service {}: {}", s.name, color.name());
            let new = table(backends, &weights[i]).with_context(context)?;
            let old = old.map(|w| table(backends, w)).transpose().with_context(context)?;
            let base = ring_base(slot, n, i as u32);
            for (j, b) in new.iter().enumerate() {
                if old.as_ref().is_none_or(|o| o[j] != *b) {
                    keys.push(base + j as u32);
                    values.push(*b);
                }
            }
        }
        let batch = self.batch_writes;
        update_u32s(self.map_mut(MAP_RINGS)?, &keys, &values, batch).context("writing a Maglev table")?;
        self.ring_writes += keys.len() as u64;
        if known.is_none() {
            // The sets depend on the config alone: once written, a slot keeps them.
            let mut sets: Array<&mut MapData, BackendSet> = Array::try_from(self.map_mut(MAP_BACKEND_SETS)?)?;
            for (i, s) in services.iter().enumerate() {
                sets.set(BackendSet::index(slot, i as u32), backend_set(color, s.backends(color)), 0)
                    .with_context(|| format!("writing {} backends of service {}", color.name(), s.name))?;
            }
        }
        self.slot_weights[slot as usize] = Some(weights.to_vec());
        Ok(())
    }

    /// Turns batched Maglev writes off (tests: the path a kernel without array batch
    /// operations takes) or on.
    pub fn set_batch_writes(&mut self, on: bool) {
        self.batch_writes = on;
    }

    /// Maglev entries written since this process opened the data plane (for tests and the
    /// benchmark: what health changes cost in map writes).
    pub fn ring_entries_written(&self) -> u64 {
        self.ring_writes
    }

    /// The Maglev table `color` uses now for service `service`, read back from the kernel.
    pub fn ring(&self, color: Color, service: usize) -> anyhow::Result<Vec<u32>> {
        let rings: Array<&MapData, u32> = Array::try_from(self.map(MAP_RINGS)?)?;
        let base = ring_base(self.current_slot(color), self.services.len() as u32, service as u32);
        (0..RING_SIZE).map(|j| Ok(rings.get(&(base + j), 0)?)).collect()
    }

    /// The slot `color` currently uses (named by the selector).
    fn current_slot(&self, color: Color) -> u32 {
        let s = self.selector;
        if slot_color(s.primary()) == color as u8 {
            s.primary()
        } else {
            s.secondary()
        }
    }

    /// Rebuilds `color`'s tables with `weights` (per service, per backend) in its spare slot
    /// and switches the selector to it; the rest of the selector is unchanged.
    pub fn publish(&mut self, color: Color, weights: &[Vec<u32>]) -> anyhow::Result<()> {
        let current = self.current_slot(color);
        let spare = current ^ 2;
        if let Some(t) = self.released[spare as usize] {
            let since = t.elapsed();
            if since < SLOT_GRACE {
                std::thread::sleep(SLOT_GRACE - since);
            }
        }
        self.write_slot(spare, color, weights)?;
        let s = self.selector;
        let next = if s.primary() == current {
            Selector::new(spare, s.secondary(), s.canary_permille())
        } else {
            Selector::new(s.primary(), spare, s.canary_permille())
        };
        self.write_selector(next)?;
        self.released[current as usize] = Some(Instant::now());
        self.released[spare as usize] = None;
        Ok(())
    }

    fn write_selector(&mut self, s: Selector) -> anyhow::Result<()> {
        let mut active: Array<&mut MapData, Selector> = Array::try_from(self.map_mut(MAP_ACTIVE)?)?;
        active.set(0, s, 0).context("writing the active selector")?;
        self.selector = s;
        Ok(())
    }

    fn read_selector(&self) -> anyhow::Result<Selector> {
        let active: Array<&MapData, Selector> = Array::try_from(self.map(MAP_ACTIVE)?)?;
        Ok(active.get(&0, 0)?)
    }

    /// Points new flows at `active` (and `canary_permille`/1000 of them at the other color):
    /// one 4-byte map write (see `Selector`). Returns how long the write took.
    pub fn route(&mut self, active: Color, canary_permille: u32) -> anyhow::Result<Duration> {
        let s = self.selector_for(active, canary_permille);
        let t = Instant::now();
        self.write_selector(s)?;
        Ok(t.elapsed())
    }

    /// The selector `route(active, canary_permille)` would write.
    pub fn selector_for(&self, active: Color, canary_permille: u32) -> Selector {
        Selector::new(self.current_slot(active), self.current_slot(active.other()), canary_permille)
    }

    /// Shorthand for `route(color, 0)`.
    pub fn select(&mut self, color: Color) -> anyhow::Result<()> {
        self.route(color, 0).map(|_| ())
    }

    /// The selector this process last wrote (or adopted): what new flows use, without a
    /// syscall.
    pub fn current(&self) -> Selector {
        self.selector
    }

    /// The selector as the kernel has it.
    pub fn selector(&self) -> anyhow::Result<Selector> {
        self.read_selector()
    }

    /// The color new flows currently go to, read back from the kernel.
    pub fn active(&self) -> anyhow::Result<Color> {
        let s = self.read_selector()?;
        Color::from_u8(slot_color(s.primary())).ok_or_else(|| anyhow!("bad selector {s:?}"))
    }

    /// A second, independent handle on the selector map (for tools and tests that flip from
    /// another thread while this `Dataplane` is in use).
    pub fn selector_handle(&self) -> anyhow::Result<Array<MapData, Selector>> {
        let aya::maps::Map::Array(data) = self.map(MAP_ACTIVE)? else {
            return Err(anyhow!("{MAP_ACTIVE} is not an array map"));
        };
        let id = data.info()?.id();
        Ok(Array::try_from(aya::maps::Map::Array(MapData::from_id(id)?))?)
    }

    /// Attaches to every interface through a link pinned at `pin_dir/link_<iface>`, so the
    /// program stays attached when the agent exits. An interface that already has a pinned
    /// link (an earlier agent's) gets this program swapped in atomically (`bpf_link_update`):
    /// no moment without a program. All or nothing: on failure, links created here are removed.
    pub fn attach(&mut self, interfaces: &[String], mode: XdpModeSetting, pin_dir: &Path) -> anyhow::Result<Vec<Attachment>> {
        let mut done: Vec<(PathBuf, bool)> = Vec::new();
        let mut out = Vec::new();
        let result = (|| -> anyhow::Result<()> {
            for iface in interfaces {
                let path = link_pin_path(pin_dir, iface);
                if path.exists() {
                    self.upgrade_link(iface, &path)?;
                    out.push(Attachment { interface: iface.clone(), mode: "pinned".into() });
                    done.push((path, false));
                } else {
                    let (id, attachment) = self.attach_one(iface, mode)?;
                    let link: XdpLink = self.program_mut().take_link(id)?;
                    let fd = FdLink::try_from(link).context("the kernel attached XDP without a bpf_link (kernel < 5.9?)")?;
                    let pinned = fd.pin(&path).with_context(|| format!("pinning the XDP link at {}", path.display()))?;
                    self.links.push(FdLink::from(pinned));
                    out.push(attachment);
                    done.push((path, true));
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            for (path, created) in done {
                if created {
                    let _ = std::fs::remove_file(&path);
                }
            }
            // Dropping the links detaches the ones created here (their pins are gone).
            self.links.clear();
            return Err(e);
        }
        // Pinned links of interfaces no longer configured are detached.
        if let Ok(entries) = std::fs::read_dir(pin_dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(iface) = name.strip_prefix("link_") {
                    if !interfaces.iter().any(|i| i == iface) {
                        warn!(interface = iface, "interface no longer configured: detaching bg from it");
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        Ok(out)
    }

    /// Swaps this program into the pinned link of `iface` (atomic for packets).
    fn upgrade_link(&mut self, iface: &str, path: &Path) -> anyhow::Result<()> {
        let pinned = PinnedLink::from_pin(path).with_context(|| format!("opening the pinned link {}", path.display()))?;
        let link = XdpLink::try_from(FdLink::from(pinned))
            .with_context(|| format!("{} is not an XDP link", path.display()))?;
        let id = self
            .program_mut()
            .attach_to_link(link)
            .with_context(|| format!("replacing the program on `{iface}` through its pinned link"))?;
        let link = self.program_mut().take_link(id)?;
        self.links.push(FdLink::try_from(link)?);
        info!(interface = iface, "program replaced through the pinned link");
        Ok(())
    }

    fn attach_one(&mut self, iface: &str, mode: XdpModeSetting) -> anyhow::Result<(aya::programs::xdp::XdpLinkId, Attachment)> {
        let prog = self.program_mut();
        let attached = |mode: &str| Attachment { interface: iface.to_owned(), mode: mode.to_owned() };
        let what = |m| format!("attaching XDP ({m}) to interface `{iface}` (does it exist in this network namespace?)");
        match mode {
            XdpModeSetting::Native => {
                Ok((prog.attach(iface, XdpMode::Driver).with_context(|| what("native"))?, attached("native")))
            }
            XdpModeSetting::Generic => {
                Ok((prog.attach(iface, XdpMode::Skb).with_context(|| what("generic"))?, attached("generic")))
            }
            XdpModeSetting::Auto => match prog.attach(iface, XdpMode::Driver) {
                Ok(id) => Ok((id, attached("native"))),
                Err(e) => {
                    warn!(interface = iface, error = %e, "native XDP attach failed; falling back to generic (skb) mode, which is slower");
                    Ok((prog.attach(iface, XdpMode::Skb).with_context(|| what("generic"))?, attached("generic")))
                }
            },
        }
    }

    /// Packet count of one reason, summed over CPUs.
    pub fn reason_count(&self, reason: Reason) -> anyhow::Result<u64> {
        percpu_sum(self.map(MAP_STATS)?, reason as u32)
    }

    /// Count of one forwarding outcome, summed over CPUs.
    pub fn fwd_count(&self, fwd: Fwd) -> anyhow::Result<u64> {
        percpu_sum(self.map(MAP_FWD_STATS)?, fwd as u32)
    }

    /// All counters, summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<Counters> {
        read_counters(self.map(MAP_STATS)?, self.map(MAP_FWD_STATS)?, self.map(MAP_COLOR_STATS)?)
    }

    /// Handles of their own on the counter maps, for reading them without the agent's lock.
    pub fn counter_maps(&self) -> anyhow::Result<CounterMaps> {
        Ok(CounterMaps {
            stats: dup_map(self.map(MAP_STATS)?)?,
            fwd: dup_map(self.map(MAP_FWD_STATS)?)?,
            colors: dup_map(self.map(MAP_COLOR_STATS)?)?,
        })
    }

    /// Handles of their own on the signal maps, and the configured backends' places there.
    pub fn signal_maps(&self) -> anyhow::Result<crate::signals::Maps> {
        Ok(crate::signals::Maps {
            signals: dup_map(self.map(MAP_SIGNALS)?)?,
            latency: dup_map(self.map(MAP_LATENCY)?)?,
            counts: self.services.iter().flat_map(|s| Color::ALL.map(|c| s.backends(c).len())).collect(),
            batch: self.batch_writes,
        })
    }

    /// Walks the flow tables. O(entries): for tests and one-off reads; the agent samples them
    /// on its own thread (`flow_tables`).
    pub fn flow_counts(&self) -> anyhow::Result<FlowCounts> {
        self.flow_tables()?.counts()
    }

    /// Handles of their own on the flow tables (and what counting them reads), for a thread
    /// that walks them without the agent's lock.
    pub fn flow_tables(&self) -> anyhow::Result<FlowTables> {
        let mut tables = Vec::with_capacity(4);
        for (name, _, _) in FLOW_TABLES {
            tables.push(dup_map(self.map(name)?)?);
        }
        Ok(FlowTables {
            config: dup_map(self.map(MAP_CONFIG)?)?,
            fwd: dup_map(self.map(MAP_FWD_STATS)?)?,
            tables,
            removed_by_agent: self.removed_by_agent.clone(),
        })
    }

    /// Writes the gateway's own addresses (replies to them, such as health checks, are not NAT
    /// replies). Called at start and every few seconds; addresses that went away are removed
    /// from the exact map (their filter bits stay: a stale bit costs one lookup).
    pub fn refresh_local_addrs(&mut self) -> anyhow::Result<()> {
        let mut wanted: Vec<VipAddr> = Vec::new();
        for ifa in nix::ifaddrs::getifaddrs().context("listing this host's addresses")? {
            let Some(a) = ifa.address else { continue };
            let ip: Option<IpAddr> = if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            };
            if let Some(ip) = ip {
                let family = if ip.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 } as u32;
                let v = VipAddr { addr: raw_addr(ip), family };
                if !wanted.contains(&v) && wanted.len() < MAX_LOCAL_ADDRS as usize {
                    wanted.push(v);
                }
            }
        }
        {
            let mut filter: Array<&mut MapData, u64> = Array::try_from(self.map_mut(MAP_LOCAL_FILTER)?)?;
            for v in &wanted {
                let bit = addr_filter_bit(&v.addr);
                let old = filter.get(&(bit >> 6), 0)?;
                filter.set(bit >> 6, old | 1u64 << (bit & 63), 0).context("writing the local address filter")?;
            }
        }
        let mut map: HashMap<&mut MapData, VipAddr, u32> = HashMap::try_from(self.map_mut(MAP_LOCAL_ADDRS)?)?;
        let stale: Vec<VipAddr> = map.keys().filter_map(|k| k.ok()).filter(|k| !wanted.contains(k)).collect();
        for v in &wanted {
            map.insert(*v, 1, 0).context("writing a local address")?;
        }
        for v in stale {
            let _ = map.remove(&v);
        }
        Ok(())
    }
}

/// What bg knows about one egress interface.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Egress {
    pub interface: String,
    pub ifindex: u32,
    /// "redirect" (XDP_REDIRECT after the FIB lookup) or "kernel" (XDP_PASS: the kernel
    /// forwards).
    pub path: String,
    /// Why, in words.
    pub why: String,
    /// Redirects into it that failed, since the data plane was created.
    pub redirect_errors: u64,
}

fn errno_name(e: i32) -> String {
    match -e {
        95 => "EOPNOTSUPP: the device cannot transmit XDP frames; for a veth, its peer has neither GRO nor an XDP program".into(),
        6 => "ENXIO: the device's peer is not ready".into(),
        100 => "ENETDOWN: the device is down".into(),
        19 => "ENODEV: no such device".into(),
        n => format!("errno {n}"),
    }
}

/// Interface name of an ifindex in this network namespace, if it has one.
fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `buf`.
    Some(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

pub(crate) const TRACEFS: &str = "/sys/kernel/tracing";

/// Mounts tracefs at `TRACEFS` unless it is there (needs CAP_SYS_ADMIN).
pub(crate) fn ensure_tracefs() -> anyhow::Result<()> {
    if !Path::new(TRACEFS).join("events").exists() {
        nix::mount::mount(Some("tracefs"), TRACEFS, Some("tracefs"), nix::mount::MsFlags::empty(), None::<&str>)
            .with_context(|| format!("mounting tracefs at {TRACEFS} (needed to watch failed XDP redirects)"))?;
    }
    Ok(())
}

/// The ifindex of an interface name in this network namespace (0: none).
pub fn ifindex(name: &str) -> u32 {
    match std::ffi::CString::new(name) {
        // SAFETY: a NUL-terminated name.
        Ok(c) => unsafe { libc::if_nametoindex(c.as_ptr()) },
        Err(_) => 0,
    }
}

/// Redirect targets: the `xdp:xdp_redirect_err` watch and the probe.
impl Dataplane {
    /// Loads the probe and attaches the tracepoint program that marks egress interfaces whose
    /// redirects fail (mounting tracefs when it is not), and tells it this data plane's program
    /// ids. The tracepoint lives as long as this data plane (the agent): while no agent runs,
    /// the marks already made keep applying, but new failures are not seen.
    pub fn watch_redirects(&mut self) -> anyhow::Result<()> {
        use aya::programs::TracePoint;
        ensure_tracefs()?;
        let probe: &mut Xdp = self.ebpf.program_mut(PROBE_PROGRAM).ok_or_else(|| anyhow!("the object has no `{PROBE_PROGRAM}`"))?.try_into()?;
        retry_interrupted(|| probe.load()).context("loading the redirect probe")?;
        let probe_id = probe.info()?.id();
        let main_id = self.program().info()?.id();
        let tp: &mut TracePoint =
            self.ebpf.program_mut(REDIRECT_ERR_PROGRAM).ok_or_else(|| anyhow!("the object has no `{REDIRECT_ERR_PROGRAM}`"))?.try_into()?;
        retry_interrupted(|| tp.load()).context("loading the redirect-error tracepoint program")?;
        tp.attach("xdp", "xdp_redirect_err").context("attaching to the xdp:xdp_redirect_err tracepoint")?;
        let mut ids: Array<&mut MapData, u32> = Array::try_from(self.map_mut(MAP_PROG_IDS)?)?;
        ids.set(0, main_id, 0)?;
        ids.set(1, probe_id, 0)?;
        Ok(())
    }

    fn egress_state(&self, ifindex: u32) -> anyhow::Result<Option<EgressState>> {
        let map: HashMap<&MapData, u32, EgressState> = HashMap::try_from(self.map(MAP_EGRESS)?)?;
        match map.get(&ifindex, 0) {
            Ok(e) => Ok(Some(e)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends one probe frame into `ifindex` through the XDP redirect path (BPF_PROG_TEST_RUN,
    /// live frames: the frame really leaves) and records whether the redirect worked: an egress
    /// whose redirect fails is marked, one whose redirect works is cleared. Needs
    /// `watch_redirects` first. The frame (EtherType 0x88b5, to a locally administered address
    /// no host has) is dropped by whatever receives it.
    pub fn probe_egress(&mut self, ifindex: u32) -> anyhow::Result<bool> {
        use aya::programs::{TestRun, TestRunAttrs, TestRunOptions};
        let before = self.egress_state(ifindex)?.map(|e| e.errors).unwrap_or(0);
        let mut frame = vec![0x02, 0x62, 0x67, 0, 0, 0x01, 0x02, 0x62, 0x67, 0, 0, 0x02];
        frame.extend_from_slice(&PROBE_ETHERTYPE.to_be_bytes());
        frame.extend_from_slice(&ifindex.to_ne_bytes());
        frame.resize(60, 0);
        let probe: &Xdp = self.ebpf.program(PROBE_PROGRAM).ok_or_else(|| anyhow!("no `{PROBE_PROGRAM}`"))?.try_into()?;
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&frame);
        opts.attrs = TestRunAttrs::new().xdp_live_frames(1);
        probe.test_run(opts).context("running the redirect probe")?;
        let after = self.egress_state(ifindex)?;
        let works = after.map(|e| e.errors).unwrap_or(0) == before;
        let mut map: HashMap<&mut MapData, u32, EgressState> = HashMap::try_from(self.map_mut(MAP_EGRESS)?)?;
        let mut e = after.unwrap_or_default();
        if works {
            e.flags &= !EGRESS_NO_REDIRECT;
        } else {
            e.flags |= EGRESS_NO_REDIRECT;
        }
        map.insert(ifindex, e, 0).context("recording the probe's verdict")?;
        Ok(works)
    }

    /// Every egress bg knows about: the given interfaces (those it is attached to) and any
    /// other the tracepoint marked.
    pub fn egresses(&self, interfaces: &[String]) -> anyhow::Result<Vec<Egress>> {
        let map: HashMap<&MapData, u32, EgressState> = HashMap::try_from(self.map(MAP_EGRESS)?)?;
        let mut known: Vec<(u32, EgressState)> = map.iter().filter_map(|r| r.ok()).collect();
        for iface in interfaces {
            let ifindex = ifindex(iface);
            if ifindex != 0 && !known.iter().any(|(i, _)| *i == ifindex) {
                known.push((ifindex, EgressState::default()));
            }
        }
        known.sort_by_key(|(i, _)| *i);
        Ok(known
            .into_iter()
            .map(|(ifindex, e)| {
                let (path, why) = if e.flags & EGRESS_NO_REDIRECT != 0 {
                    ("kernel", format!("redirects into it fail ({})", errno_name(e.last_err)))
                } else {
                    ("redirect", "redirects into it work".to_owned())
                };
                Egress {
                    interface: ifname(ifindex).unwrap_or_else(|| format!("ifindex {ifindex}")),
                    ifindex,
                    path: path.into(),
                    why,
                    redirect_errors: e.errors,
                }
            })
            .collect())
    }

    /// The reader of the programs' log records (aya-log): rare data-plane events (a failed
    /// redirect, strays dropped at a VIP, a full flow table), each kind at most once a second
    /// per CPU. Taken once; None when the object has no log map.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        match aya_log::EbpfLogger::init(&mut self.ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(error = %e, "the data plane's log records cannot be read; its rare events will not be logged");
                None
            }
        }
    }

    /// Sends `ifindex`'s packets through the kernel path from now on.
    pub fn mark_no_redirect(&mut self, ifindex: u32) -> anyhow::Result<()> {
        let mut e = self.egress_state(ifindex)?.unwrap_or_default();
        e.flags |= EGRESS_NO_REDIRECT;
        let mut map: HashMap<&mut MapData, u32, EgressState> = HashMap::try_from(self.map_mut(MAP_EGRESS)?)?;
        map.insert(ifindex, e, 0).context("marking an egress interface")?;
        Ok(())
    }

    /// Probes every egress marked as failing again; returns the ones that work now.
    pub fn reprobe_failing(&mut self) -> anyhow::Result<Vec<u32>> {
        let map: HashMap<&MapData, u32, EgressState> = HashMap::try_from(self.map(MAP_EGRESS)?)?;
        let failing: Vec<u32> = map.iter().filter_map(|r| r.ok()).filter(|(_, e)| e.flags & EGRESS_NO_REDIRECT != 0).map(|(i, _)| i).collect();
        let mut fixed = Vec::new();
        for i in failing {
            if self.probe_egress(i)? {
                fixed.push(i);
            }
        }
        Ok(fixed)
    }
}

/// Hooks for `cargo xtask bench`: the floor program and direct flow-table writes.
impl Dataplane {
    /// The trivial XDP_PASS program of the same object, loaded on first use.
    pub fn floor_program(&mut self) -> anyhow::Result<&Xdp> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut("bg_floor")
            .ok_or_else(|| anyhow!("the XDP object has no program `bg_floor`"))?
            .try_into()?;
        if prog.fd().is_err() {
            retry_interrupted(|| prog.load())?;
        }
        Ok(self.ebpf.program("bg_floor").expect("just loaded").try_into()?)
    }

    /// Attaches the program, or the floor program, to `iface` in native mode, unpinned (it is
    /// detached when this data plane is dropped). For the benchmark: BPF_PROG_TEST_RUN of an
    /// XDP program that the kernel's XDP dispatcher does not already hold swaps it in and out
    /// of the dispatcher on every call, and each swap waits for an RCU grace period, which
    /// makes a run of many single test runs take minutes.
    pub fn attach_for_bench(&mut self, iface: &str, floor: bool) -> anyhow::Result<()> {
        if floor {
            self.floor_program()?;
        }
        let name = if floor { "bg_floor" } else { PROGRAM };
        let prog: &mut Xdp = self.ebpf.program_mut(name).ok_or_else(|| anyhow!("the XDP object has no program `{name}`"))?.try_into()?;
        prog.attach(iface, XdpMode::Driver).with_context(|| format!("attaching {name} to {iface}"))?;
        Ok(())
    }

    /// Writes one established flow entry directly.
    pub fn insert_flow(&mut self, key: &FlowKey, entry: &FlowEntry) -> anyhow::Result<()> {
        if key.family == FAMILY_V4 {
            let mut flows: HashMap<&mut MapData, FlowKey4, FlowEntry> = HashMap::try_from(self.map_mut(MAP_FLOWS4)?)?;
            flows.insert(key.v4(), entry, 0).context("writing a flow entry")
        } else {
            let mut flows: HashMap<&mut MapData, FlowKey, FlowEntry> = HashMap::try_from(self.map_mut(MAP_FLOWS6)?)?;
            flows.insert(key, entry, 0).context("writing a flow entry")
        }
    }
}

/// The flow tables and what counting them reads, on handles of their own (`Dataplane::flow_tables`).
pub struct FlowTables {
    config: aya::maps::Map,
    fwd: aya::maps::Map,
    tables: Vec<aya::maps::Map>,
    removed_by_agent: Arc<AtomicU64>,
}

impl FlowTables {
    /// Walks every flow table: O(entries), a syscall or two per entry.
    pub fn counts(&self) -> anyhow::Result<FlowCounts> {
        let cfg: Array<&MapData, DpConfig> = Array::try_from(&self.config)?;
        let cfg = cfg.get(&0, 0)?;
        let now = monotonic_ns();
        let mut counts = FlowCounts::default();
        for ((_, confirmed, v4), map) in FLOW_TABLES.into_iter().zip(&self.tables) {
            let mut one = |proto: u8, entry: &FlowEntry| {
                if confirmed {
                    counts.entries += 1;
                } else {
                    counts.unconfirmed_entries += 1;
                }
                if entry.expired(proto, confirmed, now, &cfg) {
                    counts.expired += 1;
                } else if let Some(c) = Color::from_u8(entry.color) {
                    counts.flows[c as usize] += 1;
                }
            };
            if v4 {
                walk_flows::<FlowKey4>(map, |k, e| one(k.proto, e))?;
            } else {
                walk_flows::<FlowKey>(map, |k, e| one(k.proto, e))?;
            }
        }
        let confirmed = percpu_sum(&self.fwd, Fwd::FlowsConfirmed as u32)?;
        let removed = self.removed_by_agent.load(Ordering::Relaxed);
        counts.evicted = confirmed.saturating_sub(removed).saturating_sub(counts.entries);
        Ok(counts)
    }

    /// Removes every flow entry of `color` (established and unconfirmed); returns how many were
    /// removed. Their next packet finds no entry: TCP then reaches the active color's backend,
    /// which answers with a RST that the client sees from the VIP; UDP starts a new flow.
    /// Runs on these handles, without the agent's lock.
    pub fn remove_flows_of(&mut self, color: Color) -> anyhow::Result<u64> {
        let mut removed = [0u64; 2];
        for ((_, confirmed, v4), map) in FLOW_TABLES.into_iter().zip(self.tables.iter_mut()) {
            let n = if v4 { remove_color::<FlowKey4>(map, color)? } else { remove_color::<FlowKey>(map, color)? };
            removed[!confirmed as usize] += n;
        }
        self.removed_by_agent.fetch_add(removed[0], Ordering::Relaxed);
        Ok(removed[0] + removed[1])
    }
}

/// A second handle (a duplicated fd) on a map.
fn dup_map(map: &aya::maps::Map) -> anyhow::Result<aya::maps::Map> {
    use aya::maps::Map;
    use std::os::fd::AsFd;
    let dup = |m: &MapData| -> anyhow::Result<MapData> {
        Ok(MapData::from_fd(m.fd().as_fd().try_clone_to_owned().context("duplicating a map fd")?)?)
    };
    Ok(match map {
        Map::LruHashMap(m) => Map::LruHashMap(dup(m)?),
        Map::Array(m) => Map::Array(dup(m)?),
        Map::PerCpuArray(m) => Map::PerCpuArray(dup(m)?),
        _ => bail!("no second handle for this kind of map"),
    })
}

/// Entries per `BPF_MAP_UPDATE_BATCH` call (the kernel walks them with rescheduling points
/// between elements; this bounds what one call copies in).
const BATCH: usize = 16_384;

/// `BPF_MAP_UPDATE_BATCH` (kernel 5.6+ for arrays): aya has no batch operations, so this is
/// the one raw `bpf(2)` call in bg. Layout of `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_UPDATE_BATCH: nix::libc::c_long = 26;

/// Writes `values[i]` at index `keys[i]` of a `u32` array map: one syscall per `BATCH`
/// entries, or one per entry on a kernel without batch operations for arrays. On an error
/// some entries may be written: callers treat the map's contents as unknown then.
fn update_u32s(map: &mut aya::maps::Map, keys: &[u32], values: &[u32], batch: bool) -> anyhow::Result<()> {
    use std::os::fd::{AsFd, AsRawFd};
    assert_eq!(keys.len(), values.len());
    let per_entry = |map: &mut aya::maps::Map| -> anyhow::Result<()> {
        let mut array: Array<&mut MapData, u32> = Array::try_from(map)?;
        for (k, v) in keys.iter().zip(values) {
            array.set(*k, v, 0)?;
        }
        Ok(())
    };
    if !batch {
        return per_entry(map);
    }
    let aya::maps::Map::Array(data) = &*map else { bail!("not an array map") };
    let fd = data.fd().as_fd().as_raw_fd();
    let (mut done, mut retries) = (0, 0);
    while done < keys.len() {
        let end = (done + BATCH).min(keys.len());
        let mut attr = BatchAttr {
            keys: keys[done..end].as_ptr() as u64,
            values: values[done..end].as_ptr() as u64,
            count: (end - done) as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at `end - done` keys and values that outlive the call; the
        // kernel reads them and writes back `count` only.
        let r = unsafe {
            nix::libc::syscall(nix::libc::SYS_bpf, BPF_MAP_UPDATE_BATCH, &mut attr as *mut BatchAttr, std::mem::size_of::<BatchAttr>())
        };
        if r == 0 {
            done = end;
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(nix::libc::EINTR) | Some(nix::libc::EAGAIN) if retries < 100 => retries += 1,
            // EINVAL, EOPNOTSUPP, or the kernel's own ENOTSUPP (524), before anything was written.
            // The kernel writes `count` back only from its generic batch code, so it says
            // nothing here; rewriting what a partial batch wrote is harmless.
            Some(nix::libc::EINVAL | nix::libc::EOPNOTSUPP | 524) if done == 0 => {
                // No batch operations here: one update per entry.
                return per_entry(map);
            }
            _ => return Err(anyhow!(e).context(format!("BPF_MAP_UPDATE_BATCH of {} entries", end - done))),
        }
    }
    Ok(())
}

const BPF_MAP_LOOKUP_BATCH: nix::libc::c_long = 24;

/// The most bytes of values one `percpu_batch` syscall copies (a bound at any CPU count).
const LOOKUP_BATCH_BYTES: usize = 8 << 20;

/// Reads entries `0..n` of a per-CPU array of `V` with `BPF_MAP_LOOKUP_BATCH` (a few syscalls
/// for the whole map instead of one per entry), calling `each(index, cpu_value)` for every
/// CPU's copy. Ok(false), with nothing read, on a kernel without batch lookups for arrays.
pub fn percpu_batch<V: bytemuck::Pod>(map: &aya::maps::Map, n: u32, mut each: impl FnMut(u32, &V)) -> anyhow::Result<bool> {
    use std::os::fd::{AsFd, AsRawFd};
    let aya::maps::Map::PerCpuArray(data) = map else { bail!("not a per-CPU array map") };
    let fd = data.fd().as_fd().as_raw_fd();
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
    // The kernel lays each key's values out CPU after CPU, each rounded up to 8 bytes.
    let size = std::mem::size_of::<V>().div_ceil(8) * 8;
    let chunk = (LOOKUP_BATCH_BYTES / (size * cpus)).clamp(1, n.max(1) as usize);
    let mut keys = vec![0u32; chunk];
    let mut values = vec![0u64; chunk * size * cpus / 8];
    let (mut read, mut prev, mut out, mut retries) = (0u32, None::<u32>, 0u32, 0);
    while read < n {
        let want = chunk.min((n - read) as usize);
        let mut attr = BatchAttr {
            in_batch: prev.as_ref().map_or(0, |p| p as *const u32 as u64),
            out_batch: &mut out as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: want as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the buffers hold `want` keys and `want * cpus` values of `size` bytes, and
        // outlive the call; the kernel writes at most that much, and `count` and `out` back.
        let r = unsafe {
            nix::libc::syscall(nix::libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &mut attr as *mut BatchAttr, std::mem::size_of::<BatchAttr>())
        };
        let end = if r == 0 {
            false
        } else {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // The end of the map: `count` says how many were filled.
                Some(nix::libc::ENOENT) => true,
                Some(nix::libc::EINTR | nix::libc::EAGAIN) if retries < 100 => {
                    retries += 1;
                    continue;
                }
                Some(nix::libc::EINVAL | nix::libc::EOPNOTSUPP | 524) if read == 0 => return Ok(false),
                _ => return Err(anyhow!(e).context(format!("BPF_MAP_LOOKUP_BATCH of {want} entries"))),
            }
        };
        let filled = (attr.count as usize).min(want);
        let bytes: &[u8] = bytemuck::cast_slice(&values);
        for (i, key) in keys[..filled].iter().enumerate() {
            for cpu in 0..cpus {
                let at = (i * cpus + cpu) * size;
                each(*key, &bytemuck::pod_read_unaligned(&bytes[at..at + std::mem::size_of::<V>()]));
            }
        }
        read += filled as u32;
        prev = Some(out);
        if end || filled == 0 {
            break;
        }
    }
    Ok(true)
}

/// The counter maps on handles of their own (`Dataplane::counter_maps`).
pub struct CounterMaps {
    stats: aya::maps::Map,
    fwd: aya::maps::Map,
    colors: aya::maps::Map,
}

impl CounterMaps {
    /// All counters, summed over CPUs.
    pub fn read(&self) -> anyhow::Result<Counters> {
        read_counters(&self.stats, &self.fwd, &self.colors)
    }
}

/// One per-CPU `u64` counter, summed over CPUs.
fn percpu_sum(map: &aya::maps::Map, index: u32) -> anyhow::Result<u64> {
    let counters: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
    Ok(counters.get(&index, 0)?.iter().sum())
}

fn read_counters(stats: &aya::maps::Map, fwd: &aya::maps::Map, colors: &aya::maps::Map) -> anyhow::Result<Counters> {
    let mut c = Counters::default();
    for r in Reason::ALL {
        c.reasons.push((r.name().to_owned(), percpu_sum(stats, r as u32)?));
    }
    for f in Fwd::ALL {
        c.forwarding.push((f.name().to_owned(), percpu_sum(fwd, f as u32)?));
    }
    let colors: PerCpuArray<&MapData, ColorStats> = PerCpuArray::try_from(colors)?;
    for color in Color::ALL {
        for s in colors.get(&(color as u32), 0)?.iter() {
            let out = &mut c.colors[color as usize];
            out.packets += s.packets;
            out.bytes += s.bytes;
            out.new_flows += s.new_flows;
        }
    }
    Ok(c)
}

/// The flow tables: (name, established, IPv4 keys).
const FLOW_TABLES: [(&str, bool, bool); 4] =
    [(MAP_FLOWS4, true, true), (MAP_FLOWS6, true, false), (MAP_EMBRYO4, false, true), (MAP_EMBRYO6, false, false)];

/// Calls `f` for every entry of a flow table keyed by `K`.
fn walk_flows<K: aya::Pod>(map: &aya::maps::Map, mut f: impl FnMut(&K, &FlowEntry)) -> anyhow::Result<()> {
    let table: HashMap<&MapData, K, FlowEntry> = HashMap::try_from(map)?;
    for (key, entry) in table.iter().flatten() {
        f(&key, &entry);
    }
    Ok(())
}

/// Removes every entry of `color` from a flow table keyed by `K`; returns how many.
fn remove_color<K: aya::Pod>(map: &mut aya::maps::Map, color: Color) -> anyhow::Result<u64> {
    let mut table: HashMap<&mut MapData, K, FlowEntry> = HashMap::try_from(map)?;
    let doomed: Vec<K> = table.iter().flatten().filter(|(_, e)| e.color == color as u8).map(|(k, _)| k).collect();
    // An entry may already be gone (confirmed, LRU): not an error.
    Ok(doomed.iter().filter(|k| table.remove(k).is_ok()).count() as u64)
}

/// Removes a bg pin directory: links (which detaches the program once no process holds them)
/// and maps. Returns what was removed.
pub fn remove_pinned(dir: &Path) -> std::io::Result<Vec<String>> {
    match remove_pins_in(dir) {
        Ok(removed) => {
            std::fs::remove_dir(dir)?;
            Ok(removed)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Removes every pin in `dir` and keeps the directory (and a lock held on it).
fn remove_pins_in(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut removed = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        std::fs::remove_file(e.path())?;
        removed.push(e.file_name().to_string_lossy().into_owned());
    }
    Ok(removed)
}
