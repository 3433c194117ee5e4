//! What the running kernel gives the datapath, and whether it is enough.
//!
//! Probed where the kernel can be asked (helpers and map types, by loading a tiny program or
//! creating a tiny map, as libbpf does), by release otherwise (TCX links, which have no probe).
//! Each is a fact the datapath relies on; what is missing either has a fallback (netlink TC
//! filters for TCX, `bpf_ktime_get_ns` for the coarse clock) or stops `run` at start with one
//! line that names it.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported},
    util::KernelVersion,
};

/// The oldest kernel the kernel matrix proves (`cargo xtask test`): Debian 11's 5.10.
pub const MINIMUM: (u8, u8) = (5, 10);

/// The kernel facts the datapath depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Features {
    /// The release, as `major.minor.patch` (Debian's real patch level, not `uname -r`'s `.0`).
    pub release: String,
    pub at_least_minimum: bool,
    /// TCX links (6.6): pinned, atomically replaceable TC attachments. Without them the TC
    /// programs are netlink filters on a `clsact` qdisc.
    pub tcx: bool,
    /// `bpf_ktime_get_coarse_ns` (5.11): the cheaper clock; `bpf_ktime_get_ns` otherwise.
    pub coarse_clock: bool,
    /// The event ring buffer (5.8).
    pub ring_buffer: bool,
    /// BPF links for XDP (5.9), which pin and swap like TCX links.
    pub xdp_links: bool,
    /// `/sys/kernel/btf/vmlinux`: not needed by the datapath (it uses no CO-RE), reported for
    /// diagnosis.
    pub btf: bool,
}

/// What stops the datapath from loading on this kernel.
#[derive(Debug, thiserror::Error)]
#[error(
    "Linux {release} is too old for enforcer: it needs {} ({missing})",
    format_minimum()
)]
pub struct Unsupported {
    pub release: String,
    pub missing: String,
}

fn format_minimum() -> String {
    format!("Linux {}.{} or newer", MINIMUM.0, MINIMUM.1)
}

impl Features {
    /// The running kernel's, probed once per process.
    pub fn current() -> &'static Self {
        static CURRENT: std::sync::OnceLock<Features> = std::sync::OnceLock::new();
        CURRENT.get_or_init(Self::probe)
    }

    /// Asks the running kernel (a few tiny loads).
    fn probe() -> Self {
        let version = KernelVersion::current().ok();
        let at_least = |major, minor| {
            version.is_none_or(|version| version >= KernelVersion::new(major, minor, 0))
        };
        let helper =
            |helper| is_helper_supported(ProgramType::SchedClassifier, helper).unwrap_or(false);
        Self {
            release: version.map_or_else(|| "(unknown)".to_owned(), |v| v.to_string()),
            at_least_minimum: at_least(MINIMUM.0, MINIMUM.1),
            tcx: at_least(6, 6),
            coarse_clock: helper(BpfHelper::BPF_FUNC_ktime_get_coarse_ns),
            ring_buffer: is_map_supported(MapType::RingBuf).unwrap_or(false),
            xdp_links: at_least(5, 9),
            btf: std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
        }
    }

    /// `Err` with one line naming what is missing if the datapath cannot run here.
    pub fn check_minimum(&self) -> Result<(), Unsupported> {
        let mut missing = Vec::new();
        if !self.at_least_minimum {
            missing.push("the verifier and helpers of 5.10");
        }
        if !self.ring_buffer {
            missing.push("BPF ring buffers (5.8)");
        }
        if !self.xdp_links {
            missing.push("XDP links (5.9)");
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(Unsupported {
            release: self.release.clone(),
            missing: missing.join(", "),
        })
    }

    /// One line per fact, with what it means for enforcer: for `doctor` and the log.
    pub fn report(&self) -> Vec<(bool, String)> {
        vec![
            (
                self.at_least_minimum,
                format!(
                    "Linux {} (enforcer needs {})",
                    self.release,
                    format_minimum()
                ),
            ),
            (self.ring_buffer, "BPF ring buffer: flow events".to_owned()),
            (
                self.xdp_links,
                "XDP links: the XDP ingress hook, pinned and swapped on restart".to_owned(),
            ),
            (
                true,
                if self.tcx {
                    "TCX links: TC programs attached as pinned links".to_owned()
                } else {
                    "no TCX (before 6.6): TC programs attached as netlink filters on clsact"
                        .to_owned()
                },
            ),
            (
                true,
                if self.coarse_clock {
                    "bpf_ktime_get_coarse_ns: the coarse clock on the packet path".to_owned()
                } else {
                    "no bpf_ktime_get_coarse_ns (before 5.11): bpf_ktime_get_ns instead".to_owned()
                },
            ),
            (
                true,
                format!(
                    "kernel BTF: {} (not needed: the datapath uses no CO-RE)",
                    if self.btf { "present" } else { "absent" }
                ),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features() -> Features {
        Features {
            release: "6.1.192".to_owned(),
            at_least_minimum: true,
            tcx: false,
            coarse_clock: true,
            ring_buffer: true,
            xdp_links: true,
            btf: true,
        }
    }

    #[test]
    fn a_kernel_with_everything_needed_is_accepted() {
        assert!(features().check_minimum().is_ok());
    }

    #[test]
    fn a_kernel_below_the_minimum_is_refused_in_one_line_naming_what_is_missing() {
        let old = Features {
            release: "5.4.0".to_owned(),
            at_least_minimum: false,
            ring_buffer: false,
            ..features()
        };
        let message = old.check_minimum().unwrap_err().to_string();
        assert_eq!(
            message,
            "Linux 5.4.0 is too old for enforcer: it needs Linux 5.10 or newer \
             (the verifier and helpers of 5.10, BPF ring buffers (5.8))"
        );
        assert!(!message.contains('\n'));
    }

    #[test]
    fn the_report_says_how_tc_programs_are_attached() {
        let report = features().report();
        assert!(
            report
                .iter()
                .any(|(_, line)| line.contains("netlink filters"))
        );
        let tcx = Features {
            tcx: true,
            ..features()
        };
        assert!(
            tcx.report()
                .iter()
                .any(|(_, line)| line.starts_with("TCX links"))
        );
    }
}
