//! Turning the datapath's ring-buffer records into flow records with names, and noticing any
//! record the kernel could not deliver.

pub mod names_file;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use enforcer_common::{
    addr::{family, from_key_bytes},
    event::{FlowEvent, flags, hook},
    verdict::{Reason, Verdict},
};
use serde::Serialize;

use crate::{
    compile::{Compiled, Names, protocol_name},
    policy::Detection,
};

/// One end of a flow, with the names the policy gives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowEnd {
    pub ip: IpAddr,
    pub port: u16,
    pub identity: u32,
    /// Service name, `world`, `host`, or a CIDR.
    pub name: String,
}

/// A flow event as the controller reports it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowRecord {
    /// When the datapath saw the packet.
    #[serde(with = "epoch_millis")]
    pub time: SystemTime,
    #[serde(serialize_with = "verdict_name")]
    pub verdict: Verdict,
    #[serde(serialize_with = "reason_name")]
    pub reason: Reason,
    /// Id of the deciding rule (`default-deny` and friends included).
    pub rule: String,
    pub src: FlowEnd,
    pub dst: FlowEnd,
    /// Identity of the source address alone (differs from `src.identity` on spoofs).
    pub address_identity: u32,
    pub protocol: String,
    pub protocol_number: u8,
    pub ip_version: u8,
    pub generation: u32,
    pub interface: String,
    pub hook: &'static str,
    /// Packets this record stands for (kernel de-duplication of denials).
    pub count: u32,
    /// A tracked flow judged again after a policy change.
    pub rejudged: bool,
    /// Sent while the ring buffer was filling up: `count` covers every destination the source
    /// was refused for this reason; `dst` is one of them.
    pub aggregated: bool,
    pub cgroup_id: u64,
    pub cpu: u32,
    pub sequence: u64,
}

impl FlowRecord {
    /// Whether the flow's protocol has ports (TCP, UDP).
    pub fn has_ports(&self) -> bool {
        self.protocol == "tcp" || self.protocol == "udp"
    }

    /// The destination port, or 0 for a protocol without ports: with the protocol, the service
    /// the flow reached.
    pub fn service_port(&self) -> u16 {
        if self.has_ports() { self.dst.port } else { 0 }
    }
}

fn reason_name<S: serde::Serializer>(reason: &Reason, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(reason.as_str())
}

fn verdict_name<S: serde::Serializer>(verdict: &Verdict, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(verdict.as_str())
}

mod epoch_millis {
    use std::time::{SystemTime, UNIX_EPOCH};

    pub fn serialize<S: serde::Serializer>(
        time: &SystemTime,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(
            time.duration_since(UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_millis() as u64),
        )
    }
}

/// Parses one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: length checked; FlowEvent is plain integers (aya::Pod), valid for any bytes.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) })
}

/// Detects records lost between the kernel and us from per-CPU sequence gaps.
#[derive(Debug, Default)]
pub struct SequenceTracker {
    last: HashMap<u32, u64>,
    lost: u64,
}

impl SequenceTracker {
    /// Notes a record; returns how many records of this CPU went missing just before it.
    pub fn observe(&mut self, cpu: u32, seq: u64) -> u64 {
        let missing = match self.last.get(&cpu) {
            Some(last) if seq > last + 1 => seq - last - 1,
            _ => 0,
        };
        let last = self.last.entry(cpu).or_insert(seq);
        *last = (*last).max(seq);
        self.lost += missing;
        missing
    }

    /// Records lost since tracking started.
    pub fn lost(&self) -> u64 {
        self.lost
    }
}

/// Records lost and not reported yet. The kernel counts every record its ring buffer could not
/// take; sequence gaps show the same losses, but only once a later record arrives. Losses are
/// reported from the kernel's count, once per interval as one record with the total: a flood
/// that overflows the ring produces one report a second, not one per gap; a loss at the tail
/// (no later record) or while no controller ran (the count it last reported is kept beside
/// the pins) is reported too. Gaps stand in if the kernel's count cannot be read.
#[derive(Debug, Default)]
pub struct LossAccount {
    /// The kernel's count as of the last report.
    reported: u64,
    /// Losses shown by gaps since the last report.
    gaps: u64,
}

impl LossAccount {
    /// Starts from the kernel's count last reported (by this controller or an earlier one).
    pub fn resume(reported: u64) -> Self {
        Self { reported, gaps: 0 }
    }

    pub fn gap(&mut self, lost: u64) {
        self.gaps += lost;
    }

    /// The records to report lost now, given the kernel's count (if it could be read); 0 when
    /// nothing was lost since the last report.
    pub fn settle(&mut self, kernel_total: Option<u64>) -> u64 {
        let lost = match kernel_total {
            // A count below the one reported: the maps were created anew.
            Some(total) if total < self.reported => total,
            Some(total) => total - self.reported,
            None => self.gaps,
        };
        self.reported = kernel_total.unwrap_or(self.reported + lost);
        self.gaps = 0;
        lost
    }

