//! The flow record's JSON line, written at the rate the event pipeline needs (#16: a million
//! records a second on one core).
//!
//! Through serde, each of a flow alert's sixty-odd fields costs a handful of small writes and a
//! scan of its name for what JSON escapes, with serde_json or any other encoder: about a
//! microsecond a record on the build host. A [`Line`] is written from literal runs instead
//! (punctuation, field names and constant values together, JSON already) and the values between
//! them, which is where escaping is needed and done.

use std::{fmt::Write as _, net::IpAddr};

/// A JSON line being written into a string: literal runs and values, in the order they appear.
pub struct Line<'a> {
    out: &'a mut String,
}

impl<'a> Line<'a> {
    pub fn new(out: &'a mut String) -> Self {
        Self { out }
    }

    /// JSON written as it is: punctuation, field names, constants. Only literals of ours, which
    /// need no escaping, go here: `'static` keeps what a record carries (names, hosts) out.
    pub fn raw(&mut self, json: &'static str) -> &mut Self {
        self.out.push_str(json);
        self
    }

    /// A string value, quoted and escaped as serde_json escapes it.
    pub fn string(&mut self, text: &str) -> &mut Self {
        self.out.push('"');
        push_escaped(self.out, text);
        self.out.push('"');
        self
    }

    /// A string value that `write` writes in pieces (see [`Pieces`]): a message made of a
    /// record's names and words of ours. Through `Display` and `fmt`, piece by piece escaped,
    /// a flow record's message took a quarter of its time.
    pub fn text(&mut self, write: impl FnOnce(&mut JsonText<'_>)) -> &mut Self {
        self.out.push('"');
        write(&mut JsonText(self.out));
        self.out.push('"');
        self
    }

    /// An IP address as a string value, in its canonical text (RFC 5952 for IPv6), as
    /// `Display` writes it. Neither form has anything to escape; an IPv4 address is written
    /// octet by octet rather than through `fmt`, which took a seventh of a flow record's time
    /// (its two addresses).
    pub fn ip(&mut self, ip: &IpAddr) -> &mut Self {
        self.out.push('"');
        match ip {
            IpAddr::V4(v4) => {
                let [a, b, c, d] = v4.octets();
                let mut digits = itoa::Buffer::new();
                self.out.push_str(digits.format(a));
                for octet in [b, c, d] {
                    self.out.push('.');
                    self.out.push_str(digits.format(octet));
                }
            }
            // Writing into a `String` cannot fail.
            IpAddr::V6(v6) => _ = write!(self.out, "{v6}"),
        }
        self.out.push('"');
        self
    }

    pub fn integer(&mut self, value: impl itoa::Integer) -> &mut Self {
        self.out.push_str(itoa::Buffer::new().format(value));
        self
    }

    pub fn boolean(&mut self, value: bool) -> &mut Self {
        self.out.push_str(if value { "true" } else { "false" });
        self
    }
}

fn must_be_escaped(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\'
}

fn push_escaped(out: &mut String, text: &str) {
    // `fold` rather than `any`: no early exit, so the scan is vectorised; the strings are short.
    if !text
        .bytes()
        .fold(false, |seen, byte| seen | must_be_escaped(byte))
    {
        out.push_str(text);
        return;
    }
    let mut unwritten = 0;
    for (index, byte) in text.bytes().enumerate() {
        if !must_be_escaped(byte) {
            continue;
        }
        // `index` is at an ASCII byte, so both slices end on a character boundary.
        out.push_str(&text[unwritten..index]);
        push_escape(out, byte);
        unwritten = index + 1;
    }
    out.push_str(&text[unwritten..]);
}

fn push_escape(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match byte {
        b'"' => out.push_str("\\\""),
        b'\\' => out.push_str("\\\\"),
        b'\n' => out.push_str("\\n"),
        b'\r' => out.push_str("\\r"),
        b'\t' => out.push_str("\\t"),
        0x08 => out.push_str("\\b"),
        0x0c => out.push_str("\\f"),
        _ => {
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
    }
}

/// Where a message goes, piece by piece: into a JSON string value ([`Line::text`]), escaped
/// where JSON needs it, or into a plain `String` (a log line), as it is.
pub trait Pieces {
    /// Words of ours, which JSON never escapes.
    fn literal(&mut self, text: &'static str);
    /// Text from a record (names, rule ids).
    fn text(&mut self, text: &str);
    fn integer(&mut self, value: impl itoa::Integer);
}

/// The inside of a JSON string value (see [`Line::text`]).
pub struct JsonText<'a>(&'a mut String);

impl Pieces for JsonText<'_> {
    fn literal(&mut self, text: &'static str) {
        debug_assert!(
            !text.bytes().any(must_be_escaped),
            "a literal JSON escapes: {text:?}"
        );
        self.0.push_str(text);
    }

    fn text(&mut self, text: &str) {
        push_escaped(self.0, text);
    }

    fn integer(&mut self, value: impl itoa::Integer) {
        self.0.push_str(itoa::Buffer::new().format(value));
    }
}

impl Pieces for String {
    fn literal(&mut self, text: &'static str) {
        self.push_str(text);
    }

