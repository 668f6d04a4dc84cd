//! Types and pure logic shared by the XDP program (`bg-ebpf`) and the agent (`bg-userspace`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and no `bool`/`usize`, so the
//! kernel and userspace agree on the bytes. Addresses and ports are kept in network byte order
//! ("raw": the bytes as they sit in the packet, loaded with `from_ne_bytes`), and each field says
//! so. IPv4 addresses occupy word 0 of a `[u32; 4]` with the other words zero, so the same layout
//! carries IPv6 later without a map layout change.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod csum;
pub mod hash;
#[cfg(any(feature = "std", test))]
pub mod maglev;
pub mod pin;

use bytemuck::{Pod, Zeroable};

/// How many services (VIP, port, protocol) one agent serves.
pub const MAX_SERVICES: u32 = 64;
/// Backends per color per service.
pub const MAX_BACKENDS: usize = 256;
/// Backend-set slots. A slot is only ever written while no selector points at it; see
/// [`Selector`]. Two per color (`c` and `c + 2`), so a color's set can be rebuilt without
/// touching the live copy.
pub const SLOTS: u32 = 4;
/// Default size of the flow table (entries; each flow uses two, one per direction).
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 65_536;
/// Maglev table size per (slot, service). Prime, as Maglev requires, and large against 64
/// backends (≥ 100 slots per backend keeps imbalance and disruption small).
pub const RING_SIZE: u32 = 16_381;
/// A flow entry's `last_seen_ns` is refreshed at most this often (one write per second per flow
/// instead of one per packet).
pub const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// Words of the address filter (64 bits each): 65,536 bits, one per 16-bit address hash.
pub const ADDR_FILTER_WORDS: u32 = 1024;
/// Entries of the `LOCAL_ADDRS` map: the gateway's own addresses.
pub const MAX_LOCAL_ADDRS: u32 = 256;

/// The bit of an address in the `ADDR_FILTER` array: a packet whose destination is a VIP or
/// whose source is a backend has its bit set; one with neither bit set cannot belong to a VIP
/// flow and is passed without a hash-map lookup. False positives only cost the lookups.
#[inline(always)]
pub fn addr_filter_bit(addr: &[u32; 4]) -> u32 {
    hash::mix32(addr[0] ^ addr[1].rotate_left(8) ^ addr[2].rotate_left(16) ^ addr[3].rotate_left(24)) & 0xffff
}

/// Address family tag carried in keys.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
/// IP protocol numbers.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

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

/// The value of the single-entry `ACTIVE` map: which backend-set slots new flows use.
///
/// Bits 0..8: the primary slot (the active color's current slot). Bits 8..16: the secondary
/// slot (the idle color's current slot): preview services always use it, and a canary sends
/// `canary_permille`/1000 of new flows to it. Bits 16..26: that permille (0..=1000).
///
/// Why a flip is atomic: the selector is one naturally aligned `u32`, so the map update that
/// replaces it is a single 4-byte store; a concurrent XDP reader sees the old value or the new
/// one, never a mix. The slots it names (their backend sets and Maglev tables) were filled
/// completely *before* the selector was written, and a slot is only rewritten once no selector
/// has named it for a grace period, so a packet always reads one color's whole set. (An
/// in-place update of a multi-field value is a `memcpy` that a reader on another CPU can
/// observe half-done.)
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Selector(pub u32);

impl Selector {
    pub const fn new(primary: u32, secondary: u32, canary_permille: u32) -> Self {
        Selector((primary & 0xff) | (secondary & 0xff) << 8 | (canary_permille & 0x3ff) << 16)
    }
    pub const fn primary(self) -> u32 {
        self.0 & 0xff
    }
    pub const fn secondary(self) -> u32 {
        (self.0 >> 8) & 0xff
    }
    pub const fn canary_permille(self) -> u32 {
        (self.0 >> 16) & 0x3ff
    }
    /// The slot a new flow with `hash` takes; `preview` services always take the secondary.
    #[inline(always)]
    pub fn slot_for(self, hash: u32, preview: bool) -> u32 {
        if preview {
            return self.secondary();
        }
        let permille = self.canary_permille();
        // A different mix than the Maglev index, so the canary share is independent of it.
        if permille != 0 && crate::hash::mix32(hash ^ 0x5bd1_e995) % 1000 < permille {
            self.secondary()
        } else {
            self.primary()
        }
    }
}

/// The color whose backends a slot holds: slots `c` and `c + 2` belong to color `c`.
pub const fn slot_color(slot: u32) -> u8 {
    (slot & 1) as u8
}

