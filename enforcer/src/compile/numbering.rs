//! Rule numbers that stay put across policy changes.

use std::collections::{HashMap, HashSet, VecDeque};

use enforcer_common::policy::rule;

use super::{Compiled, RuleInfo};
use crate::policy::RuleKind;

/// The number of each of `rules` (in policy order). A rule the previous generation had keeps
/// its number: those before and after the changed part of the policy by position, those in it
/// by same id and meaning, then by same meaning (a rule whose default id moved with its line).
/// The rest take the lowest free numbers. So adding or removing a rule leaves every other
/// rule's kernel entries as they are.
pub(super) fn number_rules(rules: &[RuleInfo], previous: Option<&Compiled>) -> Vec<u32> {
    let Some(previous) = previous else {
        return number_changed(rules, &[], None);
    };
    let old: Vec<(&RuleInfo, u32)> = previous
        .rule_order
        .iter()
        .filter_map(|number| Some((&**previous.names.rules.get(number)?, *number)))
        .collect();
    let shorter = rules.len().min(old.len());
    let same_start = rules
        .iter()
        .zip(&old)
        .take_while(|(rule, (was, _))| *rule == *was)
        .count();
    let same_end = rules[same_start..]
        .iter()
        .rev()
        .zip(old[same_start..].iter().rev())
        .take(shorter - same_start)
        .take_while(|(rule, (was, _))| *rule == *was)
        .count();
    let middle = number_changed(
        &rules[same_start..rules.len() - same_end],
        &previous.rule_order[same_start..old.len() - same_end],
        Some(previous),
    );
    let kept = |range: std::ops::Range<usize>| previous.rule_order[range].iter().copied();
    kept(0..same_start)
        .chain(middle)
        .chain(kept(old.len() - same_end..old.len()))
        .collect()
}

/// The numbers of `rules`, which replace the rules numbered `old` of `previous` (whose other
/// rules keep theirs): by same id and meaning, then by same meaning, then the lowest numbers
/// that are free.
pub(super) fn number_changed(
    rules: &[RuleInfo],
    old: &[u32],
    previous: Option<&Compiled>,
) -> Vec<u32> {
    type Meaning<'a> = (RuleKind, &'a str, &'a str, &'a str, Option<u32>);
    fn meaning(info: &RuleInfo) -> Meaning<'_> {
        (
            info.kind,
            &info.from,
            &info.to,
            &info.ports,
            info.max_new_per_sec,
        )
    }
    let mut numbers: Vec<Option<u32>> = vec![None; rules.len()];
    let old: Vec<(&RuleInfo, u32)> = match previous {
        Some(previous) => old
            .iter()
            .filter_map(|number| Some((&**previous.names.rules.get(number)?, *number)))
            .collect(),
        None => Vec::new(),
    };
    let mut by_info: HashMap<&RuleInfo, u32> = old.iter().copied().collect();
    for (index, rule) in rules.iter().enumerate() {
        if let Some(number) = by_info.remove(rule) {
            numbers[index] = Some(number);
        }
    }
    let mut by_meaning: HashMap<Meaning<'_>, VecDeque<u32>> = HashMap::new();
    for (was, number) in &old {
        if by_info.contains_key(was) {
            by_meaning
                .entry(meaning(was))
                .or_default()
                .push_back(*number);
        }
    }
    for (index, rule) in rules.iter().enumerate() {
        if numbers[index].is_none()
            && let Some(number) = by_meaning
                .get_mut(&meaning(rule))
                .and_then(VecDeque::pop_front)
        {
            numbers[index] = Some(number);
        }
    }
    // Free: numbers `previous` did not use, and those of its replaced rules no rule took.
    let reused: HashSet<u32> = numbers.iter().flatten().copied().collect();
    let freed: HashSet<u32> = old
        .iter()
        .map(|(_, number)| *number)
        .filter(|number| !reused.contains(number))
        .collect();
    let mut used = previous
        .map(|previous| previous.names.rules.range(rule::FIRST_USER..))
        .into_iter()
        .flatten()
        .map(|(number, _)| *number)
        .peekable();
    let mut next_free = rule::FIRST_USER;
    numbers
        .into_iter()
        .map(|number| {
            number.unwrap_or_else(|| {
                loop {
                    while used.next_if(|number| *number < next_free).is_some() {}
                    let taken = (used.peek() == Some(&next_free) && !freed.contains(&next_free))
                        || reused.contains(&next_free);
                    if !taken {
                        break;
                    }
                    next_free += 1;
                }
                next_free += 1;
                next_free - 1
            })
        })
        .collect()
}
