//! Rule ids are unique in a policy. A reload of a 100 000-rule policy that changed one rule
//! checks the rules it built and leaves the others alone: they were checked when they were
//! built, against every rule of that policy, and the rule each id belongs to is kept here
//! between loads.
//!
//! A rule carries the number of the last load that took it ([`Seen`]): a rule the index names
//! for an id is in the policy being loaded exactly when its number is this load's. Rules of
//! parts a reload dropped keep an older number, or are gone, so an id they held is free again.

use std::{
    collections::{HashMap, hash_map::Entry},
    hash::BuildHasher as _,
    sync::{
        Arc, Weak,
        atomic::{AtomicU32, Ordering},
    },
};

use super::Rule;

/// The number of the last load that took a rule into its policy; 0 for none yet. Not part of
/// what a rule means: rules compare equal whatever their numbers, and a copy starts at 0.
#[derive(Debug, Default)]
pub struct Seen(AtomicU32);

impl Seen {
    /// Marks the rule as taken by load `load`; says whether an earlier load took it. (Loads
    /// run one at a time: a load and a store, not a locked swap, 100 000 times a reload.)
    fn take(&self, load: u32) -> bool {
        let before = self.0.load(Ordering::Relaxed);
        self.0.store(load, Ordering::Relaxed);
        before != 0
    }

    fn by(&self, load: u32) -> bool {
        self.0.load(Ordering::Relaxed) == load
    }
}

impl Clone for Seen {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for Seen {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// A rule id used again: the rule that uses it again (its index in policy order), and the rule
/// that used it first.
#[derive(Debug)]
pub(super) struct Repeated {
    pub(super) again: usize,
    pub(super) first: Arc<Rule>,
}

/// The rules that hold the ids, by a hash of the id.
#[derive(Default)]
pub(super) struct RuleIds {
    load: u32,
    holders: HashMap<u64, Weak<Rule>, foldhash::fast::RandomState>,
    /// The other holders of a hash that an id held in `holders` has too (rare: 64 bits).
    sharing: HashMap<u64, Vec<Weak<Rule>>, foldhash::fast::RandomState>,
    /// Whether `holders` names the holder of every id of the rules the last load took.
    complete: bool,
}

impl RuleIds {
    /// Starts the next load; returns its number.
    pub(super) fn begin(&mut self) -> u32 {
        self.load = self.load.wrapping_add(1).max(1);
        self.load
    }

    /// Marks `rule` as taken by this load; says whether its id needs checking (a rule no earlier
    /// load took, or any rule while the index is not complete).
    pub(super) fn take(&self, rule: &Rule) -> bool {
        !rule.seen.take(self.load) || !self.complete
    }

    /// The ids `rules` (this load's, in policy order) use twice, given the indexes of the rules
    /// whose ids need checking, `unchecked`; records who holds each id. Every use after the
    /// first is reported, as a check of all the rules would report it.
    pub(super) fn repeated(&mut self, rules: &[Arc<Rule>], unchecked: &[usize]) -> Vec<Repeated> {
        // Past twice as many ids as rules, most name rules long gone: start again.
        let crowded = self.holders.len() + self.sharing.len() > 2 * rules.len() + 1024;
        if !self.complete || crowded || unchecked.len() > rules.len() / 2 {
            return self.check_all(rules);
        }
        for &index in unchecked {
            let rule = &rules[index];
            if self
                .holder(&rule.id)
                .is_some_and(|held| !Arc::ptr_eq(&held, rule))
            {
                // Which use comes first is a question of policy order: a check of every rule
                // answers it.
                return self.check_all(rules);
            }
            self.hold(rule);
        }
        Vec::new()
    }

    /// Checks every rule, in policy order: the first use of an id holds it.
    fn check_all(&mut self, rules: &[Arc<Rule>]) -> Vec<Repeated> {
        self.holders.clear();
        self.sharing.clear();
        let mut repeated = Vec::new();
        for (again, rule) in rules.iter().enumerate() {
            match self.holder(&rule.id) {
                Some(first) => repeated.push(Repeated { again, first }),
                None => self.hold(rule),
            }
        }
        // A rule that repeats an id holds nothing: should it stay in the policy (built, or
        // moved), the next load must find it again.
        self.complete = repeated.is_empty();
        repeated
    }

    /// The rule of this load that holds `id`, if any.
    fn holder(&self, id: &str) -> Option<Arc<Rule>> {
        let hash = hash(id);
        self.holders
            .get(&hash)
            .into_iter()
            .chain(self.sharing.get(&hash).into_iter().flatten())
            .filter_map(Weak::upgrade)
            .find(|rule| rule.seen.by(self.load) && *rule.id == *id)
    }

    /// Records `rule` as the holder of its id, in place of rules no longer in the policy.
    fn hold(&mut self, rule: &Arc<Rule>) {
        let load = self.load;
        let current = |held: &Weak<Rule>| held.upgrade().is_some_and(|held| held.seen.by(load));
        let holder = Arc::downgrade(rule);
        match self.holders.entry(hash(&rule.id)) {
            Entry::Occupied(entry) if current(entry.get()) => {
                let sharing = self.sharing.entry(*entry.key()).or_default();
                sharing.retain(current);
                sharing.push(holder);
            }
            Entry::Occupied(mut entry) => {
                entry.insert(holder);
            }
            Entry::Vacant(entry) => {
                entry.insert(holder);
            }
        }
    }
}

/// The hash ids are held under: the same in every process and every run. Tests keep 4 bits of
/// it, so that the policy tests' reloads (see `policy::tests`) share hashes between ids all the
/// time, as 64 bits almost never do.
fn hash(id: &str) -> u64 {
    let hash = foldhash::fast::FixedState::with_seed(0).hash_one(id);
    if cfg!(test) { hash & 0xf } else { hash }
}
