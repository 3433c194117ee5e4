//! Cutting a TOML policy file into its top-level tables (`[settings]`, each `[[service]]`,
//! `[[allow]]`, ...), so that each can be parsed on its own: in parallel on a first load, and
//! only the ones whose text changed on a reload.

use std::ops::Range;

/// Where a scan of the text is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Within {
    Code,
    MultilineBasic,
    MultilineLiteral,
}

/// The byte ranges of `text`'s top-level tables, each from its header line up to the next
/// header line. `None` when the file has keys before its first header, or anything this scan
/// does not follow (an unterminated string, unbalanced brackets): such a file is parsed whole.
///
/// A header is a line that starts with `[` outside every string and every array or inline
/// table value. TOML allows nothing else to start such a line.
pub fn top_level_tables(text: &str) -> Option<Vec<Range<usize>>> {
    let mut starts = Vec::new();
    let end = scan_headers(text, 0, true, &mut starts, |_| false)?;
    if end.is_some() || starts.is_empty() {
        return None;
    }
    Some(ranges_of(&starts, text.len()))
}

/// How the top-level tables of a text relate to those of the text before an edit: the new
/// text's tables are the first `kept_before` old ones, then `fresh` new ones, then the old ones
/// from `kept_after` on, moved by the edit.
#[derive(Debug, PartialEq, Eq)]
pub struct Recut {
    pub kept_before: usize,
    pub fresh: Vec<Range<usize>>,
    pub kept_after: usize,
}

/// The top-level tables of `new`, given `old`'s (`old_tables`, as [`top_level_tables`] cut
/// them, each starting where `start` says) and how many bytes the two texts have in common at
/// their start and end (`same`, as `load::common_ends` finds them). Only the edited part is
/// scanned again: from the last header whose whole line lies before the edit, to the first
/// header after it that was a header in `old` too (from there on, both the text and the
/// scan's state are the old ones). `None` where [`top_level_tables`] would give `None`.
pub fn recut<T>(
    old: &str,
    old_tables: &[T],
    start: impl Fn(&T) -> usize,
    new: &str,
    (same_start, same_end): (usize, usize),
) -> Option<Recut> {
    // Table `i` stays if the header that ends it (table `i + 1`'s) lies whole before the edit.
    let kept_before = old_tables
        .get(1..)
        .unwrap_or_default()
        .partition_point(|table| line_end(old, start(table)) <= same_start);
    let from = match kept_before {
        0 => 0,
        kept => start(&old_tables[kept]),
    };
    let old_table_at = |new_offset: usize| {
        old_tables
            .binary_search_by_key(&(new_offset + old.len() - new.len()), &start)
            .ok()
    };
    let after_edit = new.len() - same_end;
    let mut starts = Vec::new();
    let resumed = scan_headers(new, from, kept_before == 0, &mut starts, |header| {
        header >= after_edit && old_table_at(header).is_some()
    })?;
    let kept_after = match resumed {
        Some(header) => old_table_at(header)?,
        None if kept_before == 0 && starts.is_empty() => return None,
        None => old_tables.len(),
    };
    let end = resumed.unwrap_or(new.len());
    Some(Recut {
        kept_before,
        fresh: ranges_of(&starts, end),
        kept_after,
    })
}

/// Where the line that starts at `offset` ends (after its newline).
fn line_end(text: &str, offset: usize) -> usize {
    memchr::memchr(b'\n', &text.as_bytes()[offset..])
        .map_or(text.len(), |newline| offset + newline + 1)
}

/// Each table from its start to the next one's, the last to `end`.
fn ranges_of(starts: &[usize], end: usize) -> Vec<Range<usize>> {
    let ends = starts.iter().skip(1).copied().chain([end]);
    starts
        .iter()
        .zip(ends)
        .map(|(&start, end)| start..end)
        .collect()
}

/// Scans `text` from `from` (a line start where no string, array or inline table is open),
/// pushing each header's offset into `starts` until `stop` says to stop at one: then returns
/// that header's offset, which is not pushed. `Some(None)` when the text ends with everything
/// closed; `None` when the scan cannot follow the text, or (`from_top`: scanning from the
/// file's start) a key comes before the first header.
fn scan_headers(
    text: &str,
    from: usize,
    from_top: bool,
    starts: &mut Vec<usize>,
    mut stop: impl FnMut(usize) -> bool,
) -> Option<Option<usize>> {
    let mut within = Within::Code;
    let mut depth = 0usize;
    let mut offset = from;
    for line in text[from..].split_inclusive('\n') {
        if within == Within::Code && depth == 0 {
            let content = line.trim_start_matches([' ', '\t']);
            if content.starts_with('[') {
                if stop(offset) {
                    return Some(Some(offset));
                }
                starts.push(offset);
            } else if from_top && starts.is_empty() && !is_blank_or_comment(content) {
                return None;
            }
        }
        scan_line(line.as_bytes(), &mut within, &mut depth)?;
        offset += line.len();
    }
    (within == Within::Code && depth == 0).then_some(None)
}

fn is_blank_or_comment(content: &str) -> bool {
    let content = content.trim_end();
    content.is_empty() || content.starts_with('#')
}

