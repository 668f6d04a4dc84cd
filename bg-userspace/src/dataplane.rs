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
    pin::{MAP_ACTIVE, MAP_BACKEND_SETS, MAP_FLOWS, MAP_SERVICES, MAP_STATS, PROGRAM},
    Backend, BackendSet, Color, FlowKey, NatEntry, Reason, Selector, ServiceInfo, VipKey,
    FAMILY_V4, NAT_TO_BACKEND,
};
use bytemuck::Zeroable;
use tracing::warn;

use crate::config::{Service, XdpModeSetting};

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

/// A raw (network order) IPv4 address in word 0, as map keys hold it.
pub fn raw_addr(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        // Config validation refuses IPv6 before anything reaches here.
        IpAddr::V6(_) => unreachable!("IPv6 is refused by config validation"),
    }
}

pub fn vip_key(service: &Service) -> VipKey {
    VipKey {
        addr: raw_addr(service.vip.ip()),
        port: service.vip.port().to_be(),
        proto: service.protocol.number(),
        family: FAMILY_V4,
    }
}

fn backend_set(color: Color, backends: &[SocketAddr]) -> BackendSet {
    let mut set = BackendSet::zeroed();
    set.count = backends.len() as u32;
    set.color = color as u32;
    for (slot, b) in set.backends.iter_mut().zip(backends) {
        *slot = Backend {
            addr: raw_addr(b.ip()),
            port: b.port().to_be(),
            _pad: 0,
        };
    }
    set
}

/// How the program ended up attached to one interface.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    pub interface: String,
    /// "native" or "generic".
    pub mode: String,
}

/// Flow table entries by color and direction.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct FlowCounts {
    /// Flows (counted by their client → backend entry) per color: [blue, green].
    pub flows: [u64; 2],
    /// All entries, both directions.
    pub entries: u64,
}

pub struct Dataplane {
    ebpf: Ebpf,
}

impl Dataplane {
    /// Loads the object and its program into the kernel, not attached anywhere yet.
    pub fn load(object: &[u8], flow_table_size: u32) -> anyhow::Result<Dataplane> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_FLOWS, flow_table_size)
            .load(object)
            .context("loading the bg XDP object into the kernel (are you root, with BPF enabled?)")?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| anyhow!("the XDP object has no program `{PROGRAM}`"))?
            .try_into()?;
        prog.load()
            .context("the kernel verifier rejected the bg XDP program")?;
        Ok(Dataplane { ebpf })
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

    /// Writes every service and both colors' backend sets. Call before `select` and `attach`.
    pub fn install_services(&mut self, services: &[Service]) -> anyhow::Result<()> {
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
        for name in [MAP_ACTIVE, MAP_SERVICES, MAP_BACKEND_SETS, MAP_FLOWS, MAP_STATS] {
            let path = dir.join(name);
            self.map(name)?
                .pin(&path)
                .with_context(|| format!("pinning map {name} at {}", path.display()))?;
        }
        Ok(())
    }

    /// Packet counts per reason, summed over CPUs.
    pub fn stats(&self) -> anyhow::Result<Vec<(Reason, u64)>> {
        let stats: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map(MAP_STATS)?)?;
        Reason::ALL
            .iter()
            .map(|r| {
                let per_cpu = stats.get(&(*r as u32), 0)?;
                Ok((*r, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Walks the flow table. O(entries): for status, not for a hot loop.
    pub fn flow_counts(&self) -> anyhow::Result<FlowCounts> {
        let flows: HashMap<&MapData, FlowKey, NatEntry> = HashMap::try_from(self.map(MAP_FLOWS)?)?;
        let mut counts = FlowCounts::default();
        for item in flows.iter() {
            let Ok((_, entry)) = item else { continue };
            counts.entries += 1;
            if entry.kind == NAT_TO_BACKEND {
                if let Some(c) = Color::from_u8(entry.color) {
                    counts.flows[c as usize] += 1;
                }
            }
        }
        Ok(counts)
    }

    /// Direct access for tests and tools that need a map the methods above do not cover.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}
