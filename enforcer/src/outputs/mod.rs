//! Where records go: alert encoding (OCSF, ECS), the alerts file, the tamper-evident audit log,
//! syslog, Prometheus metrics and the live `observe` socket. Outputs take records; they do not
//! reach into the datapath's loader.

pub mod alert;
pub mod alerts_file;
pub mod audit;
pub mod json_line;
pub mod metrics;
pub mod observe;
pub mod syslog;
