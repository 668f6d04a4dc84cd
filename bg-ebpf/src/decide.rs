//! Flow state and backend choice: which backend a client's packet goes to, which VIP a reply
//! comes from. The rules (README "Flow rules", each counted as a `Reason`):
//! - one entry per flow, keyed by the client → VIP 5-tuple, in one of two tables (a pair each, IPv4 and IPv6: `flows`): unconfirmed
//!   (`EMBRYO`: a SYN, a first datagram, a lost flow's packet) until confirmed, then
//!   established (`FLOWS`). TCP is confirmed when the handshake completes (the client
//!   acknowledges the backend's SYN-ACK, whose ISN a blind spoofer cannot know); a lost flow
//!   by a backend reply that is not an RST; UDP by any reply. Only a confirmation inserts into
//!   `FLOWS`, so new and unconfirmed flows (floods included) can never evict an established one;
//! - a TCP SYN without ACK starts a new flow on the active color, unless it retransmits the SYN
//!   that started the entry (same ISN). On an open established entry it does so without
//!   erasing it (the entry is *contested*); the client's next packet decides which is real;
//! - an RST from the client ends a flow only when its sequence number is near what the client
//!   has sent (`RST_WINDOW`): the entry is marked closing, never deleted, so a blind spoofed
//!   RST erases nothing;
//! - other TCP without an entry (`LostFlow`) goes by the same hash to the active color, into the
//!   unconfirmed table, until a reply that is not an RST confirms it;
//! - replies are rewritten by the static backend → VIP map (`REPLIES`), without per-flow
//!   state; only preview flows keep a reverse entry (`PREVIEW_REPLIES`);
//! - expired entries count as absent (unconfirmed: `unconfirmed_idle_ns`; UDP: `udp_idle_ns`;
//!   closing TCP: `closing_idle_ns`).

use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use bg_common::{
    addr_filter_bit, hash::flow_hash, latency_bucket, ring_base, signal_index, BackendKey, BackendSet, BackendSignals, DpConfig,
    FlowEntry, FlowKey, Fwd, PreviewReply, Reason, ServiceInfo, VipAddr, VipKey, FAMILY_V4, FAMILY_V6, FLOW_ANSWERED, FLOW_CLOSING,
    FLOW_CONTESTED, FLOW_FAILED, FLOW_LOST, FLOW_PREVIEW, PEER_RESET, LAST_SEEN_GRANULARITY_NS, LATENCY_SHIFT, MAX_BACKENDS, NO_ANSWER_NS,
    PROTO_TCP, PROTO_UDP, REPLY_HAS_PREVIEW, RING_SIZE, RST_WINDOW, SERVICE_HAS_PREVIEW, SERVICE_PREVIEW, UDP_NO_REPLY_NS,
};

use crate::{
    count_fwd,
    flows::{self, Table::{Established, Unconfirmed}},
    maps::{
        BG_ACTIVE_V1, BG_ADDR_FILTER_V1, BG_BACKEND_SETS_V1, BG_CONFIG_V2, BG_GATE_V1,
        BG_LATENCY_V1, BG_LOCAL_ADDRS_V1, BG_LOCAL_FILTER_V1, BG_PREVIEW_REPLIES_V1, BG_RATE_V2, BG_REPLIES_V2, BG_RINGS_V1,
        BG_SERVICES_V1, BG_SIGNALS_V1,
    },
    parse::{is_vip, End, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    rewrite::rewrite,
};

/// No color: the packet was not rewritten.
pub const NO_COLOR: u8 = 0xff;
/// No backend's signals: the packet was not rewritten toward or from a backend.
pub const NO_SIGNAL: u32 = u32::MAX;

pub struct Verdict {
    pub reason: Reason,
    /// The flow's color for rewritten packets, else `NO_COLOR`.
    pub color: u8,
    /// The flow entry a client's packet followed (its next hop is cached there), or null.
    pub entry: *mut FlowEntry,
    /// The backend's entry in `SIGNALS` (its bytes are counted there), or `NO_SIGNAL`.
    pub signal: u32,
}

impl Verdict {
    #[inline(always)]
    pub fn untouched(reason: Reason) -> Verdict {
        Verdict { reason, color: NO_COLOR, entry: core::ptr::null_mut(), signal: NO_SIGNAL }
    }

    #[inline(always)]
    pub fn rewritten(reason: Reason, color: u8, signal: u32) -> Verdict {
        Verdict { reason, color, entry: core::ptr::null_mut(), signal }
    }
}

/// This CPU's signals of a backend (`SIGNALS[index]`).
#[inline(always)]
pub fn signals(index: u32) -> Option<&'static mut BackendSignals> {
    BG_SIGNALS_V1.get_ptr_mut(index).map(|p| unsafe { &mut *p })
}

