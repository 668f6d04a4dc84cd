//! Where the agent pins its objects in bpffs (one place, like bpfman's `RTDIR_FS_*`).
//! A layout change of a pinned map bumps its name's `_V<n>` suffix.

/// Default directory under bpffs for one agent instance.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/bg";
/// Map names in the object, which are also their pin file names.
pub const MAP_ACTIVE: &str = "BG_ACTIVE_V1";
pub const MAP_SERVICES: &str = "BG_SERVICES_V1";
pub const MAP_BACKEND_SETS: &str = "BG_BACKEND_SETS_V1";
pub const MAP_FLOWS: &str = "BG_FLOWS_V1";
pub const MAP_STATS: &str = "BG_STATS_V1";
/// The XDP program's name in the object.
pub const PROGRAM: &str = "bg_xdp";
