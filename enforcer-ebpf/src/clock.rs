//! The time a packet is judged at: `CLOCK_MONOTONIC` nanoseconds at the granularity of the
//! kernel's tick, read from the kernel's clock at most once per tick on each CPU.
//!
//! A helper call costs what a BPF program's whole fast path costs: on a processor where the
//! kernel returns through a mitigation thunk (AMD's Safe RET, against SRSO), each function
//! return is a mispredicted branch. `bpf_ktime_get_coarse_ns` measured 20 ns a call
//! (`bpf_ktime_get_ns` 36), half of what an established flow's packet costs over an empty
//! program. `bpf_jiffies64` is no call at all: the verifier replaces it with a load of the
//! kernel's tick counter. The coarse clock moves only when the tick does, so the reading kept
//! from this CPU's last tick is the reading.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};

use crate::cpu_state;

/// 1 where the kernel has `bpf_ktime_get_coarse_ns` (5.11 and later), the cheaper clock; the
/// controller sets it to 0 before loading on older kernels. The verifier knows the value (a
/// frozen read-only global) and never visits the branch not taken, so an older kernel does not
/// refuse the helper it lacks.
#[unsafe(no_mangle)]
static COARSE_CLOCK: u8 = 1;

/// `CLOCK_MONOTONIC` nanoseconds as of this CPU's latest tick: the clock's reading from the
/// first packet this CPU judged in the current tick. Between ticks the coarse clock stands
/// still; a reading taken as the tick moves, before the clock caught up, is one tick behind
/// until the next. Never behind an earlier reading of this CPU.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: no arguments; the verifier inlines it as a load of `jiffies_64`.
    let tick = unsafe { bpf_jiffies64() };
    let Some(state) = cpu_state::this_cpu() else {
        return read_clock();
    };
    let reading = &mut state.clock;
    if reading.tick != tick {
        reading.tick = tick;
        reading.now_ns = read_clock();
    }
    reading.now_ns
}

/// The kernel's clock, by the cheapest helper this kernel has.
#[inline(always)]
fn read_clock() -> u64 {
    // SAFETY: a plain read of a global; volatile so that it is read from the map at run time
    // rather than folded into the default at compile time.
    if unsafe { core::ptr::read_volatile(&COARSE_CLOCK) } != 0 {
        // SAFETY: helpers without arguments.
        unsafe { bpf_ktime_get_coarse_ns() }
    } else {
        unsafe { bpf_ktime_get_ns() }
    }
}