/// `DpConfig::flags`: forward rewritten packets with `bpf_fib_lookup` + `XDP_REDIRECT`
/// (otherwise, or when the neighbour is unresolved, they are passed to the kernel to route).
pub const DP_FLAG_REDIRECT: u32 = 1;

/// `DpConfig::ready` of a data plane whose start finished.
pub const DP_READY: u32 = 0x6267_7264;

/// The single entry of the `CONFIG` map: settings written once, before the program is attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct DpConfig {
    /// Number of services; Maglev tables are laid out `(slot * services + service) * RING_SIZE`.
    pub services: u32,
    /// New flow entries per second, for the whole gateway (one budget shared by every CPU),
    /// before new flows are dropped; 0 = unlimited.
    pub new_flows_per_sec: u32,
    /// A UDP flow idle this long is over: its next packet starts a new flow.
    pub udp_idle_ns: u64,
    /// A TCP flow that saw FIN (or an in-window RST), idle this long, is over.
    pub closing_idle_ns: u64,
    /// `DP_FLAG_*`.
    pub flags: u32,
    /// `DP_READY` once a fresh start has finished (maps written, program attached, links
    /// pinned); anything else in pinned state means a start died half-way (not read by the
    /// program).
    pub ready: u32,
    /// An unconfirmed flow (no backend answer yet) idle this long is over.
    pub unconfirmed_idle_ns: u64,
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

/// `ServiceInfo::flags`: a preview service, always routed to the idle color.
pub const SERVICE_PREVIEW: u32 = 1;
/// `ServiceInfo::flags`: a main VIP whose service also has a preview VIP (its new flows clear
/// any stale preview reverse entry of their reply 5-tuple).
pub const SERVICE_HAS_PREVIEW: u32 = 2;

/// Value of the `SERVICES` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceInfo {
    /// Index of this service's backend sets: slot `s` lives at `s * MAX_SERVICES + index`.
    pub index: u32,
    /// `SERVICE_*` bits.
    pub flags: u32,
}

/// Key of the `VIP_ADDRS` map: every VIP address, whatever the port. Lets the program tell
/// "addressed to a VIP" for packets that carry no usable ports (fragments, malformed headers).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct VipAddr {
    /// Network byte order; IPv4 in word 0.
    pub addr: [u32; 4],
    pub family: u32,
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

/// Index of the first entry of a (slot, service) Maglev table in the `RINGS` array.
#[inline(always)]
pub fn ring_base(slot: u32, services: u32, service: u32) -> u32 {
    (slot * services + service) * RING_SIZE
}

/// Key of the IPv6 flow tables, and the form every flow's key takes in the program: a
/// packet's 5-tuple as it arrives at the gateway.
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

/// Key of the IPv4 flow tables: 16 bytes (the kernel hashes it in one round, not four, and
/// its elements are smaller). Fields as in `FlowKey`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey4 {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The IPv4 table's key of an IPv4 flow (`family` must be `FAMILY_V4`).
    #[inline(always)]
    pub fn v4(&self) -> FlowKey4 {
        FlowKey4 { src: self.src[0], dst: self.dst[0], sport: self.sport, dport: self.dport, proto: self.proto, _pad: [0; 3] }
    }

    /// For a client → VIP key and its backend: the key of the replies, backend → client.
    #[inline(always)]
    pub fn reply_key(&self, backend: [u32; 4], backend_port: u16) -> FlowKey {
        FlowKey {
            src: backend,
            dst: self.src,
            sport: backend_port,
            dport: self.sport,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }

    /// For a backend → client key and its VIP: the key of the requests, client → VIP.
    #[inline(always)]
    pub fn forward_key(&self, vip: [u32; 4], vip_port: u16) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: vip,
            sport: self.dport,
            dport: vip_port,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }
}

