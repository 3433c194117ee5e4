//! What a pinned BPF link is attached to, from the kernel (aya does not report a link's
//! interface): `status` shows an interface as enforced only if its link still points at it.

use std::{
    ffi::CString,
    os::{fd::FromRawFd as _, fd::OwnedFd, unix::ffi::OsStrExt as _},
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_XDP: u32 = 6;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// The program a link runs and the interface it is attached to (0 once that interface is gone:
/// the link is then defunct).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkTarget {
    pub program_id: u32,
    pub ifindex: u32,
}

/// The target of the XDP or TCX link pinned at `path`; `None` if there is none or it is
/// another kind of link.
pub fn target(path: &Path) -> Option<LinkTarget> {
    let link = open_pinned(path)?;
    // `struct bpf_link_info`: type, id, prog_id, then (8-byte aligned) the per-type union, whose
    // first field is the ifindex for XDP and TCX links.
    let mut info = [0u32; 16];
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = InfoAttr {
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&link) as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for this command; `info` outlives
    // the call and is as long as `info_len` says.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const InfoAttr,
            size_of::<InfoAttr>(),
        )
    };
    if ret < 0 || !matches!(info[0], BPF_LINK_TYPE_XDP | BPF_LINK_TYPE_TCX) {
        return None;
    }
    Some(LinkTarget {
        program_id: info[2],
        ifindex: info[4],
    })
}

fn open_pinned(path: &Path) -> Option<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes()).ok()?;
    #[repr(C)]
    struct GetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let attr = GetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for this command and `path` outlives
    // the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const GetAttr,
            size_of::<GetAttr>(),
        )
    };
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
