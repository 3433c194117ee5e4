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
    let mut within = Within::Code;
    let mut depth = 0usize;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if within == Within::Code && depth == 0 {
            let content = line.trim_start_matches([' ', '\t']);
            if content.starts_with('[') {
                starts.push(offset);
            } else if starts.is_empty() && !is_blank_or_comment(content) {
                return None;
            }
        }
        scan_line(line.as_bytes(), &mut within, &mut depth)?;
        offset += line.len();
    }
    if within != Within::Code || depth != 0 || starts.is_empty() {
        return None;
    }
    let ends = starts.iter().skip(1).copied().chain([text.len()]);
    Some(
        starts
            .iter()
            .zip(ends)
            .map(|(&start, end)| start..end)
            .collect(),
    )
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
