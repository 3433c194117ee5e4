//! Types shared by the enforcer eBPF programs and the controller.
//!
//! Everything here crosses the kernel/user boundary as raw bytes, so every type is `#[repr(C)]`,
//! holds only integers and byte arrays, spells its padding out as fields, and has its size checked
//! at compile time. Enumerations are `u8`/`u32` constants in the kernel half; the `user` feature
//! adds the Rust enums, `aya::Pod` impls and conversions the controller works with.
#![no_std]

/// Checks at compile time that a shared type has exactly the size its fields add up to (so the
/// compiler inserted no hidden padding the other side might not zero), and marks it `aya::Pod`
/// for the controller.
macro_rules! kernel_abi {
    ($($ty:ty = $size:expr),* $(,)?) => {
        $(
            const _: () = assert!(core::mem::size_of::<$ty>() == $size);
            #[cfg(feature = "user")]
            // SAFETY: `#[repr(C)]`, integers and byte arrays only, no implicit padding (size
            // asserted above), so every bit pattern is a valid value.
            unsafe impl aya::Pod for $ty {}
        )*
    };
}

pub mod addr;
pub mod config;
pub mod conntrack;
pub mod counters;
pub mod delivery;
pub mod event;
pub mod flow_filter;
pub mod identity;
pub mod identity_table;
pub mod policy;
pub mod verdict;

#[cfg(feature = "user")]
extern crate std;
