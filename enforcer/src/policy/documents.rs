//! The TOML documents a policy file holds, as serde reads them.

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyDocument {
    // Boxed, and lists as boxed slices: most tables are one rule or service, and kept in the
    // parse cache of a 100 000-rule policy; inline, the two optional tables took more room in
    // each than the rule, and a list's spare capacity most of the rest.
    pub(super) settings: Option<Box<Spanned<SettingsDocument>>>,
    #[serde(default)]
    pub(super) service: Box<[Spanned<ServiceDocument>]>,
    #[serde(default)]
    pub(super) allow: Box<[Spanned<RuleDocument>]>,
    #[serde(default)]
    pub(super) deny: Box<[Spanned<RuleDocument>]>,
    pub(super) detection: Option<Box<Spanned<DetectionDocument>>>,
}

impl PolicyDocument {
    pub(super) fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
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
    pub(super) cgroups: Box<[Spanned<String>]>,
    #[serde(default)]
    pub(super) interfaces: Box<[Spanned<String>]>,
    #[serde(default)]
    pub(super) addresses: Box<[Spanned<String>]>,
    pub(super) mode: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RuleDocument {
    pub(super) from: Spanned<Box<str>>,
    pub(super) to: Spanned<Box<str>>,
    pub(super) ports: Option<Box<[Spanned<Box<str>>]>>,
    pub(super) max_new_per_sec: Option<Spanned<i64>>,
    pub(super) id: Option<Spanned<Box<str>>>,
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
