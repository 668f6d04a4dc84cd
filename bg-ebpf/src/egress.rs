//! Which egress interfaces can take `XDP_REDIRECT`. A redirect into a device that cannot
//! transmit XDP frames (a veth whose peer has neither GRO nor an XDP program, a device without
//! `ndo_xdp_xmit`) is dropped by the kernel after the program returned, where no counter of
//! the program sees it. The kernel reports it on the `xdp:xdp_redirect_err` tracepoint; the
//! program there marks the egress in `BG_EGRESS_V1`, and `forward` sends later packets for
//! it through the kernel (`XDP_PASS`). The agent learns the same before any traffic flows, by
//! running `bg_probe` (BPF_PROG_TEST_RUN with live frames) against each of its interfaces.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_redirect,
    programs::{TracePointContext, XdpContext},
};
use aya_log_ebpf::warn;
use bg_common::{EgressState, EGRESS_NO_REDIRECT, PROBE_ETHERTYPE};
use network_types::eth::EthHdr;

use crate::{maps::{BG_EGRESS_V1, BG_PROG_IDS_V1}, parse::ptr_at};

/// Whether redirects into `ifindex` are known to fail.
#[inline(always)]
pub fn no_redirect(ifindex: u32) -> bool {
    match unsafe { BG_EGRESS_V1.get(&ifindex) } {
        Some(e) => e.flags & EGRESS_NO_REDIRECT != 0,
        None => false,
    }
}

/// The probe: a frame of EtherType `PROBE_ETHERTYPE` carrying a target ifindex (4 bytes, host
/// order, right after the Ethernet header) is redirected there; anything else is dropped.
#[inline(always)]
pub fn probe(ctx: &XdpContext) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return xdp_action::XDP_DROP };
    if unsafe { (*eth).ether_type } != PROBE_ETHERTYPE.to_be() {
        return xdp_action::XDP_DROP;
    }
    let Some(target) = ptr_at::<u32>(ctx, EthHdr::LEN) else { return xdp_action::XDP_DROP };
    unsafe { bpf_redirect(target.read_unaligned(), 0) as u32 }
}

// Offsets in the `xdp:xdp_redirect_err` record (tracefs events/xdp/xdp_redirect_err/format).
const TP_PROG_ID: usize = 8;
const TP_ERR: usize = 20;
const TP_TO_IFINDEX: usize = 24;
const BPF_NOEXIST: u64 = 1;

/// On `xdp:xdp_redirect_err`: a redirect by one of this agent's programs failed; mark its
/// target and count the error.
#[inline(always)]
pub fn redirect_err(ctx: &TracePointContext) -> u32 {
    let (Ok(prog_id), Ok(err), Ok(to)) =
        (unsafe { ctx.read_at::<i32>(TP_PROG_ID) }, unsafe { ctx.read_at::<i32>(TP_ERR) }, unsafe { ctx.read_at::<i32>(TP_TO_IFINDEX) })
    else {
        return 0;
    };
    let ours = |i: u32| BG_PROG_IDS_V1.get(i).is_some_and(|id| *id != 0 && *id == prog_id as u32);
    if !ours(0) && !ours(1) {
        return 0;
    }
    let ifindex = to as u32;
    let newly = match BG_EGRESS_V1.get_ptr_mut(&ifindex) {
        Some(e) => unsafe {
            let was = (*e).flags & EGRESS_NO_REDIRECT != 0;
            (*e).flags |= EGRESS_NO_REDIRECT;
            (*e).last_err = err;
            (*e).errors += 1;
            !was
        },
        None => {
            let _ = BG_EGRESS_V1.insert(&ifindex, &EgressState { flags: EGRESS_NO_REDIRECT, last_err: err, errors: 1 }, BPF_NOEXIST);
            true
        }
    };
    // Once per egress turning to the kernel path (a rare event; the agent's log says so).
    if newly {
        warn!(ctx, "XDP_REDIRECT into ifindex {} failed (errno {}): its packets take the kernel path from now on", ifindex, -err);
    }
    0
}
