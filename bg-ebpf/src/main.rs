//! bg's XDP program: DNAT of client → VIP packets toward the active color's backend, and the
//! reverse rewrite of replies, with per-flow state so a flow keeps the backend it started on.
#![no_std]
#![no_main]

mod decide;
mod maps;
mod parse;
mod rewrite;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use bg_common::Reason;

use crate::maps::BG_STATS_V1;

#[xdp]
pub fn bg_xdp(ctx: XdpContext) -> u32 {
    let reason = match parse::parse(&ctx) {
        Ok(pkt) => decide::process(&pkt),
        Err(reason) => reason,
    };
    count(reason);
    action(reason)
}

/// The final action for a reason. Rewritten packets are passed to the kernel, which routes them
/// (the gateway forwards); everything that is not ours passes untouched.
#[inline(always)]
fn action(reason: Reason) -> u32 {
    match reason {
        Reason::DropNoBackend | Reason::DropFlowTableFull => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn count(reason: Reason) {
    if let Some(c) = BG_STATS_V1.get_ptr_mut(reason as u32) {
        unsafe { *c += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
