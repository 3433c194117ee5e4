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

use ipnet::IpNet;

use super::{
    Policy, Rule, RuleKind,
    build::{self, FreshRule},
    diagnostics::{At, Diagnostic, Diagnostics, PolicyError, Source},
    documents::{
        DetectionDocument, PolicyDocument, RuleDocument, ServiceDocument, SettingsDocument,
    },
    rule_ids::RuleIds,
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

/// Each file of the policy last loaded, cut into its top-level tables, each parsed and, once a
/// policy built from them, each rule table built. With it, a one-rule change to a policy of
/// 100 000 rules cuts, parses and builds one table, not 100 000.
#[derive(Default)]
pub struct ParseCache {
    pub(super) files: HashMap<PathBuf, ParsedFile>,
    /// The services (names and addresses) the built rules were built against: a rule names a
    /// service by its place in this list, and may not name one of their addresses as a CIDR.
    services: Vec<(String, Vec<IpNet>)>,
    /// Which rule holds each rule id, as of the last load.
    ids: RuleIds,
}

pub(super) struct ParsedFile {
    text: String,
    pub(super) parts: FileParts,
    /// Whether the parts are the file's top-level tables (else one part: the whole file).
    cut: bool,
}

/// A file's parts, in file order.
pub(super) type FileParts = Vec<Part>;

/// A file's parts, and whether they are its top-level tables (else one part: the whole file).
pub(super) type FileParse = (FileParts, bool);

/// A part of a file: one top-level table, or the whole file.
pub(super) struct Part {
    pub(super) range: Range<usize>,
    /// The line the part starts on (1-based).
    pub(super) line: u32,
    pub(super) content: PartContent,
}

pub(super) enum PartContent {
    Parsed(Arc<PolicyDocument>),
    /// A part of rules only, as the last policy that loaded built them; its document is not
    /// kept (at 100 000 rules, the documents took more memory than the rules).
    Built(Box<[Arc<Rule>]>),
}

impl Part {
    fn parsed(range: Range<usize>, line: u32, document: PolicyDocument) -> Self {
        Self {
            range,
            line,
            content: PartContent::Parsed(Arc::new(document)),
        }
    }

    /// Moves the part to where it is in a text that has `bytes` more bytes and `lines` more
    /// lines before it.
    fn shift(&mut self, bytes: isize, lines: i64) {
        self.range =
            self.range.start.strict_add_signed(bytes)..self.range.end.strict_add_signed(bytes);
        self.line = u32::try_from(i64::from(self.line) + lines).unwrap_or(u32::MAX);
        if let PartContent::Built(rules) = &mut self.content
            && lines != 0
        {
            for rule in rules.iter_mut() {
                *rule = Arc::new(build::moved(rule, lines));
            }
        }
    }

    fn document(&self) -> Option<&PolicyDocument> {
        match &self.content {
            PartContent::Parsed(document) => Some(document),
            PartContent::Built(_) => None,
        }
    }
}

/// [`parse_sources`] with a [`ParseCache`].
pub fn parse_sources_cached(
    files: Vec<(PathBuf, String)>,
    cache: &mut ParseCache,
) -> Result<Policy, PolicyError> {
    let sources: Vec<Source> = files
        .into_iter()
        .map(|(path, text)| Source::new(path, text))
        .collect();
    let (hash, (parsed, built)) = std::thread::scope(|scope| {
        // A few milliseconds for a large policy: hashed beside the parse and build, not before.
        let hashing = scope.spawn(|| {
            content_hash(
                sources
                    .iter()
                    .map(|source| (&*source.path, source.text.as_str())),
            )
        });
        let built = parse_and_build(&sources, cache);
        (hashing.join(), built)
    });
    let hash = hash.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    for (source, parsed) in sources.into_iter().zip(parsed) {
        if let Some((parts, cut)) = parsed {
            let text = source.text;
            let path = source.path.to_path_buf();
            cache.files.insert(path, ParsedFile { text, parts, cut });
        }
    }
    built.map(|mut policy| {
        policy.hash = hash;
        policy
    })
}

/// Each source's parts (`None` for one that did not parse) and the policy they build.
fn parse_and_build(
    sources: &[Source],
    cache: &mut ParseCache,
) -> (Vec<Option<FileParse>>, Result<Policy, PolicyError>) {
    let mut diagnostics = Diagnostics::default();
    let mut previous = std::mem::take(&mut cache.files);
    let mut files: Vec<Option<FileParse>> = sources
        .iter()
        .map(|source| {
            if declares_nothing(&source.text) {
                // Installing it would stop enforcing everything the policy declared; an empty
                // file is far more often a write caught half-way, or a mistake, than a wish.
                diagnostics.error(
                    source.origin(0),
                    "the file is empty: a policy file declares at least one service, rule or setting",
                );
                return None;
            }
            parse_file(source, previous.remove(&*source.path))
                .map_err(|diagnostic| diagnostics.0.push(diagnostic))
                .ok()
        })
        .collect();
    if !diagnostics.0.is_empty() {
        return (files, Err(PolicyError::Invalid(diagnostics.0)));
    }
    let paths: Vec<PathBuf> = sources
        .iter()
        .map(|source| source.path.to_path_buf())
        .collect();
    let contents = gather(sources, &files);
    let mut policy = build::start(paths, &contents, &mut diagnostics);
    let services = build::service_names_and_addresses(&policy.services);
    let contents = if services == cache.services {
        contents
    } else {
        drop(contents);
        unbuild(sources, &mut files, &mut diagnostics);
        gather(sources, &files)
    };
    let fresh = build::add_rules(&mut policy, &contents, &mut cache.ids, &mut diagnostics);
    if !diagnostics.0.is_empty() {
        return (files, Err(PolicyError::Invalid(diagnostics.0)));
    }
    drop(contents);
    keep_built(&mut files, &fresh, &policy);
    cache.services = services;
    (files, Ok(policy))
}

fn gather<'a>(sources: &'a [Source], files: &'a [Option<FileParse>]) -> Vec<FileContent<'a>> {
    sources
        .iter()
        .zip(files)
        .filter_map(|(source, parsed)| {
            let (parts, cut) = parsed.as_ref()?;
            Some(FileContent::gather(source, parts, *cut))
        })
        .collect()
}

/// Parses again the built parts of every file: built against other services, their rules
/// must be built again.
fn unbuild(sources: &[Source], files: &mut [Option<FileParse>], diagnostics: &mut Diagnostics) {
    for (source, parsed) in sources.iter().zip(files) {
        let Some((parts, _)) = parsed else { continue };
        let built: Vec<usize> = (0..parts.len())
            .filter(|&index| matches!(parts[index].content, PartContent::Built(_)))
            .collect();
        let ranges: Vec<Range<usize>> = built
            .iter()
            .map(|&index| parts[index].range.clone())
            .collect();
        match parse_ranges(&source.text, &ranges) {
            Some(documents) => {
                for (index, document) in built.into_iter().zip(documents) {
                    parts[index].content = PartContent::Parsed(Arc::new(document));
                }
            }
            // They parsed when they were built, from this same text; should they not now, the
            // file's errors are those of the whole file.
            None => match parse_whole_file(source) {
                Ok(parts) => *parsed = Some((parts, false)),
                Err(diagnostic) => {
                    diagnostics.0.push(diagnostic);
                    *parsed = None;
                }
            },
        }
    }
}

/// Keeps the rules of each table that holds nothing but rules, built, in place of its
/// document. (A file parsed whole is parsed whole again next time: nothing of it is kept.)
fn keep_built(files: &mut [Option<FileParse>], fresh: &[FreshRule], policy: &Policy) {
    let mut files: Vec<(&mut FileParts, bool)> = files
        .iter_mut()
        .flatten()
        .map(|(parts, cut)| (parts, *cut))
        .collect();
    // A part's allows come before its denies in the policy: in (file, part) order, its rules
    // are in the order its table gives them, as a part built again would have them.
    let mut built: Vec<&FreshRule> = fresh.iter().collect();
    built.sort_by_key(|rule| (rule.file, rule.part, rule.index));
    for group in built.chunk_by(|a, b| (a.file, a.part) == (b.file, b.part)) {
        let (file, part) = (group[0].file, group[0].part);
        let (parts, cut) = &mut files[file];
        if !*cut {
            continue;
        }
        let part = &mut parts[part];
        let rules_only = part.document().is_some_and(|document| {
            document.settings.is_none()
                && document.detection.is_none()
                && document.service.is_empty()
        });
        if rules_only {
            part.content = PartContent::Built(
                group
                    .iter()
                    .map(|rule| Arc::clone(&policy.rules[rule.index]))
                    .collect(),
            );
        }
    }
}

/// SHA-256 over the files' names and texts: what `status` and the audit log call the policy
/// hash.
pub(super) fn content_hash<'a>(files: impl IntoIterator<Item = (&'a Path, &'a str)>) -> [u8; 32] {
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

/// Parses one file table by table: after an edit of the file `previous` holds, only the tables
/// the edit touched; else every table. A file that cannot be cut into tables, or whose tables
/// do not all parse, is parsed whole, so that its errors are exactly those of the whole file.
/// Also says whether the file was cut.
pub(super) fn parse_file(
    source: &Source,
    previous: Option<ParsedFile>,
) -> Result<FileParse, Diagnostic> {
    let parts = match previous.filter(|previous| previous.cut) {
        Some(previous) => reparse(source, previous),
        None => tables::top_level_tables(&source.text)
            .and_then(|ranges| parse_parts(&source.text, ranges, 0, 1)),
    };
    match parts {
        Some(parts) if !singletons_repeat(&parts) => Ok((parts, true)),
        _ => parse_whole_file(source).map(|parts| (parts, false)),
    }
}

/// The parts of `text`'s tables `ranges`, which come after byte `from`, the start of line
/// `line`.
fn parse_parts(text: &str, ranges: Vec<Range<usize>>, from: usize, line: u32) -> Option<FileParts> {
    let documents = parse_ranges(text, &ranges)?;
    let newlines = |bytes: Range<usize>| {
        let count = memchr::memchr_iter(b'\n', &text.as_bytes()[bytes]).count();
        u32::try_from(count).unwrap_or(u32::MAX)
    };
    let mut at = (from, line);
    let parts = ranges
        .into_iter()
        .zip(documents)
        .map(|(range, document)| {
            let line = at.1 + newlines(at.0..range.start);
            at = (range.start, line);
            Part::parsed(range, line, document)
        })
        .collect();
    Some(parts)
}

/// The parts of `source` after an edit of the file `previous` holds: the tables before and
/// after the edit taken from it (moved), those in it parsed. `None` when the new text cannot be
/// cut, or a table in the edit does not parse.
fn reparse(source: &Source, previous: ParsedFile) -> Option<FileParts> {
    let (old, new) = (previous.text.as_str(), source.text.as_str());
    let same = common_ends(old.as_bytes(), new.as_bytes());
    let mut parts = previous.parts;
    let recut = tables::recut(old, &parts, |part| part.range.start, new, same)?;
    // The edited stretch, in both texts: from the first table cut again to the first kept.
    let (from, line) = match parts.get(recut.kept_before) {
        Some(part) if recut.kept_before > 0 => (part.range.start, part.line),
        _ => (0, 1),
    };
    let old_end = parts
        .get(recut.kept_after)
        .map_or(old.len(), |part| part.range.start);
    let new_end = old_end + new.len() - old.len();
    let lines = |text: &str| memchr::memchr_iter(b'\n', text.as_bytes()).count() as i64;
    let moved_lines = lines(&new[from..new_end]) - lines(&old[from..old_end]);
    let moved_bytes = new.len() as isize - old.len() as isize;
    let fresh = parse_parts(new, recut.fresh, from, line)?;
    for part in &mut parts[recut.kept_after..] {
        part.shift(moved_bytes, moved_lines);
    }
    parts.splice(recut.kept_before..recut.kept_after, fresh);
    Some(parts)
}

/// Given twice in one file, [settings] or [detection] is an error of the whole file.
fn singletons_repeat(parts: &[Part]) -> bool {
    let documents = || parts.iter().filter_map(Part::document);
    documents()
        .filter(|document| document.settings.is_some())
        .count()
        > 1
        || documents()
            .filter(|document| document.detection.is_some())
            .count()
            > 1
}

pub(super) fn parse_whole_file(source: &Source) -> Result<FileParts, Diagnostic> {
    match PolicyDocument::parse(&source.text) {
        Ok(document) => Ok(vec![Part::parsed(0..source.text.len(), 1, document)]),
        Err(error) => Err(Diagnostic {
            origin: source.origin(error.span().map_or(0, |span| span.start)),
            message: error.message().trim().to_owned(),
        }),
    }
}

/// Below this many tables to parse, threads cost more than they save.
pub(super) const PARALLEL_PARSE_MIN: usize = 1024;

/// The documents of `text`'s `ranges`, parsed in parallel when there are many; `None` if one
/// does not parse.
fn parse_ranges(text: &str, ranges: &[Range<usize>]) -> Option<Vec<PolicyDocument>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(ranges.len().div_ceil(PARALLEL_PARSE_MIN))
        .max(1);
    let chunk = ranges.len().div_ceil(threads).max(1);
    let parsed: Vec<Option<Vec<PolicyDocument>>> = std::thread::scope(|scope| {
        let workers: Vec<_> = ranges
            .chunks(chunk)
            .map(|tables| {
                scope.spawn(move || {
                    tables
                        .iter()
                        .map(|range| PolicyDocument::parse(&text[range.clone()]).ok())
                        .collect()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap_or_default())
            .collect()
    });
    let mut documents = Vec::with_capacity(ranges.len());
    for worker in parsed {
        documents.extend(worker?);
    }
    Some(documents)
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

/// A rule of a file's content: to build from its document, or built already.
pub(super) enum RuleItem<'a> {
    Parsed {
        at: At<'a>,
        part: usize,
        rule: &'a Spanned<RuleDocument>,
    },
    Built(&'a Arc<Rule>),
}

/// One file's content in the order a parse of the whole file gives it, each item with the
/// part it was parsed from. Its rules are visited where they are, not gathered: a policy may
/// have 100 000.
pub(super) struct FileContent<'a> {
    pub(super) settings: Option<(At<'a>, &'a Spanned<SettingsDocument>)>,
    pub(super) detection: Option<(At<'a>, &'a Spanned<DetectionDocument>)>,
    pub(super) service: Vec<(At<'a>, &'a Spanned<ServiceDocument>)>,
    source: &'a Source,
    pub(super) parts: &'a [Part],
    /// Whether the parts are top-level tables (else the whole file).
    cut: bool,
}

impl<'a> FileContent<'a> {
    pub(super) fn gather(source: &'a Source, parts: &'a [Part], cut: bool) -> Self {
        let mut content = Self {
            settings: None,
            detection: None,
            service: Vec::new(),
            source,
            parts,
            cut,
        };
        for part in parts {
            let Some(document) = part.document() else {
                continue;
            };
            let at = content.at(part);
            if let Some(settings) = &document.settings {
                content.settings = Some((at, settings));
            }
            if let Some(detection) = &document.detection {
                content.detection = Some((at, detection));
            }
            content
                .service
                .extend(document.service.iter().map(|service| (at, service)));
        }
        content
    }

    /// Where positions in `part` are.
    fn at(&self, part: &Part) -> At<'a> {
        if self.cut {
            self.source.table(part.range.start, part.line)
        } else {
            self.source.from(part.range.start)
        }
    }

    /// Visits the rules of the file's parts `parts` with their kind, in file order.
    pub(super) fn each_rule(
        &self,
        parts: Range<usize>,
        mut visit: impl FnMut(RuleKind, RuleItem<'a>),
    ) {
        let first = parts.start;
        for (index, part) in (first..).zip(&self.parts[parts]) {
            match &part.content {
                PartContent::Built(rules) => {
                    for rule in rules.iter() {
                        visit(rule.kind, RuleItem::Built(rule));
                    }
                }
                PartContent::Parsed(document) => {
                    let at = self.at(part);
                    let kinds = [
                        (RuleKind::Allow, &document.allow),
                        (RuleKind::Deny, &document.deny),
                    ];
                    for (kind, documents) in kinds {
                        for rule in documents.iter() {
                            visit(
                                kind,
                                RuleItem::Parsed {
                                    at,
                                    part: index,
                                    rule,
                                },
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Whether TOML text is only whitespace and comments.
pub(super) fn declares_nothing(text: &str) -> bool {
    text.lines().all(|line| {
        let line = line.trim();
        line.is_empty() || line.starts_with('#')
    })
}
