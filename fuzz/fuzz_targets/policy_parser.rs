//! The policy parser and compiler on any text: diagnostics or a compiled policy, never a panic.
#![no_main]

use std::path::PathBuf;

use enforcer::{compile, policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Ok(parsed) = policy::parse_sources(vec![(PathBuf::from("fuzz.toml"), text.to_owned())])
    else {
        return;
    };
    let _ = compile::compile(&parsed, &compile::HostView::default(), None);
});
