use std::process::ExitCode;

use clap::Parser as _;
use enforcer::cli::{Cli, Failure};

// A policy reload builds and drops hundreds of thousands of small objects; glibc's malloc spent
// about 40% of a 100 000-rule reload in its free lists (measured with perf), mimalloc a
// fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // A reload allocates and frees hundreds of MiB in small objects. In 2 MiB transparent huge
    // pages, each first touch zeroes a whole huge page and a page stays resident while any of
    // it is in use: with 4 KiB pages the 100 000-rule load took 0.46-0.51 s rather than
    // 0.58-0.66 s, and the controller held 111 MiB after it rather than 118-120 (`cargo xtask
    // bench`'s apply, four runs each). Set first, before the allocator has touched much; a
    // kernel that refuses it changes nothing else.
    let _ = nix::sys::prctl::set_thp_disable(true);
    // A runtime runs the same binary as the CNI plugin (DESIGN §13).
    if enforcer::cni::invoked_as_plugin() {
        return enforcer::cni::main();
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match enforcer::cli::execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::BadInput(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
        Err(Failure::Runtime(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}
