//! TC filters through rtnetlink: how the TC programs are attached on kernels without TCX
//! (before 6.6).
//!
//! A `cls_bpf` filter in direct-action mode on the interface's `clsact` qdisc, at a fixed
//! priority and handle, so that a later controller finds it again. Such a filter is kernel
//! state of the qdisc, not of a file descriptor: it stays when the controller exits or dies
//! (fail closed, like a pinned link), and a new controller replaces its program in one
//! `RTM_NEWTFILTER` (the kernel swaps the program under RCU: no packet goes unjudged). The
//! `clsact` qdisc is created when missing and removed with the last filter on it.
//!
//! Only the few messages this needs, on a plain `NETLINK_ROUTE` socket; errors carry the
//! kernel's extended-ack message where it gives one.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

/// Priority of enforcer's filters: 1, the first to run, so no other filter can accept a packet
/// before the policy has judged it.
pub const PRIORITY: u16 = 1;
/// Handle of enforcer's filters within their priority.
pub const HANDLE: u32 = 0x0e4f;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    /// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / TC_H_MIN_EGRESS)`.
    fn parent(self) -> u32 {
        match self {
            Self::Ingress => 0xffff_fff2,
            Self::Egress => 0xffff_fff3,
        }
    }
}

/// A `cls_bpf` filter found on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    pub handle: u32,
    /// The program it runs (0 if the kernel did not say).
    pub program_id: u32,
    pub name: String,
}

impl Filter {
    /// Whether this is the filter enforcer attaches.
    pub fn is_enforcers(&self) -> bool {
        self.priority == PRIORITY && self.handle == HANDLE
    }
}

const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const RTM_NEWTFILTER: u16 = 44;
const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
const TCA_BPF_ID: u16 = 11;
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
/// `TC_H_CLSACT`, the clsact qdisc's parent, and its handle `TC_H_MAKE(TC_H_CLSACT, 0)`.
const CLSACT_PARENT: u32 = 0xffff_fff1;
const CLSACT_HANDLE: u32 = 0xffff_0000;
/// `htons(ETH_P_ALL)`: the filter sees every protocol.
const ETH_P_ALL_BE: u32 = 0x0300;
const NLMSG_HEADER_LEN: usize = 16;
const TCMSG_LEN: usize = 20;

