//! The flow tables, one pair per family: established (`FLOWS`) and unconfirmed (`EMBRYO`).
//! IPv4 flows are keyed by the 16-byte `FlowKey4` (the kernel hashes it in one round instead of
//! four and compares 16 bytes, and its elements are smaller), IPv6 flows by the full `FlowKey`.
//! The program handles every flow by its `FlowKey`; these functions pick the table.

use bg_common::{FlowEntry, FlowKey, FAMILY_V4};

use crate::maps::{BG_EMBRYO4_V1, BG_EMBRYO6_V1, BG_FLOWS4_V1, BG_FLOWS6_V1};

/// Which of a family's two tables.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Established,
    Unconfirmed,
}

/// The entry of `key` in table `t`, or None.
#[inline(always)]
pub fn get(t: Table, key: &FlowKey) -> Option<*mut FlowEntry> {
    if key.family == FAMILY_V4 {
        let k = key.v4();
        match t {
            Table::Established => BG_FLOWS4_V1.get_ptr_mut(&k),
            Table::Unconfirmed => BG_EMBRYO4_V1.get_ptr_mut(&k),
        }
    } else {
        match t {
            Table::Established => BG_FLOWS6_V1.get_ptr_mut(key),
            Table::Unconfirmed => BG_EMBRYO6_V1.get_ptr_mut(key),
        }
    }
}

/// Inserts or replaces (`flags`: 0, or BPF_NOEXIST); true when stored.
#[inline(always)]
pub fn insert(t: Table, key: &FlowKey, e: &FlowEntry, flags: u64) -> bool {
    if key.family == FAMILY_V4 {
        let k = key.v4();
        match t {
            Table::Established => BG_FLOWS4_V1.insert(&k, e, flags).is_ok(),
            Table::Unconfirmed => BG_EMBRYO4_V1.insert(&k, e, flags).is_ok(),
        }
    } else {
        match t {
            Table::Established => BG_FLOWS6_V1.insert(key, e, flags).is_ok(),
            Table::Unconfirmed => BG_EMBRYO6_V1.insert(key, e, flags).is_ok(),
        }
    }
}

/// Removes the entry; true when there was one.
#[inline(always)]
pub fn remove(t: Table, key: &FlowKey) -> bool {
    if key.family == FAMILY_V4 {
        let k = key.v4();
        match t {
            Table::Established => BG_FLOWS4_V1.remove(&k).is_ok(),
            Table::Unconfirmed => BG_EMBRYO4_V1.remove(&k).is_ok(),
        }
    } else {
        match t {
            Table::Established => BG_FLOWS6_V1.remove(key).is_ok(),
            Table::Unconfirmed => BG_EMBRYO6_V1.remove(key).is_ok(),
        }
    }
}