/// A clock reading in `LATENCY_SHIFT` units, truncated (differences are taken modulo 2^32:
/// 73 minutes, far longer than any handshake).
#[inline(always)]
fn units(now_ns: u64) -> u32 {
    (now_ns >> LATENCY_SHIFT) as u32
}

/// Whether the flow is one whose handshake is judged: started by a SYN or a first datagram
/// (a lost flow's entry was not), and not answered or refused yet.
#[inline(always)]
fn undecided(e: &FlowEntry) -> bool {
    e.flags & (FLOW_ANSWERED | FLOW_FAILED | FLOW_LOST) == 0
}

/// Whether a client packet at `at_ns` came `NO_ANSWER_NS` (TCP) or `UDP_NO_REPLY_NS` (UDP) or
/// more after the flow started: a client sending again that late without an answer was not
/// answered in time. Judged on fields only the client's side writes (`last_seen_ns` of an
/// unconfirmed entry, `started`): the reply side sets flags, and the two never write the same
/// byte on different CPUs.
#[inline(always)]
fn late(at_ns: u64, e: &FlowEntry, tcp: bool) -> bool {
    let after = if tcp { NO_ANSWER_NS } else { UDP_NO_REPLY_NS };
    units(at_ns).wrapping_sub(e.started) >= (after >> LATENCY_SHIFT) as u32
}

/// The backend answered the flow (a SYN-ACK, a UDP flow's first reply): answered in time
/// unless refused, or the client had already sent again late (counted as unanswered then);
/// TCP handshakes also enter their latency histogram, late ones included.
#[inline(always)]
fn count_answer(e: &FlowEntry, tcp: bool) {
    if e.flags & FLOW_FAILED == 0 && !late(e.last_seen_ns, e, tcp) {
        if let Some(s) = signals(e.signal as u32) {
            s.answered += 1;
        }
    }
    if tcp {
        let latency = units(now_ns()).wrapping_sub(e.started);
        if let Some(h) = BG_LATENCY_V1.get_ptr_mut(e.signal as u32 / MAX_BACKENDS as u32) {
            if let Some(b) = unsafe { (*h).buckets.get_mut(latency_bucket(latency) as usize) } {
                *b += 1;
            }
        }
    }
}

#[inline(always)]
fn filter_hit(filter: &aya_ebpf::maps::Array<u64>, addr: &[u32; 4]) -> bool {
    let bit = addr_filter_bit(addr);
    match filter.get(bit >> 6) {
        Some(w) => *w & (1u64 << (bit & 63)) != 0,
        None => true,
    }
}

/// Whether `addr`'s bit is set in the address filter (VIPs and backends).
#[inline(always)]
pub fn maybe_ours(addr: &[u32; 4]) -> bool {
    filter_hit(&BG_ADDR_FILTER_V1, addr)
}

