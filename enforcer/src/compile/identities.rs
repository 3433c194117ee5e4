//! The first phase of compiling: every identity the policy names (host, world, services, CIDR
//! peers), and where this host's packets get them (ipcache, endpoint interfaces, cgroups).

use std::collections::{BTreeMap, BTreeSet};

use enforcer_common::{
    config::MAX_CGROUP_LEVEL,
    identity::{CgroupKey, EndpointKey, HOST, IdentityInfo, SERVICE_END, WORLD, flags},
};
use ipnet::IpNet;

use super::{
    CompileError,
    tables::{HostView, Prefix, Tables},
};
use crate::{
    endpoints::Registration,
    fleet::RemoteEndpoint,
    policy::{InterfaceSelector, Mode, Peer, Policy, Service, identity},
};

/// What [`Identities::single`] says of a peer that may stand for several identities (no
/// identity is this number).
pub const MANY: u32 = u32::MAX;

/// The identities of one policy.
#[derive(Debug)]
pub(crate) struct Identities {
    pub host: IdentityInfo,
    /// The services' identities, in policy order.
    pub services: Vec<IdentityInfo>,
    pub cidrs: BTreeMap<IpNet, u32>,
    /// Every identity with its name, as [`super::Names`] keeps them.
    pub names: BTreeMap<u32, (String, IdentityInfo)>,
}

impl Identities {
    pub fn of(policy: &Policy) -> Result<Self, CompileError> {
        let host = IdentityInfo {
            identity: HOST,
            flags: if policy.manage_host {
                flags::SERVICE
            } else {
                0
            },
        };
        let mut names = BTreeMap::new();
        names.insert(HOST, ("host".to_owned(), host));
        names.insert(WORLD, ("world".to_owned(), IdentityInfo::WORLD));
        let services: Vec<IdentityInfo> = policy
            .services
            .iter()
            .map(|service| service_info(policy, service))
            .collect();
        for (service, info) in policy.services.iter().zip(&services) {
            names.insert(info.identity, (service.name.clone(), *info));
        }
        let cidrs = cidr_identities(policy)?;
        for (net, id) in &cidrs {
            let info = IdentityInfo {
                identity: *id,
                flags: 0,
            };
            names.insert(*id, (net.to_string(), info));
        }
        Ok(Self {
            host,
            services,
            cidrs,
            names,
        })
    }

    /// The one identity `peer` stands for, or [`MANY`] (world and CIDR peers stand for every
    /// CIDR peer inside them).
    pub fn single(&self, peer: &Peer) -> u32 {
        match peer {
            Peer::Service(index) => self.services[*index].identity,
            Peer::Host => HOST,
            Peer::World | Peer::Cidr(_) => MANY,
        }
    }

    /// The identities a rule's peer stands for, into `identities`.
    pub fn expand(&self, peer: &Peer, identities: &mut Vec<u32>) {
        identities.clear();
        match peer {
            Peer::Service(index) => identities.push(self.services[*index].identity),
            Peer::Host => identities.push(HOST),
            // World is everything unclaimed, and that includes addresses a CIDR rule names.
            Peer::World => {
                identities.push(WORLD);
                identities.extend(self.cidrs.values().copied());
            }
            // A longest-prefix match resolves an address inside a narrower CIDR peer to that
            // peer's identity; rules about the wider CIDR must apply to it too.
            Peer::Cidr(net) => identities.extend(
                self.cidrs
                    .iter()
                    .filter(|(inner, _)| net.contains(*inner))
                    .map(|(_, id)| *id),
            ),
        }
    }

    /// The name of `identity`, for errors.
    pub fn name(&self, identity: u32) -> String {
        self.names
            .get(&identity)
            .map_or_else(|| identity.to_string(), |(name, _)| name.clone())
    }

