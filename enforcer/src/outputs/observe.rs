//! `enforcer observe`: live flow records from the running controller over a root-only Unix
//! socket. The controller keeps the last records for clients that only want a look back; with
//! `follow` it streams new ones as they come.

use std::{
    collections::VecDeque,
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::UnixListener,
    sync::{broadcast, mpsc, oneshot},
};

use crate::{
    endpoints::protocol::{Request, Response},
    events::FlowRecord,
};

/// Records a client gets when it connects.
const BACKLOG: usize = 1024;

/// Where the pipeline publishes flow records for observers.
pub struct Hub {
    backlog: Mutex<VecDeque<Arc<str>>>,
    live: broadcast::Sender<Arc<str>>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            backlog: Mutex::new(VecDeque::with_capacity(BACKLOG)),
            live: broadcast::channel(BACKLOG).0,
        }
    }
}

impl Hub {
    pub fn publish(&self, record: &FlowRecord) {
        let Ok(line) = serde_json::to_string(record) else {
            return;
        };
        let line: Arc<str> = Arc::from(line);
        let mut backlog = crate::locks::lock(&self.backlog);
        if backlog.len() == BACKLOG {
            backlog.pop_front();
        }
        backlog.push_back(line.clone());
        // No observer is fine: the record is in the backlog.
        let _ = self.live.send(line);
    }
}

/// A registry request from a client, and where its answer goes.
pub type RegistryRequest = (Request, oneshot::Sender<Response>);

/// Serves the controller's socket on `path` (mode 0600 in a 0700 directory) until the task is
/// dropped: observers, and registry requests, which go to `registry`.
pub async fn serve(
    path: PathBuf,
    hub: Arc<Hub>,
    registry: mpsc::UnboundedSender<RegistryRequest>,
) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    // A socket left by a controller that died.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let hub = hub.clone();
        let registry = registry.clone();
        tokio::spawn(async move {
            if let Err(error) = serve_client(stream, &hub, &registry).await {
                tracing::debug!("client went away: {error}");
            }
        });
    }
}

async fn serve_client(
    stream: tokio::net::UnixStream,
    hub: &Hub,
    registry: &mpsc::UnboundedSender<RegistryRequest>,
) -> io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut request = String::new();
    tokio::io::BufReader::new(reader)
        .read_line(&mut request)
        .await?;
    if request.starts_with('{') {
        let response = answer_registry_request(&request, registry).await;
        let line = serde_json::to_string(&response).expect("plain data serialises");
        writer.write_all(format!("{line}\n").as_bytes()).await?;
        return writer.shutdown().await;
    }
    let follow = request.trim() == "follow";
    // Subscribe before copying the backlog so nothing falls between the two.
    let mut live = hub.live.subscribe();
    let backlog: Vec<Arc<str>> = crate::locks::lock(&hub.backlog).iter().cloned().collect();
    for line in &backlog {
        writer.write_all(format!("{line}\n").as_bytes()).await?;
    }
    if !follow {
        return writer.shutdown().await;
    }
    loop {
        match live.recv().await {
            Ok(line) => writer.write_all(format!("{line}\n").as_bytes()).await?,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // Say so rather than silently skip.
                writer
                    .write_all(format!("{{\"observer_lagged\":{missed}}}\n").as_bytes())
                    .await?;
            }
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

/// Hands a registry request to the controller and waits for its answer.
async fn answer_registry_request(
    line: &str,
    registry: &mpsc::UnboundedSender<RegistryRequest>,
) -> Response {
    let request: Request = match serde_json::from_str(line) {
        Ok(request) => request,
        Err(error) => return Response::refused(format!("malformed request: {error}")),
    };
    let (reply, answer) = oneshot::channel();
    if registry.send((request, reply)).is_err() {
        return Response::failed("the controller is stopping");
    }
    answer
        .await
        .unwrap_or_else(|_| Response::failed("the controller is stopping"))
}

/// Which records an observer wants.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Either end is this service (or world/host/CIDR name).
    pub service: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub verdict: Option<String>,
    pub port: Option<u16>,
}

impl Filter {
    pub fn matches(&self, record: &Value) -> bool {
        let src = record["src"]["name"].as_str().unwrap_or_default();
        let dst = record["dst"]["name"].as_str().unwrap_or_default();
        self.service
            .as_ref()
            .is_none_or(|service| service == src || service == dst)
            && self.from.as_ref().is_none_or(|from| from == src)
            && self.to.as_ref().is_none_or(|to| to == dst)
            && self
                .verdict
                .as_ref()
                .is_none_or(|verdict| record["verdict"] == verdict.as_str())
            && self.port.is_none_or(|port| record["dst"]["port"] == port)
    }
}

/// One line a person can read.
pub fn describe(record: &Value) -> String {
    let end = |side: &str| {
        let end = &record[side];
        format!(
            "{} [{}]:{}",
            end["name"].as_str().unwrap_or("?"),
            end["ip"].as_str().unwrap_or("?"),
            end["port"]
        )
    };
    let count = record["count"].as_u64().unwrap_or(1);
    format!(
        "{} {} -> {} {} {:<5} {} by {}{}{}",
        crate::outputs::alert::rfc3339(
            std::time::UNIX_EPOCH
                + std::time::Duration::from_millis(record["time"].as_u64().unwrap_or(0))
        ),
        end("src"),
        end("dst"),
        record["protocol"].as_str().unwrap_or("?"),
        record["verdict"].as_str().unwrap_or("?"),
        record["reason"].as_str().unwrap_or("?"),
        record["rule"].as_str().unwrap_or("?"),
        if count > 1 {
            format!(" ({count} packets)")
        } else {
            String::new()
        },
        if record["rejudged"] == true {
            " (policy changed)"
        } else if record["aggregated"] == true {
            " (any destination: aggregated per source under load)"
        } else {
            ""
        },
    )
}

/// Connects to a controller's socket and prints matching records until the stream ends.
pub fn watch(
    socket: &Path,
    follow: bool,
    filter: &Filter,
    json: bool,
    mut out: impl io::Write,
) -> io::Result<()> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|error| io::Error::new(error.kind(), format!("cannot reach the controller at {}: {error} (is `enforcer run` running with this --pin-path?)", socket.display())))?;
    stream.write_all(if follow { b"follow\n" } else { b"backlog\n" })?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let Ok(record) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if let Some(missed) = record.get("observer_lagged") {
            eprintln!("observe: {missed} records skipped (this observer fell behind)");
            continue;
        }
        if !filter.matches(&record) {
            continue;
        }
        if json {
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "{}", describe(&record))?;
        }
        out.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn filters_match_service_direction_verdict_and_port() {
        let record = json!({"src": {"name": "frontend", "port": 40000}, "dst": {"name": "api", "port": 8080}, "verdict": "deny"});
        assert!(Filter::default().matches(&record));
        assert!(
            Filter {
                service: Some("api".into()),
                ..Default::default()
            }
            .matches(&record)
        );
        assert!(
            Filter {
                from: Some("frontend".into()),
                to: Some("api".into()),
                ..Default::default()
            }
            .matches(&record)
        );
        assert!(
            !Filter {
                from: Some("api".into()),
                ..Default::default()
            }
            .matches(&record)
        );
        assert!(
            Filter {
                verdict: Some("deny".into()),
                port: Some(8080),
                ..Default::default()
            }
            .matches(&record)
        );
        assert!(
            !Filter {
                verdict: Some("allow".into()),
                ..Default::default()
            }
            .matches(&record)
        );
        assert!(
            !Filter {
                port: Some(80),
                ..Default::default()
            }
            .matches(&record)
        );
    }
}
