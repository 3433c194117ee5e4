//! Where a policy is wrong, said with file, line and column.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use toml::Spanned;

/// A position in a policy file, 1-based.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Origin {
    /// Shared by every origin in the file: a policy of 100 000 rules has as many.
    pub file: Arc<Path>,
    pub line: u32,
    pub column: u32,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// One problem in a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub origin: Origin,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.message)
    }
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no policy files (*.toml) in directory {}", .0.display())]
    EmptyDirectory(PathBuf),
    #[error(
        "{} can be changed by {who} (owner uid {owner}, mode {mode:04o}): whoever can write the policy decides what is allowed; make it owned by root and not group- or world-writable (chmod go-w)",
        path.display()
    )]
    Writable {
        path: PathBuf,
        who: &'static str,
        owner: u32,
        mode: u32,
    },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Diagnostic>),
}

impl PolicyError {
    /// The individual problems, for callers that report them one by one.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            Self::Invalid(diagnostics) => diagnostics,
            _ => &[],
        }
    }
}

/// A policy file's text, for turning byte offsets into line and column.
pub(super) struct Source {
    /// Shared with the origins of everything the file declares.
    pub(super) path: Arc<Path>,
    pub(super) text: String,
    /// Byte offset where each line starts.
    pub(super) line_starts: Vec<usize>,
}

impl Source {
    pub(super) fn new(path: PathBuf, text: String) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(newline, _)| newline + 1))
            .collect();
        Self {
            path: Arc::from(path),
            text,
            line_starts,
        }
    }

    pub(super) fn origin(&self, offset: usize) -> Origin {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|start| *start <= offset);
        let line_start = self.line_starts[line - 1];
        let column = self.text[line_start..offset].chars().count() + 1;
        // (A policy file of four billion lines is not one a controller could load anyway.)
        Origin {
            file: Arc::clone(&self.path),
            line: u32::try_from(line).unwrap_or(u32::MAX),
            column: u32::try_from(column).unwrap_or(u32::MAX),
        }
    }

    /// Positions in the part of this file that starts at byte `base`.
    pub(super) fn from(&self, base: usize) -> At<'_> {
        At { source: self, base }
    }
}

/// A part of a policy file (one top-level table, or the whole file) that was parsed on its
/// own: the spans of what was parsed from it count from `base`.
#[derive(Clone, Copy)]
pub(super) struct At<'a> {
    pub(super) source: &'a Source,
    pub(super) base: usize,
}

impl At<'_> {
    pub(super) fn at<T>(&self, spanned: &Spanned<T>) -> Origin {
        self.source.origin(self.base + spanned.span().start)
    }
}

/// Collects diagnostics while a policy is checked, so one run reports every problem.
#[derive(Default)]
pub(super) struct Diagnostics(pub(super) Vec<Diagnostic>);

impl Diagnostics {
    pub(super) fn error(&mut self, origin: Origin, message: impl ToString) {
        self.0.push(Diagnostic {
            origin,
            message: message.to_string(),
        });
    }
}
