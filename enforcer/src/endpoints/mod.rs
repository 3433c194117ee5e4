//! Endpoints registered with a running controller from outside the policy (DESIGN §13): by
//! `enforcer endpoint add`, or by the CNI plugin when a container is created. A registration
//! says "the workload behind interface IF, with addresses A..., is service S"; the controller
//! then treats it exactly as an endpoint the policy declares (identity by interface and
//! address, anti-spoofing), keeps it beside its pins so that a restarted controller adopts it,
//! and audits each change. One that contradicts the policy is refused and changes nothing.

pub mod protocol;

use std::{
    collections::BTreeMap,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::policy::Policy;

/// One registered endpoint: the host side of its interface, its service, its addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub service: String,
    pub interface: String,
    pub addresses: Vec<IpAddr>,
}

/// Why a registration is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistrationError {
    #[error("the policy has no service \"{0}\"")]
    UnknownService(String),
    #[error("an endpoint needs at least one address")]
    NoAddress,
    #[error("invalid interface name \"{0}\" (1 to 15 characters, no '/' or spaces)")]
    InvalidInterface(String),
    #[error("interface {interface} is service \"{owner}\"'s in the policy")]
    InterfaceOfPolicy { interface: String, owner: String },
    #[error(
        "interface {interface} is already registered as an endpoint of \"{service}\" with other addresses; remove it first"
    )]
    InterfaceRegistered { interface: String, service: String },
    #[error("address {address} belongs to service \"{owner}\" in the policy")]
    AddressOfPolicy { address: IpAddr, owner: String },
    #[error("address {address} is already registered for interface {interface}")]
    AddressRegistered { address: IpAddr, interface: String },
}

/// The registered endpoints, by interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Registry {
    by_interface: BTreeMap<String, Registration>,
}

impl Registry {
    pub fn iter(&self) -> impl Iterator<Item = &Registration> {
        self.by_interface.values()
    }

    pub fn get(&self, interface: &str) -> Option<&Registration> {
        self.by_interface.get(interface)
    }

    /// Whether `registration` may join this registry under `policy`. The same registration
    /// again is fine (a runtime retries `ADD`).
    pub fn check(
        &self,
        policy: &Policy,
        registration: &Registration,
    ) -> Result<(), RegistrationError> {
        let Registration {
            service,
            interface,
            addresses,
        } = registration;
        if policy.service(service).is_none() {
            return Err(RegistrationError::UnknownService(service.clone()));
        }
        if addresses.is_empty() {
            return Err(RegistrationError::NoAddress);
        }
        if interface.is_empty()
            || interface.len() > 15
            || interface.contains(['/', ' ', '\t', '\n'])
        {
            return Err(RegistrationError::InvalidInterface(interface.clone()));
        }
        if let Some(owner) = policy
            .services
            .iter()
            .find(|owner| owner.name != *service && owner.selects_interface(interface))
        {
            return Err(RegistrationError::InterfaceOfPolicy {
                interface: interface.clone(),
                owner: owner.name.clone(),
            });
        }
        match self.by_interface.get(interface) {
            Some(existing) if existing == registration => return Ok(()),
            Some(existing) => {
                return Err(RegistrationError::InterfaceRegistered {
                    interface: interface.clone(),
                    service: existing.service.clone(),
                });
            }
            None => {}
        }
        for address in addresses {
            self.check_address(policy, service, *address)?;
        }
        Ok(())
    }

    fn check_address(
        &self,
        policy: &Policy,
        service: &str,
        address: IpAddr,
    ) -> Result<(), RegistrationError> {
        if let Some(owner) = policy.services.iter().find(|owner| {
            owner.name != service && owner.addresses.iter().any(|net| net.contains(&address))
        }) {
            return Err(RegistrationError::AddressOfPolicy {
                address,
                owner: owner.name.clone(),
            });
        }
        if let Some(other) = self
            .by_interface
            .values()
            .find(|other| other.addresses.contains(&address))
        {
            return Err(RegistrationError::AddressRegistered {
                address,
                interface: other.interface.clone(),
            });
        }
        Ok(())
    }

    /// Adds a registration [`Self::check`] accepted; returns whether it is new.
    pub fn insert(&mut self, registration: Registration) -> bool {
        self.by_interface
            .insert(registration.interface.clone(), registration.clone())
            .as_ref()
            != Some(&registration)
    }

    pub fn remove(&mut self, interface: &str) -> Option<Registration> {
        self.by_interface.remove(interface)
    }

    /// The registrations `policy` still accepts (a reload may remove a service, or declare an
    /// address a registration had), and why each other one is skipped.
    pub fn valid_under(&self, policy: &Policy) -> (Vec<&Registration>, Vec<String>) {
        let mut valid = Vec::new();
        let mut skipped = Vec::new();
        let mut accepted = Registry::default();
        for registration in self.by_interface.values() {
            match accepted.check(policy, registration) {
                Ok(()) => {
                    accepted.insert(registration.clone());
                    valid.push(registration);
                }
                Err(error) => skipped.push(format!(
                    "registered endpoint {} is not enforced as \"{}\" under this policy: {error}",
                    registration.interface, registration.service
                )),
            }
        }
        (valid, skipped)
    }

    /// Reads the registry a controller kept at `path`; none there is an empty registry.
    pub fn load(path: &Path) -> Result<Self, PersistError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(PersistError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let registrations: Vec<Registration> =
            serde_json::from_str(&text).map_err(|source| PersistError::Malformed {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            by_interface: registrations
                .into_iter()
                .map(|registration| (registration.interface.clone(), registration))
                .collect(),
        })
    }