/// `FlowEntry::flags`: a FIN, or an RST inside the window the entry has seen, was sent by the
/// client: the flow ends when idle for `closing_idle_ns`, and a new SYN replaces it.
pub const FLOW_CLOSING: u8 = 1;
/// `FlowEntry::flags` (established): a SYN with another ISN (`contest_isn`) started a new flow
/// on this 4-tuple while the entry was open. The client's next packet decides which is real.
pub const FLOW_CONTESTED: u8 = 2;
/// `FlowEntry::flags` (unconfirmed): started by a packet that was not a SYN (the entry was
/// lost, evicted or drained); confirmed by any backend reply that is not an RST.
pub const FLOW_LOST: u8 = 4;
/// `FlowEntry::flags`: started on a preview VIP; its replies are mapped through
/// `PREVIEW_REPLIES` (the static reply map names the main VIP).
pub const FLOW_PREVIEW: u8 = 8;
/// `FlowEntry::flags` (unconfirmed TCP): the backend's SYN-ACK acknowledging the SYN was seen;
/// `peer_isn` holds its ISN.
pub const FLOW_ANSWERED: u8 = 16;
/// `FlowEntry::flags` (unconfirmed TCP): the backend refused the handshake (an RST to the SYN),
/// counted in `BackendSignals::refused` once.
pub const FLOW_FAILED: u8 = 32;

/// Value of the flow tables, keyed by the flow's client → VIP 5-tuple (`FlowKey`): the
/// unconfirmed table (`EMBRYO`) until the backend answers, the established one (`FLOWS`) after.
/// One entry per flow: replies are rewritten by the static `REPLIES` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowEntry {
    /// The backend, network byte order; IPv4 in word 0.
    pub backend: [u32; 4],
    /// `bpf_ktime_get_ns` of the last packet, refreshed at most every
    /// `LAST_SEEN_GRANULARITY_NS`; kept for unconfirmed, UDP and closing entries (open
    /// established TCP flows do not age, and their packets skip the clock read).
    pub last_seen_ns: u64,
    /// Network byte order.
    pub backend_port: u16,
    /// `Color as u8` chosen when the flow started.
    pub color: u8,
    /// `FLOW_*` bits.
    pub flags: u8,
    /// TCP: the sequence number of the SYN that started the flow (host order); its
    /// retransmissions follow the entry, any other SYN starts a new flow.
    pub isn: u32,
    /// TCP: the highest sequence number the client has sent up to (seq + length, host order):
    /// an RST ends the flow only near it.
    pub seq_next: u32,
    /// TCP, with `FLOW_CONTESTED`: the ISN of the SYN that contests this entry.
    pub contest_isn: u32,
    /// TCP, unconfirmed with `FLOW_ANSWERED`: the backend's ISN (from its SYN-ACK, host
    /// order); the client's ACK of it completes the handshake and confirms the flow.
    /// Confirmed: 0, or `PEER_RESET` once the backend reset the flow (written by the reply
    /// side only).
    pub peer_isn: u32,
    /// The next-hop cache of the client → backend direction (redirect forwarding): valid while
    /// `bpf_ktime_get_coarse_ns() >> NH_EPOCH_SHIFT` equals `nh_epoch` (about a second), for
    /// packets of at most `nh_len` bytes of IP (the longest one the FIB said fits), so a route
    /// or neighbour change is seen within a second and a larger packet is looked up again
    /// (and answered "too big" when it is).
    pub nh_epoch: u32,
    /// The egress interface; 0: nothing cached.
    pub nh_ifindex: u32,
    pub nh_len: u16,
    /// The flow's backend's entry in `SIGNALS` (`signal_index`).
    pub signal: u16,
    /// Destination and source MAC for the egress.
    pub nh_macs: [u8; 12],
    /// `bpf_ktime_get_ns() >> LATENCY_SHIFT` (truncated) when the flow started: its handshake
    /// latency is measured from here to the backend's SYN-ACK.
    pub started: u32,
}

/// `FlowEntry::peer_isn` of a confirmed flow the backend reset (counted once).
pub const PEER_RESET: u32 = 1;

/// `FlowEntry::nh_epoch` is the coarse clock shifted by this (2^30 ns, about 1.07 s).
pub const NH_EPOCH_SHIFT: u32 = 30;

impl FlowEntry {
    /// A flow toward `backend:backend_port` (network order) on `color`; every other field 0
    /// (no flags, no sequence numbers, no next hop cached).
    #[inline(always)]
    pub const fn to(backend: [u32; 4], backend_port: u16, color: u8) -> FlowEntry {
        FlowEntry {
            backend,
            last_seen_ns: 0,
            backend_port,
            color,
            flags: 0,
            isn: 0,
            seq_next: 0,
            contest_isn: 0,
            peer_isn: 0,
            nh_epoch: 0,
            nh_ifindex: 0,
            nh_len: 0,
            signal: 0,
            nh_macs: [0; 12],
            started: 0,
        }
    }

