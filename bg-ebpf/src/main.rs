//! bg's XDP program: DNAT of client → VIP packets toward the active color's backend, and the
//! reverse rewrite of replies, with per-flow state so a flow keeps the backend it started on.
//!
//! Entry point and counters only; see `parse` (headers), `decide` (flow table, backend
//! choice), `icmp` (errors about VIP flows), `rewrite` (addresses, ports, checksums),
//! `forward` (FIB lookup, redirect).
#![no_std]
#![no_main]
// Atomic read-modify-write on map values (the shared rate window).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod decide;
mod egress;
mod flows;
mod forward;
mod icmp;
mod maps;
mod parse;
mod pmtu;
mod rewrite;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{tracepoint, xdp},
    programs::{TracePointContext, XdpContext},
};
use aya_log_ebpf::warn;
use bg_common::{Fwd, Reason};

use crate::{
    forward::{Out, Undo},
    maps::{BG_COLOR_STATS_V1, BG_CONFIG_V2, BG_FWD_STATS_V2, BG_STATS_V2},
    parse::{End, Parsed},
};

#[xdp]
pub fn bg_xdp(ctx: XdpContext) -> u32 {
    // The log line (rare) is written here, in a frame of its own beside `run`'s: aya-log's
    // call would otherwise add its frame to `run`'s, the deepest, past the 512-byte stack.
    let r = run(&ctx);
    if r >> 32 != 0 {
        log_drop(&ctx, (r >> 32) as u32 - 1);
    }
    r as u32
}

/// The log line about a drop (`finish`), in a frame of its own.
#[inline(never)]
fn log_drop(ctx: &XdpContext, reason: u32) {
    if let Some(reason) = Reason::from_u32(reason) {
        warn!(ctx, "dropped a packet to a VIP: {} (at most one such line a second per CPU; bgctl stats counts them all)", reason.name());
    }
}

/// The program proper: the XDP action in the low 32 bits; above them, `reason + 1` when a
/// line about that drop reason is to be logged (`log_allowed`), else 0.
#[inline(never)]
fn run(ctx: &XdpContext) -> u64 {
    // `--features variant` (tests only): one more map lookup, whose result is unused, makes a
    // program with a different tag and the same behaviour.
    #[cfg(feature = "variant")]
    let _ = BG_CONFIG_V2.get(0);
    let (verdict, out) = match parse::parse(&ctx) {
        Err(reason) => return finish(reason),
        Ok(Parsed::Flow(pkt)) => {
            let key = pkt.key();
            let verdict = decide::process(&pkt, &key);
            // What the rewrite replaced, so a packet too big for its next hop can be quoted
            // back to its sender as sent: replies had their source rewritten, the rest their
            // destination.
            let undo = if verdict.reason == Reason::FromBackend {
                Undo { end: End::Src, addr: key.src, port: key.sport }
            } else {
                Undo { end: End::Dst, addr: key.dst, port: key.dport }
            };
            let entry = verdict.entry;
            let out = Out { eth: pkt.eth, l3: pkt.l3, family: pkt.family, proto: pkt.proto, ports: unsafe { *pkt.ports }, flow: Some((pkt, undo)), entry };
            (verdict, out)
        }
        Ok(Parsed::Icmp(e)) => {
            let proto = if e.family == bg_common::FAMILY_V4 { bg_common::PROTO_ICMP } else { bg_common::PROTO_ICMPV6 };
            (icmp::process(&e), Out { eth: e.eth, l3: e.l3, family: e.family, proto, ports: [0, 0], flow: None, entry: core::ptr::null_mut() })
        }
    };
    if verdict.color == decide::NO_COLOR {
        return finish(verdict.reason);
    }
    count(verdict.reason);
    let len = (ctx.data_end() - ctx.data()) as u64;
    if let Some(c) = BG_COLOR_STATS_V1.get_ptr_mut(verdict.color as u32 & 1) {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
    if verdict.signal != decide::NO_SIGNAL {
        if let Some(s) = decide::signals(verdict.signal) {
            if verdict.reason == Reason::FromBackend {
                s.bytes_from += len;
            } else {
                s.bytes_to += len;
                if verdict.reason == Reason::NewFlow {
                    s.new_flows += 1;
                }
            }
        }
    }
    let Some(cfg) = BG_CONFIG_V2.get(0) else {
        return xdp_action::XDP_PASS as u64;
    };
    let (action, fwd) = forward::forward(&ctx, &out, cfg);
    count_fwd(fwd, 1);
    action as u64
}

/// The benchmark floor: returns XDP_PASS and nothing else (`cargo xtask bench` reports bg's
/// costs as this plus X). Never attached.
#[xdp]
pub fn bg_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The agent's redirect probe (see `egress`). Never attached; run with BPF_PROG_TEST_RUN.
#[xdp]
pub fn bg_probe(ctx: XdpContext) -> u32 {
    egress::probe(&ctx)
}

/// On `xdp:xdp_redirect_err`: marks egress interfaces whose redirects fail (see `egress`).
#[tracepoint]
pub fn bg_redirect_err(ctx: TracePointContext) -> u32 {
    egress::redirect_err(&ctx)
}

/// Counts the reason of a packet that was not rewritten and returns its action (as `run`
/// does): drop for the drop reasons (only ever for packets addressed to a VIP), pass untouched
/// for the rest.
#[inline(always)]
fn finish(reason: Reason) -> u64 {
    count(reason);
    if reason.is_drop() {
        let log = (reason == Reason::DropStray || reason == Reason::DropFlowTableFull) && log_allowed(reason);
        xdp_action::XDP_DROP as u64 | if log { (reason as u64 + 1) << 32 } else { 0 }
    } else {
        xdp_action::XDP_PASS as u64
    }
}

/// Rare events reach the agent's log through aya-log, at most one line a second per CPU and
/// reason: a flood of strays costs one clock read each, not a log record each.
#[inline(always)]
fn log_allowed(reason: Reason) -> bool {
    let Some(last) = maps::BG_LOG_RATE_V1.get_ptr_mut(reason as u32) else { return false };
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() };
    unsafe {
        if now.wrapping_sub(*last) < 1_000_000_000 && *last != 0 {
            return false;
        }
        *last = now;
    }
    true
}

#[inline(always)]
fn count(reason: Reason) {
    if let Some(c) = BG_STATS_V2.get_ptr_mut(reason as u32) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub(crate) fn count_fwd(fwd: Fwd, n: u64) {
    if let Some(c) = BG_FWD_STATS_V2.get_ptr_mut(fwd as u32) {
        unsafe { *c += n };
    }
}

#[inline(always)]
pub(crate) fn count_new_flow(color: u8) {
    if let Some(c) = BG_COLOR_STATS_V1.get_ptr_mut(color as u32 & 1) {
        unsafe { (*c).new_flows += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
