//! Per-CPU volume counters.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowCounterKey {
    pub src_identity: u32,
    pub dst_identity: u32,
    pub verdict: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

kernel_abi!(FlowCounterKey = 12, Counter = 16);