    /// Whether the entry is over at `now_ns` by the idle rules: unconfirmed entries after
    /// `unconfirmed_idle_ns`, UDP after `udp_idle_ns`, closing TCP after `closing_idle_ns`.
    #[inline(always)]
    pub fn expired(&self, proto: u8, confirmed: bool, now_ns: u64, cfg: &DpConfig) -> bool {
        let idle = now_ns.saturating_sub(self.last_seen_ns);
        if !confirmed {
            return idle > cfg.unconfirmed_idle_ns;
        }
        if proto == PROTO_UDP {
            return idle > cfg.udp_idle_ns;
        }
        self.flags & FLOW_CLOSING != 0 && idle > cfg.closing_idle_ns
    }
}

/// How far (bytes, either side of `FlowEntry::seq_next`) a client RST's sequence number may be
/// and still end the flow. A blind RST hits this window with odds of about 1 in 32768.
pub const RST_WINDOW: u32 = 65_536;

/// Key of the static `REPLIES` map: a backend as its replies arrive (source address and
/// port), the protocol and the family. Same layout as `VipKey`.
pub type BackendKey = VipKey;

/// `ReplyNat::flags`: the backend's service has a preview VIP, so a reply may belong to a
/// preview flow: `PREVIEW_REPLIES` is looked up first.
pub const REPLY_HAS_PREVIEW: u8 = 1;

/// Value of the static `REPLIES` map: what a backend's replies are rewritten to. Written by
/// the agent from the config, which allows a backend address:port in one service and one
/// color only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ReplyNat {
    /// The service's VIP, network byte order; IPv4 in word 0.
    pub vip: [u32; 4],
    /// Network byte order.
    pub vip_port: u16,
    /// The backend's color (`Color as u8`).
    pub color: u8,
    /// `REPLY_*` bits.
    pub flags: u8,
    /// The backend's entry in `SIGNALS` (`signal_index`).
    pub signal: u32,
}

/// Value of `PREVIEW_REPLIES`, keyed by a preview flow's reply 5-tuple (backend → client).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct PreviewReply {
    /// The preview VIP, network byte order; IPv4 in word 0.
    pub vip: [u32; 4],
    /// Network byte order.
    pub vip_port: u16,
    pub _pad: u16,
}

/// The new-flow rate bound's window, one for the whole gateway (shared by every CPU, updated
/// with atomics).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct RateWindow {
    /// The second of the monotonic clock being counted (named `start_ns` in layout V1).
    pub start_ns: u64,
    /// New flows admitted in that second.
    pub count: u64,
}

/// Per-CPU, per-color traffic counters (`COLOR_STATS[color]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ColorStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Per-CPU connection signals of one backend: what its real traffic sees, counted by the data
/// path (`SIGNALS[signal_index(service, color, backend)]`). The agent's SLOs are judged on
/// these (README "Connection signals").
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BackendSignals {
    /// Flows started (a TCP SYN, a first UDP datagram).
    pub new_flows: u64,
    /// Flows answered in time: TCP by the backend's SYN-ACK before the client sent its SYN
    /// again `NO_ANSWER_NS` or more after the first; UDP by a first reply before the client
    /// sent again `UDP_NO_REPLY_NS` or more after its first datagram.
    pub answered: u64,
    /// TCP handshakes refused: the backend answered the SYN with an RST.
    pub refused: u64,
    /// Flows with no answer in time: the client sent its SYN again `NO_ANSWER_NS` or more
    /// after the first with no SYN-ACK yet (its retransmission timeout, 1 s on Linux), a UDP
    /// client sent again `UDP_NO_REPLY_NS` or more after its first datagram with no reply.
    pub no_answer: u64,
    /// Confirmed TCP flows that were not closing reset by the backend (once per flow).
    pub resets: u64,
    /// Bytes (whole frames) client → backend and backend → client.
    pub bytes_to: u64,
    pub bytes_from: u64,
}

/// A UDP flow without a reply this long after its first datagram counts as unanswered (on
/// the client's next datagram).
pub const UDP_NO_REPLY_NS: u64 = 1_000_000_000;
/// A TCP SYN sent again this long or more after the flow's first, with no SYN-ACK yet, counts
/// the flow as unanswered: under the 1 s initial retransmission timeout of RFC 6298 (Linux,
/// and most stacks), far over any healthy backend's answer; a duplicate sent at once counts
/// nothing.
pub const NO_ANSWER_NS: u64 = 800_000_000;

