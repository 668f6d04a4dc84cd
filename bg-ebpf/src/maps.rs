//! Every map the program uses. Names are the pin file names (see `bg_common::pin`).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use bg_common::{
    BackendSet, FlowKey, NatEntry, Reason, Selector, ServiceInfo, VipKey, DEFAULT_FLOW_TABLE_SIZE,
    MAX_SERVICES, SLOTS,
};

/// The single entry selecting the backend-set slot for new flows; one aligned u32, so a flip is
/// one atomic store (see `bg_common::Selector`).
#[map]
pub static BG_ACTIVE_V1: Array<Selector> = Array::with_max_entries(1, 0);

/// VIP:port/protocol → service index.
#[map]
pub static BG_SERVICES_V1: HashMap<VipKey, ServiceInfo> =
    HashMap::with_max_entries(MAX_SERVICES, 0);

/// Backend sets, `slot * MAX_SERVICES + service`; a slot is written only while unselected.
#[map]
pub static BG_BACKEND_SETS_V1: Array<BackendSet> =
    Array::with_max_entries(SLOTS * MAX_SERVICES, 0);

/// Per-flow NAT state, both directions; size set by the agent at load time.
#[map]
pub static BG_FLOWS_V1: LruHashMap<FlowKey, NatEntry> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

/// Per-CPU packet count per `Reason`.
#[map]
pub static BG_STATS_V1: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);
