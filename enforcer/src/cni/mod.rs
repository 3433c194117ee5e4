//! `enforcer-cni`: the same binary as a chained CNI plugin (spec 1.0; DESIGN §13). After the
//! runtime's own plugins have made the interface and given it addresses, `ADD` reads their
//! result (`prevResult`), registers the endpoint with the local controller under the
//! configured service and passes the result on; the controller answers only once the endpoint
//! is enforced, so the container's first packet is judged. `DEL` unregisters, `CHECK` verifies.
//! Failures are CNI error objects on stdout with a non-zero exit; the controller never keeps a
//! half-made registration.

pub mod config;

use std::{
    io::{Read as _, Write as _},
    net::IpAddr,
    process::ExitCode,
};

use serde_json::{Value, json};

use self::config::{NetworkConfig, service_from_args};
use crate::{
    datapath::host,
    endpoints::{
        Registration,
        protocol::{self, Request},
    },
};

/// The spec versions this plugin speaks.
const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Whether this process was started as a CNI plugin: by the name `enforcer-cni`, or by a
/// runtime that set `CNI_COMMAND`.
pub fn invoked_as_plugin() -> bool {
    let named = std::env::args_os().next().is_some_and(|argv0| {
        std::path::Path::new(&argv0)
            .file_name()
            .is_some_and(|name| name == "enforcer-cni")
    });
    named || std::env::var_os("CNI_COMMAND").is_some()
}

/// A CNI error (spec §"Error"): well-known codes below 100, the plugin's own from 100.
#[derive(Debug)]
pub struct CniError {
    code: u32,
    msg: String,
    details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

/// Codes of the spec, and this plugin's.
mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const UNDECODABLE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The controller refused the endpoint: it contradicts the policy.
    pub const REFUSED: u32 = 100;
    /// The controller could not enforce the endpoint.
    pub const NOT_ENFORCED: u32 = 101;
}

/// Runs the plugin: one command from the environment, the configuration on stdin, the result
/// or error on stdout.
pub fn main() -> ExitCode {
    let mut input = Vec::new();
    let outcome = std::io::stdin()
        .read_to_end(&mut input)
        .map_err(|error| CniError::new(code::IO_FAILURE, "reading stdin failed", error.to_string()))
        .and_then(|_| execute(&input));
    let version = serde_json::from_slice::<Value>(&input)
        .ok()
        .and_then(|config| config["cniVersion"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "1.0.0".to_owned());
    let (output, status) = match outcome {
        Ok(Some(result)) => (result, ExitCode::SUCCESS),
        Ok(None) => (Value::Null, ExitCode::SUCCESS),
        Err(error) => (
            json!({ "cniVersion": version, "code": error.code, "msg": error.msg, "details": error.details }),
            ExitCode::FAILURE,
        ),
    };
    if !output.is_null() {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{output}");
    }
    status
}

fn execute(input: &[u8]) -> Result<Option<Value>, CniError> {
    let command = std::env::var("CNI_COMMAND").map_err(|_| {
        CniError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_COMMAND is not set",
            "enforcer-cni is run by a container runtime as a CNI plugin",
        )
    })?;
    if command == "VERSION" {
        return Ok(Some(
            json!({ "cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS }),
        ));
    }
    let config = NetworkConfig::parse(input)?;
    if !SUPPORTED_VERSIONS.contains(&config.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("CNI version {} is not supported", config.cni_version),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    match command.as_str() {
        "ADD" => add(&config).map(Some),
        "DEL" => del(&config).map(|()| None),
        "CHECK" => check(&config).map(|()| None),
        other => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("unknown CNI_COMMAND {other}"),
            "expected ADD, DEL, CHECK or VERSION",
        )),
    }
}

fn add(config: &NetworkConfig) -> Result<Value, CniError> {
    let registration = registration(config)?;
    send(config, &Request::Add { registration })?;
    let mut result = config.prev_result.clone().unwrap_or_default();
    result["cniVersion"] = json!(config.cni_version);
    Ok(result)
}

/// Unregisters the endpoint `prevResult` names; without one there is nothing this plugin can
/// name, which is no error (the spec asks DEL to succeed when there is nothing to remove).
fn del(config: &NetworkConfig) -> Result<(), CniError> {
    let Some(prev_result) = &config.prev_result else {
        return Ok(());
    };
    let Some(interface) = host_interface(prev_result) else {
        return Ok(());
    };
    send(config, &Request::Del { interface })?;
    Ok(())
}

fn check(config: &NetworkConfig) -> Result<(), CniError> {
    let registration = registration(config)?;
    send(config, &Request::Check { registration })?;
    Ok(())
}

/// What the previous plugins' result and the configuration say the endpoint is.
fn registration(config: &NetworkConfig) -> Result<Registration, CniError> {
    let prev_result = config.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "enforcer-cni is a chained plugin: it needs prevResult",
            "put it in a plugin list after the plugins that create the interface and assign addresses (for example bridge with host-local)",
        )
    })?;
    let args = std::env::var("CNI_ARGS").unwrap_or_default();
    let service = service_from_args(&args)
        .or_else(|| config.service.clone())
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "no service for this endpoint",
                "set \"service\" in the plugin configuration, or ENFORCER_SERVICE in CNI_ARGS",
            )
        })?;
    let interface = host_interface(prev_result).ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "prevResult names no host-side interface",
            "the previous plugins must report the host end of the container's interface",
        )
    })?;
    let addresses = addresses(prev_result);
    if addresses.is_empty() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "prevResult has no addresses",
            "an IPAM plugin must assign the container's addresses before enforcer-cni",
        ));
    }
    Ok(Registration {
        service,
        interface,
        addresses,
    })
}