/// Creates the `clsact` qdisc on `ifindex` unless it has one.
pub fn add_clsact(ifindex: u32) -> io::Result<()> {
    let mut message = Message::new(
        RTM_NEWQDISC,
        NLM_F_CREATE | NLM_F_EXCL,
        ifindex,
        CLSACT_HANDLE,
        CLSACT_PARENT,
        0,
    );
    message.attr(TCA_KIND, b"clsact\0");
    match Socket::open()?.request(&message) {
        Err(error) if errno(&error) == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// Removes the `clsact` qdisc of `ifindex` if no filter is left on it (someone else's filters
/// keep it, and theirs stay untouched).
pub fn remove_clsact_if_unused(ifindex: u32) -> io::Result<()> {
    for direction in [Direction::Ingress, Direction::Egress] {
        if !filters(ifindex, direction)?.is_empty() {
            return Ok(());
        }
    }
    let mut message = Message::new(RTM_DELQDISC, 0, ifindex, CLSACT_HANDLE, CLSACT_PARENT, 0);
    message.attr(TCA_KIND, b"clsact\0");
    match Socket::open()?.request(&message) {
        Err(error) if matches!(errno(&error), Some(libc::ENOENT | libc::EINVAL)) => Ok(()),
        other => other,
    }
}

/// Makes enforcer's filter on `ifindex` run `program` (named `name`): created, or its program
/// replaced atomically if it exists.
pub fn set_filter(
    ifindex: u32,
    direction: Direction,
    program: BorrowedFd<'_>,
    name: &str,
) -> io::Result<()> {
    let mut message = Message::new(
        RTM_NEWTFILTER,
        NLM_F_CREATE,
        ifindex,
        HANDLE,
        direction.parent(),
        filter_info(),
    );
    message.attr(TCA_KIND, b"bpf\0");
    let options = message.begin_nested(TCA_OPTIONS);
    message.attr(TCA_BPF_FD, &(program.as_raw_fd() as u32).to_ne_bytes());
    let mut name = name.as_bytes().to_vec();
    name.push(0);
    message.attr(TCA_BPF_NAME, &name);
    message.attr(TCA_BPF_FLAGS, &TCA_BPF_FLAG_ACT_DIRECT.to_ne_bytes());
    message.end_nested(options);
    Socket::open()?.request(&message)
}

/// Removes enforcer's filter from `ifindex` (nothing to do if it is not there).
pub fn remove_filter(ifindex: u32, direction: Direction) -> io::Result<()> {
    let mut message = Message::new(
        RTM_DELTFILTER,
        0,
        ifindex,
        HANDLE,
        direction.parent(),
        filter_info(),
    );
    message.attr(TCA_KIND, b"bpf\0");
    match Socket::open()?.request(&message) {
        Err(error)
            if matches!(
                errno(&error),
                Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Every `cls_bpf` filter on `ifindex` in `direction` (none if it has no `clsact` qdisc).
pub fn filters(ifindex: u32, direction: Direction) -> io::Result<Vec<Filter>> {
    let message = Message::new(
        RTM_GETTFILTER,
        NLM_F_DUMP,
        ifindex,
        0,
        direction.parent(),
        0,
    );
    let replies = match Socket::open()?.dump(&message) {
        Err(error) if matches!(errno(&error), Some(libc::EINVAL | libc::ENOENT)) => {
            return Ok(Vec::new());
        }
        other => other?,
    };
    Ok(replies
        .iter()
        .filter_map(|reply| parse_filter(reply))
        .collect())
}

/// The program enforcer's filter on `ifindex` runs, if the filter is there.
pub fn enforcer_filter(ifindex: u32, direction: Direction) -> io::Result<Option<Filter>> {
    Ok(filters(ifindex, direction)?
        .into_iter()
        .find(Filter::is_enforcers))
}

fn filter_info() -> u32 {
    (u32::from(PRIORITY) << 16) | ETH_P_ALL_BE
}

/// A filter from an `RTM_NEWTFILTER` reply (the payload after the netlink header); the dump's
/// per-priority head entries (handle 0) are not filters.
fn parse_filter(payload: &[u8]) -> Option<Filter> {
    let handle = u32::from_ne_bytes(payload.get(8..12)?.try_into().ok()?);
    let info = u32::from_ne_bytes(payload.get(16..20)?.try_into().ok()?);
    if handle == 0 {
        return None;
    }
    let mut filter = Filter {
        priority: (info >> 16) as u16,
        handle,
        program_id: 0,
        name: String::new(),
    };
    let mut kind_is_bpf = false;
    for (kind, value) in attributes(payload.get(TCMSG_LEN..)?) {
        match kind {
            TCA_KIND => kind_is_bpf = value.starts_with(b"bpf\0"),
            TCA_OPTIONS => {
                for (kind, value) in attributes(value) {
                    match kind {
                        TCA_BPF_ID => {
                            filter.program_id = u32::from_ne_bytes(value.get(..4)?.try_into().ok()?)
                        }
                        TCA_BPF_NAME => {
                            filter.name = String::from_utf8_lossy(value)
                                .trim_end_matches('\0')
                                .to_owned()
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    kind_is_bpf.then_some(filter)
}

/// The (type, value) attributes packed in `bytes`.
fn attributes(mut bytes: &[u8]) -> Vec<(u16, &[u8])> {
    let mut found = Vec::new();
    while bytes.len() >= 4 {
        let len = u16::from_ne_bytes([bytes[0], bytes[1]]) as usize;
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & 0x3fff;
        if len < 4 || len > bytes.len() {
            break;
        }
        found.push((kind, &bytes[4..len]));
        bytes = &bytes[align4(len).min(bytes.len())..];
    }
    found
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// One request: a netlink header, a `tcmsg`, attributes.
struct Message {
    bytes: Vec<u8>,
}

impl Message {
    fn new(kind: u16, flags: u16, ifindex: u32, handle: u32, parent: u32, info: u32) -> Self {
        let mut bytes = Vec::with_capacity(128);
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        bytes.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        bytes.extend_from_slice(&[0, 0, 0, 0]); // family AF_UNSPEC, padding
        bytes.extend_from_slice(&ifindex.to_ne_bytes());
        bytes.extend_from_slice(&handle.to_ne_bytes());
        bytes.extend_from_slice(&parent.to_ne_bytes());
        bytes.extend_from_slice(&info.to_ne_bytes());
        Self { bytes }
    }

    fn attr(&mut self, kind: u16, value: &[u8]) {
        self.bytes
            .extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(value);
        self.bytes.resize(align4(self.bytes.len()), 0);
    }

    /// Starts a nested attribute; returns where its header is.
    fn begin_nested(&mut self, kind: u16) -> usize {
        let at = self.bytes.len();
        self.attr(kind, &[]);
        at
    }

    fn end_nested(&mut self, at: usize) {
        let len = (self.bytes.len() - at) as u16;
        self.bytes[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(&self) -> Vec<u8> {
        let mut bytes = self.bytes.clone();
        let len = bytes.len() as u32;
        bytes[..4].copy_from_slice(&len.to_ne_bytes());
        bytes
    }
}

struct Socket {
    fd: OwnedFd,
}

impl Socket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the descriptor is owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        for option in [libc::NETLINK_EXT_ACK, libc::NETLINK_CAP_ACK] {
            let on: libc::c_int = 1;
            // SAFETY: setsockopt with a valid int; failure only loses the error text.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_NETLINK,
                    option,
                    &on as *const libc::c_int as *const libc::c_void,
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
        Ok(Self { fd })
    }

    fn send(&self, message: &Message) -> io::Result<()> {
        let bytes = message.finish();
        // SAFETY: a zeroed sockaddr_nl addressed to the kernel (port 0).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `bytes` and `kernel` are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr() as *const libc::c_void,
                bytes.len(),
                0,
                &kernel as *const libc::sockaddr_nl as *const libc::sockaddr,
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The netlink messages of the next datagram: (type, flags, payload).
    fn receive(&self) -> io::Result<Vec<(u16, u16, Vec<u8>)>> {
        let mut buffer = vec![0u8; 32 * 1024];
        // SAFETY: `buffer` is valid for writes of its length.
        let received = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buffer.as_mut_ptr() as *mut libc::c_void,
                buffer.len(),
                0,
            )
        };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buffer[..received as usize];
        let mut messages = Vec::new();
        while rest.len() >= NLMSG_HEADER_LEN {
            let len = u32::from_ne_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            if len < NLMSG_HEADER_LEN || len > rest.len() {
                break;
            }
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            let flags = u16::from_ne_bytes([rest[6], rest[7]]);
            messages.push((kind, flags, rest[NLMSG_HEADER_LEN..len].to_vec()));
            rest = &rest[align4(len).min(rest.len())..];
        }
        Ok(messages)
    }

    /// Sends `message` and waits for the kernel's acknowledgement.
    fn request(&self, message: &Message) -> io::Result<()> {
        self.send(message)?;
        loop {
            for (kind, flags, payload) in self.receive()? {
                if kind == NLMSG_ERROR {
                    return acknowledgement(flags, &payload);
                }
            }
        }
    }

    /// Sends a dump request; returns the payload of every reply.
    fn dump(&self, message: &Message) -> io::Result<Vec<Vec<u8>>> {
        self.send(message)?;
        let mut replies = Vec::new();
        loop {
            for (kind, flags, payload) in self.receive()? {
                match kind {
                    NLMSG_DONE => return Ok(replies),
                    NLMSG_ERROR => {
                        acknowledgement(flags, &payload)?;
                        return Ok(replies);
                    }
                    _ => replies.push(payload),
                }
            }
        }
    }
}

/// The result an `NLMSG_ERROR` message carries, with the kernel's message if it gave one.
fn acknowledgement(flags: u16, payload: &[u8]) -> io::Result<()> {
    let errno = payload.get(..4).map_or(0, |bytes| {
        i32::from_ne_bytes(bytes.try_into().expect("4 bytes"))
    });
    if errno == 0 {
        return Ok(());
    }
    let error = io::Error::from_raw_os_error(-errno);
    // With NETLINK_CAP_ACK the echoed request is only its header: the attributes follow it.
    let text = (flags & NLM_F_ACK_TLVS != 0)
        .then(|| payload.get(4 + NLMSG_HEADER_LEN..))
        .flatten()
        .and_then(|tlvs| {
            attributes(tlvs)
                .into_iter()
                .find(|(kind, _)| *kind == NLMSGERR_ATTR_MSG)
                .map(|(_, text)| {
                    String::from_utf8_lossy(text)
                        .trim_end_matches('\0')
                        .to_owned()
                })
        });
    Err(match text {
        // The errno stays readable (through `errno`), which callers match on; the kernel's text
        // is what the operator reads.
        Some(text) => io::Error::new(
            error.kind(),
            Refusal {
                errno: -errno,
                text,
            },
        ),
        None => error,
    })
}

/// The kernel's refusal of a request, with its extended-ack text.
#[derive(Debug)]
struct Refusal {
    errno: i32,
    text: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let error = io::Error::from_raw_os_error(self.errno);
        write!(f, "{} ({error})", self.text)
    }
}

impl std::error::Error for Refusal {}

/// The errno of an error from this module.
fn errno(error: &io::Error) -> Option<i32> {
    error.raw_os_error().or_else(|| {
        error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<Refusal>())
            .map(|refusal| refusal.errno)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_read_back_as_written() {
        let mut message = Message::new(RTM_NEWTFILTER, 0, 7, HANDLE, 0, filter_info());
        message.attr(TCA_KIND, b"bpf\0");
        let options = message.begin_nested(TCA_OPTIONS);
        message.attr(TCA_BPF_ID, &42u32.to_ne_bytes());
        message.attr(TCA_BPF_NAME, b"enf_tc_egress\0");
        message.end_nested(options);
        let bytes = message.finish();
        assert_eq!(bytes.len() % 4, 0);
        let filter = parse_filter(&bytes[NLMSG_HEADER_LEN..]).expect("a bpf filter");
        assert_eq!(
            filter,
            Filter {
                priority: PRIORITY,
                handle: HANDLE,
                program_id: 42,
                name: "enf_tc_egress".to_owned(),
            }
        );
        assert!(filter.is_enforcers());
    }

    #[test]
    fn a_priority_head_without_handle_is_not_a_filter() {
        let message = Message::new(RTM_NEWTFILTER, 0, 7, 0, 0, filter_info());
        assert_eq!(parse_filter(&message.finish()[NLMSG_HEADER_LEN..]), None);
    }
}
