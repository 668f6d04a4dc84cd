//! Frames put on the wire by hand, for floods and spoofed packets: an `AF_PACKET` socket on an
//! interface of a test namespace, sending frames built by `packet` with that link's real
//! Ethernet addresses.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context};

use crate::netns::{InNetns, Netns};

/// An interface's MAC address, read in its namespace.
pub fn mac(ns: &Netns, iface: &str) -> anyhow::Result<[u8; 6]> {
    let out = ns.exec(&["cat", &format!("/sys/class/net/{iface}/address")])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let bytes: Vec<u8> = text.trim().split(':').map(|h| u8::from_str_radix(h, 16)).collect::<Result<_, _>>().context("parsing a MAC")?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("`{}` is not a MAC address", text.trim()))
}

/// A raw socket that sends whole Ethernet frames out of one interface.
pub struct Wire {
    fd: OwnedFd,
    ifindex: i32,
    /// Destination and source MAC written over every frame's first 12 bytes.
    macs: [u8; 12],
}

impl Wire {
    /// Opens the socket inside `ns` on `iface`, toward `peer_mac`.
    pub fn open(ns: &Netns, iface: &str, peer_mac: [u8; 6]) -> anyhow::Result<Wire> {
        let own = mac(ns, iface)?;
        let _inside = InNetns::enter(ns)?;
        let name = std::ffi::CString::new(iface)?;
        // SAFETY: plain syscalls with valid arguments; the fd is owned below.
        let (fd, ifindex) = unsafe {
            let ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            if ifindex == 0 {
                bail!("no interface {iface} in {}", ns.name);
            }
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            if fd < 0 {
                bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
            }
            (OwnedFd::from_raw_fd(fd), ifindex)
        };
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&peer_mac);
        macs[6..].copy_from_slice(&own);
        Ok(Wire { fd, ifindex, macs })
    }

    /// Sends one frame (its Ethernet addresses replaced by the link's).
    pub fn send(&self, frame: &[u8]) -> anyhow::Result<()> {
        let mut f = frame.to_vec();
        f[..12].copy_from_slice(&self.macs);
        // SAFETY: a zeroed sockaddr_ll with the fields sendto needs; the buffer outlives the call.
        let rc = unsafe {
            let mut sa: libc::sockaddr_ll = std::mem::zeroed();
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_ifindex = self.ifindex;
            sa.sll_halen = 6;
            sa.sll_addr[..6].copy_from_slice(&self.macs[..6]);
            libc::sendto(
                self.fd.as_raw_fd(),
                f.as_ptr() as *const libc::c_void,
                f.len(),
                0,
                &sa as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            // A full device queue under a flood: the frame is lost, as on a real wire.
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                return Ok(());
            }
            bail!("sending a frame: {e}");
        }
        Ok(())
    }
}
