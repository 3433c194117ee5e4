//! The registry's requests over the controller's Unix socket (the one `observe` uses): one
//! JSON line each way. The socket is root's only (mode 0600 in a 0700 directory), which is
//! the whole of its access control, as for `observe`.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::Registration;

/// A request to the controller's registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "endpoint", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Register; answered once the endpoint is enforced (or refused, changing nothing).
    Add {
        registration: Registration,
    },
    /// Unregister the endpoint behind `interface`; nothing registered there is no error.
    Del {
        interface: String,
    },
    /// Whether exactly this registration is in force.
    Check {
        registration: Registration,
    },
    List,
}

/// The controller's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Why the request failed; `None` when it succeeded.
    pub error: Option<String>,
    /// The failure is the request's (it contradicts the policy) rather than the controller's.
    #[serde(default)]
    pub refused: bool,
    /// The registered endpoints after the request.
    #[serde(default)]
    pub endpoints: Vec<Registration>,
}

impl Response {
    pub fn refused(error: impl ToString) -> Self {
        Self {
            error: Some(error.to_string()),
            refused: true,
            endpoints: Vec::new(),
        }
    }

    pub fn failed(error: impl ToString) -> Self {
        Self {
            error: Some(error.to_string()),
            refused: false,
            endpoints: Vec::new(),
        }
    }
}

/// How long a client waits for an answer: an `add` waits for the programs to be attached and a
/// generation switched, well under a second.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no controller answers on {} (is `enforcer run` using this --pin-path?): {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("talking to the controller on {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("the controller on {} answered something unreadable: {answer:?}", path.display())]
    Malformed { path: PathBuf, answer: String },
}

/// Sends `request` to the controller listening on `socket` and returns its answer.
pub fn send(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    let io_error = |source| ClientError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(io_error)?;
    let line = serde_json::to_string(request).expect("plain data serialises");
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(io_error)?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(io_error)?;
    serde_json::from_str(&answer).map_err(|_| ClientError::Malformed {
        path: socket.to_owned(),
        answer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_one_json_line_each() {
        let add = Request::Add {
            registration: Registration {
                service: "api".to_owned(),
                interface: "veth1".to_owned(),
                addresses: vec!["10.1.0.2".parse().unwrap()],
            },
        };
        let line = serde_json::to_string(&add).unwrap();
        assert_eq!(
            line,
            r#"{"endpoint":"add","registration":{"service":"api","interface":"veth1","addresses":["10.1.0.2"]}}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), add);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"endpoint":"list"}"#).unwrap(),
            Request::List
        );
        assert!(serde_json::from_str::<Request>(r#"{"endpoint":"add","x":1}"#).is_err());
    }
}