    fn text(&mut self, text: &str) {
        self.push_str(text);
    }

    fn integer(&mut self, value: impl itoa::Integer) {
        self.push_str(itoa::Buffer::new().format(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(write: impl FnOnce(&mut Line)) -> String {
        let mut out = String::new();
        write(&mut Line::new(&mut out));
        out
    }

    /// Values must read exactly as serde_json writes them: the alert lines were serde_json's
    /// before, and a SIEM parser may have been written against their bytes.
    #[test]
    fn every_character_is_escaped_as_serde_json_escapes_it() {
        let mut every: String = (0u8..0x80).map(char::from).collect();
        every.push_str("é€😀\u{7f}\u{2028}");
        let samples = every
            .char_indices()
            .map(|(index, _)| &every[index..])
            .chain(
                every
                    .char_indices()
                    .map(|(index, character)| &every[index..index + character.len_utf8()]),
            )
            .chain(["", "plain text of more than thirty-two bytes, none escaped"]);
        for sample in samples {
            let expected = serde_json::to_string(sample).unwrap();
            assert_eq!(
                written(|line| {
                    line.string(sample);
                }),
                expected
            );
            assert_eq!(
                written(|line| {
                    line.text(|text| text.text(sample));
                }),
                expected
            );
        }
    }

    #[test]
    fn a_text_in_pieces_is_one_string_value_escaped_where_a_piece_needs_it() {
        let line = written(|line| {
            line.text(|text| {
                text.text("a\n");
                text.literal(" -> ");
                text.integer(7u16);
                text.text("\"é\\");
            });
        });
        assert_eq!(line, serde_json::to_string("a\n -> 7\"é\\").unwrap());
        let mut plain = String::new();
        plain.text("a\n");
        plain.literal(" -> ");
        plain.integer(7u16);
        assert_eq!(plain, "a\n -> 7");
    }

    #[test]
    fn addresses_are_written_as_serde_json_writes_their_text() {
        let addresses = [
            "0.0.0.0",
            "10.0.1.255",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:10.0.0.1",
            "2001:db8::8:800:200c:417a",
            "fe80::1:0:0:1",
        ];
        for address in addresses {
            let ip: IpAddr = address.parse().unwrap();
            assert_eq!(
                written(|line| {
                    line.ip(&ip);
                }),
                serde_json::to_string(&ip.to_string()).unwrap(),
                "{address}"
            );
        }
    }

    #[test]
    fn numbers_and_literals_are_written_as_serde_json_writes_them() {
        let line = written(|line| {
            line.raw("[")
                .integer(u64::MAX)
                .raw(",")
                .integer(i64::MIN)
                .raw(",")
                .integer(0u8)
                .raw(",")
                .boolean(true)
                .raw(",")
                .boolean(false)
                .raw("]");
        });
        assert_eq!(
            line,
            serde_json::json!([u64::MAX, i64::MIN, 0, true, false]).to_string()
        );
    }
}
