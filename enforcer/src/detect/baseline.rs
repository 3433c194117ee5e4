//! `--edge-baseline PATH`: the edges `new_edge` has reported, kept across controller restarts
//! so that a restart does not report every live edge as new again (DESIGN §7 "since the
//! baseline file, when one is kept"). One JSON object per line, appended when an edge is first
//! seen. Operators may edit it: delete a line to hear about that edge again, or seed a new host
//! with another host's file.

use std::{
    fs::File,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use crate::detect::Edge;

#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    #[error("{}:{line}: {problem}", path.display())]
    Malformed {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

pub struct EdgeBaseline {
    path: PathBuf,
    file: File,
}

/// The edges in a baseline's text, and the length of the text they came from. A last line
/// without its newline that does not parse was torn by a crash during an append: it is left
/// out (and its length with it), so that the file can be cut back to the lines that are whole.
fn parse(path: &Path, text: &str) -> Result<(Vec<Edge>, usize), BaselineError> {
    let mut edges = Vec::new();
    let mut whole = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let complete = line.ends_with('\n');
        let content = line.trim();
        if !content.is_empty() {
            match serde_json::from_str::<Edge>(content) {
                Ok(edge) => edges.push(edge),
                Err(_) if !complete => break,
                Err(error) => {
                    return Err(BaselineError::Malformed {
                        path: path.to_owned(),
                        line: index + 1,
                        problem: format!(
                            "not an edge ({error}); expected {{\"src\": ..., \"dst\": ..., \"protocol\": ..., \"port\": ...}}"
                        ),
                    });
                }
            }
        }
        whole += line.len();
    }
    Ok((edges, whole))
}

impl EdgeBaseline {
    /// Opens (or creates) the baseline and returns the edges it already knows.
    pub fn open(path: &Path) -> Result<(Self, Vec<Edge>), BaselineError> {
        let io_error = |what, source| BaselineError::Io {
            what,
            path: path.to_owned(),
            source,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => String::new(),
            Err(error) => return Err(io_error("reading edge baseline", error)),
        };
        let (edges, whole) = parse(path, &text)?;
        let mut file = crate::logfile::open_append(path)
            .map_err(|error| io_error("opening edge baseline", error))?;
        if whole < text.len() {
            tracing::warn!(
                "{}: dropping a torn last line (the controller stopped while writing it): {:?}",
                path.display(),
                &text[whole..]
            );
            file.set_len(whole as u64)
                .map_err(|error| io_error("truncating edge baseline", error))?;
        } else if !text.is_empty() && !text.ends_with('\n') {
            file.write_all(b"\n")
                .map_err(|error| io_error("writing edge baseline", error))?;
        }
        Ok((
            Self {
                path: path.to_owned(),
                file,
            },
            edges,
        ))
    }

    /// Adds an edge; one write, so a crash tears at most this line.
    pub fn record(&mut self, edge: &Edge) {
        let mut line = serde_json::to_string(edge).expect("an edge serialises");
        line.push('\n');
        if let Err(error) = self.file.write_all(line.as_bytes()) {
            tracing::error!(
                "{}: cannot record the new edge {line:?}: {error}; it will be reported as new again after a restart",
                self.path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(src: &str, port: u16) -> Edge {
        Edge {
            src: src.to_owned(),
            dst: "api".to_owned(),
            protocol: "tcp".to_owned(),
            port,
        }
    }

    #[test]
    fn recorded_edges_are_known_when_reopened() {
        let scratch = crate::ScratchFile::new("reopen.jsonl");
        let path = &scratch.0;
        let (mut baseline, known) = EdgeBaseline::open(path).unwrap();
        assert!(known.is_empty());
        baseline.record(&edge("frontend", 8080));
        baseline.record(&edge("worker", 9090));
        drop(baseline);
        let (_, known) = EdgeBaseline::open(path).unwrap();
        assert_eq!(known, vec![edge("frontend", 8080), edge("worker", 9090)]);
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_appending_goes_on_after_the_whole_ones() {
        let scratch = crate::ScratchFile::new("torn.jsonl");
        let path = &scratch.0;
        let whole = format!(
            "{}\n",
            serde_json::to_string(&edge("frontend", 8080)).unwrap()
        );
        std::fs::write(path, format!("{whole}{{\"src\":\"wor")).unwrap();
        let (mut baseline, known) = EdgeBaseline::open(path).unwrap();
        assert_eq!(known, vec![edge("frontend", 8080)]);
        baseline.record(&edge("worker", 9090));
        let (_, known) = EdgeBaseline::open(path).unwrap();
        assert_eq!(known, vec![edge("frontend", 8080), edge("worker", 9090)]);
    }

    #[test]
    fn a_whole_last_line_without_its_newline_is_kept() {
        let scratch = crate::ScratchFile::new("no-newline.jsonl");
        let path = &scratch.0;
        std::fs::write(
            path,
            serde_json::to_string(&edge("frontend", 8080)).unwrap(),
        )
        .unwrap();
        let (mut baseline, known) = EdgeBaseline::open(path).unwrap();
        assert_eq!(known, vec![edge("frontend", 8080)]);
        baseline.record(&edge("worker", 9090));
        let (_, known) = EdgeBaseline::open(path).unwrap();
        assert_eq!(known.len(), 2);
    }

    #[test]
    fn a_bad_line_in_the_middle_is_refused_with_its_place() {
        let scratch = crate::ScratchFile::new("bad.jsonl");
        let path = &scratch.0;
        let good = serde_json::to_string(&edge("frontend", 8080)).unwrap();
        std::fs::write(
            path,
            format!("{good}\n{{\"src\":\"x\",\"port\":\"eighty\"}}\n{good}\n"),
        )
        .unwrap();
        let error = EdgeBaseline::open(path).err().expect("refused").to_string();
        assert!(
            error.starts_with(&format!("{}:2: not an edge", path.display())),
            "{error}"
        );
    }
}
