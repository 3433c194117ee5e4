//! Reaching etcd: the connection options `run --kvstore` and `fleet` share, and the errors.

use std::{path::PathBuf, time::Duration};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use super::KvstoreOptions;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("etcd: {0}")]
    Etcd(Box<etcd_client::Error>),
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--kvstore-cert and --kvstore-key go together")]
    HalfIdentity,
    #[error("{0}")]
    Session(String),
}

/// Connects to the etcd cluster at `options.endpoints` (TLS when a CA is given, with a client
/// certificate when one is). The connection is lazy: an unreachable cluster shows at the
/// first request.
pub async fn connect(options: &KvstoreOptions) -> Result<Client, FleetError> {
    let mut connect = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    if let Some(ca) = &options.ca {
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
        match (&options.cert, &options.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            (None, None) => {}
            _ => return Err(FleetError::HalfIdentity),
        }
        connect = connect.with_tls(tls);
    }
    Ok(Client::connect(&options.endpoints, Some(connect)).await?)
}

impl From<etcd_client::Error> for FleetError {
    fn from(error: etcd_client::Error) -> Self {
        Self::Etcd(Box::new(error))
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, FleetError> {
    std::fs::read(path).map_err(|source| FleetError::Read {
        path: path.clone(),
        source,
    })
}
