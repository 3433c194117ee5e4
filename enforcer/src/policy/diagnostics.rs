//! Where a policy is wrong, said with file, line and column.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
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
    /// Byte offset where each line starts: made when first needed, which positions in a table
    /// whose line is known are not (several milliseconds, and megabytes, for a large policy).
    line_starts: OnceLock<Vec<usize>>,
}

impl Source {
    pub(super) fn new(path: PathBuf, text: String) -> Self {
        Self {
            path: Arc::from(path),
            text,
            line_starts: OnceLock::new(),
        }
    }

    fn line_starts(&self) -> &[usize] {
        self.line_starts.get_or_init(|| {
            let newlines = || memchr::memchr_iter(b'\n', self.text.as_bytes());
            let mut starts = Vec::with_capacity(newlines().count() + 1);
            starts.push(0);
            starts.extend(newlines().map(|newline| newline + 1));
            starts
        })
    }

    pub(super) fn origin(&self, offset: usize) -> Origin {
        let offset = offset.min(self.text.len());
        let line_starts = self.line_starts();
        let line = line_starts.partition_point(|start| *start <= offset);
        self.origin_on(line, line_starts[line - 1], offset)
    }

    /// The origin of `offset`, on line `line` (1-based), which starts at byte `line_start`.
    fn origin_on(&self, line: usize, line_start: usize, offset: usize) -> Origin {
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
        At {
            source: self,
            base,
            line: None,
        }
    }

    /// Positions in the table of this file that starts at byte `base`, the start of line `line`.
    pub(super) fn table(&self, base: usize, line: u32) -> At<'_> {
        At {
            source: self,
            base,
            line: Some(line),
        }
    }
}

/// A part of a policy file (one top-level table, or the whole file) that was parsed on its
/// own: the spans of what was parsed from it count from `base`.
#[derive(Clone, Copy)]
pub(super) struct At<'a> {
    pub(super) source: &'a Source,
    pub(super) base: usize,
    /// The line `base` starts, when known: a position is then found in the part's own text.
    line: Option<u32>,
}

impl At<'_> {
    pub(super) fn at<T>(&self, spanned: &Spanned<T>) -> Origin {
        let offset = (self.base + spanned.span().start).min(self.source.text.len());
        let Some(line) = self.line else {
            return self.source.origin(offset);
        };
        let before = &self.source.text.as_bytes()[self.base..offset];
        let newlines = memchr::memchr_iter(b'\n', before).count();
        let line_start =
            memchr::memrchr(b'\n', before).map_or(self.base, |newline| self.base + newline + 1);
        self.source
            .origin_on(line as usize + newlines, line_start, offset)
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