    /// Writes where packets get their identities: the services' addresses, interfaces and
    /// cgroups, the CIDR peers, this host's addresses. What this host lacks is a warning.
    pub fn place(
        &self,
        policy: &Policy,
        host: &HostView,
        tables: &mut Tables,
        warnings: &mut Vec<String>,
    ) {
        for (service, info) in policy.services.iter().zip(&self.services) {
            for net in &service.addresses {
                let local = host.is_local_endpoint_address(service, net);
                let address_info = IdentityInfo {
                    flags: info.flags | if local { flags::LOCAL_ENDPOINT } else { 0 },
                    ..*info
                };
                tables.ipcache.insert(Prefix::of(net), address_info);
            }
            place_interfaces(service, *info, host, tables, warnings);
            place_cgroups(service, *info, host, tables, warnings);
        }
        for registration in &host.registered {
            if let Some(index) = policy
                .services
                .iter()
                .position(|service| service.name == registration.service)
            {
                place_registration(registration, self.services[index], host, tables);
            }
        }
        for remote in &host.fleet {
            self.place_remote(policy, remote, host, tables, warnings);
        }
        // The table's only prefixes: registrations, other hosts' endpoints and this host's
        // addresses are whole addresses.
        let prefixes = || {
            policy
                .services
                .iter()
                .flat_map(|service| &service.addresses)
                .chain(self.cidrs.keys())
                .map(Prefix::of)
        };
        tables.ipv4_hosts_only = !prefixes().any(|prefix| prefix.covers_ipv4_partly());
        tables.ipv6_hosts_only = !prefixes().any(|prefix| prefix.covers_ipv6_partly());
        for (net, id) in &self.cidrs {
            tables
                .ipcache
                .entry(Prefix::of(net))
                .or_insert(IdentityInfo {
                    identity: *id,
                    flags: 0,
                });
        }
        for addr in &host.addresses {
            let prefix = Prefix::of(&IpNet::from(*addr));
            match tables.ipcache.get(&prefix) {
                None => {
                    tables.ipcache.insert(prefix, self.host);
                }
                Some(existing) if existing.identity >= SERVICE_END => warnings.push(format!(
                    "host address {addr} is also CIDR peer {prefix} in a rule; it resolves to that CIDR, not to \"host\""
                )),
                Some(_) => {}
            }
        }
    }
}

impl Identities {
    /// Another host's endpoint: its address is its service's, unless this host's policy or
    /// registrations say it is someone else's.
    fn place_remote(
        &self,
        policy: &Policy,
        remote: &RemoteEndpoint,
        host: &HostView,
        tables: &mut Tables,
        warnings: &mut Vec<String>,
    ) {
        let Some(index) = policy
            .services
            .iter()
            .position(|service| service.name == remote.service)
        else {
            warnings.push(format!(
                "node {} publishes {} as service \"{}\", which this policy does not have; skipped",
                remote.node, remote.address, remote.service
            ));
            return;
        };
        let claimed_here = policy.services.iter().find(|service| {
            service.name != remote.service
                && service
                    .addresses
                    .iter()
                    .any(|net| net.contains(&remote.address))
        });
        let registered_here = host
            .registered
            .iter()
            .any(|registration| registration.addresses.contains(&remote.address));
        if let Some(owner) = claimed_here {
            warnings.push(format!(
                "node {} publishes {} as service \"{}\", but the policy gives it to \"{}\"; refused",
                remote.node, remote.address, remote.service, owner.name
            ));
            return;
        }
        if registered_here {
            warnings.push(format!(
                "node {} publishes {}, which is registered on this host; refused",
                remote.node, remote.address
            ));
            return;
        }
        tables
            .ipcache
            .entry(Prefix::of(&IpNet::from(remote.address)))
            .or_insert(self.services[index]);
    }
}