/// Whether `addr` is one of the gateway's own addresses.
#[inline(always)]
fn is_local(addr: &[u32; 4], family: u8) -> bool {
    filter_hit(&BG_LOCAL_FILTER_V1, addr) && unsafe { BG_LOCAL_ADDRS_V1.get(&VipAddr { addr: *addr, family: family as u32 }) }.is_some()
}

/// Decides and applies the rewrite for a parsed TCP/UDP packet (`key`: its 5-tuple as it
/// arrived).
#[inline(always)]
pub fn process(pkt: &Packet, key: &FlowKey) -> Verdict {
    // Neither to a VIP nor from a backend: cannot be a VIP flow; no hash lookups.
    let (to_vip, from_backend) = (maybe_ours(&key.dst), maybe_ours(&key.src));
    if !to_vip && !from_backend {
        return Verdict::untouched(Reason::PassNotOurs);
    }
    let Some(cfg) = BG_CONFIG_V2.get(0) else {
        return Verdict::untouched(Reason::PassNotOurs);
    };
    if to_vip {
        if let Some(v) = forward(pkt, key, cfg) {
            return v;
        }
    }
    if from_backend {
        return reply(pkt, key, cfg);
    }
    Verdict::untouched(Reason::PassNotOurs)
}

#[inline(always)]
fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// A client → VIP packet. None when it is not addressed to a service (it may be a reply).
#[inline(always)]
fn forward(pkt: &Packet, key: &FlowKey, cfg: &DpConfig) -> Option<Verdict> {
    let tcp = pkt.proto == PROTO_TCP;
    let syn = tcp && pkt.has(TCP_SYN) && !pkt.has(TCP_ACK);
    // Established: one lookup for the packets of a confirmed flow.
    if let Some(e) = flows::get(Established, key) {
        let e = unsafe { &mut *e };
        // Only UDP and closing TCP entries age; an open TCP flow needs no clock read.
        let ages = !tcp || e.flags & FLOW_CLOSING != 0;
        let now = if ages { now_ns() } else { 0 };
        if !(ages && e.expired(pkt.proto, true, now, cfg)) {
            if !syn {
                return Some(established(pkt, key, e, now, cfg));
            }
            if e.isn == pkt.seq {
                // A retransmission of the SYN that started it.
                return Some(follow(pkt, e, now, Reason::ToBackend));
            }
            // A new SYN on a live flow: a new connection (the client lost or closed the old
            // one) or a spoof. It goes to the active color as a new flow below; the old entry
            // stays, contested, until the client's next packet says which one is real.
            e.flags |= FLOW_CONTESTED;
            e.contest_isn = pkt.seq;
        }
    }
    let now = now_ns();
    // Unconfirmed.
    let embryo = flows::get(Unconfirmed, key);
    if let Some(e) = embryo {
        let e = unsafe { &mut *e };
        if !e.expired(pkt.proto, false, now, cfg) && !(syn && e.isn != pkt.seq) {
            if tcp && pkt.has(TCP_RST) {
                // An RST during the handshake ends it when it fits what the client sent.
                let mut v = follow(pkt, e, now, Reason::ToBackend);
                if in_window(pkt.seq, e.seq_next) && flows::remove(Unconfirmed, key) {
                    count_fwd(Fwd::FlowsRemoved, 1);
                    // The element is free now: nothing may be written through it.
                    v.entry = core::ptr::null_mut();
                }
                return Some(v);
            }
            // Its SYN again (the client's retransmission) `NO_ANSWER_NS` or more after the
            // first, before any SYN-ACK; or a UDP client sending again long after its first
            // datagram with no reply yet: the backend did not answer in time. Counted once: at
            // the first such packet (the entry's last packet was not late yet). A duplicate
            // SYN sent at once (or by a spoofer) counts nothing: by then a healthy backend has
            // answered.
            if undecided(e) && (syn || !tcp) && late(now, e, tcp) && !late(e.last_seen_ns, e, tcp) {
                if let Some(s) = signals(e.signal as u32) {
                    s.no_answer += 1;
                }
            }
            track_seq(pkt, e);
            e.last_seen_ns = now;
            let mut v = follow(pkt, e, 0, Reason::ToBackend);
            // The client acknowledges the backend's SYN-ACK: the handshake is complete.
            if tcp && !syn && e.flags & FLOW_ANSWERED != 0 && acks_peer(pkt.ack, e.peer_isn) {
                promote(key, e);
                // The unconfirmed element may be free now: nothing may be written through it.
                v.entry = core::ptr::null_mut();
            }
            return Some(v);
        }
    }

    // No live entry: a new flow, if the packet is for a service.
    let vip = VipKey { addr: key.dst, port: key.dport, proto: key.proto, family: key.family };
    let Some(service) = (unsafe { BG_SERVICES_V1.get(&vip) }) else {
        // To a VIP address but no service of it: a stray, which the kernel would route back out.
        return is_vip(key.dst, key.family).then(|| Verdict::untouched(Reason::DropStray));
    };
    if martian(&key.src, key.family) {
        return Some(Verdict::untouched(Reason::DropMartian));
    }
    if key.family == FAMILY_V6 && pkt.proto == PROTO_UDP && unsafe { pkt.l4_check.read_unaligned() } == 0 {
        return Some(Verdict::untouched(Reason::DropUdp6NoChecksum));
    }
    let reason = if tcp {
        if pkt.has(TCP_RST) {
            return Some(Verdict::untouched(Reason::DropRstNoFlow));
        }
        if syn {
            Reason::NewFlow
        } else {
            Reason::LostFlow
        }
    } else {
        Reason::NewFlow
    };
    if over_rate(cfg, now) {
        return Some(Verdict::untouched(Reason::DropNewFlowRate));
    }
    Some(new_flow(pkt, key, service, cfg, now, reason, embryo.is_some()))
}