    /// The kernel's count as of the last report, to be kept for a successor.
    pub fn reported(&self) -> u64 {
        self.reported
    }
}

/// Converts `CLOCK_MONOTONIC` nanoseconds (what `bpf_ktime_get_ns` returns) to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Wall-clock time at monotonic zero.
    boot: SystemTime,
}

impl Clock {
    pub fn now() -> Self {
        let monotonic = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|now| Duration::new(now.tv_sec() as u64, now.tv_nsec() as u32))
            .unwrap_or_default();
        Self {
            boot: SystemTime::now() - monotonic,
        }
    }

    pub fn wall(&self, monotonic_ns: u64) -> SystemTime {
        self.boot + Duration::from_nanos(monotonic_ns)
    }
}

/// The names events may refer to, by generation (a record can arrive after the generation
/// that judged it was replaced), and the detectors' tuning of the latest generation.
#[derive(Clone, Default)]
pub struct Generations {
    by_generation: BTreeMap<u32, (Arc<Names>, Detection)>,
}

impl Generations {
    const KEEP: usize = 8;

    /// Adds `generation`'s names. Done before the kernel switches to it, so that its first
    /// records are named; [`remove`](Self::remove) takes it back if the switch fails.
    pub fn insert(&mut self, generation: u32, compiled: &Compiled) {
        self.by_generation.insert(
            generation,
            (Arc::clone(&compiled.names), compiled.detection.clone()),
        );
        while self.by_generation.len() > Self::KEEP {
            self.by_generation.pop_first();
        }
    }

    /// Adds the names of a generation another controller installed (see
    /// [`crate::events::names_file`]); its detector tuning is not known, and not needed: this
    /// controller installs its own generation next.
    pub fn adopt(&mut self, generation: u32, names: Arc<Names>) {
        self.by_generation
            .insert(generation, (names, Detection::default()));
    }

    pub fn remove(&mut self, generation: u32) {
        self.by_generation.remove(&generation);
    }

    /// The names of `generation`, if it is one of those kept.
    pub fn get(&self, generation: u32) -> Option<&Arc<Names>> {
        self.by_generation.get(&generation).map(|(names, _)| names)
    }

    pub fn latest(&self) -> Option<&Arc<Names>> {
        self.by_generation
            .last_key_value()
            .map(|(_, (names, _))| names)
    }

    pub fn latest_generation(&self) -> Option<u32> {
        self.by_generation
            .last_key_value()
            .map(|(generation, _)| *generation)
    }

    /// The detectors' tuning of the latest generation.
    pub fn detection(&self) -> Detection {
        self.by_generation
            .last_key_value()
            .map(|(_, (_, detection))| detection.clone())
            .unwrap_or_default()
    }
}

