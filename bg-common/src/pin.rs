//! Where the agent pins its objects in bpffs (one place, like bpfman's `RTDIR_FS_*`).
//! A layout change of a pinned map bumps its name's `_V<n>` suffix.

/// Default directory under bpffs for one agent instance.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/bg";
/// Map names in the object, which are also their pin file names.
pub const MAP_CONFIG: &str = "BG_CONFIG_V2";
pub const MAP_ACTIVE: &str = "BG_ACTIVE_V1";
pub const MAP_SERVICES: &str = "BG_SERVICES_V1";
pub const MAP_VIP_ADDRS: &str = "BG_VIP_ADDRS_V1";
pub const MAP_BACKEND_SETS: &str = "BG_BACKEND_SETS_V1";
pub const MAP_RINGS: &str = "BG_RINGS_V1";
/// Established flows, IPv4 (`FlowKey4`) and IPv6 (`FlowKey`).
pub const MAP_FLOWS4: &str = "BG_FLOWS4_V1";
pub const MAP_FLOWS6: &str = "BG_FLOWS6_V1";
/// Unconfirmed flows, IPv4 and IPv6.
pub const MAP_EMBRYO4: &str = "BG_EMBRYO4_V1";
pub const MAP_EMBRYO6: &str = "BG_EMBRYO6_V1";
pub const MAP_REPLIES: &str = "BG_REPLIES_V2";
pub const MAP_PREVIEW_REPLIES: &str = "BG_PREVIEW_REPLIES_V1";
pub const MAP_GATE: &str = "BG_GATE_V1";
pub const MAP_LOCAL_ADDRS: &str = "BG_LOCAL_ADDRS_V1";
pub const MAP_LOCAL_FILTER: &str = "BG_LOCAL_FILTER_V1";
pub const MAP_STATS: &str = "BG_STATS_V2";
pub const MAP_FWD_STATS: &str = "BG_FWD_STATS_V2";
pub const MAP_COLOR_STATS: &str = "BG_COLOR_STATS_V1";
pub const MAP_RATE: &str = "BG_RATE_V2";
pub const MAP_ADDR_FILTER: &str = "BG_ADDR_FILTER_V1";
pub const MAP_EGRESS: &str = "BG_EGRESS_V1";
pub const MAP_PROG_IDS: &str = "BG_PROG_IDS_V1";
/// Per-CPU connection signals per backend (`BackendSignals`) and handshake latency
/// histograms per (service, color) (`LatencyHist`).
pub const MAP_SIGNALS: &str = "BG_SIGNALS_V1";
pub const MAP_LATENCY: &str = "BG_LATENCY_V1";
/// Every map, in pin order.
pub const ALL_MAPS: [&str; 24] = [
    MAP_CONFIG,
    MAP_ACTIVE,
    MAP_SERVICES,
    MAP_VIP_ADDRS,
    MAP_BACKEND_SETS,
    MAP_RINGS,
    MAP_FLOWS4,
    MAP_FLOWS6,
    MAP_EMBRYO4,
    MAP_EMBRYO6,
    MAP_REPLIES,
    MAP_PREVIEW_REPLIES,
    MAP_GATE,
    MAP_LOCAL_ADDRS,
    MAP_LOCAL_FILTER,
    MAP_STATS,
    MAP_FWD_STATS,
    MAP_COLOR_STATS,
    MAP_RATE,
    MAP_ADDR_FILTER,
    MAP_EGRESS,
    MAP_PROG_IDS,
    MAP_SIGNALS,
    MAP_LATENCY,
];
/// The XDP program's name in the object.
pub const PROGRAM: &str = "bg_xdp";
/// The XDP program the agent runs (BPF_PROG_TEST_RUN, live frames) to learn whether redirects
/// into an interface work; never attached.
pub const PROBE_PROGRAM: &str = "bg_probe";
/// The tracepoint program on `xdp:xdp_redirect_err` that marks an egress whose redirects fail.
pub const REDIRECT_ERR_PROGRAM: &str = "bg_redirect_err";
