//! The kernel side as the agent sees it: load the XDP object, fill its maps, attach, pin, flip.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::{anyhow, Context};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use bg_common::{
    maglev,
    pin::{
        ALL_MAPS, MAP_ACTIVE, MAP_BACKEND_SETS, MAP_COLOR_STATS, MAP_CONFIG, MAP_FLOWS, MAP_FWD_STATS,
        MAP_RINGS, MAP_SERVICES, MAP_STATS, MAP_VIP_ADDRS, PROGRAM,
    },
    ring_base, Backend, BackendSet, Color, ColorStats, DpConfig, FlowKey, Fwd, NatEntry, Reason,
    Selector, ServiceInfo, VipAddr, VipKey, DP_FLAG_REDIRECT, FAMILY_V4, FAMILY_V6, NAT_TO_BACKEND, RING_SIZE,
    SLOTS,
};
use bytemuck::Zeroable;
use tracing::warn;

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

/// The backend-set slot that holds a color's set. Slots 2 and 3 are spares for rebuilding a
/// color's set without writing the live copy.
pub fn slot_of(color: Color) -> u32 {
    color as u32
}

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

pub fn vip_key(service: &Service) -> VipKey {
    VipKey {
        addr: raw_addr(service.vip.ip()),
        port: service.vip.port().to_be(),
        proto: service.protocol.number(),
        family: family(service.vip.ip()),
    }
}