/// Whether `seq` is within `RST_WINDOW` of `next` (either side, modulo 2^32).
#[inline(always)]
fn in_window(seq: u32, next: u32) -> bool {
    seq.wrapping_sub(next).wrapping_add(RST_WINDOW) <= 2 * RST_WINDOW
}

/// Raises the entry's `seq_next` to the end of this TCP segment when it is further, but only
/// by up to `RST_WINDOW`: a client's segments follow one another, while a spoofed one far
/// ahead must not move the window a later blind RST is checked against. RSTs move nothing.
#[inline(always)]
fn track_seq(pkt: &Packet, e: &mut FlowEntry) {
    if pkt.proto != PROTO_TCP || pkt.has(TCP_RST) {
        return;
    }
    let end = pkt.seq.wrapping_add(pkt.payload_len).wrapping_add(pkt.has(TCP_FIN) as u32);
    let ahead = end.wrapping_sub(e.seq_next) as i32;
    if ahead > 0 && ahead as u32 <= RST_WINDOW {
        e.seq_next = end;
    }
}

/// A packet of an established flow.
#[inline(always)]
fn established(pkt: &Packet, key: &FlowKey, e: &mut FlowEntry, now: u64, cfg: &DpConfig) -> Verdict {
    if pkt.proto == PROTO_TCP {
        if e.flags & FLOW_CONTESTED != 0 {
            // One packet decides, and only once: a contest is never open to repeated guesses.
            e.flags &= !FLOW_CONTESTED;
            if pkt.seq == e.contest_isn.wrapping_add(1) {
                if let Some(n) = flows::get(Unconfirmed, key) {
                    let n = unsafe { &mut *n };
                    // The contesting SYN's connection goes on. Its handshake's ACK acknowledges
                    // the new backend's SYN-ACK (which a spoofer of the SYN never saw): it is the
                    // real one. After a clean close (the old entry closing) its ACK is enough:
                    // its SYN-ACK may have come back through another gateway.
                    let answered = n.flags & FLOW_ANSWERED != 0 && acks_peer(pkt.ack, n.peer_isn);
                    let live = !n.expired(PROTO_TCP, false, now_ns(), cfg);
                    if live && (answered || e.flags & FLOW_CLOSING != 0) {
                        // Written in place (no LRU slot is taken for a key that has one), copied
                        // element to element (not through the small stack).
                        unsafe { core::ptr::copy_nonoverlapping(n as *const FlowEntry, e as *mut FlowEntry, 1) };
                        e.flags &= !(FLOW_LOST | FLOW_ANSWERED);
                        e.peer_isn = 0;
                        track_seq(pkt, e);
                        if flows::remove(Unconfirmed, key) {
                            count_fwd(Fwd::FlowsRemoved, 1);
                        }
                        return follow(pkt, e, 0, Reason::ToBackend);
                    }
                    // A spoof's guess: its unconfirmed entry goes, and with it the contest.
                    if flows::remove(Unconfirmed, key) {
                        count_fwd(Fwd::FlowsRemoved, 1);
                    }
                }
            }
        }
        track_seq(pkt, e);
        if pkt.has(TCP_RST) {
            if in_window(pkt.seq, e.seq_next) && e.flags & FLOW_CLOSING == 0 {
                e.flags |= FLOW_CLOSING;
                e.last_seen_ns = now_ns();
            }
        } else if pkt.has(TCP_FIN) && e.flags & FLOW_CLOSING == 0 && in_window(pkt.seq, e.seq_next) {
            // A FIN near what the client sent (a blind one far from it would let an idle
            // connection expire).
            e.flags |= FLOW_CLOSING;
            e.last_seen_ns = now_ns();
        }
    }
    follow(pkt, e, now, Reason::ToBackend)
}

