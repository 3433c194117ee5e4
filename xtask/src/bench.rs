//! `cargo xtask bench`.

use std::path::Path;

use anyhow::{bail, Result};

pub fn run(_enforcer: &Path, _workspace: &Path) -> Result<()> {
    bail!("no benchmarks yet")
}
