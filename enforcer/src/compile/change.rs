//! Compiling a change to the policy in force. When only rules changed, and not many, the
//! entries of the identity pairs those rules touch are written again and everything else is
//! taken from the generation in force: a one-rule change to a 100 000-rule policy compiles a
//! handful of entries, not 100 000 rules. The result is the one [`compile`] gives.

use std::{collections::BTreeSet, ops::Range, sync::Arc};

use super::{
    CompileError, Compiled, HostView, Names, RuleInfo, SharedNames, compile,
    identities::{Identities, MANY},
    numbering::number_changed,
    rules::rewrite_pairs,
};
use crate::policy::{Mode, Peer, Policy, Rule, Service};

/// The policy in force, the host it was compiled for, and what it compiled to.
#[derive(Clone, Copy)]
pub struct Before<'a> {
    pub policy: &'a Policy,
    pub host: &'a HostView,
    pub compiled: &'a Compiled,
}

/// Above this many rules replaced (old and new together), the whole policy is compiled.
const MOST_CHANGED: usize = 1024;

/// Compiles `policy` for `host`, after `before`: what changed only, when that is some rules.
pub fn compile_change(
    policy: &Policy,
    host: &HostView,
    before: Before<'_>,
) -> Result<Compiled, CompileError> {
    match changed_rules(policy, host, &before) {
        Some(changed) => compile_changed(policy, before, &changed),
        None => compile(policy, host, Some(before.compiled)),
    }
}

/// Which rules a change replaced: `old` of the policy before by `new` of this one; every other
/// rule is the same, in the same order.
struct Changed {
    old: Range<usize>,
    new: Range<usize>,
}

/// The rules that changed, when nothing else did (services, settings, this host), none of them
/// names a CIDR (those are identities of their own), and they are few.
fn changed_rules(policy: &Policy, host: &HostView, before: &Before<'_>) -> Option<Changed> {
    let was = before.policy;
    if host != before.host
        || policy.mode != was.mode
        || policy.manage_host != was.manage_host
        || !services_alike(&policy.services, &was.services)
    {
        return None;
    }
    let same =
        |(now, then): (&Arc<Rule>, &Arc<Rule>)| Arc::ptr_eq(now, then) || compile_alike(now, then);
    let same_start = policy
        .rules
        .iter()
        .zip(&was.rules)
        .take_while(|&pair| same(pair))
        .count();
    let shorter = policy.rules.len().min(was.rules.len());
    let same_end = policy.rules[same_start..]
        .iter()
        .rev()
        .zip(was.rules[same_start..].iter().rev())
        .take(shorter - same_start)
        .take_while(|&pair| same(pair))
        .count();
    let changed = Changed {
        old: same_start..was.rules.len() - same_end,
        new: same_start..policy.rules.len() - same_end,
    };
    let names_a_cidr =
        |rule: &Arc<Rule>| matches!(rule.from, Peer::Cidr(_)) || matches!(rule.to, Peer::Cidr(_));
    let few = changed.old.len() + changed.new.len() <= MOST_CHANGED;
    let replaced = was.rules[changed.old.clone()]
        .iter()
        .chain(&policy.rules[changed.new.clone()]);
    (few && !replaced.clone().any(names_a_cidr)).then_some(changed)
}

/// Whether two lists of services compile alike: the same but for where they are written.
fn services_alike(now: &[Service], then: &[Service]) -> bool {
    let alike = |now: &Service, then: &Service| {
        let Service {
            name,
            identity,
            identity_declared,
            cgroups,
            interfaces,
            interface_selectors: _,
            addresses,
            mode,
            origin: _,
        } = now;
        *name == then.name
            && *identity == then.identity
            && *identity_declared == then.identity_declared
            && *cgroups == then.cgroups
            && *interfaces == then.interfaces
            && *addresses == then.addresses
            && *mode == then.mode
    };
    now.len() == then.len() && now.iter().zip(then).all(|(now, then)| alike(now, then))
}

/// Whether two rules compile to the same entries and names (they may sit on other lines).
fn compile_alike(a: &Rule, b: &Rule) -> bool {
    a.kind == b.kind
        && a.id == b.id
        && a.from == b.from
        && a.to == b.to
        && a.ports == b.ports
        && a.max_new_per_sec == b.max_new_per_sec
}

