//! Every map the program uses. Names are the pin file names (see `bg_common::pin`).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use bg_common::{
    ADDR_FILTER_WORDS, BackendSet, ColorStats, DpConfig, EgressState, FlowKey, NatEntry, RateWindow, Selector,
    ServiceInfo, VipAddr, VipKey, DEFAULT_FLOW_TABLE_SIZE, MAX_EGRESS, MAX_SERVICES, RING_SIZE, SLOTS, STAT_SLOTS,
};

/// Settings written once by the agent before attaching (timeouts, rate bound, flags).
#[map]
pub static BG_CONFIG_V1: Array<DpConfig> = Array::with_max_entries(1, 0);

/// The single entry selecting the backend-set slot for new flows; one aligned u32, so a flip is
/// one atomic store (see `bg_common::Selector`).
#[map]
pub static BG_ACTIVE_V1: Array<Selector> = Array::with_max_entries(1, 0);

/// VIP:port/protocol → service index.
#[map]
pub static BG_SERVICES_V1: HashMap<VipKey, ServiceInfo> =
    HashMap::with_max_entries(MAX_SERVICES, 0);

/// Every VIP address (any port): "is this addressed to a VIP" for packets without usable ports.
#[map]
pub static BG_VIP_ADDRS_V1: HashMap<VipAddr, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Backend sets, `slot * MAX_SERVICES + service`; a slot is written only while unselected.
#[map]
pub static BG_BACKEND_SETS_V1: Array<BackendSet> =
    Array::with_max_entries(SLOTS * MAX_SERVICES, 0);

/// Maglev tables: backend index per `ring_base(slot, services, service) + hash % RING_SIZE`.
/// Sized by the agent at load time to `SLOTS * services * RING_SIZE`.
#[map]
pub static BG_RINGS_V1: Array<u32> = Array::with_max_entries(SLOTS * RING_SIZE, 0);

/// Per-flow NAT state, both directions; size set by the agent at load time.
#[map]
pub static BG_FLOWS_V1: LruHashMap<FlowKey, NatEntry> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

/// Per-CPU packet count per `Reason` (each packet counts exactly one); `STAT_SLOTS` entries.
#[map]
pub static BG_STATS_V2: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);

/// Per-CPU count per forwarding outcome of rewritten packets (`Fwd`); `STAT_SLOTS` entries.
#[map]
pub static BG_FWD_STATS_V2: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);

/// Per-CPU packets, bytes and new flows per color.
#[map]
pub static BG_COLOR_STATS_V1: PerCpuArray<ColorStats> = PerCpuArray::with_max_entries(2, 0);

/// The window of the new-flow rate bound, shared by every CPU.
#[map]
pub static BG_RATE_V2: Array<RateWindow> = Array::with_max_entries(1, 0);

/// Bit filter over VIP and backend addresses (`bg_common::addr_filter_bit`): packets that hit
/// neither bit skip the flow and service lookups.
#[map]
pub static BG_ADDR_FILTER_V1: Array<u64> = Array::with_max_entries(ADDR_FILTER_WORDS, 0);

/// Egress interfaces by ifindex: whether redirects into them work (`EgressState`). Written by
/// the agent (probe results) and by the `bg_redirect_err` tracepoint program.
#[map]
pub static BG_EGRESS_V1: HashMap<u32, EgressState> = HashMap::with_max_entries(MAX_EGRESS, 0);

/// The ids of this agent's `bg_xdp` and `bg_probe` programs: the tracepoint program counts only
/// their redirect errors (the tracepoint fires for every XDP program on the host).
#[map]
pub static BG_PROG_IDS_V1: Array<u32> = Array::with_max_entries(2, 0);
