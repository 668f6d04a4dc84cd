//! nftables through its own library API, libnftables (the library `nft` itself is a thin
//! front end to), loaded at run time from Debian's `libnftables1`: one context, one
//! transaction per call, no process spawned. This is the "API" column for nftables; the
//! "CLI" column runs `nft -f`.
//!
//! libnftables takes commands as text and sends them as one netlink batch, so a
//! `flush map` + `add element` buffer is applied atomically, as `nft -f` applies a file.

use std::ffi::{c_char, c_int, c_void, CStr, CString};

use anyhow::{bail, Context};

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;
type CtxInt = unsafe extern "C" fn(*mut c_void) -> c_int;
type GetBuf = unsafe extern "C" fn(*mut c_void) -> *const c_char;

/// A libnftables context. Its netlink socket belongs to the network namespace of the thread
/// that made it: make it (and use it) on a thread inside the namespace to be changed.
pub struct Nft {
    lib: *mut c_void,
    ctx: *mut c_void,
    free: CtxFree,
    run: RunCmd,
    error: GetBuf,
}

fn sym<T: Copy>(lib: *mut c_void, name: &str) -> anyhow::Result<T> {
    let c = CString::new(name)?;
    // SAFETY: `lib` is a live handle from dlopen; the name is NUL-terminated.
    let p = unsafe { libc::dlsym(lib, c.as_ptr()) };
    if p.is_null() {
        bail!("libnftables.so.1 has no symbol {name}");
    }
    debug_assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: `T` is the function pointer type of that symbol as libnftables(3) declares it.
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

impl Nft {
    pub fn open() -> anyhow::Result<Nft> {
        let name = CString::new("libnftables.so.1")?;
        // SAFETY: dlopen with a NUL-terminated name; the handle is closed on drop.
        let lib = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if lib.is_null() {
            bail!("cannot load libnftables.so.1 (Debian package libnftables1, installed with nftables)");
        }
        let new: CtxNew = sym(lib, "nft_ctx_new")?;
        let buffer_output: CtxInt = sym(lib, "nft_ctx_buffer_output")?;
        let buffer_error: CtxInt = sym(lib, "nft_ctx_buffer_error")?;
        // SAFETY: functions of the loaded library, called as documented (flags 0: default).
        let ctx = unsafe { new(0) };
        if ctx.is_null() {
            bail!("nft_ctx_new failed");
        }
        let nft = Nft { lib, ctx, free: sym(lib, "nft_ctx_free")?, run: sym(lib, "nft_run_cmd_from_buffer")?, error: sym(lib, "nft_ctx_get_error_buffer")? };
        // SAFETY: as above; output and errors go to buffers instead of stdout/stderr.
        unsafe {
            buffer_output(nft.ctx);
            buffer_error(nft.ctx);
        }
        Ok(nft)
    }

    /// Runs `commands` (nft syntax, several lines allowed) as one transaction.
    pub fn run(&self, commands: &str) -> anyhow::Result<()> {
        let c = CString::new(commands).context("nft commands contain NUL")?;
        // SAFETY: a live context and a NUL-terminated buffer.
        let rc = unsafe { (self.run)(self.ctx, c.as_ptr()) };
        if rc != 0 {
            // SAFETY: the error buffer is a NUL-terminated string owned by the context.
            let msg = unsafe { CStr::from_ptr((self.error)(self.ctx)) }.to_string_lossy().into_owned();
            bail!("libnftables: {}", msg.trim());
        }
        Ok(())
    }
}

impl Drop for Nft {
    fn drop(&mut self) {
        // SAFETY: the context and the handle were made in `open` and are not used after this.
        unsafe {
            (self.free)(self.ctx);
            libc::dlclose(self.lib);
        }
    }
}
