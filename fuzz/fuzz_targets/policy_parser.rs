//! The policy parser and compiler on any text: diagnostics or a compiled policy, never a panic.
//! The text may hold two versions of a policy file, before and after a NUL: the second, loaded
//! and compiled after the first (only what the edit touched), must be what it is loaded and
//! compiled on its own.
#![no_main]

use std::path::PathBuf;

use enforcer::{compile, policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let (before, after) = text.split_once('\0').unwrap_or(("", text));
    let file = |text: &str| vec![(PathBuf::from("fuzz.toml"), text.to_owned())];
    let host = compile::HostView::default();
    let mut cache = policy::ParseCache::default();
    let earlier = policy::parse_sources_cached(file(before), &mut cache)
        .ok()
        .and_then(|policy| Some((compile::compile(&policy, &host, None).ok()?, policy)));
    let edited =
        policy::parse_sources_cached(file(after), &mut cache).map_err(|error| error.to_string());
    let alone = policy::parse_sources(file(after)).map_err(|error| error.to_string());
    assert_eq!(edited, alone, "loaded after an edit");
    let Ok(parsed) = edited else {
        return;
    };
    let whole = compile::compile(
        &parsed,
        &host,
        earlier.as_ref().map(|(compiled, _)| compiled),
    );
    let Some((compiled, policy)) = &earlier else {
        return;
    };
    let before = compile::Before {
        policy,
        host: &host,
        compiled,
    };
    let change = compile::compile_change(&parsed, &host, before);
    match (whole, change) {
        (Ok(whole), Ok(change)) => {
            assert_eq!(whole.tables, change.tables, "compiled after an edit");
            assert_eq!(
                whole.rule_order, change.rule_order,
                "numbered after an edit"
            );
        }
        (whole, change) => assert_eq!(
            whole.err().map(|error| error.to_string()),
            change.err().map(|error| error.to_string()),
            "compiled after an edit"
        ),
    }
});
