//! The plugin's configuration on stdin (DESIGN §13): the network configuration's common keys,
//! this plugin's `service` and `socket`, and the previous plugins' result.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

use super::{CniError, code};
use crate::datapath::{loader::DEFAULT_PIN_PATH, pins::PinLayout};

/// What enforcer-cni reads of its configuration; other keys (the runtime's, other plugins')
/// are passed over, as the spec asks.
#[derive(Debug, Deserialize)]
pub struct NetworkConfig {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// The service of endpoints on this network.
    pub service: Option<String>,
    /// The controller's socket; default: the default controller's.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(rename = "prevResult")]
    pub prev_result: Option<Value>,
}

fn default_socket() -> PathBuf {
    PinLayout::new(DEFAULT_PIN_PATH).observe_socket()
}

impl NetworkConfig {
    pub fn parse(input: &[u8]) -> Result<Self, CniError> {
        serde_json::from_slice(input).map_err(|error| {
            CniError::new(
                code::UNDECODABLE,
                "the network configuration on stdin is not valid",
                error.to_string(),
            )
        })
    }
}

/// `ENFORCER_SERVICE` in `CNI_ARGS` (`KEY=VALUE` pairs separated by `;`).
pub fn service_from_args(args: &str) -> Option<String> {
    args.split(';')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == "ENFORCER_SERVICE")
        .map(|(_, value)| value.to_owned())
        .filter(|value| !value.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_may_come_from_cni_args() {
        assert_eq!(
            service_from_args("IgnoreUnknown=1;ENFORCER_SERVICE=api;K8S_POD_NAME=x").as_deref(),
            Some("api")
        );
        assert_eq!(service_from_args("IgnoreUnknown=1"), None);
        assert_eq!(service_from_args("ENFORCER_SERVICE="), None);
        assert_eq!(service_from_args(""), None);
    }

    #[test]
    fn the_configuration_keeps_what_the_plugin_needs() {
        let config = NetworkConfig::parse(
            br#"{"cniVersion":"1.0.0","name":"shop","type":"enforcer-cni","service":"api","prevResult":{"ips":[]}}"#,
        )
        .unwrap();
        assert_eq!(config.cni_version, "1.0.0");
        assert_eq!(config.service.as_deref(), Some("api"));
        assert_eq!(config.socket, PathBuf::from("/run/enforcer/enforcer.sock"));
        assert!(config.prev_result.is_some());
        let error = NetworkConfig::parse(b"{}").unwrap_err();
        assert_eq!(error.code, code::UNDECODABLE);
    }
}