/// Rewrites a client's packet toward the entry's backend. `now` is 0 when the entry needs no
/// refresh (open TCP flows, whose `last_seen_ns` is only kept from their FIN on).
#[inline(always)]
fn follow(pkt: &Packet, e: &mut FlowEntry, now: u64, reason: Reason) -> Verdict {
    if now != 0 && now.wrapping_sub(e.last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
        e.last_seen_ns = now;
    }
    let (backend, port) = (e.backend, e.backend_port);
    rewrite(pkt, End::Dst, &backend, port);
    Verdict { reason, color: e.color, entry: e as *mut FlowEntry, signal: e.signal as u32 }
}

/// A backend → client packet: the static map names the VIP. Replies also confirm flows: a
/// SYN-ACK its SYN's flow, a UDP reply its flow, any TCP reply but an RST a lost flow.
#[inline(always)]
fn reply(pkt: &Packet, key: &FlowKey, cfg: &DpConfig) -> Verdict {
    let bkey = BackendKey { addr: key.src, port: key.sport, proto: key.proto, family: key.family };
    let Some(r) = (unsafe { BG_REPLIES_V2.get(&bkey) }) else {
        return Verdict::untouched(Reason::PassNotOurs);
    };
    // Answers to the gateway itself (the agent's health checks) are not NAT replies.
    if is_local(&key.dst, key.family) {
        return Verdict::untouched(Reason::PassNotOurs);
    }
    let (mut vip, mut vip_port, color) = (r.vip, r.vip_port, r.color);
    if r.flags & REPLY_HAS_PREVIEW != 0 {
        if let Some(p) = unsafe { BG_PREVIEW_REPLIES_V1.get(key) } {
            (vip, vip_port) = (p.vip, p.vip_port);
        }
    }
    let fkey = key.forward_key(vip, vip_port);
    if pkt.proto == PROTO_TCP {
        if pkt.has(TCP_SYN) && pkt.has(TCP_ACK) {
            // The backend answers the SYN: noted (with its ISN); the client's ACK of it will
            // confirm the flow. A SYN-ACK alone proves nothing about the client (a spoofed SYN
            // gets one too).
            if let Some(e) = flows::get(Unconfirmed, &fkey) {
                let e = unsafe { &mut *e };
                if pkt.ack == e.isn.wrapping_add(1) && from_its_backend(e, key) {
                    if e.flags & (FLOW_ANSWERED | FLOW_LOST) == 0 {
                        count_answer(e, true);
                    }
                    e.flags |= FLOW_ANSWERED;
                    e.peer_isn = pkt.seq;
                }
            }
        } else if pkt.has(TCP_RST) {
            backend_reset(pkt, &fkey, key);
        } else if lost_flows_waiting() {
            confirm(&fkey, key, cfg, false, |e| e.flags & FLOW_LOST != 0);
        }
    } else {
        // UDP. A confirmed flow: its replies keep it alive too (a server that pushes to a
        // quiet client must not see its flow expire and move). An expired one is over: the
        // reply is the answer to a new flow on the same 5-tuple, if there is one.
        let now = now_ns();
        let live = match flows::get(Established, &fkey) {
            Some(e) => {
                let e = unsafe { &mut *e };
                let live = !e.expired(PROTO_UDP, true, now, cfg);
                if live && from_its_backend(e, key) && now.wrapping_sub(e.last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
                    e.last_seen_ns = now;
                }
                live
            }
            None => false,
        };
        if !live {
            confirm(&fkey, key, cfg, true, |_| true);
        }
    }
    rewrite(pkt, End::Src, &vip, vip_port);
    Verdict::rewritten(Reason::FromBackend, color, r.signal)
}