fn compile_changed(
    policy: &Policy,
    before: Before<'_>,
    changed: &Changed,
) -> Result<Compiled, CompileError> {
    let previous = before.compiled;
    // Same services, same host, and no CIDR among the rules replaced (see `changed_rules`).
    let identities = Arc::clone(&previous.identities);
    let mut shared = SharedNames::of(policy);
    let infos: Vec<RuleInfo> = policy.rules[changed.new.clone()]
        .iter()
        .map(|rule| RuleInfo::of(&mut shared, rule))
        .collect();
    let replaced = &previous.rule_order[changed.old.clone()];
    let numbers = number_changed(&infos, replaced, Some(previous));
    let mut rule_order = Vec::with_capacity(policy.rules.len());
    rule_order.extend_from_slice(&previous.rule_order[..changed.old.start]);
    rule_order.extend_from_slice(&numbers);
    rule_order.extend_from_slice(&previous.rule_order[changed.old.end..]);
    let mut rule_sources = Vec::with_capacity(policy.rules.len());
    rule_sources.extend_from_slice(&previous.rule_sources[..changed.old.start]);
    rule_sources.extend(
        policy.rules[changed.new.clone()]
            .iter()
            .map(|rule| identities.single(&rule.from)),
    );
    rule_sources.extend_from_slice(&previous.rule_sources[changed.old.end..]);

    let pairs = pairs_of(&before.policy.rules[changed.old.clone()], &identities)
        .into_iter()
        .chain(pairs_of(&policy.rules[changed.new.clone()], &identities))
        .collect();
    let mut tables = (*previous.tables).clone();
    let touching = rules_touching(policy, &identities, &rule_sources, &pairs);
    rewrite_pairs(
        policy,
        &identities,
        &rule_order,
        &pairs,
        touching.into_iter(),
        &mut tables,
    )?;

    let mut names = previous.names.rules.clone();
    for number in replaced {
        names.remove(number);
    }
    for (info, number) in infos.into_iter().zip(numbers) {
        let shared = previous
            .names
            .rules
            .get(&number)
            .filter(|was| ***was == info);
        names.insert(number, shared.map_or_else(|| Arc::new(info), Arc::clone));
    }
    Ok(Compiled {
        hash: policy.hash,
        audit: policy.mode == Mode::Audit,
        tables: Arc::new(tables),
        names: Arc::new(Names {
            rules: names,
            identities: identities.names.clone(),
        }),
        rule_order,
        rule_sources,
        identities,
        warnings: previous.warnings.clone(),
        detection: policy.detection.clone(),
    })
}

/// The identity pairs `rules` name.
fn pairs_of(rules: &[Arc<Rule>], identities: &Identities) -> BTreeSet<(u32, u32)> {
    let (mut sources, mut destinations) = (Vec::new(), Vec::new());
    let mut pairs = BTreeSet::new();
    for rule in rules {
        identities.expand(&rule.from, &mut sources);
        identities.expand(&rule.to, &mut destinations);
        for src in &sources {
            pairs.extend(destinations.iter().map(|dst| (*src, *dst)));
        }
    }
    pairs
}

/// The indexes of the rules that name one of `pairs`, in policy order. Only rules whose source
/// is one of the pairs' (or may be: `MANY`) are looked at: a pass over `rule_sources`, not over
/// 100 000 rules.
fn rules_touching(
    policy: &Policy,
    identities: &Identities,
    rule_sources: &[u32],
    pairs: &BTreeSet<(u32, u32)>,
) -> Vec<usize> {
    let sources: BTreeSet<u32> = pairs.iter().map(|(src, _)| *src).collect();
    let (mut from, mut to) = (Vec::new(), Vec::new());
    (0..policy.rules.len())
        .filter(|&index| {
            let source = rule_sources[index];
            if source != MANY && !sources.contains(&source) {
                return false;
            }
            let rule = &policy.rules[index];
            identities.expand(&rule.from, &mut from);
            if !from.iter().any(|src| sources.contains(src)) {
                return false;
            }
            identities.expand(&rule.to, &mut to);
            from.iter()
                .any(|src| to.iter().any(|dst| pairs.contains(&(*src, *dst))))
        })
        .collect()
}
