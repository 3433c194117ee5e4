//! What a controller knows of the fleet's endpoints: the `endpoints/` keys as last listed and
//! watched, and the remote endpoints they make (pure; the session feeds it).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::{PublishedEndpoint, RemoteEndpoint, endpoints_prefix};

/// One `endpoints/<node>/<address>` key.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Claim {
    node: String,
    address: IpAddr,
    service: String,
    /// The revision that created the key: of two claims on one address, the older stands.
    created: i64,
}

/// The fleet's endpoint keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetView {
    claims: BTreeMap<String, Claim>,
}

impl FleetView {
    /// Applies a put of `key`; keys that are not endpoint keys, or values that do not parse,
    /// are ignored (and said so by the returned error).
    pub fn put(&mut self, key: &str, value: &[u8], created: i64) -> Result<(), String> {
        let (node, address) =
            parse_key(key).ok_or_else(|| format!("not an endpoint key: {key}"))?;
        let endpoint: PublishedEndpoint = serde_json::from_slice(value)
            .map_err(|error| format!("endpoint key {key} holds no endpoint: {error}"))?;
        self.claims.insert(
            key.to_owned(),
            Claim {
                node,
                address,
                service: endpoint.service,
                created,
            },
        );
        Ok(())
    }

    pub fn delete(&mut self, key: &str) {
        self.claims.remove(key);
    }

    /// Forgets everything (before a full listing).
    pub fn clear(&mut self) {
        self.claims.clear();
    }

    /// The endpoints of hosts other than `own_node`, one per address, and the claims refused
    /// because an address was claimed first elsewhere (by this host included).
    pub fn remote(&self, own_node: &str) -> (Vec<RemoteEndpoint>, Vec<String>) {
        let mut by_address: BTreeMap<IpAddr, Vec<&Claim>> = BTreeMap::new();
        for claim in self.claims.values() {
            by_address.entry(claim.address).or_default().push(claim);
        }
        let mut remote = Vec::new();
        let mut conflicts = Vec::new();
        for (address, mut claims) in by_address {
            // This host's own claim stands here; otherwise the oldest.
            claims.sort_by_key(|claim| (claim.node != own_node, claim.created));
            let first = claims[0];
            for other in &claims[1..] {
                conflicts.push(format!(
                    "address {address} is claimed by node {} for service \"{}\" and by node {} for \"{}\"; the first claim stands",
                    first.node, first.service, other.node, other.service
                ));
            }
            if first.node != own_node {
                remote.push(RemoteEndpoint {
                    node: first.node.clone(),
                    service: first.service.clone(),
                    address,
                });
            }
        }
        (remote, conflicts)
    }

    /// The keys `node` has published.
    pub fn keys_of(&self, node: &str) -> BTreeSet<String> {
        self.claims
            .iter()
            .filter(|(_, claim)| claim.node == node)
            .map(|(key, _)| key.clone())
            .collect()
    }
}

/// `(node, address)` of an `endpoints/<node>/<address>` key.
fn parse_key(key: &str) -> Option<(String, IpAddr)> {
    let rest = key.strip_prefix(&endpoints_prefix())?;
    let (node, address) = rest.split_once('/')?;
    Some((node.to_owned(), address.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::endpoint_key;

    fn value(service: &str, address: &str) -> Vec<u8> {
        serde_json::to_vec(&PublishedEndpoint {
            service: service.to_owned(),
            identity: 1,
            addresses: vec![address.parse().unwrap()],
            interface: "veth1".to_owned(),
        })
        .unwrap()
    }

    fn put(view: &mut FleetView, node: &str, service: &str, address: &str, created: i64) {
        let key = endpoint_key(node, address.parse().unwrap());
        view.put(&key, &value(service, address), created).unwrap();
    }

    #[test]
    fn other_hosts_endpoints_are_remote_and_this_hosts_are_not() {
        let mut view = FleetView::default();
        put(&mut view, "a", "api", "10.1.0.2", 5);
        put(&mut view, "c", "db", "10.3.0.2", 6);
        let (remote, conflicts) = view.remote("a");
        assert_eq!(
            remote,
            [RemoteEndpoint {
                node: "c".to_owned(),
                service: "db".to_owned(),
                address: "10.3.0.2".parse().unwrap()
            }]
        );
        assert!(conflicts.is_empty());
        view.delete(&endpoint_key("c", "10.3.0.2".parse().unwrap()));
        assert!(view.remote("a").0.is_empty());
        assert_eq!(view.keys_of("a").len(), 1);
    }

    #[test]
    fn an_address_claimed_twice_is_the_first_claimants_and_the_other_is_reported() {
        let mut view = FleetView::default();
        put(&mut view, "b", "api", "10.9.0.1", 9);
        put(&mut view, "c", "db", "10.9.0.1", 4);
        let (remote, conflicts) = view.remote("a");
        assert_eq!(remote.len(), 1);
        assert_eq!(remote[0].node, "c", "created first");
        assert_eq!(conflicts.len(), 1);
        assert!(conflicts[0].contains("10.9.0.1"), "{conflicts:?}");
        let (remote, conflicts) = view.remote("b");
        assert!(remote.is_empty(), "on b, b's own claim stands");
        assert_eq!(conflicts.len(), 1);
    }

    #[test]
    fn keys_that_are_not_endpoints_are_refused() {
        let mut view = FleetView::default();
        assert!(view.put("/enforcer/v1/nodes/a", b"{}", 1).is_err());
        assert!(
            view.put(&endpoint_key("a", "10.0.0.1".parse().unwrap()), b"junk", 1)
                .is_err()
        );
        assert!(view.remote("b").0.is_empty());
    }
}