/// Gives an event its names and wall-clock time; `None` for a verdict or reason code this build
/// does not know (a datapath from another build).
pub fn describe(
    event: &FlowEvent,
    generations: &Generations,
    clock: &Clock,
    interface: impl Fn(u32) -> String,
) -> Option<FlowRecord> {
    let verdict = Verdict::from_code(event.verdict)?;
    let reason = Reason::from_code(event.reason)?;
    // A generation this controller neither installed nor adopted with its names (see
    // `names_file`), or one older than those kept: identities keep their numbers from one
    // generation to the next, so the latest names them; rule numbers may not, so a user rule
    // shows as its number.
    let names = generations.get(event.generation);
    let name = |identity: u32| match names.or_else(|| generations.latest()) {
        Some(names) => names.identity_name(identity),
        None => format!("identity-{identity}"),
    };
    let rule = match names {
        Some(names) => names.rule_id(event.rule),
        None => Names::default().rule_id(event.rule),
    };
    Some(FlowRecord {
        time: clock.wall(event.timestamp_ns),
        verdict,
        reason,
        rule,
        src: FlowEnd {
            ip: from_key_bytes(event.src_addr),
            port: event.src_port,
            identity: event.src_identity,
            name: name(event.src_identity),
        },
        dst: FlowEnd {
            ip: from_key_bytes(event.dst_addr),
            port: event.dst_port,
            identity: event.dst_identity,
            name: name(event.dst_identity),
        },
        address_identity: event.addr_identity,
        protocol: protocol_name(event.proto),
        protocol_number: event.proto,
        ip_version: if event.family == family::INET6 { 6 } else { 4 },
        generation: event.generation,
        interface: interface(event.ifindex),
        hook: match event.hook {
            hook::TC_EGRESS => "tc-egress",
            hook::TC_INGRESS => "tc-ingress",
            hook::SOCKET_INGRESS => "socket-ingress",
            _ => "xdp-ingress",
        },
        count: event.count.max(1),
        rejudged: event.flags & flags::REJUDGED != 0,
        aggregated: event.flags & flags::AGGREGATED != 0,
        cgroup_id: event.cgroup_id,
        cpu: event.cpu,
        sequence: event.seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_are_reported_once_from_the_kernels_count_whatever_the_gaps_showed() {
        let mut account = LossAccount::resume(10);
        assert_eq!(account.settle(Some(10)), 0, "nothing new");
        account.gap(3);
        account.gap(4);
        assert_eq!(account.settle(Some(17)), 7, "the gaps' 7, once, not twice");
        assert_eq!(
            account.settle(Some(20)),
            3,
            "lost at the tail: no later record showed a gap"
        );
        account.gap(2);
        assert_eq!(
            account.settle(None),
            2,
            "no kernel count: the gaps stand in"
        );
        assert_eq!(account.reported(), 22);
        assert_eq!(account.settle(Some(5)), 5, "maps created anew");
    }

    #[test]
    fn gaps_in_a_cpus_sequence_are_counted_as_lost() {
        let mut tracker = SequenceTracker::default();
        assert_eq!(
            tracker.observe(0, 10),
            0,
            "the first record only sets the baseline"
        );
        assert_eq!(tracker.observe(0, 11), 0);
        assert_eq!(tracker.observe(1, 3), 0);
        assert_eq!(tracker.observe(0, 15), 3);
        assert_eq!(tracker.observe(1, 4), 0);
        assert_eq!(tracker.lost(), 3);
    }

    #[test]
    fn events_name_rules_by_their_own_generation_and_identities_by_any() {
        let policy = crate::policy::parse_sources(vec![(
            std::path::PathBuf::from("p.toml"),
            "[[service]]\nname = \"a\"\naddresses = [\"10.0.0.1/32\"]\n\
             [[service]]\nname = \"b\"\naddresses = [\"10.0.0.2/32\"]\n\
             [[allow]]\nfrom = \"a\"\nto = \"b\"\nports = [\"80/tcp\"]\nid = \"web\"\n"
                .to_owned(),
        )])
        .unwrap();
        let compiled =
            crate::compile::compile(&policy, &crate::compile::HostView::default(), None).unwrap();
        let mut generations = Generations::default();
        generations.insert(5, &compiled);
        let a = crate::policy::identity::of_service_name("a");
        let b = crate::policy::identity::of_service_name("b");
        let web = compiled.rule_order[0];
        let record = |generation: u32, rule: u32| {
            let event = FlowEvent {
                generation,
                rule,
                src_identity: a,
                dst_identity: b,
                verdict: enforcer_common::verdict::ALLOW,
                reason: enforcer_common::verdict::reason::POLICY_ALLOW,
                ..Default::default()
            };
            describe(&event, &generations, &Clock::now(), |_| String::new()).unwrap()
        };
        let current = record(5, web);
        assert_eq!(
            (
                current.rule.as_str(),
                current.src.name.as_str(),
                current.dst.name.as_str()
            ),
            ("web", "a", "b")
        );
        // Generation 4 was installed by a controller before a restart: its rule numbers may
        // stand for other rules, so none is named after this generation's.
        let adopted = record(4, web);
        assert_eq!(adopted.rule, format!("rule-{web}"));
        assert_eq!(
            (adopted.src.name.as_str(), adopted.dst.name.as_str()),
            ("a", "b")
        );
        assert_eq!(
            record(4, enforcer_common::policy::rule::DEFAULT_DENY).rule,
            "default-deny"
        );
    }

    #[test]
    fn an_event_with_a_code_this_build_does_not_know_is_not_described() {
        let generations = Generations::default();
        let event = |verdict: u8, reason: u8| FlowEvent {
            verdict,
            reason,
            ..Default::default()
        };
        let describe =
            |event: FlowEvent| describe(&event, &generations, &Clock::now(), |_| String::new());
        let known = describe(event(
            enforcer_common::verdict::DENY,
            enforcer_common::verdict::reason::SPOOFED,
        ));
        assert_eq!(
            known.map(|record| record.reason),
            Some(enforcer_common::verdict::Reason::Spoofed)
        );
        assert!(describe(event(enforcer_common::verdict::DENY, 0)).is_none());
        assert!(describe(event(9, enforcer_common::verdict::reason::SPOOFED)).is_none());
    }

    #[test]
    fn short_records_are_rejected() {
        assert!(decode(&[0u8; 10]).is_none());
        let event = FlowEvent {
            seq: 7,
            count: 3,
            ..Default::default()
        };
        // SAFETY: FlowEvent is plain old data.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&event as *const FlowEvent).cast::<u8>(),
                size_of::<FlowEvent>(),
            )
        };
        assert_eq!(decode(bytes), Some(event));
    }
}
