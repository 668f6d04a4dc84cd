//! Pins a BPF map of a chosen layout, straight through the bpf(2) syscall: how the tests
//! plant a "foreign" pinned map (wrong type, key or value size) where bg expects its own.

use std::{ffi::CString, os::fd::FromRawFd, path::Path};

use anyhow::{bail, Context};

pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a zero-padded bpf_attr of the size passed; the kernel reads only it.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// Creates a map (`map_type`, sizes in bytes) and pins it at `path`.
pub fn pin_map(path: &Path, map_type: u32, key_size: u32, value_size: u32, max_entries: u32) -> anyhow::Result<()> {
    let mut attr = [0u8; 128];
    for (i, v) in [map_type, key_size, value_size, max_entries].into_iter().enumerate() {
        attr[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    let fd = bpf(BPF_MAP_CREATE, &mut attr).context("BPF_MAP_CREATE")? as i32;
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(std::os::fd::AsRawFd::as_raw_fd(&fd) as u32).to_ne_bytes());
    if let Err(e) = bpf(BPF_OBJ_PIN, &mut attr) {
        bail!("pinning a map at {}: {e}", path.display());
    }
    Ok(())
}
