//! `enforcer status`: what the kernel runs, read from the pins and the kernel, not from what a
//! controller meant to do.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    time::{Duration, UNIX_EPOCH},
};

use enforcer_common::{
    config::PolicyConfig,
    counters::Counter,
    verdict::{Verdict, reason_name},
};

use super::{Failure, with_causes};
use crate::datapath::enforcement::{self, InterfaceState};
use crate::datapath::{
    hook::Hook,
    host, loader,
    maps::{Fill, KernelMaps},
    pins::PinLayout,
};

/// What `status` shows, gathered from the kernel.
pub(super) struct Status {
    pub pin_path: PathBuf,
    pub installed: Option<PolicyConfig>,
    pub attachments: Vec<Attachment>,
    /// Every interface named (by `--attach`, the policy, or a pin), and its state.
    pub interfaces: Vec<(String, InterfaceState)>,
    /// (verdict code, reason code, counter)
    pub packets: Vec<(u8, u8, Counter)>,
    pub fill: BTreeMap<&'static str, Fill>,
    pub events_lost: u64,
    /// The tags of the program the socket hook's link runs, and of this build's.
    pub socket_hook: (Option<String>, Option<String>),
}

/// One hook of one interface that enforcer has recorded as attached.
pub(super) struct Attachment {
    pub interface: String,
    pub hook: Hook,
    /// The tag of the program the kernel runs there now; `None` if it runs none.
    pub running: Option<String>,
    /// The tag of this build's program for the hook, if known.
    pub expected: Option<String>,
    /// Whether the interface exists in this network namespace.
    pub present: bool,
}

impl Status {
    pub fn gather(pins: &PinLayout) -> Result<Self, Failure> {
        if !pins.exists() {
            return Err(Failure::Runtime(format!(
                "no datapath is pinned at {} (is `enforcer run` using another --pin-path?)",
                pins.root.display()
            )));
        }
        let runtime = |error: &dyn std::error::Error| Failure::Runtime(with_causes(error));
        let (maps, _) = KernelMaps::from_pins(&pins.maps()).map_err(|error| runtime(&error))?;
        let programs = loader::pinned_programs(pins);
        let build_tags = loader::build_tags().unwrap_or_default();
        let mut attachments = Vec::new();
        for (interface, hooks) in pins.attached_interfaces() {
            for hook in hooks {
                attachments.push(Attachment {
                    running: programs
                        .linked
                        .get(&hook.pin_name(&interface))
                        .map(|info| format!("{:016x}", info.tag())),
                    expected: build_tags.get(hook.program()).cloned(),
                    present: host::interface_index(&interface).is_some(),
                    interface: interface.clone(),
                    hook,
                });
            }
        }
        let selectors = enforcement::read_selectors(&pins.interfaces_file());
        Ok(Self {
            pin_path: pins.root.clone(),
            installed: maps.installed().map_err(|error| runtime(&error))?,
            interfaces: enforcement::interface_states(pins, &selectors, &programs.linked),
            attachments,
            packets: maps.packet_counts().map_err(|error| runtime(&error))?,
            fill: maps.fill(),
            events_lost: maps.events_lost(),
            socket_hook: (
                programs
                    .linked
                    .get(loader::SOCKETS_LINK)
                    .map(|info| format!("{:016x}", info.tag())),
                build_tags.get(loader::SOCKET_PROGRAM).cloned(),
            ),
        })
    }

    /// How many (interface, hook) attachments the kernel really runs.
    pub fn enforced(&self) -> usize {
        self.attachments
            .iter()
            .filter(|attachment| attachment.running.is_some())
            .count()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "pin path {}", self.pin_path.display());
        match &self.installed {
            Some(config) => {
                let mode = if config.flags & enforcer_common::config::flags::AUDIT != 0 {
                    "audit"
                } else {
                    "enforce"
                };
                let installed = UNIX_EPOCH + Duration::from_nanos(config.installed_at_ns);
                let _ = writeln!(
                    out,
                    "generation {} (slot {}), mode {mode}, installed {}",
                    config.generation,
                    config.slot,
                    crate::outputs::alert::rfc3339(installed)
                );
                let _ = writeln!(out, "policy sha256 {}", hex::encode(config.policy_hash));
            }
            None => {
                let _ = writeln!(
                    out,
                    "no policy generation installed: attached interfaces drop all IP traffic"
                );
            }
        }
        let _ = writeln!(out, "\ninterfaces:");
        if self.interfaces.is_empty() {
            let _ = writeln!(out, "  (none named)");
        }
        for (name, state) in &self.interfaces {
            let _ = writeln!(out, "  {name:<16} {}", state.as_str());
        }
        let _ = writeln!(out, "\nattached:");
        if self.attachments.is_empty() {
            let _ = writeln!(out, "  (no interfaces)");
        }
        for attachment in &self.attachments {
            let _ = writeln!(out, "  {}", attachment.render());
        }
        let needed = self
            .installed
            .is_some_and(|config| config.cgroup_levels != 0);
        let socket_hook = match &self.socket_hook {
            (Some(running), Some(expected)) if running == expected => {
                format!("tag {running}, this build's program")
            }
            (Some(running), Some(_)) => format!("tag {running} DIFFERS from this build's program"),
            (Some(running), None) => format!("tag {running}, build tag unknown"),
            (None, _) if needed => "NOT ATTACHED: packets handed over to it for services \
                                    identified by cgroup pass unjudged"
                .to_owned(),
            (None, _) => "not attached, as no service of the live generation is identified by \
                          cgroup"
                .to_owned(),
        };
        let _ = writeln!(out, "  socket hook on the cgroup v2 root: {socket_hook}");
        let _ = writeln!(out, "\npackets:");
        for (verdict, reason, counter) in &self.packets {
            let verdict = Verdict::from_code(*verdict).map_or("?", Verdict::as_str);
            let _ = writeln!(
                out,
                "  {verdict:<6} {:<20} {:>12} packets {:>14} bytes",
                reason_name(*reason),
                counter.packets,
                counter.bytes
            );
        }
        let _ = writeln!(out, "\nmaps:");
        for (name, fill) in &self.fill {
            let _ = writeln!(
                out,
                "  {name:<12} {:>8} / {:<8} entries",
                fill.entries, fill.capacity
            );
        }
        let _ = writeln!(out, "\nevents lost: {}", self.events_lost);
        out
    }
}