/// `FlowEntry::started` and handshake latencies are in units of 2^10 ns (1.024 us).
pub const LATENCY_SHIFT: u32 = 10;
/// Buckets of the handshake latency histogram: bucket 0 holds latencies under one unit,
/// bucket k (1..) those in [2^(k-1), 2^k) units, the last one everything from 2^(k-1) up
/// (bucket 23 starts at 4.3 s).
pub const LATENCY_BUCKETS: usize = 24;

/// Per-CPU handshake latency histogram of one (service, color): `LATENCY[service * 2 + color]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct LatencyHist {
    pub buckets: [u64; LATENCY_BUCKETS],
}

/// The histogram bucket of a latency in `LATENCY_SHIFT` units.
#[inline(always)]
pub fn latency_bucket(units: u32) -> u32 {
    let b = 32 - units.leading_zeros();
    if b >= LATENCY_BUCKETS as u32 {
        LATENCY_BUCKETS as u32 - 1
    } else {
        b
    }
}

/// Where a backend's signals live: one block of `MAX_BACKENDS` per (service, color), the
/// backend's place in its color's list inside it. Fits `FlowEntry::signal` (u16).
#[inline(always)]
pub const fn signal_index(service: u32, color: u32, backend: u32) -> u32 {
    (service * 2 + (color & 1)) * MAX_BACKENDS as u32 + backend
}

/// What bg knows about an egress interface (`EGRESS[ifindex]`): whether `XDP_REDIRECT` into it
/// works, learned from the agent's probe and from the `xdp:xdp_redirect_err` tracepoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct EgressState {
    /// `EGRESS_*`.
    pub flags: u32,
    /// The last redirect error into this interface (a negative errno, e.g. -95 EOPNOTSUPP when
    /// a veth's peer has neither GRO nor an XDP program).
    pub last_err: i32,
    /// Redirects into this interface that failed (each one a frame the driver dropped).
    pub errors: u64,
}

/// Redirects into this egress fail: its packets take the kernel path (`XDP_PASS`) instead.
pub const EGRESS_NO_REDIRECT: u32 = 1;
/// Entries of the `EGRESS` map: interfaces bg has seen as a redirect target.
pub const MAX_EGRESS: u32 = 1024;
/// The probe frame's EtherType (IEEE 802 local experimental 1): nobody handles it, so a probe
/// that does reach a peer is dropped there.
pub const PROBE_ETHERTYPE: u16 = 0x88b5;

/// Why the program returned what it returned: the index of the per-CPU `STATS` map and the
/// words `bgctl stats` prints (Cilium's drop reasons idea). Every packet counts exactly one.
/// Append only; never renumber.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IP (ARP, LLDP, ...): passed untouched.
    PassNotIp = 0,
    /// 802.1Q/802.1ad tagged: passed untouched (attach bg to the VLAN interface instead).
    PassVlan = 1,
    /// IP but neither TCP nor UDP nor an ICMP error quoting a VIP flow: passed untouched.
    PassNotL4 = 2,
    /// TCP/UDP neither for a VIP nor part of a VIP flow: passed untouched.
    PassNotOurs = 3,
    /// Not addressed to a VIP, headers cut short: passed untouched (the kernel judges it).
    PassTruncated = 4,
    /// Not addressed to a VIP, malformed IP header (IHL < 5): passed untouched.
    PassMalformed = 5,
    /// Not addressed to a VIP, a fragment: passed untouched.
    PassFragment = 6,
    /// Would be rewritten but TTL/hop limit ≤ 1: passed untouched, so the kernel answers
    /// "time exceeded" as a router does.
    PassTtlExpired = 7,
    /// First packet of a flow (TCP SYN, first UDP datagram): backend chosen, rewritten.
    NewFlow = 8,
    /// Client → VIP packet of a known flow: rewritten toward its pinned backend.
    ToBackend = 9,
    /// Backend → client reply: source rewritten back to the VIP.
    FromBackend = 10,
    /// TCP to a VIP, not SYN, no flow entry (the entry was lost or evicted, or the flow was
    /// drained): sent to the active color's backend by the same hash and re-recorded. If that
    /// backend does not know the connection, it answers with a RST, which reaches the client.
    LostFlow = 11,
    /// VIP packet while the active color has no usable backend for the service: dropped.
    DropNoBackend = 12,
    /// A new flow could not be recorded in the flow table: dropped (its replies would leave
    /// un-NATed otherwise).
    DropFlowTableFull = 13,
    /// TCP RST to a VIP with no flow entry: dropped, and no entry is created.
    DropRstNoFlow = 14,
    /// New flow over the per-CPU new-flow rate bound (SYN flood): dropped, no entry created,
    /// so established flows are not evicted.
    DropNewFlowRate = 15,
    /// Addressed to a VIP, malformed or truncated IP/TCP/UDP header: dropped.
    DropMalformed = 16,
    /// Addressed to a VIP, an IP fragment (no reassembly here, later fragments carry no
    /// ports to find the flow): dropped.
    DropFragment = 17,
    /// ICMP error about a reply of a VIP flow (it quotes VIP → client), sent to the VIP:
    /// outer destination and quoted source rewritten to the backend, so the backend's path
    /// MTU discovery works.
    IcmpToBackend = 18,
    /// ICMP error about a packet sent to a backend (it quotes client → backend), on its way to
    /// the client: quoted destination rewritten to the VIP (and the outer source, when it is
    /// the backend itself), so the client matches it to its connection.
    IcmpToClient = 19,
    /// IPv6 to a VIP with a routing header that still has segments left: the VIP is only a
    /// waypoint (and the L4 checksum covers the final destination): dropped.
    DropSourceRouted = 20,
    /// Addressed to a VIP but to no service of it (another port, another protocol, ICMP echo,
    /// an ICMP error about no flow bg has): dropped. The gateway does not own the VIP; passed,
    /// the kernel would route it back out.
    DropStray = 21,
    /// To a VIP from a source no real client has (0/8, 127/8, multicast and reserved 224/3,
    /// a VIP itself; IPv6 ::, ::1, ff00::/8, IPv4-mapped): dropped before it creates a flow.
    DropMartian = 22,
    /// IPv6 UDP to a VIP with checksum 0 (invalid in IPv6, RFC 8200 8.1): dropped.
    DropUdp6NoChecksum = 23,
}