/// A registered endpoint, as a declared one would be placed: its addresses (local when this
/// host routes them through its interface) and its interface.
fn place_registration(
    registration: &Registration,
    info: IdentityInfo,
    host: &HostView,
    tables: &mut Tables,
) {
    let ifindex = host.interfaces.get(&registration.interface);
    for address in &registration.addresses {
        let local = ifindex.is_some() && host.routes.get(address) == Some(&registration.interface);
        tables.ipcache.insert(
            Prefix::of(&IpNet::from(*address)),
            IdentityInfo {
                flags: info.flags | if local { flags::LOCAL_ENDPOINT } else { 0 },
                ..info
            },
        );
    }
    if let Some(ifindex) = ifindex {
        tables.endpoints.insert(
            EndpointKey {
                ifindex: *ifindex,
                slot: 0,
            },
            info,
        );
    }
}

fn service_info(policy: &Policy, service: &Service) -> IdentityInfo {
    let audit = if policy.service_mode(service) == Mode::Audit {
        flags::AUDIT
    } else {
        0
    };
    IdentityInfo {
        identity: service.identity,
        flags: flags::SERVICE | audit,
    }
}

/// CIDR peers get identities of their own, hashed from the prefix; two that collide are an
/// error.
fn cidr_identities(policy: &Policy) -> Result<BTreeMap<IpNet, u32>, CompileError> {
    let cidrs: BTreeSet<IpNet> = policy
        .rules
        .iter()
        .flat_map(|rule| [&rule.from, &rule.to])
        .filter_map(|peer| match peer {
            Peer::Cidr(net) => Some(*net),
            _ => None,
        })
        .collect();
    let mut identities = BTreeMap::new();
    let mut owner: BTreeMap<u32, IpNet> = BTreeMap::new();
    for net in cidrs {
        let id = identity::of_cidr(&net);
        if let Some(other) = owner.insert(id, net) {
            return Err(CompileError::CidrCollision {
                a: other,
                b: net,
                identity: id,
            });
        }
        identities.insert(net, id);
    }
    Ok(identities)
}

fn place_interfaces(
    service: &Service,
    info: IdentityInfo,
    host: &HostView,
    tables: &mut Tables,
    warnings: &mut Vec<String>,
) {
    for (name, ifindex) in &host.interfaces {
        if !service.selects_interface(name) {
            continue;
        }
        let key = EndpointKey {
            ifindex: *ifindex,
            slot: 0,
        };
        // Two services' patterns may match one interface: the first in the policy has it.
        match tables.endpoints.get(&key) {
            Some(first) if first.identity != info.identity => warnings.push(format!(
                "interface \"{name}\" is selected by service \"{}\" too; it stays the endpoint of the service before it in the policy",
                service.name
            )),
            _ => {
                tables.endpoints.insert(key, info);
            }
        }
    }
    for name in &service.interfaces {
        if matches!(InterfaceSelector::new(name), Ok(InterfaceSelector::Name(_)))
            && !host.interfaces.contains_key(name)
        {
            warnings.push(format!(
                "interface \"{name}\" of service \"{}\" does not exist on this host; it is enforced once it appears",
                service.name
            ));
        }
    }
}

fn place_cgroups(
    service: &Service,
    info: IdentityInfo,
    host: &HostView,
    tables: &mut Tables,
    warnings: &mut Vec<String>,
) {
    for path in &service.cgroups {
        let Some(cgroup) = host.cgroups.get(path) else {
            warnings.push(format!(
                "cgroup {} of service \"{}\" does not exist on this host; skipped",
                path.display(),
                service.name
            ));
            continue;
        };
        tables.cgroups.insert(
            CgroupKey {
                cgroup_id: cgroup.id,
                slot: 0,
                _pad: 0,
            },
            info,
        );
        if cgroup.level <= MAX_CGROUP_LEVEL {
            tables.cgroup_levels |= 1 << cgroup.level;
        } else {
            warnings.push(format!(
                "cgroup {} of service \"{}\" is {} levels deep; only its own processes have the service's identity, not those of cgroups below it (the datapath looks {MAX_CGROUP_LEVEL} levels deep)",
                path.display(),
                service.name,
                cgroup.level
            ));
        }
    }
}