fn backend_set(color: Color, backends: &[BackendAddr]) -> BackendSet {
    let mut set = BackendSet::zeroed();
    set.count = backends.len() as u32;
    set.color = color as u32;
    for (slot, b) in set.backends.iter_mut().zip(backends) {
        *slot = Backend {
            addr: raw_addr(b.addr.ip()),
            port: b.addr.port().to_be(),
            _pad: 0,
        };
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

/// The Maglev table of one color's backends of one service.
pub fn maglev_table(backends: &[BackendAddr]) -> anyhow::Result<Vec<u32>> {
    let ids: Vec<Vec<u8>> = backends.iter().map(|b| maglev_id(&b.addr)).collect();
    let members: Vec<maglev::Member<'_>> = ids
        .iter()
        .zip(backends)
        .map(|(id, b)| maglev::Member { id, weight: b.weight })
        .collect();
    maglev::build(&members, RING_SIZE).ok_or_else(|| anyhow!("no backend has a positive weight"))
}

/// The data path's settings from the config.
pub fn dp_config(config: &Config) -> DpConfig {
    let cpus = aya::util::nr_cpus().unwrap_or(1).max(1) as u32;
    DpConfig {
        services: config.services.len() as u32,
        new_flows_per_sec: config.max_new_flows_per_sec.div_ceil(cpus),
        udp_idle_ns: config.udp_idle_timeout_secs * 1_000_000_000,
        closing_idle_ns: config.closing_timeout_secs * 1_000_000_000,
        flags: if config.forwarding == Forwarding::Redirect { DP_FLAG_REDIRECT } else { 0 },
        _pad: 0,
    }
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// How the program ended up attached to one interface.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    pub interface: String,
    /// "native" or "generic".
    pub mode: String,
}

/// Flow table occupancy.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct FlowCounts {
    /// Live flows (counted by their client → backend entry, not expired) per color:
    /// [blue, green].
    pub flows: [u64; 2],
    /// All entries in the table, both directions, expired ones included (the LRU recycles
    /// those when it needs room).
    pub entries: u64,
    /// Entries that are over by the idle rules but not yet recycled.
    pub expired: u64,
    /// Entries the LRU evicted to make room: created − removed − present. An eviction of a
    /// live flow breaks it (its next packet counts as `lost_flow`).
    pub evicted: u64,
}

/// Counters read from the per-CPU maps, summed over CPUs.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Packets per `Reason` name.
    pub reasons: Vec<(String, u64)>,
    /// Rewritten packets per forwarding outcome, and flow entries removed by the data path.
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

pub struct Dataplane {
    ebpf: Ebpf,
    /// Flow entries removed from userspace (drains), for the eviction arithmetic.
    removed_by_agent: u64,
}

impl Dataplane {
    /// Loads the object and its program into the kernel and fills every map from `config`
    /// (services, both colors' backend sets and Maglev tables, settings, active color). Not
    /// attached anywhere yet: dropping the result leaves nothing behind.
    pub fn new(object: &[u8], config: &Config) -> anyhow::Result<Dataplane> {
        let rings = SLOTS * config.services.len() as u32 * RING_SIZE;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_FLOWS, config.flow_table_size)
            .map_max_entries(MAP_RINGS, rings)
            .load(object)
            .context("loading the bg XDP object into the kernel (are you root, with BPF enabled?)")?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| anyhow!("the XDP object has no program `{PROGRAM}`"))?
            .try_into()?;
        prog.load()
            .context("the kernel verifier rejected the bg XDP program")?;
        let mut dp = Dataplane { ebpf, removed_by_agent: 0 };
        {
            let mut cfg: Array<&mut MapData, DpConfig> = Array::try_from(dp.map_mut(MAP_CONFIG)?)?;
            cfg.set(0, dp_config(config), 0).context("writing the data path settings")?;
        }
        dp.install_services(&config.services)?;
        dp.select(config.initial_color)?;
        Ok(dp)
    }

    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(PROGRAM)
            .expect("checked at load")
            .try_into()
            .expect("checked at load")
    }

    fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM)
            .expect("checked at load")
            .try_into()
            .expect("checked at load")
    }

    fn map_mut(&mut self, name: &str) -> anyhow::Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("the XDP object has no map `{name}`"))
    }

    fn map(&self, name: &str) -> anyhow::Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .ok_or_else(|| anyhow!("the XDP object has no map `{name}`"))
    }

    /// Writes every service, both colors' backend sets and Maglev tables, and the VIP address
    /// list. Only at load: slots are never rewritten while a selector may point at them.
    fn install_services(&mut self, services: &[Service]) -> anyhow::Result<()> {
        let n = services.len() as u32;
        {
            let mut rings: Array<&mut MapData, u32> = Array::try_from(self.map_mut(MAP_RINGS)?)?;
            for (i, s) in services.iter().enumerate() {
                for color in Color::ALL {
                    let table = maglev_table(s.backends(color))
                        .with_context(|| format!("service {}: {}", s.name, color.name()))?;
                    let base = ring_base(slot_of(color), n, i as u32);
                    for (j, b) in table.iter().enumerate() {
                        rings.set(base + j as u32, b, 0).context("writing a Maglev table")?;
                    }
                }
            }
        }
        {
            let mut sets: Array<&mut MapData, BackendSet> =
                Array::try_from(self.map_mut(MAP_BACKEND_SETS)?)?;
            for (i, s) in services.iter().enumerate() {
                for color in Color::ALL {
                    let set = backend_set(color, s.backends(color));
                    sets.set(BackendSet::index(slot_of(color), i as u32), set, 0)
                        .with_context(|| format!("writing {} backends of service {}", color.name(), s.name))?;
                }
            }
        }
        {
            let mut addrs: HashMap<&mut MapData, VipAddr, u32> =
                HashMap::try_from(self.map_mut(MAP_VIP_ADDRS)?)?;
            for s in services {
                let key = VipAddr { addr: raw_addr(s.vip.ip()), family: family(s.vip.ip()) as u32 };
                addrs.insert(key, 1, 0).context("writing a VIP address")?;
            }
        }
        let mut map: HashMap<&mut MapData, VipKey, ServiceInfo> =
            HashMap::try_from(self.map_mut(MAP_SERVICES)?)?;
        for (i, s) in services.iter().enumerate() {
            map.insert(vip_key(s), ServiceInfo { index: i as u32 }, 0)
                .with_context(|| format!("writing service {}", s.name))?;
        }
        Ok(())
    }

    /// Points new flows at `color`'s backend sets: one 4-byte map write (see `Selector`).
    pub fn select(&mut self, color: Color) -> anyhow::Result<()> {
        let mut active: Array<&mut MapData, Selector> = Array::try_from(self.map_mut(MAP_ACTIVE)?)?;
        active
            .set(0, Selector::for_slot(slot_of(color)), 0)
            .context("writing the active selector")
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

    /// The color new flows currently go to, read back from the kernel.
    pub fn active(&self) -> anyhow::Result<Color> {
        let active: Array<&MapData, Selector> = Array::try_from(self.map(MAP_ACTIVE)?)?;
        let sel = active.get(&0, 0)?;
        Color::from_u8(sel.slot() as u8 & 1).ok_or_else(|| anyhow!("bad selector {sel:?}"))
    }

    /// Attaches to every interface, or to none: on any failure the ones already attached are
    /// detached again before the error is returned.
    pub fn attach(&mut self, interfaces: &[String], mode: XdpModeSetting) -> anyhow::Result<Vec<Attachment>> {
        let mut done = Vec::new();
        let mut ids = Vec::new();
        for iface in interfaces {
            match self.attach_one(iface, mode) {
                Ok((id, attachment)) => {
                    ids.push(id);
                    done.push(attachment);
                }
                Err(e) => {
                    for id in ids {
                        let _ = self.program_mut().detach(id);
                    }
                    return Err(e);
                }
            }
        }
        Ok(done)
    }

    fn attach_one(
        &mut self,
        iface: &str,
        mode: XdpModeSetting,
    ) -> anyhow::Result<(aya::programs::xdp::XdpLinkId, Attachment)> {
        let prog = self.program_mut();
        let attached = |mode: &str| Attachment {
            interface: iface.to_owned(),
            mode: mode.to_owned(),
        };
        let what = |m| format!("attaching XDP ({m}) to interface `{iface}` (does it exist in this network namespace?)");
        match mode {
            XdpModeSetting::Native => Ok((
                prog.attach(iface, XdpMode::Driver).with_context(|| what("native"))?,
                attached("native"),
            )),
            XdpModeSetting::Generic => Ok((
                prog.attach(iface, XdpMode::Skb).with_context(|| what("generic"))?,
                attached("generic"),
            )),
            XdpModeSetting::Auto => match prog.attach(iface, XdpMode::Driver) {
                Ok(id) => Ok((id, attached("native"))),
                Err(e) => {
                    warn!(interface = iface, error = %e, "native XDP attach failed; falling back to generic (skb) mode, which is slower");
                    Ok((
                        prog.attach(iface, XdpMode::Skb).with_context(|| what("generic"))?,
                        attached("generic"),
                    ))
                }
            },
        }
    }

    /// Pins every map under `dir` (which must exist on a bpffs).
    pub fn pin_maps(&self, dir: &Path) -> anyhow::Result<()> {
        for name in ALL_MAPS {
            let path = dir.join(name);
            self.map(name)?
                .pin(&path)
                .with_context(|| format!("pinning map {name} at {}", path.display()))?;
        }
        Ok(())
    }

    /// Packet count of one reason, summed over CPUs.
    pub fn reason_count(&self, reason: Reason) -> anyhow::Result<u64> {
        let stats: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map(MAP_STATS)?)?;
        Ok(stats.get(&(reason as u32), 0)?.iter().sum())
    }

    /// Count of one forwarding outcome, summed over CPUs.
    pub fn fwd_count(&self, fwd: Fwd) -> anyhow::Result<u64> {
        let stats: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map(MAP_FWD_STATS)?)?;
        Ok(stats.get(&(fwd as u32), 0)?.iter().sum())
    }

    /// All counters, summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<Counters> {
        let mut c = Counters::default();
        for r in Reason::ALL {
            c.reasons.push((r.name().to_owned(), self.reason_count(r)?));
        }
        for f in Fwd::ALL {
            c.forwarding.push((f.name().to_owned(), self.fwd_count(f)?));
        }
        let colors: PerCpuArray<&MapData, ColorStats> = PerCpuArray::try_from(self.map(MAP_COLOR_STATS)?)?;
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

    /// Walks the flow table. O(entries): for status, not for a hot loop.
    pub fn flow_counts(&self) -> anyhow::Result<FlowCounts> {
        let cfg: Array<&MapData, DpConfig> = Array::try_from(self.map(MAP_CONFIG)?)?;
        let cfg = cfg.get(&0, 0)?;
        let flows: HashMap<&MapData, FlowKey, NatEntry> = HashMap::try_from(self.map(MAP_FLOWS)?)?;
        let now = monotonic_ns();
        let mut counts = FlowCounts::default();
        for item in flows.iter() {
            let Ok((key, entry)) = item else { continue };
            counts.entries += 1;
            if entry.expired(key.proto, now, &cfg) {
                counts.expired += 1;
            } else if entry.kind == NAT_TO_BACKEND {
                if let Some(c) = Color::from_u8(entry.color) {
                    counts.flows[c as usize] += 1;
                }
            }
        }
        let created = self.fwd_count(Fwd::FlowsCreated)?;
        let removed = self.fwd_count(Fwd::FlowsRemoved)? + self.removed_by_agent;
        counts.evicted = created.saturating_sub(removed).saturating_sub(counts.entries);
        Ok(counts)
    }

    /// Removes every flow entry (both directions) of `color`; returns how many were removed.
    /// Their next packet finds no entry: TCP then reaches the active color's backend, which
    /// answers with a RST that the client sees from the VIP; UDP starts a new flow.
    pub fn remove_flows_of(&mut self, color: Color) -> anyhow::Result<u64> {
        let mut flows: HashMap<&mut MapData, FlowKey, NatEntry> = HashMap::try_from(self.map_mut(MAP_FLOWS)?)?;
        let doomed: Vec<FlowKey> = flows
            .iter()
            .filter_map(|item| item.ok())
            .filter(|(_, e)| e.color == color as u8)
            .map(|(k, _)| k)
            .collect();
        let mut removed = 0;
        for k in doomed {
            // An entry may already be gone (RST, LRU): not an error.
            if flows.remove(&k).is_ok() {
                removed += 1;
            }
        }
        self.removed_by_agent += removed;
        Ok(removed)
    }

    /// Direct access for tests and tools that need a map the methods above do not cover.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}
