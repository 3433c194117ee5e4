//! Raw `bpf(2)` calls for what aya has no API for: loading a program from instructions (an
//! attacker's program for the swap test; the empty baseline for benchmarks), swapping a pinned
//! link's program, timing a program with `BPF_PROG_TEST_RUN`, and reading the kernel's run-time
//! statistics of a pinned link's program.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    time::Duration,
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_ENABLE_STATS: libc::c_long = 32;
/// `BPF_STATS_RUN_TIME`, the one kind `BPF_ENABLE_STATS` has.
const BPF_STATS_RUN_TIME: u32 = 0;
/// Offsets in `struct bpf_link_info` and `struct bpf_prog_info` (include/uapi/linux/bpf.h),
/// and how much of the latter is read.
const LINK_INFO_PROG_ID: usize = 8;
const PROG_INFO_RUN_TIME_NS: usize = 192;
const PROG_INFO_RUN_CNT: usize = 200;
const PROG_INFO_READ: usize = 208;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_CGROUP_INET_INGRESS: u32 = 0;
const BPF_XDP: u32 = 37;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

fn sys(command: libc::c_long, attr: &mut [u8]) -> io::Result<i64> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` prefix laid out for `command`, and
    // outlives the call; the kernel writes results back into it.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, command, attr.as_mut_ptr(), attr.len()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Loads `r0 = XDP_PASS; exit`: an XDP program that does nothing and lets everything through.
pub fn load_pass_all_xdp() -> io::Result<OwnedFd> {
    load_returning(BPF_PROG_TYPE_XDP, BPF_XDP, 2)
}

/// Loads `r0 = TC_ACT_UNSPEC; exit` for the TCX hook `egress` or ingress: a TC program that
/// does nothing and leaves the packet to what comes next. It can replace the program of a TCX
/// link of that hook (see [`swap_link_program`]).
pub fn load_pass_all_tcx(egress: bool) -> io::Result<OwnedFd> {
    let attach = if egress {
        BPF_TCX_EGRESS
    } else {
        BPF_TCX_INGRESS
    };
    load_returning(BPF_PROG_TYPE_SCHED_CLS, attach, -1)
}

/// Loads `r0 = TC_ACT_SHOT; exit` for the TCX hook `egress` or ingress: a TC program that drops
/// everything and does nothing else, the empty program of a hook that refuses a packet.
pub fn load_drop_all_tcx(egress: bool) -> io::Result<OwnedFd> {
    let attach = if egress {
        BPF_TCX_EGRESS
    } else {
        BPF_TCX_INGRESS
    };
    load_returning(BPF_PROG_TYPE_SCHED_CLS, attach, 2)
}

/// Loads `r0 = 1; exit` for a cgroup's ingress: a socket filter that lets everything through.
pub fn load_pass_all_socket_ingress() -> io::Result<OwnedFd> {
    load_returning(BPF_PROG_TYPE_CGROUP_SKB, BPF_CGROUP_INET_INGRESS, 1)
}

/// Loads `r0 = value; exit` as a program of `program_type`, for `attach_type`.
fn load_returning(program_type: u32, attach_type: u32, value: i32) -> io::Result<OwnedFd> {
    let mut instructions = [0u8; 16];
    // BPF_ALU64 | BPF_MOV | BPF_K into r0, then BPF_JMP | BPF_EXIT.
    instructions[0] = 0xb7;
    instructions[4..8].copy_from_slice(&value.to_le_bytes());
    instructions[8] = 0x95;
    let license = CString::new("GPL").expect("no NUL");
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&program_type.to_ne_bytes());
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(instructions.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[48..53].copy_from_slice(b"pass\0");
    attr[68..72].copy_from_slice(&attach_type.to_ne_bytes());
    let fd = sys(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A file descriptor for the loaded program with kernel id `id` (`BPF_PROG_GET_FD_BY_ID`).
pub fn program_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u8; 16];
    attr[0..4].copy_from_slice(&id.to_ne_bytes());
    let fd = sys(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The object pinned at `path` (`BPF_OBJ_GET`).
fn pinned(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut get = [0u8; 16];
    get[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    let fd = sys(BPF_OBJ_GET, &mut get)?;
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Replaces the program of the link pinned at `path` (`BPF_LINK_UPDATE`).
pub fn swap_link_program(path: &Path, program: &OwnedFd) -> io::Result<()> {
    let link = pinned(path)?;
    let mut update = [0u8; 16];
    update[0..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    update[4..8].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
    sys(BPF_LINK_UPDATE, &mut update).map(drop)
}

/// The mean time, in nanoseconds, that the programs of the links pinned at `links` took per
/// run while `during` ran, one figure per link: the kernel's own timing of every program run
/// (`BPF_ENABLE_STATS`), on only for that while. The timing adds two clock reads to every run,
/// so it is for comparing programs' costs, not for measuring rates.
pub fn mean_run_times(links: &[&Path], during: impl FnOnce()) -> io::Result<Vec<f64>> {
    let timing = enable_run_time_stats()?;
    let before = links
        .iter()
        .map(|link| link_program_run_time(link))
        .collect::<io::Result<Vec<_>>>()?;
    during();
    let mut means = Vec::with_capacity(links.len());
    for (link, (time_before, runs_before)) in links.iter().zip(before) {
        let (time, runs) = link_program_run_time(link)?;
        let runs = runs.saturating_sub(runs_before).max(1);
        means.push(time.saturating_sub(time_before).as_nanos() as f64 / runs as f64);
    }
    drop(timing);
    Ok(means)
}

/// Turns on the kernel's timing of every program run until the returned descriptor is closed.
fn enable_run_time_stats() -> io::Result<OwnedFd> {
    let mut attr = [0u8; 8];
    attr[0..4].copy_from_slice(&BPF_STATS_RUN_TIME.to_ne_bytes());
    let fd = sys(BPF_ENABLE_STATS, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// How long the program of the link pinned at `path` has run in all, and how many times, as
/// far as the kernel counted them (while run-time statistics were on).
fn link_program_run_time(path: &Path) -> io::Result<(Duration, u64)> {
    let link = pinned(path)?;
    let mut link_info = [0u8; 64];
    object_info(&link, &mut link_info)?;
    let program_id = u32::from_ne_bytes(
        link_info[LINK_INFO_PROG_ID..LINK_INFO_PROG_ID + 4]
            .try_into()
            .expect("4 bytes"),
    );
    let program = program_by_id(program_id)?;
    let mut info = [0u8; PROG_INFO_READ];
    object_info(&program, &mut info)?;
    let word = |at: usize| u64::from_ne_bytes(info[at..at + 8].try_into().expect("8 bytes"));
    Ok((
        Duration::from_nanos(word(PROG_INFO_RUN_TIME_NS)),
        word(PROG_INFO_RUN_CNT),
    ))
}

/// Fills `info` with what the kernel tells of the object behind `fd`
/// (`BPF_OBJ_GET_INFO_BY_FD`), as far as `info` reaches.
fn object_info(fd: &OwnedFd, info: &mut [u8]) -> io::Result<()> {
    let mut attr = [0u8; 16];
    attr[0..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    sys(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}

/// Runs `program` on `frame` `repeat` times; returns its return value and the kernel's average
/// time per run.
pub fn test_run(program: &OwnedFd, frame: &[u8], repeat: u32) -> io::Result<(u32, Duration)> {
    let mut attr = [0u8; 80];
    attr[0..4].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    attr[16..24].copy_from_slice(&(frame.as_ptr() as u64).to_ne_bytes());
    attr[32..36].copy_from_slice(&repeat.to_ne_bytes());
    sys(BPF_PROG_TEST_RUN, &mut attr)?;
    let retval = u32::from_ne_bytes(attr[4..8].try_into().expect("4 bytes"));
    let duration = u32::from_ne_bytes(attr[36..40].try_into().expect("4 bytes"));
    Ok((retval, Duration::from_nanos(u64::from(duration))))
}

/// How many programs are attached to interface `ifindex` of the calling thread's network
/// namespace through TCX, ingress and egress; zero on kernels without TCX (before 6.6).
pub fn tcx_program_counts(ifindex: u32) -> io::Result<(u32, u32)> {
    let count = |attach_type: u32| -> io::Result<u32> {
        let mut attr = [0u8; 64];
        attr[0..4].copy_from_slice(&ifindex.to_ne_bytes());
        attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
        match sys(BPF_PROG_QUERY, &mut attr) {
            Ok(_) => Ok(u32::from_ne_bytes(
                attr[24..28].try_into().expect("4 bytes"),
            )),
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => Ok(0),
            Err(error) => Err(error),
        }
    };
    Ok((count(BPF_TCX_INGRESS)?, count(BPF_TCX_EGRESS)?))
}
