//! Every map the program uses. Names are the pin file names (see `bg_common::pin`).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use bg_common::{
    ADDR_FILTER_WORDS, BackendKey, BackendSet, BackendSignals, ColorStats, LatencyHist, DpConfig, EgressState, FlowEntry, FlowKey, FlowKey4, PreviewReply,
    RateWindow, ReplyNat, Selector, ServiceInfo, VipAddr, VipKey, DEFAULT_FLOW_TABLE_SIZE, MAX_BACKENDS, MAX_EGRESS,
    MAX_LOCAL_ADDRS, MAX_SERVICES, RING_SIZE, SLOTS, STAT_SLOTS,
};

/// Settings written once by the agent before attaching (timeouts, rate bound, flags).
#[map]
pub static BG_CONFIG_V2: Array<DpConfig> = Array::with_max_entries(1, 0);

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

/// Established flows (confirmed by their backend's answer), by client → VIP 5-tuple, IPv4 and
/// IPv6 (see `flows`); size `flow_table_size` each, set by the agent at load time. Only
/// confirmations insert here, so new and unconfirmed flows can never evict an established one.
#[map]
pub static BG_FLOWS4_V1: LruHashMap<FlowKey4, FlowEntry> = LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);
#[map]
pub static BG_FLOWS6_V1: LruHashMap<FlowKey, FlowEntry> = LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

/// Unconfirmed flows (a SYN, a first UDP datagram, a lost flow's packet; no answer from the
/// backend yet), by client → VIP 5-tuple, IPv4 and IPv6; size `unconfirmed_table_size` each.
/// Floods churn these tables only.
#[map]
pub static BG_EMBRYO4_V1: LruHashMap<FlowKey4, FlowEntry> = LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE / 8, 0);
#[map]
pub static BG_EMBRYO6_V1: LruHashMap<FlowKey, FlowEntry> = LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE / 8, 0);

/// Static reverse NAT: a backend's address, port and protocol → its service's VIP and color.
/// Replies need no per-flow state, so no eviction can leak a backend's address.
#[map]
pub static BG_REPLIES_V2: HashMap<BackendKey, ReplyNat> = HashMap::with_max_entries(MAX_SERVICES * 2 * MAX_BACKENDS as u32, 0);

/// Preview flows' replies (their backend also serves the main VIP): reply 5-tuple → preview VIP.
#[map]
pub static BG_PREVIEW_REPLIES_V1: LruHashMap<FlowKey, PreviewReply> = LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE / 8, 0);

/// [0]: until when (`bpf_ktime_get_ns`) lost flows may be waiting for their backend's answer;
/// while it is in the future, TCP replies look for an unconfirmed entry to confirm.
#[map]
pub static BG_GATE_V1: Array<u64> = Array::with_max_entries(1, 0);

/// The gateway's own addresses (replies to them, such as the agent's health checks, are not
/// NAT replies), with a bit filter in front (`bg_common::addr_filter_bit`).
#[map]
pub static BG_LOCAL_ADDRS_V1: HashMap<VipAddr, u32> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);
#[map]
pub static BG_LOCAL_FILTER_V1: Array<u64> = Array::with_max_entries(ADDR_FILTER_WORDS, 0);

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

/// Per-CPU, per `Reason`: when a log line about that reason was last written (coarse clock).
#[map]
pub static BG_LOG_RATE_V1: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);

/// Per-CPU connection signals per backend (`bg_common::BackendSignals`), at
/// `signal_index(service, color, backend)`; sized by the agent at load time to
/// `services * 2 * MAX_BACKENDS`.
#[map]
pub static BG_SIGNALS_V1: PerCpuArray<BackendSignals> = PerCpuArray::with_max_entries(2 * MAX_BACKENDS as u32, 0);

/// Per-CPU handshake latency histogram per (service, color): `service * 2 + color`.
#[map]
pub static BG_LATENCY_V1: PerCpuArray<LatencyHist> = PerCpuArray::with_max_entries(MAX_SERVICES * 2, 0);
