//! Where a datapath's objects are pinned, and the controller's files beside them.

use std::{collections::BTreeMap, fs, path::PathBuf};

use super::hook::Hook;

/// The paths under a pin directory.
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn programs(&self) -> PathBuf {
        self.root.join("programs")
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Records of TC programs attached as netlink filters (kernels without TCX).
    pub fn tc_filters(&self) -> PathBuf {
        self.root.join("tc-filters")
    }

    pub(crate) fn link(&self, hook: Hook, interface: &str) -> PathBuf {
        self.links().join(hook.pin_name(interface))
    }

    /// The link of the socket hook, on the cgroup v2 root.
    pub(crate) fn sockets_link(&self) -> PathBuf {
        self.links().join(super::loader::SOCKETS_LINK)
    }

    pub(crate) fn tc_filter(&self, hook: Hook, interface: &str) -> PathBuf {
        self.tc_filters().join(hook.pin_name(interface))
    }

    /// A file of the controller using these pins, beside its observe socket:
    /// `/run/enforcer/<pin directory name>.<extension>` (bpffs holds only BPF objects).
    pub fn state_file(&self, extension: &str) -> PathBuf {
        let name = self.root.file_name().map_or_else(
            || "enforcer".to_owned(),
            |name| name.to_string_lossy().into_owned(),
        );
        PathBuf::from("/run/enforcer").join(format!("{name}.{extension}"))
    }

    /// The socket `observe` clients connect to.
    pub fn observe_socket(&self) -> PathBuf {
        self.state_file("sock")
    }

    /// Where the controller keeps the interfaces it enforces (see
    /// [`super::enforcement::write_selectors`]).
    pub fn interfaces_file(&self) -> PathBuf {
        self.state_file("interfaces.json")
    }

    /// Where the endpoints registered with the controller are kept (see
    /// [`crate::endpoints::Registry::save`]).
    pub fn endpoints_file(&self) -> PathBuf {
        self.state_file("endpoints.json")
    }

    /// Where the controller keeps the fleet's endpoints it last knew (DESIGN §12).
    pub fn fleet_file(&self) -> PathBuf {
        self.state_file("fleet.json")
    }

    /// Where the controller keeps the last policy it installed from etcd.
    pub fn kvstore_policy_file(&self) -> PathBuf {
        self.state_file("policy.toml")
    }

    /// Where the controller keeps the kernel's count of lost records as it last reported it.
    pub fn lost_file(&self) -> PathBuf {
        self.state_file("lost")
    }

    /// Where the live generation's rule names are kept (see [`crate::events::names_file`]).
    pub fn names_file(&self) -> PathBuf {
        self.state_file("names.json")
    }

    /// Every file the controller keeps beside these pins (all but its socket).
    pub fn state_files(&self) -> [PathBuf; 6] {
        [
            self.names_file(),
            self.interfaces_file(),
            self.endpoints_file(),
            self.fleet_file(),
            self.kvstore_policy_file(),
            self.lost_file(),
        ]
    }

    /// Whether a datapath is pinned here.
    pub fn exists(&self) -> bool {
        self.maps().join("POLICY_ACTIVE").exists()
    }

    /// Interfaces with a pinned link or a recorded TC filter, with their hooks in order.
    pub fn attached_interfaces(&self) -> BTreeMap<String, Vec<Hook>> {
        let mut interfaces: BTreeMap<String, Vec<Hook>> = BTreeMap::new();
        let links = fs::read_dir(self.links()).into_iter().flatten().flatten();
        let filters = fs::read_dir(self.tc_filters())
            .into_iter()
            .flatten()
            .flatten();
        for entry in links.chain(filters) {
            let name = entry.file_name().to_string_lossy().into_owned();
            for hook in Hook::ALL {
                if let Some(interface) = name.strip_prefix(&format!("{}-", hook.as_str())) {
                    interfaces
                        .entry(interface.to_owned())
                        .or_default()
                        .push(hook);
                }
            }
        }
        // Directory order is the file system's: the hooks are listed in their own order.
        for hooks in interfaces.values_mut() {
            hooks.sort();
        }
        interfaces
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_beside_the_pins_are_named_after_the_pin_directory() {
        let pins = PinLayout::new("/sys/fs/bpf/enforcer-a");
        assert_eq!(pins.maps(), PathBuf::from("/sys/fs/bpf/enforcer-a/maps"));
        assert_eq!(pins.links(), PathBuf::from("/sys/fs/bpf/enforcer-a/links"));
        assert_eq!(
            pins.tc_filters(),
            PathBuf::from("/sys/fs/bpf/enforcer-a/tc-filters")
        );
        assert_eq!(
            pins.observe_socket(),
            PathBuf::from("/run/enforcer/enforcer-a.sock")
        );
        assert_eq!(
            pins.names_file(),
            PathBuf::from("/run/enforcer/enforcer-a.names.json")
        );
        assert_eq!(
            pins.link(Hook::TcIngress, "veth0"),
            PathBuf::from("/sys/fs/bpf/enforcer-a/links/tci-veth0")
        );
    }

    #[test]
    fn attached_interfaces_are_read_from_links_and_filter_records() {
        let root = std::env::temp_dir().join(format!("enforcer-pins-{}", std::process::id()));
        let pins = PinLayout::new(&root);
        fs::create_dir_all(pins.links()).unwrap();
        fs::create_dir_all(pins.tc_filters()).unwrap();
        for (directory, hook, interface) in [
            (pins.links(), Hook::Xdp, "eth1"),
            (pins.links(), Hook::TcEgress, "eth1"),
            (pins.tc_filters(), Hook::TcIngress, "veth-api-1"),
            (pins.tc_filters(), Hook::TcEgress, "veth-api-1"),
        ] {
            fs::write(directory.join(hook.pin_name(interface)), "").unwrap();
        }
        fs::write(pins.links().join("not-a-hook"), "").unwrap();
        let attached = pins.attached_interfaces();
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(
            attached,
            BTreeMap::from([
                ("eth1".to_owned(), vec![Hook::Xdp, Hook::TcEgress]),
                (
                    "veth-api-1".to_owned(),
                    vec![Hook::TcIngress, Hook::TcEgress]
                ),
            ])
        );
        assert!(!pins.exists(), "no maps are pinned");
    }
}
