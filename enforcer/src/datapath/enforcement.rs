//! Which interfaces are enforced, from the kernel's truth (DESIGN §13): an interface a
//! controller names (by `--attach` or the policy's `interfaces`, kept in a file beside its
//! socket) or a pin records is `enforced`, `missing` or `defunct`. `status` and the heartbeat
//! both say it this way.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    path::Path,
};

use super::{host, pins::PinLayout};
use crate::policy::InterfaceSelector;

/// Whether an interface is enforced, from the kernel's truth (DESIGN §13).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterfaceState {
    /// It exists and every hook recorded for it runs a program.
    Enforced,
    /// It is named (by `--attach` or the policy) but does not exist, and nothing is recorded.
    Missing,
    /// It exists but runs no program of ours on some hook (it was recreated, or could not be
    /// attached), or it went and its links or filters are still recorded.
    Defunct,
}

impl InterfaceState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforced => "enforced",
            Self::Missing => "missing",
            Self::Defunct => "defunct",
        }
    }

    /// The state of an interface from whether it exists and which of its hooks run a program.
    fn of(present: bool, hooks_running: &[bool]) -> Self {
        if present && !hooks_running.is_empty() && hooks_running.iter().all(|running| *running) {
            Self::Enforced
        } else if !present && hooks_running.is_empty() {
            Self::Missing
        } else {
            Self::Defunct
        }
    }
}

/// Every interface named by `selectors` (what a controller wrote, see [`write_selectors`]) or
/// by a pin under `pins`, with its state.
///
/// `linked` is what [`super::loader::pinned_programs`] read: the program each link runs.
pub fn interface_states(
    pins: &PinLayout,
    selectors: &[String],
    linked: &BTreeMap<String, aya::programs::ProgramInfo>,
) -> Vec<(String, InterfaceState)> {
    let present = host::interfaces();
    let attached = pins.attached_interfaces();
    let selectors: Vec<InterfaceSelector> = selectors
        .iter()
        .filter_map(|entry| InterfaceSelector::new(entry).ok())
        .collect();
    let mut names: BTreeSet<String> = attached.keys().cloned().collect();
    names.extend(
        present
            .keys()
            .filter(|name| selectors.iter().any(|selector| selector.selects(name)))
            .cloned(),
    );
    names.extend(selectors.iter().filter_map(|selector| match selector {
        InterfaceSelector::Name(name) => Some(name.clone()),
        InterfaceSelector::Pattern(_) => None,
    }));
    names
        .into_iter()
        .map(|name| {
            let running: Vec<bool> = attached
                .get(&name)
                .into_iter()
                .flatten()
                .map(|hook| linked.contains_key(&hook.pin_name(&name)))
                .collect();
            let state = InterfaceState::of(present.contains_key(&name), &running);
            (name, state)
        })
        .collect()
}

/// Writes the selectors where `status` finds them: `{"selectors": [...]}`, replaced
/// atomically.
pub fn write_selectors(path: &Path, selectors: &[String]) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let temporary = path.with_extension("json.tmp");
    let text = serde_json::json!({ "selectors": selectors }).to_string();
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

/// The selectors a controller using these pins wrote, or none.
pub fn read_selectors(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|value| serde_json::from_value(value["selectors"].clone()).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interface_is_enforced_only_when_it_exists_and_every_hook_runs() {
        use InterfaceState::*;
        assert_eq!(InterfaceState::of(true, &[true, true]), Enforced);
        assert_eq!(
            InterfaceState::of(true, &[true, false]),
            Defunct,
            "one hook runs nothing"
        );
        assert_eq!(
            InterfaceState::of(true, &[]),
            Defunct,
            "named, there, not attached"
        );
        assert_eq!(InterfaceState::of(false, &[]), Missing);
        assert_eq!(
            InterfaceState::of(false, &[false, false]),
            Defunct,
            "went; links left"
        );
    }

    #[test]
    fn selectors_are_written_and_read_back() {
        let scratch = crate::ScratchFile::new("selectors.json");
        write_selectors(&scratch.0, &["veth-api-*".to_owned(), "v-db".to_owned()]).unwrap();
        assert_eq!(read_selectors(&scratch.0), ["veth-api-*", "v-db"]);
        assert!(read_selectors(Path::new("/nonexistent/selectors.json")).is_empty());
    }
}