    /// Writes the registry to `path`, replacing it atomically (mode 0600: root's business).
    pub fn save(&self, path: &Path) -> Result<(), PersistError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let io_error = |source| PersistError::Io {
            path: path.to_owned(),
            source,
        };
        let registrations: Vec<&Registration> = self.by_interface.values().collect();
        let text = serde_json::to_string_pretty(&registrations).expect("plain data serialises");
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_error)?;
        }
        let temporary = path.with_extension("json.tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(io_error)?;
        io::Write::write_all(&mut file, text.as_bytes()).map_err(io_error)?;
        file.sync_all().map_err(io_error)?;
        std::fs::rename(&temporary, path).map_err(io_error)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("registered endpoints file {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("registered endpoints file {} is malformed: {source}", path.display())]
    Malformed {
        path: PathBuf,
        source: serde_json::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Policy {
        crate::policy::parse_sources(vec![(PathBuf::from("policy.toml"), text.to_owned())])
            .expect("valid policy")
    }

    fn policy() -> Policy {
        parse(
            "[[service]]\nname = \"api\"\naddresses = [\"10.1.0.0/24\"]\n\
             [[service]]\nname = \"db\"\ninterfaces = [\"veth-db-*\"]\naddresses = [\"10.2.0.5/32\"]\n\
             [[service]]\nname = \"jobs\"\n",
        )
    }

    fn registration(service: &str, interface: &str, addresses: &[&str]) -> Registration {
        Registration {
            service: service.to_owned(),
            interface: interface.to_owned(),
            addresses: addresses.iter().map(|text| text.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn a_registration_that_contradicts_the_policy_is_refused_with_the_reason() {
        let policy = policy();
        let registry = Registry::default();
        let refused = |registration: Registration| registry.check(&policy, &registration);
        assert_eq!(
            refused(registration("web", "veth1", &["10.9.0.1"])),
            Err(RegistrationError::UnknownService("web".to_owned()))
        );
        assert_eq!(
            refused(registration("jobs", "veth1", &[])),
            Err(RegistrationError::NoAddress)
        );
        assert_eq!(
            refused(registration("jobs", "veth-db-7", &["10.9.0.1"])),
            Err(RegistrationError::InterfaceOfPolicy {
                interface: "veth-db-7".to_owned(),
                owner: "db".to_owned()
            })
        );
        assert_eq!(
            refused(registration("jobs", "veth1", &["10.1.0.9"])),
            Err(RegistrationError::AddressOfPolicy {
                address: "10.1.0.9".parse().unwrap(),
                owner: "api".to_owned()
            })
        );
        assert_eq!(
            refused(registration(
                "jobs",
                "a-name-too-long-for-linux",
                &["10.9.0.1"]
            )),
            Err(RegistrationError::InvalidInterface(
                "a-name-too-long-for-linux".to_owned()
            ))
        );
        assert_eq!(
            refused(registration("api", "veth1", &["10.1.0.9"])),
            Ok(()),
            "inside the service's own declared range"
        );
    }

    #[test]
    fn an_interface_or_address_is_registered_once_and_a_retry_is_no_change() {
        let policy = policy();
        let mut registry = Registry::default();
        let first = registration("jobs", "veth1", &["10.9.0.1", "fd00::1"]);
        registry.check(&policy, &first).unwrap();
        assert!(registry.insert(first.clone()));
        assert_eq!(registry.check(&policy, &first), Ok(()), "the same again");
        assert!(!registry.insert(first.clone()), "and nothing changes");
        assert_eq!(
            registry.check(&policy, &registration("jobs", "veth1", &["10.9.0.2"])),
            Err(RegistrationError::InterfaceRegistered {
                interface: "veth1".to_owned(),
                service: "jobs".to_owned()
            })
        );
        assert_eq!(
            registry.check(&policy, &registration("api", "veth2", &["fd00::1"])),
            Err(RegistrationError::AddressRegistered {
                address: "fd00::1".parse().unwrap(),
                interface: "veth1".to_owned()
            })
        );
        assert_eq!(registry.remove("veth1"), Some(first));
        assert_eq!(registry.iter().count(), 0);
    }

    #[test]
    fn registrations_a_new_policy_contradicts_are_skipped_with_the_reason() {
        let mut registry = Registry::default();
        registry.insert(registration("jobs", "veth1", &["10.9.0.1"]));
        registry.insert(registration("api", "veth2", &["10.1.0.7"]));
        let without_jobs = parse("[[service]]\nname = \"api\"\n");
        let (valid, skipped) = registry.valid_under(&without_jobs);
        assert_eq!(valid.len(), 1);
        assert_eq!(valid[0].interface, "veth2");
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].contains("no service \"jobs\""), "{skipped:?}");
    }

    #[test]
    fn the_registry_survives_a_round_trip_through_its_file() {
        let scratch = crate::ScratchFile::new("endpoints.json");
        let mut registry = Registry::default();
        registry.insert(registration("jobs", "veth1", &["10.9.0.1", "fd00::1"]));
        registry.save(&scratch.0).unwrap();
        assert_eq!(Registry::load(&scratch.0).unwrap(), registry);
        assert_eq!(
            Registry::load(Path::new("/nonexistent/endpoints.json")).unwrap(),
            Registry::default()
        );
        std::fs::write(&scratch.0, "not json").unwrap();
        assert!(matches!(
            Registry::load(&scratch.0),
            Err(PersistError::Malformed { .. })
        ));
    }
}