/// An RST from a backend: a refused handshake when it answers an unanswered flow's SYN
/// (it acknowledges the ISN; counted once: the flow is marked), a reset when it ends a flow
/// the client confirmed that is not closing (counted once per flow, marked in `peer_isn`,
/// which only this side writes on a confirmed entry: the client's side writes its flags).
/// Anything else (an RST to a half-open flow, to no flow of that backend) counts nothing.
#[inline(always)]
fn backend_reset(pkt: &Packet, fkey: &FlowKey, reply: &FlowKey) {
    if let Some(e) = flows::get(Unconfirmed, fkey) {
        let e = unsafe { &mut *e };
        if from_its_backend(e, reply) && undecided(e) && pkt.has(TCP_ACK) && pkt.ack == e.isn.wrapping_add(1) {
            e.flags |= FLOW_FAILED;
            if let Some(s) = signals(e.signal as u32) {
                s.refused += 1;
            }
        }
        return;
    }
    if let Some(e) = flows::get(Established, fkey) {
        let e = unsafe { &mut *e };
        if from_its_backend(e, reply) && e.flags & FLOW_CLOSING == 0 && e.peer_isn != PEER_RESET {
            e.peer_isn = PEER_RESET;
            if let Some(s) = signals(e.signal as u32) {
                s.resets += 1;
            }
        }
    }
}

/// Whether a lost flow started recently enough to still be waiting for its confirmation.
#[inline(always)]
fn lost_flows_waiting() -> bool {
    match BG_GATE_V1.get(0) {
        Some(until) => *until != 0 && unsafe { bpf_ktime_get_coarse_ns() } < *until,
        None => false,
    }
}

const BPF_NOEXIST: u64 = 1;

/// Moves the unconfirmed entry of `fkey` to the established table when `ok` says this reply
/// confirms it. Not over an open established entry of the same key (a contested one): there
/// the client's next packet decides. `answer`: the reply is the flow's first answer (UDP),
/// counted as such.
#[inline(always)]
fn confirm(fkey: &FlowKey, reply: &FlowKey, cfg: &DpConfig, answer: bool, ok: impl Fn(&FlowEntry) -> bool) {
    let Some(e) = flows::get(Unconfirmed, fkey) else { return };
    let e = unsafe { &mut *e };
    if !ok(e) || !from_its_backend(e, reply) {
        return;
    }
    if answer && e.flags & FLOW_LOST == 0 {
        count_answer(e, false);
    }
    if let Some(old) = flows::get(Established, fkey).map(|p| unsafe { &*p }) {
        if old.flags & FLOW_CLOSING == 0 && !old.expired(fkey.proto, true, now_ns(), cfg) {
            return;
        }
    }
    promote(fkey, e);
}