/// The host end of the container's interface: the interface outside any sandbox that is a
/// veth (a bridge plugin also reports its bridge), or the only one outside a sandbox.
fn host_interface(prev_result: &Value) -> Option<String> {
    let outside: Vec<&str> = prev_result["interfaces"]
        .as_array()?
        .iter()
        .filter(|interface| interface["sandbox"].as_str().is_none_or(str::is_empty))
        .filter_map(|interface| interface["name"].as_str())
        .collect();
    outside
        .iter()
        .find(|name| host::interface_driver(name).as_deref() == Some("veth"))
        .or_else(|| (outside.len() == 1).then(|| &outside[0]))
        .map(|name| (*name).to_owned())
}

/// The addresses in `prevResult` (`ips[].address` is a CIDR: the address and its subnet).
fn addresses(prev_result: &Value) -> Vec<IpAddr> {
    prev_result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .collect()
}

fn send(config: &NetworkConfig, request: &Request) -> Result<(), CniError> {
    let response = protocol::send(&config.socket, request).map_err(|error| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            "the enforcer controller did not answer",
            error.to_string(),
        )
    })?;
    match response.error {
        None => Ok(()),
        Some(error) if response.refused => Err(CniError::new(
            code::REFUSED,
            "the enforcer controller refused the endpoint",
            error,
        )),
        Some(error) => Err(CniError::new(
            code::NOT_ENFORCED,
            "the enforcer controller could not enforce the endpoint",
            error,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Debian's bridge + host-local plugins return for a container.
    fn bridge_result() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                { "name": "cni0", "mac": "ea:1d:48:be:04:a3" },
                { "name": "lo", "mac": "5a:c3:04:62:b6:41" },
                { "name": "eth0", "mac": "5a:46:5d:9e:e6:2d", "sandbox": "/var/run/netns/c1" }
            ],
            "ips": [
                { "interface": 2, "address": "10.77.0.2/24", "gateway": "10.77.0.1" },
                { "interface": 2, "address": "fd00:77::2/64" }
            ],
            "dns": {}
        })
    }

    #[test]
    fn addresses_are_read_from_the_previous_result() {
        assert_eq!(
            addresses(&bridge_result()),
            [
                "10.77.0.2".parse::<IpAddr>().unwrap(),
                "fd00:77::2".parse().unwrap()
            ]
        );
        assert!(addresses(&json!({})).is_empty());
    }

    #[test]
    fn the_host_interface_is_the_one_outside_the_sandbox() {
        let only_one = json!({ "interfaces": [
            { "name": "veth1" },
            { "name": "eth0", "sandbox": "/var/run/netns/c1" }
        ]});
        assert_eq!(host_interface(&only_one).as_deref(), Some("veth1"));
        assert_eq!(
            host_interface(&bridge_result()),
            None,
            "two outside and neither a veth here: ambiguous"
        );
        assert_eq!(host_interface(&json!({})), None);
    }
}
