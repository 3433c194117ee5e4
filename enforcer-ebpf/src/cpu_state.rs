//! What each CPU keeps between the packets it judges that nobody outside the datapath reads:
//! its latest clock reading, its estimate of the ring buffer's room, and when its records last
//! woke the reader. One value, so that a packet that needs several of them loads one map
//! pointer and one line: on a new shape's record, each per-CPU map is a dependent pair of
//! cold loads (the pointer to this CPU's value, then the value). Soft state, not pinned: a
//! new load starts from zero (the clock and the room are read again at once, and the first
//! record wakes the reader).

use crate::maps::CPU_STATE;

/// A CPU's last reading of the clock, and the tick it was taken in (see `clock::now`).
#[repr(C)]
pub struct ClockReading {
    pub tick: u64,
    pub now_ns: u64,
}

/// A CPU's estimate of the ring buffer's free bytes: read from the ring buffer in the tick
/// `tick`, less the records this CPU reserved since (see `report::RingRoom`).
#[repr(C)]
pub struct RoomEstimate {
    pub tick: u64,
    pub free: u64,
}

#[repr(C)]
pub struct CpuState {
    pub clock: ClockReading,
    pub room: RoomEstimate,
    /// When a record of this CPU last woke the controller's reader (see `report::wakeup`).
    pub last_wakeup_ns: u64,
}

const _: () = assert!(size_of::<CpuState>() == 40);

/// This CPU's state. `None` only if the map lookup fails, which a one-entry per-CPU array's
/// does not.
#[inline(always)]
pub fn this_cpu() -> Option<&'static mut CpuState> {
    let state = CPU_STATE.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; programs on one CPU do not interleave (softirq context), and a
    // program run holds one reference at a time.
    Some(unsafe { &mut *state })
}