/// Whether a reply (backend → client key) comes from the backend the flow was sent to: a
/// packet forged with another backend's address confirms nothing.
#[inline(always)]
fn from_its_backend(e: &FlowEntry, reply: &FlowKey) -> bool {
    e.backend == reply.src && e.backend_port == reply.sport
}

/// Whether an acknowledgment number acknowledges the backend's SYN-ACK (ISN `peer_isn`): its
/// SYN and at most `RST_WINDOW` bytes after it. A blind guess hits with odds of 1 in 65536.
#[inline(always)]
fn acks_peer(ack: u32, peer_isn: u32) -> bool {
    ack.wrapping_sub(peer_isn.wrapping_add(1)) <= RST_WINDOW
}

/// Moves an unconfirmed entry to the established table.
#[inline(always)]
/// `e` is the unconfirmed element itself (it is about to be removed): it is inserted from where
/// it is, with no copy on the program's small stack.
fn promote(fkey: &FlowKey, e: &mut FlowEntry) {
    e.flags &= !(FLOW_LOST | FLOW_ANSWERED);
    e.peer_isn = 0;
    // One insert (an LRU map takes a slot before it checks the flags): over a closing or
    // expired entry of a previous connection on this 4-tuple, or under a new key.
    let stored = if flows::get(Established, fkey).is_some() {
        flows::insert(Established, fkey, e, 0)
    } else {
        let ok = flows::insert(Established, fkey, e, BPF_NOEXIST);
        if ok {
            count_fwd(Fwd::FlowsConfirmed, 1);
        }
        ok
    };
    if stored && flows::remove(Unconfirmed, fkey) {
        count_fwd(Fwd::FlowsRemoved, 1);
    }
}

/// A source no real client has, to a VIP: IPv4 0/8, 127/8, 224/3 (multicast, reserved,
/// broadcast); IPv6 ::, ::1, ff00::/8, IPv4-mapped; or a VIP address itself.
#[inline(always)]
fn martian(src: &[u32; 4], family: u8) -> bool {
    // Addresses are in network order: the first byte on the wire is the lowest of word 0.
    let first = src[0].to_ne_bytes()[0];
    let bogus = if family == FAMILY_V4 {
        first == 0 || first == 127 || first >= 224
    } else {
        let mapped = src[0] == 0 && src[1] == 0 && src[2] == 0xffffu32.to_be();
        let low_zero = src[0] == 0 && src[1] == 0 && src[2] == 0;
        first == 0xff || mapped || (low_zero && (src[3] == 0 || src[3] == 1u32.to_be()))
    };
    // A VIP's bit is in the address filter: only then the exact lookup.
    bogus || (maybe_ours(src) && is_vip(*src, family))
}

/// The new-flow rate bound: true when this second's budget, shared by every CPU, is spent.
/// `RateWindow` holds the second (of the monotonic clock) being counted and the flows counted
/// in it. The first CPU to see a new second resets the count with plain stores; the count is
/// raised with an atomic add (BPF_ATOMIC without fetch: the fetching forms do not work on this
/// toolchain). So the bound holds to within a few flows: CPUs that check at the same moment
/// can each pass the last slot, and a reset racing an add can lose that add.
#[inline(always)]
fn over_rate(cfg: &DpConfig, now: u64) -> bool {
    if cfg.new_flows_per_sec == 0 {
        return false;
    }
    let Some(w) = BG_RATE_V2.get_ptr_mut(0) else { return false };
    let second = now / 1_000_000_000;
    // SAFETY: the map value lives as long as the map; aligned 8-byte loads and stores are
    // single instructions, so no CPU sees half of one.
    unsafe {
        let (window, count) = (&raw mut (*w).start_ns, &raw mut (*w).count);
        if window.read_volatile() != second {
            window.write_volatile(second);
            count.write_volatile(0);
        }
        if count.read_volatile() >= cfg.new_flows_per_sec as u64 {
            return true;
        }
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(count, 1);
    }
    false
}

