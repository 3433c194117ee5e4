//! Answering the registry's requests (see [`crate::endpoints`]) in the event loop: a change
//! is saved, compiled and installed, and the interface attached, before the answer goes out;
//! one that cannot be carried through is undone, so an endpoint is never half registered.

use serde_json::json;

use super::{
    Host, RunOptions,
    controller::{self, Controller, Trigger},
};
use crate::{
    datapath::host,
    endpoints::{
        Registration, Registry,
        protocol::{Request, Response},
    },
};

pub(super) use crate::outputs::observe::RegistryRequest;

pub(super) fn answer(
    request: Request,
    options: &RunOptions,
    controller: &mut Controller,
    host: &mut Host<'_>,
) -> Response {
    match request {
        Request::List => listing(controller),
        Request::Add { registration } => add(registration, options, controller, host),
        Request::Del { interface } => del(&interface, options, controller, host),
        Request::Check { registration } => check(&registration, controller, host),
    }
}

fn listing(controller: &Controller) -> Response {
    Response {
        endpoints: controller.registry.iter().cloned().collect(),
        ..Response::default()
    }
}

fn add(
    registration: Registration,
    options: &RunOptions,
    controller: &mut Controller,
    host: &mut Host<'_>,
) -> Response {
    let Some((policy, _)) = &controller.policy else {
        return Response::failed("no policy is loaded");
    };
    if let Err(error) = controller.registry.check(policy, &registration) {
        return Response::refused(error);
    }
    let interface = registration.interface.clone();
    if host::interface_index(&interface).is_none() {
        return Response::refused(format!("interface {interface} does not exist on this host"));
    }
    if controller.registry.get(&interface) == Some(&registration)
        && host.interfaces.is_enforced(&interface)
    {
        return listing(controller);
    }
    let before = controller.registry.clone();
    controller.registry.insert(registration.clone());
    let enforced = |host: &Host<'_>| {
        if host.interfaces.is_enforced(&interface) {
            return Ok(());
        }
        let why = host
            .interfaces
            .gap(&interface)
            .map_or_else(|| "not attached".to_owned(), |gap| gap.error.clone());
        Err(format!("cannot enforce interface {interface}: {why}"))
    };
    if let Err(error) = carry_out(options, controller, host, before, enforced) {
        return Response::failed(error);
    }
    tracing::info!(
        interface,
        service = registration.service,
        "endpoint registered and enforced"
    );
    controller::audit(
        &controller.audit,
        "endpoint_add",
        json!({ "endpoint": registration }),
    );
    listing(controller)
}

fn del(
    interface: &str,
    options: &RunOptions,
    controller: &mut Controller,
    host: &mut Host<'_>,
) -> Response {
    let before = controller.registry.clone();
    let Some(removed) = controller.registry.remove(interface) else {
        return listing(controller);
    };
    if let Err(error) = carry_out(options, controller, host, before, |_| Ok(())) {
        return Response::failed(error);
    }
    tracing::info!(
        interface,
        service = removed.service,
        "endpoint unregistered"
    );
    controller::audit(
        &controller.audit,
        "endpoint_del",
        json!({ "endpoint": removed }),
    );
    listing(controller)
}

fn check(registration: &Registration, controller: &Controller, host: &Host<'_>) -> Response {
    let interface = &registration.interface;
    match controller.registry.get(interface) {
        None => Response::failed(format!("no endpoint is registered on {interface}")),
        Some(registered) if registered != registration => Response::failed(format!(
            "{interface} is registered as {} with addresses {:?}, not as asked",
            registered.service, registered.addresses
        )),
        Some(_) if !host.interfaces.is_enforced(interface) => {
            Response::failed(format!("{interface} is registered but not enforced"))
        }
        Some(_) => listing(controller),
    }
}

/// Carries out the change made to the registry (it was `before`): applied, then `verified`;
/// if either fails, the registry goes back to `before`, applied again, and the error is
/// returned: an endpoint is never half registered or half removed.
fn carry_out(
    options: &RunOptions,
    controller: &mut Controller,
    host: &mut Host<'_>,
    before: Registry,
    verified: impl FnOnce(&Host<'_>) -> Result<(), String>,
) -> Result<(), String> {
    let outcome = apply(options, controller, host).and_then(|()| verified(host));
    if outcome.is_err() {
        controller.registry = before;
        if let Err(undo) = apply(options, controller, host) {
            tracing::error!("undoing a change to the registered endpoints failed too: {undo}");
        }
    }
    outcome
}

/// Keeps the registry, installs what it now compiles to, follows its interfaces.
fn apply(
    options: &RunOptions,
    controller: &mut Controller,
    host: &mut Host<'_>,
) -> Result<(), String> {
    controller
        .registry
        .save(&controller.registry_file)
        .map_err(|error| error.to_string())?;
    controller
        .recompile_for_host(Trigger::Registration)
        .map_err(|error| error.to_string())?;
    host.follow(options, controller);
    Ok(())
}
