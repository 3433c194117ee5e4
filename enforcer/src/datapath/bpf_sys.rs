//! The bpf(2) commands aya does not wrap: `BPF_MAP_FREEZE` (each generation's config),
//! `BPF_MAP_UPDATE_BATCH` (a policy's entries, many to a call), an array-of-maps update from
//! a thread that holds no aya handle (the switch), `BPF_LINK_CREATE` and `BPF_LINK_UPDATE` for
//! the socket hook's cgroup link from a handle that is not aya's program, and what a pinned link
//! is attached to (aya does not report a link's interface; `status` shows an
//! interface as enforced only if its link still points at it).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_FREEZE: libc::c_long = 22;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_CGROUP_INET_INGRESS: u32 = 0;
const BPF_LINK_TYPE_XDP: u32 = 6;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// The program a link runs and the interface it is attached to (0 once that interface is gone:
/// the link is then defunct).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkTarget {
    pub program_id: u32,
    pub ifindex: u32,
}

/// `bpf(command, attr)`. `Attr` must be a `#[repr(C)]` prefix of `union bpf_attr` for
/// `command`, with every pointer in it valid for the call.
fn bpf<Attr>(command: libc::c_long, attr: &Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid `Attr` that outlives the call, and its size is passed with it;
    // what it points to is the caller's promise above.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *const Attr,
            size_of::<Attr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `BPF_MAP_FREEZE`: no further writes from userspace.
pub fn freeze(map: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct FreezeAttr {
        map_fd: u32,
        _pad: u32,
    }
    let attr = FreezeAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
    };
    bpf(BPF_MAP_FREEZE, &attr).map(|_| ())
}

/// `union bpf_attr` for the element commands: the key and value are pointers to `u32`s that
/// outlive the call.
#[repr(C)]
struct ElementAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Puts the map `inner` at `index` of the array-of-maps `outer`. Programs see it as soon as
/// the kernel swapped the pointer; the call returns only after a grace period, when no program
/// run can still hold the map it replaced.
pub fn set_inner_map(outer: BorrowedFd<'_>, index: u32, inner: BorrowedFd<'_>) -> io::Result<()> {
    let value = inner.as_raw_fd() as u32;
    let attr = ElementAttr {
        map_fd: outer.as_raw_fd() as u32,
        _pad: 0,
        key: &index as *const u32 as u64,
        value: &value as *const u32 as u64,
        flags: 0,
    };
    bpf(BPF_MAP_UPDATE_ELEM, &attr).map(|_| ())
}

/// The id of the map at `index` of the array-of-maps `outer` (what a lookup from userspace
/// returns for a map-in-map).
pub fn inner_map_id(outer: BorrowedFd<'_>, index: u32) -> io::Result<u32> {
    let mut id = 0u32;
    let attr = ElementAttr {
        map_fd: outer.as_raw_fd() as u32,
        _pad: 0,
        key: &index as *const u32 as u64,
        value: &mut id as *mut u32 as u64,
        flags: 0,
    };
    bpf(BPF_MAP_LOOKUP_ELEM, &attr)?;
    Ok(id)
}

/// `BPF_MAP_UPDATE_BATCH` (kernel 5.6): writes `keys[i]` → `values[i]` for every `i`, in one
/// call rather than one per entry (a syscall each was about a fifth of writing a 100 000-rule
/// policy; the kernel's inserts are the rest). `K` and `V` must be the map's key and value
/// types. On error, the entries before the failing one are written.
pub fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    assert_eq!(keys.len(), values.len(), "one value per key");
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: u32::try_from(keys.len()).expect("fewer than 2^32 entries"),
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` is the batch member of `union bpf_attr`; `keys` and `values` hold `count`
    // plain-data elements of the map's key and value sizes each, and outlive the call. The
    // kernel writes back into `count` only, which is why `attr` is passed mutable.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            size_of::<BatchAttr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The target of the XDP or TCX link pinned at `path`; `None` if there is none or it is
/// another kind of link.
pub fn link_target(path: &Path) -> Option<LinkTarget> {
    let info = link_info(path)?;
    // After type, id and prog_id, the (8-byte aligned) per-type union, whose first field is
    // the ifindex for XDP and TCX links.
    if !matches!(info[0], BPF_LINK_TYPE_XDP | BPF_LINK_TYPE_TCX) {
        return None;
    }
    Some(LinkTarget {
        program_id: info[2],
        ifindex: info[4],
    })
}

/// The program the link pinned at `path` runs (any kind of link); `None` if there is none.
pub fn link_program(path: &Path) -> Option<u32> {
    link_info(path).map(|info| info[2])
}

/// `struct bpf_link_info` of the link pinned at `path`, as words: type, id, prog_id, then the
/// per-type union.
fn link_info(path: &Path) -> Option<[u32; 16]> {
    let link = open_pinned(path)?;
    let mut info = [0u32; 16];
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        // `info` outlives the call and is as long as `info_len` says.
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &attr).ok()?;
    Some(info)
}

/// `BPF_LINK_UPDATE`: the link pinned at `path` runs `program` from now on, atomically.
pub fn update_link(path: &Path, program: BorrowedFd<'_>) -> io::Result<()> {
    let link = open_pinned(path).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
    #[repr(C)]
    struct UpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = UpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &attr).map(|_| ())
}

/// `BPF_LINK_CREATE`: attaches the cgroup_skb program `program` to what sockets in `cgroup`
/// (and below) receive, beside any other program there, and pins the link at `path`. The
/// link lasts until its pin is removed.
pub fn link_cgroup_ingress(
    program: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    path: &Path,
) -> io::Result<()> {
    #[repr(C)]
    struct LinkCreateAttr {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
    }
    let attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_INET_INGRESS,
        flags: 0,
    };
    let fd = bpf(BPF_LINK_CREATE, &attr)?;
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    pin(link.as_fd(), path)
}

/// `BPF_OBJ_PIN`: `object` pinned at `path`, on a bpffs.
fn pin(object: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    #[repr(C)]
    struct PinAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let attr = PinAttr {
        // `path` outlives the call.
        pathname: path.as_ptr() as u64,
        bpf_fd: object.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &attr).map(|_| ())
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
        // `path` outlives the call.
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &attr).ok()?;
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
