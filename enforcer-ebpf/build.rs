use which::which;

/// The eBPF object is linked by `bpf-linker`, which cargo does not know about: rebuild when the
/// linker binary changes, so a linker upgrade is never silently ignored.
fn main() {
    match which("bpf-linker") {
        Ok(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
        Err(err) => println!(
            "cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup` to install it"
        ),
    }
}
