//! Reading policy files: one file or a directory, each cut into top-level tables that are
//! parsed (in parallel, and only what changed since the last parse) and then built together.

use std::{
    collections::HashMap,
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
};

use sha2::{Digest, Sha256};
use toml::Spanned;

use super::{
    Policy,
    build::build,
    diagnostics::{At, Diagnostic, Diagnostics, PolicyError, Source},
    documents::{
        DetectionDocument, PolicyDocument, RuleDocument, ServiceDocument, SettingsDocument,
    },
    tables,
};

/// Loads a policy from a file or a directory of `*.toml` files (merged, in name order).
pub fn load(path: &Path) -> Result<Policy, PolicyError> {
    load_cached(path, &mut ParseCache::default())
}

/// [`load`], parsing only the top-level tables that are not in `cache` (the tables of the
/// policy it last loaded), and leaving this policy's tables there for the next load.
pub fn load_cached(path: &Path, cache: &mut ParseCache) -> Result<Policy, PolicyError> {
    let files = policy_files(path)?;
    let mut sources = Vec::with_capacity(files.len());
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| PolicyError::Read {
            path: file.clone(),
            source,
        })?;
        sources.push((file, text));
    }
    parse_sources_cached(sources, cache)
}

/// The files a policy path stands for.
pub fn policy_files(path: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let metadata = std::fs::metadata(path).map_err(|source| PolicyError::Read {
        path: path.to_owned(),
        source,
    })?;
    if !metadata.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let entries = std::fs::read_dir(path).map_err(|source| PolicyError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // Kubernetes ConfigMap mounts keep their real files in `..data`-style hidden entries;
        // the visible names are symlinks into them.
        if name.starts_with('.') || !name.ends_with(".toml") {
            continue;
        }
        if file.is_file() {
            files.push(file);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(PolicyError::EmptyDirectory(path.to_owned()));
    }
    Ok(files)
}

/// Refuses a policy that someone other than root (or the user running enforcer) can change, as
/// sshd's StrictModes does for its files: the policy files themselves, and the directory that
/// holds them (a directory policy's own; a single file's parent, which may be world-writable
/// only with the sticky bit, like `/tmp`, as others cannot then replace the file). `run` checks
/// this at every load; `check`, `explain` and `diff` read drafts and do not. What lies on a
/// read-only mount passes.
pub fn check_writers(path: &Path) -> Result<(), PolicyError> {
    let files = policy_files(path)?;
    let is_directory = std::fs::metadata(path).is_ok_and(|metadata| metadata.is_dir());
    let directory = if is_directory {
        path.to_owned()
    } else {
        path.parent()
            .filter(|parent| !parent.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned()
    };
    writers_ok(&directory, !is_directory)?;
    for file in &files {
        writers_ok(file, false)?;
    }
    Ok(())
}

/// Whether only root or this user can change `path` (following symlinks, as reading does).
fn writers_ok(path: &Path, sticky_directory_will_do: bool) -> Result<(), PolicyError> {
    use std::os::unix::fs::MetadataExt as _;
    let metadata = std::fs::metadata(path).map_err(|source| PolicyError::Read {
        path: path.to_owned(),
        source,
    })?;
    // A read-only mount (a Kubernetes ConfigMap volume) cannot be written whatever its modes say.
    let read_only = nix::sys::statvfs::statvfs(path)
        .is_ok_and(|stat| stat.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));
    if read_only {
        return Ok(());
    }
    let (owner, mode) = (metadata.uid(), metadata.mode() & 0o7777);
    let me = nix::unistd::geteuid().as_raw();
    let sticky = mode & 0o1000 != 0;
    let who = if owner != 0 && owner != me {
        Some("its owner, another user")
    } else if mode & 0o002 != 0 && !(sticky_directory_will_do && sticky) {
        Some("every user")
    } else if mode & 0o020 != 0 && !(sticky_directory_will_do && sticky) {
        Some("its group")
    } else {
        None
    };
    match who {
        Some(who) => Err(PolicyError::Writable {
            path: path.to_owned(),
            who,
            owner,
            mode,
        }),
        None => Ok(()),
    }
}

/// Parses policy sources given as `(path, text)`, in the order given.
pub fn parse_sources(files: Vec<(PathBuf, String)>) -> Result<Policy, PolicyError> {
    parse_sources_cached(files, &mut ParseCache::default())
}

/// Each file of the policy last loaded, with its top-level tables as parsed. With it, a
/// one-rule change to a policy of 100 000 rules parses one table, not 100 000.
#[derive(Default)]
pub struct ParseCache {
    pub(super) files: HashMap<PathBuf, ParsedFile>,
}

pub(super) struct ParsedFile {
    pub(super) text: String,
    pub(super) parts: FileParts,
}

/// [`parse_sources`] with a [`ParseCache`].
pub fn parse_sources_cached(
    files: Vec<(PathBuf, String)>,
    cache: &mut ParseCache,
) -> Result<Policy, PolicyError> {
    let hash = content_hash(&files);
    let sources: Vec<Source> = files
        .into_iter()
        .map(|(path, text)| Source::new(path, text))
        .collect();
    let mut diagnostics = Diagnostics::default();
    let mut previous = std::mem::take(&mut cache.files);
    let mut parts = Vec::with_capacity(sources.len());
    for source in &sources {
        if declares_nothing(&source.text) {
            // Installing it would stop enforcing everything the policy declared; an empty
            // file is far more often a write caught half-way, or a mistake, than a wish.
            diagnostics.error(
                source.origin(0),
                "the file is empty: a policy file declares at least one service, rule or setting",
            );
            continue;
        }
        match parse_file(source, previous.remove(&*source.path).as_ref()) {
            Ok(file_parts) => {
                cache.files.insert(
                    source.path.to_path_buf(),
                    ParsedFile {
                        text: source.text.clone(),
                        parts: file_parts.clone(),
                    },
                );
                parts.push((source, file_parts));
            }
            Err(diagnostic) => diagnostics.0.push(diagnostic),
        }
    }
    if !diagnostics.0.is_empty() {
        return Err(PolicyError::Invalid(diagnostics.0));
    }
    let files: Vec<FileContent<'_>> = parts
        .iter()
        .map(|(source, file_parts)| FileContent::gather(source, file_parts))
        .collect();
    let paths = sources
        .iter()
        .map(|source| source.path.to_path_buf())
        .collect();
    let policy = build(hash, paths, &files, &mut diagnostics);
    if diagnostics.0.is_empty() {
        Ok(policy)
    } else {
        Err(PolicyError::Invalid(diagnostics.0))
    }
}

/// SHA-256 over the files' names and texts: what `status` and the audit log call the policy
/// hash.
pub(super) fn content_hash(files: &[(PathBuf, String)]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for (path, text) in files {
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update((text.len() as u64).to_le_bytes());
        hasher.update(text.as_bytes());
    }
    hasher.finalize().into()
}

/// A file's parsed parts, each with the bytes it was parsed from: its top-level tables, or the
/// whole file as one part.
pub(super) type FileParts = Vec<(Range<usize>, Arc<PolicyDocument>)>;

/// Parses one file table by table, taking the tables whose text did not change since `previous`
/// from it. A file that cannot be cut into tables, or whose tables do not all parse, is parsed
/// whole, so that its errors are exactly those of the whole file.
pub(super) fn parse_file(
    source: &Source,
    previous: Option<&ParsedFile>,
) -> Result<FileParts, Diagnostic> {
    if let Some(ranges) = tables::top_level_tables(&source.text)
        && let Some(parts) = parse_tables(&source.text, ranges, previous)
    {
        return Ok(parts);
    }
    parse_whole_file(source)
}

pub(super) fn parse_whole_file(source: &Source) -> Result<FileParts, Diagnostic> {
    match PolicyDocument::parse(&source.text) {
        Ok(document) => Ok(vec![(0..source.text.len(), Arc::new(document))]),
        Err(error) => Err(Diagnostic {
            origin: source.origin(error.span().map_or(0, |span| span.start)),
            message: error.message().trim().to_owned(),
        }),
    }
}

/// Below this many tables to parse, threads cost more than they save.
pub(super) const PARALLEL_PARSE_MIN: usize = 1024;

pub(super) fn parse_tables(
    text: &str,
    ranges: Vec<Range<usize>>,
    previous: Option<&ParsedFile>,
) -> Option<FileParts> {
    let mut known: Vec<Option<Arc<PolicyDocument>>> = match previous {
        Some(previous) => {
            let same = common_ends(previous.text.as_bytes(), text.as_bytes());
            ranges
                .iter()
                .map(|range| previous.unchanged(text.len(), same, range))
                .collect()
        }
        None => vec![None; ranges.len()],
    };
    let missing: Vec<(usize, &str)> = ranges
        .iter()
        .enumerate()
        .filter(|(index, _)| known[*index].is_none())
        .map(|(index, range)| (index, &text[range.clone()]))
        .collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(missing.len().div_ceil(PARALLEL_PARSE_MIN))
        .max(1);
    let chunk = missing.len().div_ceil(threads).max(1);
    let parsed: Vec<Vec<Option<PolicyDocument>>> = std::thread::scope(|scope| {
        let workers: Vec<_> = missing
            .chunks(chunk)
            .map(|tables| {
                scope.spawn(move || {
                    tables
                        .iter()
                        .map(|(_, table)| PolicyDocument::parse(table).ok())
                        .collect()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap_or_default())
            .collect()
    });
    for ((index, _), document) in missing.iter().zip(parsed.into_iter().flatten()) {
        known[*index] = Some(Arc::new(document?));
    }
    let parts: FileParts = ranges
        .into_iter()
        .zip(known)
        .map(|(range, document)| document.map(|document| (range, document)))
        .collect::<Option<_>>()?;
    // Given twice in one file, [settings] or [detection] is an error of the whole file.
    let singletons_repeat = parts
        .iter()
        .filter(|(_, part)| part.settings.is_some())
        .count()
        > 1
        || parts
            .iter()
            .filter(|(_, part)| part.detection.is_some())
            .count()
            > 1;
    (!singletons_repeat).then_some(parts)
}

impl ParsedFile {
    /// The parse of the new text's `range`, when that range lies in what the new text (of
    /// `new_len` bytes) has in common with this one at its start or end (`same`), and was a
    /// table here too. So no table's text is hashed or compared on its own.
    pub(super) fn unchanged(
        &self,
        new_len: usize,
        (same_start, same_end): (usize, usize),
        range: &Range<usize>,
    ) -> Option<Arc<PolicyDocument>> {
        let was = if range.end <= same_start {
            range.clone()
        } else if range.start >= new_len - same_end {
            let shift = |offset: usize| offset + self.text.len() - new_len;
            shift(range.start)..shift(range.end)
        } else {
            return None;
        };
        let index = self
            .parts
            .binary_search_by_key(&was.start, |(range, _)| range.start)
            .ok()?;
        let (old_range, document) = &self.parts[index];
        (old_range.end == was.end).then(|| document.clone())
    }
}

/// How many bytes two texts have in common at their start, and then at their end (the two
/// never overlap in either text).
pub(super) fn common_ends(old: &[u8], new: &[u8]) -> (usize, usize) {
    const CHUNK: usize = 4096;
    let shorter = old.len().min(new.len());
    let mut start = 0;
    while start + CHUNK <= shorter && old[start..start + CHUNK] == new[start..start + CHUNK] {
        start += CHUNK;
    }
    start += old[start..shorter]
        .iter()
        .zip(&new[start..shorter])
        .take_while(|(a, b)| a == b)
        .count();
    let room = shorter - start;
    let (old_tail, new_tail) = (&old[old.len() - room..], &new[new.len() - room..]);
    let mut end = 0;
    while end + CHUNK <= room
        && old_tail[room - end - CHUNK..room - end] == new_tail[room - end - CHUNK..room - end]
    {
        end += CHUNK;
    }
    end += old_tail[..room - end]
        .iter()
        .rev()
        .zip(new_tail[..room - end].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    (start, end)
}

/// One file's content in the order a parse of the whole file gives it, each item with the
/// part it was parsed from.
pub(super) struct FileContent<'a> {
    pub(super) settings: Option<(At<'a>, &'a Spanned<SettingsDocument>)>,
    pub(super) detection: Option<(At<'a>, &'a Spanned<DetectionDocument>)>,
    pub(super) service: Vec<(At<'a>, &'a Spanned<ServiceDocument>)>,
    pub(super) allow: Vec<(At<'a>, &'a Spanned<RuleDocument>)>,
    pub(super) deny: Vec<(At<'a>, &'a Spanned<RuleDocument>)>,
}

impl<'a> FileContent<'a> {
    pub(super) fn gather(source: &'a Source, parts: &'a FileParts) -> Self {
        let mut content = Self {
            settings: None,
            detection: None,
            service: Vec::new(),
            allow: Vec::new(),
            deny: Vec::new(),
        };
        for (range, part) in parts {
            let at = source.from(range.start);
            if let Some(settings) = &part.settings {
                content.settings = Some((at, settings));
            }
            if let Some(detection) = &part.detection {
                content.detection = Some((at, detection));
            }
            content
                .service
                .extend(part.service.iter().map(|service| (at, service)));
            content
                .allow
                .extend(part.allow.iter().map(|rule| (at, rule)));
            content.deny.extend(part.deny.iter().map(|rule| (at, rule)));
        }
        content
    }
}

/// Whether TOML text is only whitespace and comments.
pub(super) fn declares_nothing(text: &str) -> bool {
    text.lines().all(|line| {
        let line = line.trim();
        line.is_empty() || line.starts_with('#')
    })
}