/// Entries of the per-CPU counter arrays (`STATS`, `FWD_STATS`): room for reasons and
/// outcomes appended later, so adding one does not change a pinned map's layout.
pub const STAT_SLOTS: u32 = 64;

impl Reason {
    pub const COUNT: u32 = 24;
    pub const ALL: [Reason; Reason::COUNT as usize] = [
        Reason::PassNotIp,
        Reason::PassVlan,
        Reason::PassNotL4,
        Reason::PassNotOurs,
        Reason::PassTruncated,
        Reason::PassMalformed,
        Reason::PassFragment,
        Reason::PassTtlExpired,
        Reason::NewFlow,
        Reason::ToBackend,
        Reason::FromBackend,
        Reason::LostFlow,
        Reason::DropNoBackend,
        Reason::DropFlowTableFull,
        Reason::DropRstNoFlow,
        Reason::DropNewFlowRate,
        Reason::DropMalformed,
        Reason::DropFragment,
        Reason::IcmpToBackend,
        Reason::IcmpToClient,
        Reason::DropSourceRouted,
        Reason::DropStray,
        Reason::DropMartian,
        Reason::DropUdp6NoChecksum,
    ];

    /// The reason numbered `v`.
    #[inline(always)]
    pub fn from_u32(v: u32) -> Option<Reason> {
        Reason::ALL.get(v as usize).copied()
    }

    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassVlan => "pass_vlan",
            Reason::PassNotL4 => "pass_not_tcp_udp",
            Reason::PassNotOurs => "pass_not_ours",
            Reason::PassTruncated => "pass_truncated",
            Reason::PassMalformed => "pass_malformed",
            Reason::PassFragment => "pass_fragment",
            Reason::PassTtlExpired => "pass_ttl_expired",
            Reason::NewFlow => "new_flow",
            Reason::ToBackend => "to_backend",
            Reason::FromBackend => "from_backend",
            Reason::LostFlow => "lost_flow",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropFlowTableFull => "drop_flow_table_full",
            Reason::DropRstNoFlow => "drop_rst_no_flow",
            Reason::DropNewFlowRate => "drop_new_flow_rate",
            Reason::DropMalformed => "drop_malformed",
            Reason::DropFragment => "drop_fragment",
            Reason::IcmpToBackend => "icmp_to_backend",
            Reason::IcmpToClient => "icmp_to_client",
            Reason::DropSourceRouted => "drop_source_routed",
            Reason::DropStray => "drop_stray",
            Reason::DropMartian => "drop_martian",
            Reason::DropUdp6NoChecksum => "drop_udp6_no_checksum",
        }
    }

    /// Whether the packet is dropped (the rest are passed or forwarded).
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::DropNoBackend
                | Reason::DropFlowTableFull
                | Reason::DropRstNoFlow
                | Reason::DropNewFlowRate
                | Reason::DropMalformed
                | Reason::DropFragment
                | Reason::DropSourceRouted
                | Reason::DropStray
                | Reason::DropMartian
                | Reason::DropUdp6NoChecksum
        )
    }
}

