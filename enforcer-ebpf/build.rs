use which::which;

/// The eBPF object is linked by `bpf-linker`, which cargo does not know about: rebuild when the
/// linker binary changes, so a linker upgrade is never silently ignored.
fn main() {
    // bpf-linker asks LLVM to expand memcpy in order by default, and that setting also stops
    // LLVM from expanding memset: every zeroed field or array then became a call to a
    // byte-at-a-time loop (a third of the datapath's instructions on an established flow).
    // Without it, LLVM writes them as plain stores.
    println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
    match which("bpf-linker") {
        Ok(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
        Err(err) => println!(
            "cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup` to install it"
        ),
    }
}