/// Follows strings, comments and brackets through one line.
fn scan_line(line: &[u8], within: &mut Within, depth: &mut usize) -> Option<()> {
    let mut at = 0;
    while at < line.len() {
        match *within {
            Within::MultilineBasic => match line[at] {
                b'\\' => at += 2,
                b'"' if line[at..].starts_with(b"\"\"\"") => {
                    // Up to two quotes may precede the closing three.
                    at += quote_run(&line[at..], b'"').min(5);
                    *within = Within::Code;
                }
                _ => at += 1,
            },
            Within::MultilineLiteral => match line[at] {
                b'\'' if line[at..].starts_with(b"'''") => {
                    at += quote_run(&line[at..], b'\'').min(5);
                    *within = Within::Code;
                }
                _ => at += 1,
            },
            Within::Code => match line[at] {
                b'#' => return Some(()),
                b'"' if line[at..].starts_with(b"\"\"\"") => {
                    *within = Within::MultilineBasic;
                    at += 3;
                }
                b'\'' if line[at..].starts_with(b"'''") => {
                    *within = Within::MultilineLiteral;
                    at += 3;
                }
                b'"' => at += 1 + basic_string_length(&line[at + 1..])?,
                b'\'' => {
                    at += 2 + line[at + 1..].iter().position(|&byte| byte == b'\'')?;
                }
                b'[' | b'{' => {
                    *depth += 1;
                    at += 1;
                }
                b']' | b'}' => {
                    *depth = depth.checked_sub(1)?;
                    at += 1;
                }
                _ => at += 1,
            },
        }
    }
    Some(())
}

fn quote_run(text: &[u8], quote: u8) -> usize {
    text.iter().take_while(|&&byte| byte == quote).count()
}

/// The length of a one-line basic string's rest, up to and including its closing quote.
fn basic_string_length(rest: &[u8]) -> Option<usize> {
    let mut at = 0;
    while at < rest.len() {
        match rest[at] {
            b'\\' => at += 2,
            b'"' => return Some(at + 1),
            b'\n' => return None,
            _ => at += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(text: &str) -> Option<Vec<&str>> {
        top_level_tables(text).map(|ranges| ranges.into_iter().map(|range| &text[range]).collect())
    }

    #[test]
    fn each_header_starts_a_table_that_runs_to_the_next() {
        let text = "# shop\n\n[settings]\nmode = \"audit\"\n\n[[service]]\nname = \"a\"\n  [[ allow ]]\nfrom = \"a\"\n";
        assert_eq!(
            tables(text).unwrap(),
            [
                "[settings]\nmode = \"audit\"\n\n",
                "[[service]]\nname = \"a\"\n",
                "  [[ allow ]]\nfrom = \"a\"\n"
            ]
        );
    }

    #[test]
    fn brackets_inside_strings_comments_and_values_are_not_headers() {
        let text = concat!(
            "[[allow]]\n",
            "id = \"\"\"\n[[deny]]\nstill \\\"\"\" the id\"\"\"\"\n",
            "from = '''\n[settings]'''\n",
            "ports = [\n  \"80/tcp\", # ] not a bracket\n  [\"x]\", '[y'],\n]\n",
            "to = \"b\\\"[\" # [[deny]]\n",
            "[[deny]]\n",
        );
        let found = tables(text).unwrap();
        assert_eq!(found.len(), 2, "{found:#?}");
        assert_eq!(found[1], "[[deny]]\n");
    }

    /// Cut again around an edit, a text has the tables a cut of the whole text gives it: for
    /// every deletion of a byte, and insertion of a character that structures TOML, anywhere
    /// in a policy with strings, comments, arrays and indented headers.
    #[test]
    fn a_text_cut_again_around_an_edit_has_the_tables_of_a_whole_cut() {
        let old = concat!(
            "# shop\n[settings]\nmode = \"audit\"\n\n[[service]]\nname = \"a\"\n",
            "addresses = [\n  \"10.0.0.1/32\", # [[deny]]\n]\n  [[allow]]\nfrom = \"a\"\n",
            "id = \"\"\"\n[[deny]]\"\"\"\n[[deny]]\nfrom = 'a[' \nto = \"b\"\n[detection]\n",
        );
        let old_tables = top_level_tables(old).unwrap();
        let mut edits = Vec::new();
        for (at, _) in old.char_indices() {
            edits.push(format!("{}{}", &old[..at], &old[at + 1..]));
            for inserted in ["[", "]", "\"", "'", "#", "\n", "{", "\\", "x"] {
                edits.push(format!("{}{inserted}{}", &old[..at], &old[at..]));
            }
        }
        for new in &edits {
            let same = super::super::load::common_ends(old.as_bytes(), new.as_bytes());
            let recut = recut(old, &old_tables, |table| table.start, new, same).map(|recut| {
                let moved = |table: &Range<usize>| {
                    table.start + new.len() - old.len()..table.end + new.len() - old.len()
                };
                let before = old_tables[..recut.kept_before].iter().cloned();
                let after = old_tables[recut.kept_after..].iter().map(moved);
                before.chain(recut.fresh).chain(after).collect::<Vec<_>>()
            });
            assert_eq!(recut, top_level_tables(new), "{new:?}");
        }
    }

    #[test]
    fn files_it_cannot_cut_safely_are_left_whole() {
        for text in [
            "mode = \"audit\"\n[[service]]\n",
            "[[allow]]\nid = \"unterminated\n",
            "[[allow]]\nid = \"\"\"\nnever closed\n",
            "[[allow]]\nports = [\"80/tcp\"\n",
            "[[allow]]\nports = ]\n",
            "# only a comment\n",
        ] {
            assert_eq!(top_level_tables(text), None, "{text:?}");
        }
    }
}