/// Picks a backend of the active color by Maglev, records an unconfirmed entry, rewrites.
#[inline(always)]
fn new_flow(pkt: &Packet, key: &FlowKey, service: &ServiceInfo, cfg: &DpConfig, now: u64, reason: Reason, embryo_present: bool) -> Verdict {
    let Some(selector) = BG_ACTIVE_V1.get(0) else {
        return Verdict::untouched(Reason::DropNoBackend);
    };
    let hash = flow_hash(key);
    let preview = service.flags & SERVICE_PREVIEW != 0;
    let slot = selector.slot_for(hash, preview);
    let Some(set) = BG_BACKEND_SETS_V1.get(BackendSet::index(slot, service.index)) else {
        return Verdict::untouched(Reason::DropNoBackend);
    };
    let ring_index = ring_base(slot, cfg.services, service.index) + hash % RING_SIZE;
    let Some(&b) = BG_RINGS_V1.get(ring_index) else {
        return Verdict::untouched(Reason::DropNoBackend);
    };
    if b >= set.count || b as usize >= MAX_BACKENDS {
        return Verdict::untouched(Reason::DropNoBackend);
    }
    let backend = &set.backends[b as usize];
    let color = set.color as u8;
    let lost = reason == Reason::LostFlow;
    let syn = pkt.has(TCP_SYN);
    let signal = signal_index(service.index, set.color, b);
    let mut entry = FlowEntry {
        last_seen_ns: now,
        flags: if lost { FLOW_LOST } else { 0 } | if preview { FLOW_PREVIEW } else { 0 },
        isn: if syn { pkt.seq } else { 0 },
        seq_next: pkt.seq.wrapping_add(syn as u32),
        signal: signal as u16,
        started: units(now),
        ..FlowEntry::to(backend.addr, backend.port, color)
    };
    track_seq(pkt, &mut entry);
    if preview {
        // The backend also serves the main VIP: this flow's replies need their own mapping.
        let r = PreviewReply { vip: key.dst, vip_port: key.dport, _pad: 0 };
        if BG_PREVIEW_REPLIES_V1.insert(&key.reply_key(backend.addr, backend.port), &r, 0).is_err() {
            return Verdict::untouched(Reason::DropFlowTableFull);
        }
    } else if service.flags & SERVICE_HAS_PREVIEW != 0 {
        // A reply 5-tuple belongs to one connection at a time: an earlier preview flow's
        // mapping (its client port reused now) must not claim this flow's replies.
        let _ = BG_PREVIEW_REPLIES_V1.remove(&key.reply_key(backend.addr, backend.port));
    }
    // One insert (an LRU map takes a slot before it checks the flags): over an expired or
    // replaced entry under the same key, or under a new one.
    if embryo_present {
        if !flows::insert(Unconfirmed, key, &entry, 0) {
            return Verdict::untouched(Reason::DropFlowTableFull);
        }
    } else if flows::insert(Unconfirmed, key, &entry, BPF_NOEXIST) {
        count_fwd(Fwd::FlowsCreated, 1);
    } else {
        return Verdict::untouched(Reason::DropFlowTableFull);
    }
    if lost {
        if let Some(g) = BG_GATE_V1.get_ptr_mut(0) {
            unsafe { *g = now + cfg.unconfirmed_idle_ns };
        }
    }
    rewrite(pkt, End::Dst, &backend.addr, backend.port);
    crate::count_new_flow(color);
    Verdict::rewritten(reason, color, signal)
}