/// How a rewritten packet left: the index of the per-CPU `FWD_STATS` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fwd {
    /// `bpf_fib_lookup` found route and neighbour: MACs rewritten, TTL decremented,
    /// `XDP_REDIRECT` to the egress interface.
    Redirect = 0,
    /// Redirect disabled in config: `XDP_PASS`, the kernel routes it.
    Kernel = 1,
    /// Route found, neighbour not resolved yet: `XDP_PASS`, the kernel resolves and routes it.
    KernelNoNeigh = 2,
    /// Packet larger than the egress MTU that may be fragmented (IPv4 without DF): `XDP_PASS`,
    /// the kernel fragments it.
    KernelFragNeeded = 3,
    /// Any other lookup result (no route, blackhole, forwarding disabled ...): `XDP_PASS`,
    /// the kernel decides and answers as a router would.
    KernelOther = 4,
    /// Unconfirmed flow entries removed by the data path (confirmed, or ended by an RST
    /// during the handshake).
    FlowsRemoved = 5,
    /// Unconfirmed flow entries created under a key that had none (new flows).
    FlowsCreated = 6,
    /// Packet of a VIP flow larger than the egress MTU that must not be fragmented (IPv4 with
    /// DF, IPv6): bg answers its sender with "fragmentation needed" / "packet too big" quoting
    /// the packet as the sender sent it (handed to the kernel, which routes it to the sender),
    /// so path MTU discovery works through the NAT. The kernel's own answer would quote the
    /// rewritten packet, which no socket matches.
    TooBigAnswered = 7,
    /// Same, but the answer could not be built (the frame could not be resized): dropped.
    TooBigDropped = 8,
    /// Route and neighbour found, but redirects into that egress fail (a veth whose peer has
    /// neither GRO nor an XDP program, a device without XDP transmit): `XDP_PASS`, the kernel
    /// forwards it.
    KernelNoRedirect = 9,
    /// Flows confirmed by their backend's answer and moved to the established table under a
    /// key it did not hold. Confirmed − present (established) = established entries the LRU
    /// evicted (the agent's drains aside).
    FlowsConfirmed = 10,
}