impl Attachment {
    fn render(&self) -> String {
        let (tag, verdict) = match &self.running {
            Some(tag) => {
                let verdict = match &self.expected {
                    Some(expected) if expected == tag => "matches this build",
                    Some(_) => "DIFFERS from this build's program",
                    None => "build tag unknown",
                };
                (tag.as_str(), verdict)
            }
            None => (
                "-",
                "NOT ENFORCED: no program attached (the interface is gone or was recreated, or the link or filter was removed)",
            ),
        };
        let present = if self.present {
            ""
        } else {
            " (interface not in this namespace)"
        };
        format!(
            "{:<16} {:<4} {} tag {tag} {verdict}{present}",
            self.interface,
            self.hook.as_str(),
            self.hook.program()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attachment(running: Option<&str>, expected: Option<&str>, present: bool) -> Attachment {
        Attachment {
            interface: "veth-api".to_owned(),
            hook: Hook::TcEgress,
            running: running.map(str::to_owned),
            expected: expected.map(str::to_owned),
            present,
        }
    }

    fn status(attachments: Vec<Attachment>) -> Status {
        Status {
            pin_path: PathBuf::from("/sys/fs/bpf/test"),
            installed: None,
            interfaces: Vec::new(),
            attachments,
            packets: vec![(
                0,
                0,
                Counter {
                    packets: 3,
                    bytes: 180,
                },
            )],
            fill: BTreeMap::from([(
                "RULES",
                Fill {
                    entries: 2,
                    capacity: 1024,
                },
            )]),
            events_lost: 7,
            socket_hook: (None, Some("00000000000000bb".to_owned())),
        }
    }

    #[test]
    fn a_socket_hook_that_is_not_attached_says_what_passes_unjudged() {
        let mut with_cgroup_services = status(Vec::new());
        with_cgroup_services.installed = Some(PolicyConfig {
            cgroup_levels: 1 << 1,
            ..PolicyConfig::default()
        });
        let report = with_cgroup_services.render();
        assert!(
            report.contains("socket hook on the cgroup v2 root: NOT ATTACHED"),
            "{report}"
        );
        let without = status(Vec::new()).render();
        assert!(
            without.contains("socket hook on the cgroup v2 root: not attached, as no service"),
            "{without}"
        );
        let mut attached = status(Vec::new());
        attached.socket_hook.0 = Some("00000000000000bb".to_owned());
        assert!(
            attached
                .render()
                .contains("socket hook on the cgroup v2 root: tag 00000000000000bb, this build's")
        );
    }

    #[test]
    fn an_interface_without_a_running_program_is_shown_as_not_enforced() {
        let report = status(vec![
            attachment(Some("00000000000000aa"), Some("00000000000000aa"), true),
            attachment(None, Some("00000000000000aa"), false),
        ]);
        assert_eq!(report.enforced(), 1);
        let text = report.render();
        assert!(
            text.contains(
                "veth-api         tc   enf_tc_egress tag 00000000000000aa matches this build\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("tag - NOT ENFORCED: no program attached (the interface is gone or was recreated, or the link or filter was removed) (interface not in this namespace)\n"),
            "{text}"
        );
    }

    #[test]
    fn interface_states_are_listed() {
        let mut report = status(Vec::new());
        report.interfaces = vec![("veth-api-1".to_owned(), InterfaceState::Defunct)];
        assert!(
            report
                .render()
                .contains("interfaces:\n  veth-api-1       defunct\n"),
            "{}",
            report.render()
        );
    }

    #[test]
    fn a_program_of_another_build_is_flagged() {
        let text = status(vec![attachment(
            Some("00000000000000bb"),
            Some("00000000000000aa"),
            true,
        )])
        .render();
        assert!(
            text.contains("tag 00000000000000bb DIFFERS from this build's program"),
            "{text}"
        );
    }

    #[test]
    fn no_policy_no_interfaces_and_the_counters_are_all_shown() {
        let text = status(Vec::new()).render();
        for expected in [
            "pin path /sys/fs/bpf/test\n",
            "no policy generation installed: attached interfaces drop all IP traffic\n",
            "attached:\n  (no interfaces)\n",
            "  RULES               2 / 1024     entries\n",
            "events lost: 7\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert_eq!(status(Vec::new()).enforced(), 0);
    }
}
