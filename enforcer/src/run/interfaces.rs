//! Which interfaces are enforced: every interface `--attach` names or the policy's `interfaces`
//! entries select (by name or pattern) has the programs attached whenever it exists. The
//! controller calls [`Interfaces::reconcile`] at start, after each policy install and on every
//! burst of link events: what was recreated is attached again, what went is forgotten.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    datapath::{
        enforcement,
        hook::IngressHook,
        host,
        loader::{Datapath, LoadError},
    },
    detect::{Detector, Finding, Party},
    endpoints::Registry,
    policy::{InterfaceSelector, Policy},
};

/// How long an interface the policy names may exist unenforced before it is a finding.
pub const GAP_GRACE: Duration = Duration::from_secs(1);

/// An interface that should be enforced and is not: its programs could not be attached.
#[derive(Debug)]
pub struct Gap {
    pub interface: String,
    pub since: Instant,
    pub error: String,
    reported: bool,
}

/// The interfaces this controller enforces, and the ones it tried to and could not.
pub struct Interfaces {
    ingress: IngressHook,
    /// `--attach` names and the policy's `interfaces` entries.
    selectors: Vec<String>,
    /// The interface index each name was attached at: an interface recreated under the same
    /// name has another index, and needs attaching again.
    attached: BTreeMap<String, u32>,
    gaps: BTreeMap<String, Gap>,
    /// Where `status` reads the selectors (see [`enforcement::write_selectors`]).
    selectors_file: PathBuf,
}

impl Interfaces {
    pub fn new(ingress: IngressHook, selectors_file: PathBuf) -> Self {
        Self {
            ingress,
            selectors: Vec::new(),
            attached: BTreeMap::new(),
            gaps: BTreeMap::new(),
            selectors_file,
        }
    }

    /// The selectors for `policy`, the registered endpoints and the `--attach` names; kept for
    /// `status`.
    pub fn select(&mut self, attach: &[String], policy: &Policy, registry: &Registry) {
        let mut selectors: Vec<String> = attach.to_vec();
        for service in &policy.services {
            selectors.extend(service.interfaces.iter().cloned());
        }
        selectors.extend(
            registry
                .iter()
                .map(|registration| registration.interface.clone()),
        );
        selectors.sort();
        selectors.dedup();
        if selectors != self.selectors {
            if let Err(error) = enforcement::write_selectors(&self.selectors_file, &selectors) {
                tracing::warn!(
                    "writing {}: {error}; `status` cannot tell missing interfaces",
                    self.selectors_file.display()
                );
            }
            self.selectors = selectors;
        }
    }

    /// The interfaces present now that a selector selects, by name.
    fn wanted(&self, present: &BTreeMap<String, u32>) -> BTreeMap<String, u32> {
        let selectors: Vec<InterfaceSelector> = self
            .selectors
            .iter()
            .filter_map(|entry| InterfaceSelector::new(entry).ok())
            .collect();
        present
            .iter()
            .filter(|(name, _)| selectors.iter().any(|selector| selector.selects(name)))
            .map(|(name, ifindex)| (name.clone(), *ifindex))
            .collect()
    }

    /// Attaches to every wanted interface that is not attached at its current index; forgets
    /// the links of interfaces that went, were recreated or are no longer wanted. Failures to
    /// attach become gaps (see [`Self::overdue_gaps`]).
    pub fn reconcile(&mut self, datapath: &mut Datapath) {
        let present = host::interfaces();
        let wanted = self.wanted(&present);
        for (name, ifindex) in self.attached.clone() {
            if wanted.get(&name) != Some(&ifindex) {
                datapath.detach(&name);
                self.attached.remove(&name);
                let why = if !present.contains_key(&name) {
                    "the interface went"
                } else if wanted.contains_key(&name) {
                    "the interface was recreated"
                } else {
                    "the policy no longer names it"
                };
                tracing::info!(interface = name, "links forgotten: {why}");
            }
        }
        self.gaps.retain(|name, _| wanted.contains_key(name));
        for (name, ifindex) in wanted {
            if self.attached.contains_key(&name) {
                continue;
            }
            match self.attach(datapath, &name) {
                Ok(()) => {
                    self.attached.insert(name.clone(), ifindex);
                    self.gaps.remove(&name);
                }
                Err(error) => {
                    tracing::error!(interface = name, "cannot enforce: {error}");
                    self.gaps.entry(name.clone()).or_insert(Gap {
                        interface: name,
                        since: Instant::now(),
                        error: error.to_string(),
                        reported: false,
                    });
                }
            }
        }
    }

    fn attach(&self, datapath: &mut Datapath, name: &str) -> Result<(), LoadError> {
        let ingress = datapath.attach(name, self.ingress)?;
        tracing::info!(
            interface = name,
            ingress = ingress.program(),
            egress = crate::datapath::loader::TC_EGRESS_PROGRAM,
            "attached"
        );
        Ok(())
    }

    /// Attaches to the wanted interfaces at start, where a failure is the start's.
    pub fn attach_at_start(&mut self, datapath: &mut Datapath) -> Result<(), LoadError> {
        let present = host::interfaces();
        for (name, ifindex) in self.wanted(&present) {
            self.attach(datapath, &name)?;
            self.attached.insert(name, ifindex);
        }
        let keep: BTreeSet<String> = self.attached.keys().cloned().collect();
        datapath.detach_others(&keep);
        Ok(())
    }

    /// Whether `interface` runs the programs (as far as this controller attached them).
    pub fn is_enforced(&self, interface: &str) -> bool {
        self.attached
            .get(interface)
            .is_some_and(|ifindex| host::interface_index(interface) == Some(*ifindex))
    }

    /// Why `interface` could not be attached, if it could not.
    pub fn gap(&self, interface: &str) -> Option<&Gap> {
        self.gaps.get(interface)
    }

    /// Whether some wanted interface is not enforced yet (the controller retries it).
    pub fn has_gaps(&self) -> bool {
        !self.gaps.is_empty()
    }

    /// The gaps open for longer than [`GAP_GRACE`] and not reported yet; each is returned once.
    pub fn overdue_gaps(&mut self, now: Instant) -> Vec<&Gap> {
        self.gaps
            .values_mut()
            .filter(|gap| !gap.reported && now.duration_since(gap.since) >= GAP_GRACE)
            .map(|gap| {
                gap.reported = true;
                &*gap
            })
            .collect()
    }

    /// How many wanted interfaces are unenforced now.
    pub fn unenforced(&self) -> usize {
        self.gaps.len()
    }
}

/// The `enforcement_gap` finding for a gap: severity High, about this host.
pub fn gap_finding(gap: &Gap, host: &str) -> Finding {
    let now = SystemTime::now();
    let open_for = gap.since.elapsed();
    Finding {
        detector: Detector::EnforcementGap,
        src: Party {
            name: host.to_owned(),
            ip: None,
        },
        dst: None,
        protocol: None,
        port: None,
        rule: None,
        count: 1,
        start: now.checked_sub(open_for).unwrap_or(now),
        end: now,
        message: format!(
            "interface {} is named by the policy and exists, but enforcer's programs could not be attached for {:.1} s: its traffic passes unjudged ({})",
            gap.interface,
            open_for.as_secs_f64(),
            gap.error
        ),
        details: serde_json::json!({ "interface": gap.interface, "error": gap.error }),
    }
}