impl Fwd {
    pub const COUNT: u32 = 11;
    pub const ALL: [Fwd; Fwd::COUNT as usize] = [
        Fwd::Redirect,
        Fwd::Kernel,
        Fwd::KernelNoNeigh,
        Fwd::KernelFragNeeded,
        Fwd::KernelOther,
        Fwd::FlowsRemoved,
        Fwd::FlowsCreated,
        Fwd::TooBigAnswered,
        Fwd::TooBigDropped,
        Fwd::KernelNoRedirect,
        Fwd::FlowsConfirmed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Fwd::Redirect => "fwd_redirect",
            Fwd::Kernel => "fwd_kernel",
            Fwd::KernelNoNeigh => "fwd_kernel_no_neigh",
            Fwd::KernelFragNeeded => "fwd_kernel_frag_needed",
            Fwd::KernelOther => "fwd_kernel_other",
            Fwd::FlowsRemoved => "flow_entries_removed",
            Fwd::FlowsCreated => "flow_entries_created",
            Fwd::TooBigAnswered => "fwd_too_big_answered",
            Fwd::TooBigDropped => "fwd_too_big_dropped",
            Fwd::KernelNoRedirect => "fwd_kernel_no_redirect",
            Fwd::FlowsConfirmed => "flow_entries_confirmed",
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
    unsafe impl aya::Pod for FlowKey4 {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for ReplyNat {}
    unsafe impl aya::Pod for PreviewReply {}
    unsafe impl aya::Pod for DpConfig {}
    unsafe impl aya::Pod for VipAddr {}
    unsafe impl aya::Pod for RateWindow {}
    unsafe impl aya::Pod for ColorStats {}
    unsafe impl aya::Pod for EgressState {}
    unsafe impl aya::Pod for BackendSignals {}
    unsafe impl aya::Pod for LatencyHist {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytemuck::Zeroable;
    use core::mem::size_of;

    #[test]
    fn map_types_have_the_sizes_the_kernel_sees() {
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<BackendSet>(), 8 + 20 * MAX_BACKENDS);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FlowEntry>(), 72);
        assert_eq!(size_of::<ReplyNat>(), 24);
        assert_eq!(size_of::<BackendSignals>(), 56);
        assert_eq!(size_of::<LatencyHist>(), 8 * LATENCY_BUCKETS);
        assert_eq!(size_of::<PreviewReply>(), 20);
        assert_eq!(size_of::<DpConfig>(), 40);
        assert_eq!(size_of::<VipAddr>(), 20);
    }

    #[test]
    fn latency_buckets_are_log2() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1), 1);
        assert_eq!(latency_bucket(2), 2);
        assert_eq!(latency_bucket(3), 2);
        assert_eq!(latency_bucket(4), 3);
        // 100 ms = 97656 units: in [2^16, 2^17).
        assert_eq!(latency_bucket(97_656), 17);
        assert_eq!(latency_bucket(u32::MAX), 23);
        assert_eq!(latency_bucket(1 << 22), 23);
        assert_eq!(latency_bucket((1 << 22) - 1), 22);
    }

    #[test]
    fn signal_indexes_fit_a_flow_entry() {
        assert_eq!(signal_index(0, 0, 0), 0);
        assert_eq!(signal_index(0, 1, 3), MAX_BACKENDS as u32 + 3);
        assert!(signal_index(MAX_SERVICES - 1, 1, MAX_BACKENDS as u32 - 1) <= u16::MAX as u32);
    }

    #[test]
    fn counters_fit_their_maps() {
        assert!(Reason::COUNT <= STAT_SLOTS && Fwd::COUNT <= STAT_SLOTS);
    }

    #[test]
    fn reasons_are_numbered_by_position() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32, "{} out of place", r.name());
        }
        for (i, f) in Fwd::ALL.iter().enumerate() {
            assert_eq!(*f as u32, i as u32, "{} out of place", f.name());
        }
    }

    #[test]
    fn reply_and_forward_keys_are_inverse() {
        let k = FlowKey {
            src: [1, 0, 0, 0],
            dst: [2, 0, 0, 0],
            sport: 10,
            dport: 80,
            proto: PROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        };
        let reply = k.reply_key([3, 0, 0, 0], 8080);
        assert_eq!((reply.src, reply.dst, reply.sport, reply.dport), ([3, 0, 0, 0], [1, 0, 0, 0], 8080, 10));
        assert_eq!(reply.forward_key(k.dst, k.dport), k);
    }

    #[test]
    fn selector_packs_and_splits() {
        let s = Selector::new(2, 1, 100);
        assert_eq!((s.primary(), s.secondary(), s.canary_permille()), (2, 1, 100));
        assert_eq!(slot_color(2), 0);
        assert_eq!(slot_color(1), 1);
        assert!((0..1000).all(|h| Selector::new(0, 1, 0).slot_for(h, false) == 0));
        assert!((0..1000).all(|h| Selector::new(0, 1, 0).slot_for(h, true) == 1));
        assert!((0..1000).all(|h| Selector::new(0, 1, 1000).slot_for(h, false) == 1));
        let to_secondary = (0..100_000u32).filter(|h| Selector::new(0, 1, 100).slot_for(crate::hash::mix32(*h), false) == 1).count();
        assert!((9_000..11_000).contains(&to_secondary), "10% canary gave {to_secondary} of 100000");
    }

    #[test]
    fn expiry_rules() {
        let cfg = DpConfig { services: 1, new_flows_per_sec: 0, udp_idle_ns: 30, closing_idle_ns: 10, flags: 0, ready: 0, unconfirmed_idle_ns: 5 };
        let mut e = FlowEntry::zeroed();
        e.last_seen_ns = 100;
        assert!(!e.expired(PROTO_UDP, true, 130, &cfg));
        assert!(e.expired(PROTO_UDP, true, 131, &cfg));
        assert!(!e.expired(PROTO_TCP, true, 1_000_000, &cfg), "open confirmed TCP flows never expire by idleness");
        assert!(!e.expired(PROTO_TCP, false, 105, &cfg));
        assert!(e.expired(PROTO_TCP, false, 106, &cfg), "unconfirmed entries expire after their short idle time");
        assert!(e.expired(PROTO_UDP, false, 106, &cfg), "also UDP ones, before the UDP idle time");
        e.flags = FLOW_CLOSING;
        assert!(!e.expired(PROTO_TCP, true, 110, &cfg));
        assert!(e.expired(PROTO_TCP, true, 111, &cfg));
    }
}
