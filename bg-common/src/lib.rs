//! Types and pure logic shared by the XDP program (`bg-ebpf`) and the agent (`bg-userspace`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and no `bool`/`usize`, so the
//! kernel and userspace agree on the bytes. Addresses and ports are kept in network byte order
//! ("raw": the bytes as they sit in the packet, loaded with `from_ne_bytes`), and each field says
//! so. IPv4 addresses occupy word 0 of a `[u32; 4]` with the other words zero, so the same layout
//! carries IPv6 later without a map layout change.
#![no_std]

pub mod csum;
pub mod hash;
pub mod pin;

use bytemuck::{Pod, Zeroable};

/// How many services (VIP, port, protocol) one agent serves.
pub const MAX_SERVICES: u32 = 256;
/// Backends per color per service.
pub const MAX_BACKENDS: usize = 32;
/// Backend-set slots. A slot is only ever written while no selector points at it; see
/// [`Selector`]. Two per color, so a color's set can be rebuilt without touching the live copy.
pub const SLOTS: u32 = 4;
/// Default size of the flow table (entries; each flow uses two, one per direction).
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 65_536;

/// Address family tag carried in keys.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
/// IP protocol numbers.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// The two environments.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Color {
    Blue = 0,
    Green = 1,
}

impl Color {
    pub const ALL: [Color; 2] = [Color::Blue, Color::Green];

    pub const fn other(self) -> Color {
        match self {
            Color::Blue => Color::Green,
            Color::Green => Color::Blue,
        }
    }

    pub const fn from_u8(v: u8) -> Option<Color> {
        match v {
            0 => Some(Color::Blue),
            1 => Some(Color::Green),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Color::Blue => "blue",
            Color::Green => "green",
        }
    }
}

/// The value of the single-entry `ACTIVE` map: which backend-set slot new flows use.
///
/// Why a flip is atomic: the selector is one naturally aligned `u32`, so the map update that
/// replaces it is a single 4-byte store; a concurrent XDP reader sees the old value or the new
/// one, never a mix. The slot it names was filled completely *before* the selector was written
/// and slots that a selector may point at are never rewritten in place, so the backend set a
/// packet reads through the selector is always one color's whole set. (An in-place update of a
/// multi-field value is a `memcpy` a reader on another CPU can observe half-done.)
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Selector(pub u32);

impl Selector {
    pub const fn for_slot(slot: u32) -> Self {
        Selector(slot)
    }
    pub const fn slot(self) -> u32 {
        self.0 & 0xff
    }
}

/// Key of the `SERVICES` map: a VIP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct VipKey {
    /// Network byte order; IPv4 in word 0.
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// Value of the `SERVICES` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceInfo {
    /// Index of this service's backend sets: slot `s` lives at `s * MAX_SERVICES + index`.
    pub index: u32,
}

/// One backend: where a new flow is sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Backend {
    /// Network byte order; IPv4 in word 0.
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Value of the `BACKEND_SETS` array: one color's backends for one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BackendSet {
    /// Number of valid entries in `backends`; 0 means the color has no backend for the service.
    pub count: u32,
    /// The color these backends belong to (`Color as u32`).
    pub color: u32,
    pub backends: [Backend; MAX_BACKENDS],
}

impl BackendSet {
    pub fn index(slot: u32, service: u32) -> u32 {
        slot * MAX_SERVICES + service
    }
}

/// Key of the `FLOWS` table: a packet's 5-tuple as it arrives at the gateway.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    /// Network byte order; IPv4 in word 0.
    pub src: [u32; 4],
    /// Network byte order; IPv4 in word 0.
    pub dst: [u32; 4],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// `NatEntry::kind`: rewrite the destination (client → VIP becomes client → backend).
pub const NAT_TO_BACKEND: u8 = 0;
/// `NatEntry::kind`: rewrite the source (backend → client becomes VIP → client).
pub const NAT_FROM_BACKEND: u8 = 1;

/// Value of the `FLOWS` table. Each flow has two entries, one per direction, written together
/// when the flow starts: the forward one holds the backend, the reply one the VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct NatEntry {
    /// The address to write (backend for `NAT_TO_BACKEND`, VIP for `NAT_FROM_BACKEND`),
    /// network byte order.
    pub addr: [u32; 4],
    /// The port to write, network byte order.
    pub port: u16,
    /// `NAT_TO_BACKEND` or `NAT_FROM_BACKEND`.
    pub kind: u8,
    /// `Color as u8` chosen when the flow started.
    pub color: u8,
}

/// Why the program returned what it returned: the index of the per-CPU `STATS` map and the
/// words `bgctl` prints (Cilium's drop reasons idea). Append only; never renumber.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4 (ARP, IPv6, ...): passed untouched.
    PassNotIpv4 = 0,
    /// IPv4 but not TCP or UDP: passed untouched.
    PassNotL4 = 1,
    /// TCP/UDP that is neither for a VIP nor part of a VIP flow: passed untouched.
    PassNotOurs = 2,
    /// Frame too short for the headers it claims: passed untouched.
    PassTruncated = 3,
    /// IPv4 with options (IHL != 5): passed untouched.
    PassIpOptions = 4,
    /// IPv4 fragment: passed untouched.
    PassFragment = 5,
    /// Client → VIP packet of a new flow: backend chosen, rewritten, passed to the kernel to route.
    NewFlow = 6,
    /// Client → VIP packet of a known flow: rewritten toward its pinned backend.
    ToBackend = 7,
    /// Backend → client reply: source rewritten back to the VIP.
    FromBackend = 8,
    /// VIP packet while the active color has no backend for the service: dropped.
    DropNoBackend = 9,
    /// A new flow could not be recorded in the flow table: dropped (a flow without an entry
    /// would have its replies leave un-NATed).
    DropFlowTableFull = 10,
}

impl Reason {
    pub const COUNT: u32 = 11;
    pub const ALL: [Reason; Reason::COUNT as usize] = [
        Reason::PassNotIpv4,
        Reason::PassNotL4,
        Reason::PassNotOurs,
        Reason::PassTruncated,
        Reason::PassIpOptions,
        Reason::PassFragment,
        Reason::NewFlow,
        Reason::ToBackend,
        Reason::FromBackend,
        Reason::DropNoBackend,
        Reason::DropFlowTableFull,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIpv4 => "pass_not_ipv4",
            Reason::PassNotL4 => "pass_not_tcp_udp",
            Reason::PassNotOurs => "pass_not_ours",
            Reason::PassTruncated => "pass_truncated",
            Reason::PassIpOptions => "pass_ip_options",
            Reason::PassFragment => "pass_fragment",
            Reason::NewFlow => "new_flow",
            Reason::ToBackend => "to_backend",
            Reason::FromBackend => "from_backend",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropFlowTableFull => "drop_flow_table_full",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, `Pod` (no padding, any bit pattern valid).
    unsafe impl aya::Pod for Selector {}
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for ServiceInfo {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for BackendSet {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for NatEntry {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn map_types_have_the_sizes_the_kernel_sees() {
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<BackendSet>(), 8 + 20 * MAX_BACKENDS);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<NatEntry>(), 20);
    }

    #[test]
    fn reasons_are_numbered_by_position() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32, "{} out of place", r.name());
        }
    }
}
