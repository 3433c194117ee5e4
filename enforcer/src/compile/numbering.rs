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
    if let Some(previous) = previous {
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
        let new_middle = same_start..rules.len() - same_end;
        let old_middle = &old[same_start..old.len() - same_end];
        for (index, (_, number)) in (0..same_start)
            .zip(&old)
            .chain((rules.len() - same_end..rules.len()).zip(&old[old.len() - same_end..]))
        {
            numbers[index] = Some(*number);
        }
        let mut by_info: HashMap<&RuleInfo, u32> = old_middle.iter().copied().collect();
        for index in new_middle.clone() {
            if let Some(number) = by_info.remove(&rules[index]) {
                numbers[index] = Some(number);
            }
        }
        let mut by_meaning: HashMap<Meaning<'_>, VecDeque<u32>> = HashMap::new();
        for (was, number) in old_middle {
            if by_info.contains_key(was) {
                by_meaning
                    .entry(meaning(was))
                    .or_default()
                    .push_back(*number);
            }
        }
        for index in new_middle {
            if numbers[index].is_none()
                && let Some(number) = by_meaning
                    .get_mut(&meaning(&rules[index]))
                    .and_then(VecDeque::pop_front)
            {
                numbers[index] = Some(number);
            }
        }
    }
    let taken: HashSet<u32> = numbers.iter().flatten().copied().collect();
    let mut next_free = rule::FIRST_USER;
    numbers
        .into_iter()
        .map(|number| {
            number.unwrap_or_else(|| {
                while taken.contains(&next_free) {
                    next_free += 1;
                }
                next_free += 1;
                next_free - 1
            })
        })
        .collect()
}
