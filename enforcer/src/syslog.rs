//! `--syslog tcp://HOST:PORT`: the same records the alerts file gets, as RFC 5424 messages
//! (facility local0, the JSON record as the message) framed by octet counting (RFC 6587) on a
//! TCP connection. A thread of its own sends them, reconnecting with back-off, so a slow or
//! absent collector never stalls the event pipeline; what does not fit its queue is counted
//! and logged, never dropped silently.

use std::{
    io::Write as _,
    net::{SocketAddr, TcpStream, ToSocketAddrs as _},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use prometheus_client::metrics::counter::Counter;
use serde_json::Value;

/// Messages waiting for the collector before new ones are dropped (and counted).
const QUEUE: usize = 65_536;
const FACILITY_LOCAL0: u8 = 16;

/// Parses `tcp://HOST:PORT`.
pub fn parse_target(text: &str) -> Result<(String, u16), String> {
    let rest = text
        .strip_prefix("tcp://")
        .ok_or_else(|| format!("invalid --syslog \"{text}\": expected tcp://HOST:PORT"))?;
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("invalid --syslog \"{text}\": no port"))?;
    let port = port
        .parse()
        .map_err(|_| format!("invalid --syslog \"{text}\": bad port \"{port}\""))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("invalid --syslog \"{text}\": no host"));
    }
    Ok((host.to_owned(), port))
}

/// Syslog severity for an OCSF severity id.
pub fn severity(ocsf_severity: u8) -> u8 {
    match ocsf_severity {
        0 | 1 => 6, // informational
        2 => 5,     // notice
        3 => 4,     // warning
        4 => 3,     // error
        _ => 2,     // critical
    }
}

/// One RFC 5424 message with its octet-counting frame.
pub fn frame(
    severity: u8,
    time: SystemTime,
    hostname: &str,
    msgid: &str,
    record: &Value,
) -> String {
    let priority = u16::from(FACILITY_LOCAL0) * 8 + u16::from(severity);
    let message = format!(
        "<{priority}>1 {} {hostname} enforcer {} {msgid} - {record}",
        crate::alert::rfc3339(time),
        std::process::id()
    );
    format!("{} {message}", message.len())
}

pub struct SyslogSink {
    queue: Option<mpsc::SyncSender<String>>,
    /// `enforcer_syslog_dropped_total`.
    dropped: Counter,
    sender: Option<JoinHandle<()>>,
    hostname: String,
}

impl SyslogSink {
    /// Starts sending to `host:port` (resolved again at each reconnect); counts what it has to
    /// drop in `dropped`.
    pub fn start(host: String, port: u16, hostname: String, dropped: Counter) -> Self {
        Self::with_queue(host, port, hostname, dropped, QUEUE)
    }

    fn with_queue(
        host: String,
        port: u16,
        hostname: String,
        dropped: Counter,
        capacity: usize,
    ) -> Self {
        let (queue, messages) = mpsc::sync_channel::<String>(capacity);
        let sender = std::thread::Builder::new()
            .name("syslog".to_owned())
            .spawn(move || send_all(&host, port, &messages))
            .map_err(|error| tracing::error!("cannot start the syslog sender: {error}"))
            .ok();
        Self {
            queue: Some(queue),
            dropped,
            sender,
            hostname,
        }
    }

    /// Queues a record; `msgid` says what it is (flow, finding, heartbeat, lost).
    pub fn send(&self, ocsf_severity: u8, msgid: &str, record: &Value) {
        let Some(queue) = &self.queue else { return };
        let framed = frame(
            severity(ocsf_severity),
            SystemTime::now(),
            &self.hostname,
            msgid,
            record,
        );
        if queue.try_send(framed).is_err() {
            let dropped = self.dropped.inc() + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(
                    dropped,
                    "syslog collector too slow or unreachable: records dropped from the syslog stream only (the alerts file, if any, still has them)"
                );
            }
        }
    }
}

impl Drop for SyslogSink {
    /// Lets the sender deliver what is queued, for a little while.
    fn drop(&mut self) {
        self.queue.take();
        if let Some(sender) = self.sender.take() {
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while !sender.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn connect(host: &str, port: u16) -> Option<TcpStream> {
    let addresses: Vec<SocketAddr> = (host, port).to_socket_addrs().ok()?.collect();
    addresses
        .iter()
        .find_map(|address| TcpStream::connect_timeout(address, Duration::from_secs(2)).ok())
}

fn send_all(host: &str, port: u16, messages: &mpsc::Receiver<String>) {
    let mut stream: Option<TcpStream> = None;
    let mut backoff = Duration::from_millis(250);
    while let Ok(message) = messages.recv() {
        loop {
            if stream.is_none() {
                stream = connect(host, port);
                if stream.is_none() {
                    tracing::warn!(
                        "syslog collector {host}:{port} unreachable; retrying in {backoff:?}"
                    );
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
                let _ = stream
                    .as_ref()
                    .map(|stream| stream.set_write_timeout(Some(Duration::from_secs(5))));
                backoff = Duration::from_millis(250);
            }
            match stream
                .as_mut()
                .map(|stream| stream.write_all(message.as_bytes()))
            {
                Some(Ok(())) => break,
                _ => stream = None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    #[test]
    fn messages_are_rfc5424_with_octet_counting() {
        let record = serde_json::json!({ "class_uid": 4001 });
        let framed = frame(
            severity(2),
            UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            "node-1",
            "flow",
            &record,
        );
        let (length, message) = framed.split_once(' ').unwrap();
        assert_eq!(length.parse::<usize>().unwrap(), message.len());
        let expected_start = "<133>1 2023-11-14T22:13:20.123Z node-1 enforcer ";
        assert!(message.starts_with(expected_start), "{message}");
        assert!(
            message.ends_with(" flow - {\"class_uid\":4001}"),
            "{message}"
        );
    }

    #[test]
    fn records_beyond_the_queue_of_an_unreachable_collector_are_counted() {
        let dropped = Counter::default();
        // Nothing listens on port 1: the sender holds one record and retries.
        let sink = SyslogSink::with_queue(
            "127.0.0.1".to_owned(),
            1,
            "node-1".to_owned(),
            dropped.clone(),
            4,
        );
        for _ in 0..10 {
            sink.send(2, "flow", &serde_json::json!({}));
        }
        let counted = dropped.get();
        assert!(
            (5..=6).contains(&counted),
            "10 sent, 4 queued, at most 1 in hand: {counted}"
        );
    }

    #[test]
    fn targets_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_target("tcp://127.0.0.1:514").unwrap(),
            ("127.0.0.1".to_owned(), 514)
        );
        assert_eq!(
            parse_target("tcp://[::1]:6514").unwrap(),
            ("::1".to_owned(), 6514)
        );
        assert!(parse_target("udp://127.0.0.1:514").is_err());
        assert!(parse_target("tcp://127.0.0.1").is_err());
    }
}
