//! The TOML documents a policy file holds, as serde reads them.

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyDocument {
    // Boxed: most tables are one rule or service, and kept in the parse cache; inline, these
    // two took more room in each than the rule.
    pub(super) settings: Option<Box<Spanned<SettingsDocument>>>,
    #[serde(default)]
    pub(super) service: Vec<Spanned<ServiceDocument>>,
    #[serde(default)]
    pub(super) allow: Vec<Spanned<RuleDocument>>,
    #[serde(default)]
    pub(super) deny: Vec<Spanned<RuleDocument>>,
    pub(super) detection: Option<Box<Spanned<DetectionDocument>>>,
}

impl PolicyDocument {
    pub(super) fn parse(text: &str) -> Result<Self, toml::de::Error> {
        let mut document: Self = toml::from_str(text)?;
        document.shrink_to_fit();
        Ok(document)
    }

    /// Deserializing leaves each list with room for four entries: for a table of one rule,
    /// kept in the parse cache, that is most of its memory.
    pub(super) fn shrink_to_fit(&mut self) {
        self.service.shrink_to_fit();
        for service in &mut self.service {
            let service = service.get_mut();
            service.cgroups.shrink_to_fit();
            service.interfaces.shrink_to_fit();
            service.addresses.shrink_to_fit();
        }
        for rules in [&mut self.allow, &mut self.deny] {
            rules.shrink_to_fit();
            for rule in rules.iter_mut() {
                if let Some(ports) = &mut rule.get_mut().ports {
                    ports.shrink_to_fit();
                }
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SettingsDocument {
    pub(super) mode: Option<Spanned<String>>,
    pub(super) manage_host: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServiceDocument {
    pub(super) name: Spanned<String>,
    pub(super) identity: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) cgroups: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) interfaces: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) addresses: Vec<Spanned<String>>,
    pub(super) mode: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RuleDocument {
    pub(super) from: Spanned<String>,
    pub(super) to: Spanned<String>,
    pub(super) ports: Option<Vec<Spanned<String>>>,
    pub(super) max_new_per_sec: Option<Spanned<i64>>,
    pub(super) id: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DetectionDocument {
    pub(super) window_secs: Option<Spanned<i64>>,
    pub(super) spike_z: Option<Spanned<f64>>,
    pub(super) spike_min_calls: Option<Spanned<i64>>,
    pub(super) spike_warmup_windows: Option<Spanned<i64>>,
    pub(super) fanout_distinct_peers: Option<Spanned<i64>>,
    pub(super) deny_burst: Option<Spanned<i64>>,
}
