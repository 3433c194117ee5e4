//! Noticing when this host's interfaces, addresses or routes change: an rtnetlink socket
//! subscribed to the link, address and route groups, as `ip monitor` is. The messages are not
//! parsed: each burst only says "look again", and the controller compares what it reads with
//! what it enforces (a missed or overflowed burst is then no loss: the next look sees it all).

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use tokio::io::unix::AsyncFd;

/// `RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR |
/// RTMGRP_IPV6_ROUTE`.
const GROUPS: u32 = 0x1 | 0x10 | 0x40 | 0x100 | 0x400;

/// A subscription to this network namespace's link, address and route changes.
pub struct HostEvents {
    socket: AsyncFd<OwnedFd>,
}

impl HostEvents {
    /// Subscribes; must be called inside a tokio runtime.
    pub fn subscribe() -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the descriptor is owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_nl is valid; the fields that matter are set below.
        let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        address.nl_family = libc::AF_NETLINK as u16;
        address.nl_groups = GROUPS;
        // SAFETY: `address` is a sockaddr_nl of the size given.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const address).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if bound < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the socket is owned by the AsyncFd and neither closed nor replaced while
        // registered.
        let socket = unsafe { AsyncFd::register(fd) }.map_err(|error| error.into_parts().1)?;
        Ok(Self { socket })
    }

    /// Waits for a change, then drains every message already queued: one wake-up per burst.
    pub async fn changed(&self) -> io::Result<()> {
        loop {
            let mut guard = self.socket.readable().await?;
            let mut received = false;
            loop {
                match drain_one(guard.get_inner().as_raw_fd()) {
                    Ok(()) => received = true,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                    // The kernel dropped messages for us: something changed, look again.
                    Err(error) if error.raw_os_error() == Some(libc::ENOBUFS) => received = true,
                    Err(error) => return Err(error),
                }
            }
            guard.clear_ready();
            if received {
                return Ok(());
            }
        }
    }
}

fn drain_one(fd: i32) -> io::Result<()> {
    let mut buffer = [0u8; 16384];
    // SAFETY: `buffer` is writable for its whole length.
    let read = unsafe { libc::recv(fd, buffer.as_mut_ptr().cast(), buffer.len(), 0) };
    if read < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
