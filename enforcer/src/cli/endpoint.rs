//! `enforcer endpoint add|del|list`: the registry of the running controller (DESIGN §13).

use std::{net::IpAddr, path::PathBuf};

use clap::Subcommand;

use super::Failure;
use crate::{
    datapath::{loader::DEFAULT_PIN_PATH, pins::PinLayout},
    endpoints::{
        Registration,
        protocol::{self, Request, Response},
    },
};

#[derive(Debug, Subcommand)]
pub enum EndpointCommand {
    /// Register the endpoint behind an interface as a service's; returns once it is enforced.
    Add {
        #[arg(long)]
        service: String,
        /// The host side of the endpoint's interface (a veth's host end).
        #[arg(long)]
        interface: String,
        /// An address of the endpoint (repeat for each).
        #[arg(long = "address", required = true)]
        addresses: Vec<IpAddr>,
        #[command(flatten)]
        target: Target,
    },
    /// Unregister the endpoint behind an interface (nothing registered there is no error).
    Del {
        #[arg(long)]
        interface: String,
        #[command(flatten)]
        target: Target,
    },
    /// The registered endpoints.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
}

/// Which controller to talk to.
#[derive(Debug, clap::Args)]
pub struct Target {
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pin_path: PathBuf,
    /// The controller's socket (default: /run/enforcer/<pin directory name>.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
}

impl Target {
    fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| PinLayout::new(&self.pin_path).observe_socket())
    }
}

pub fn execute(command: EndpointCommand) -> Result<(), Failure> {
    match command {
        EndpointCommand::Add {
            service,
            interface,
            addresses,
            target,
        } => {
            let registration = Registration {
                service,
                interface,
                addresses,
            };
            send(
                &target,
                &Request::Add {
                    registration: registration.clone(),
                },
            )?;
            println!(
                "{} is enforced as {}",
                registration.interface, registration.service
            );
            Ok(())
        }
        EndpointCommand::Del { interface, target } => {
            send(
                &target,
                &Request::Del {
                    interface: interface.clone(),
                },
            )?;
            println!("{interface} is not registered");
            Ok(())
        }
        EndpointCommand::List { json, target } => {
            let response = send(&target, &Request::List)?;
            print!("{}", listing(&response.endpoints, json));
            Ok(())
        }
    }
}

/// Sends a request; a refusal is the operator's input (exit 1), any other failure the
/// system's (exit 2).
pub(super) fn send(target: &Target, request: &Request) -> Result<Response, Failure> {
    let response = protocol::send(&target.socket(), request)
        .map_err(|error| Failure::Runtime(error.to_string()))?;
    match &response.error {
        Some(error) if response.refused => Err(Failure::BadInput(format!("refused: {error}"))),
        Some(error) => Err(Failure::Runtime(error.clone())),
        None => Ok(response),
    }
}

fn listing(endpoints: &[Registration], json: bool) -> String {
    if json {
        return format!(
            "{}\n",
            serde_json::to_string(endpoints).expect("plain data serialises")
        );
    }
    if endpoints.is_empty() {
        return "no endpoints registered\n".to_owned();
    }
    endpoints
        .iter()
        .map(|endpoint| {
            let addresses: Vec<String> =
                endpoint.addresses.iter().map(ToString::to_string).collect();
            format!(
                "{:<16} {:<20} {}\n",
                endpoint.interface,
                endpoint.service,
                addresses.join(" ")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listing_shows_each_endpoint_on_a_line() {
        let endpoints = [Registration {
            service: "api".to_owned(),
            interface: "veth1".to_owned(),
            addresses: vec!["10.1.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
        }];
        assert_eq!(
            listing(&endpoints, false),
            "veth1            api                  10.1.0.2 fd00::2\n"
        );
        assert_eq!(listing(&[], false), "no endpoints registered\n");
        assert!(listing(&endpoints, true).starts_with("[{\"service\":\"api\""));
    }
}
