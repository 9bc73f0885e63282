//! QMP framing: splits the control stream into top-level JSON values the way QEMU's
//! json-lexer.c and json-streamer.c do, and bounds each value while scanning it, before
//! serde_json builds anything from it.
//!
//! Like QEMU: values need no separator (newlines and `\r\n` between them are allowed); a
//! value ends when its braces and brackets balance; a byte that cannot start or continue a
//! token is an error, after which the scanner skips input until a structural character, a
//! control character other than tab, or 0xFE/0xFF (QEMU's resynchronisation points), and
//! goes on from there. Single-quoted strings and `\'` (QEMU's extensions) are rewritten to
//! standard JSON so serde_json can parse them.
//!
//! Unlike QEMU 10.0, a value that breaks a limit gets one error and the rest of it is
//! skipped (its brackets are still counted): QEMU resets and lexes the rest as new values,
//! answering 1030 errors to 1030 `[` and as many `]`.

use std::collections::VecDeque;

/// Longest message (QEMU's MAX_TOKEN_SIZE): a `device-state-set` of up to ~48 MiB of
/// device state (base64) fits.
pub(crate) const MAX_MESSAGE: usize = 64 << 20;
/// Most tokens in one message (QEMU's MAX_TOKEN_COUNT). With the byte cap this bounds the
/// parsed value: a 64 MiB array of small numbers is refused before anything is built.
pub(crate) const MAX_TOKENS: usize = 2 << 20;
/// Deepest nesting of objects and arrays. QEMU allows 1024; serde_json refuses more than
/// 128, and no command needs more than a few levels.
pub(crate) const MAX_NESTING: usize = 128;
/// How much of a bad token an error reply quotes.
const STRAY_QUOTE: usize = 32;

/// What the scanner produced, with the stream position (bytes since the connection began)
/// just past the last byte that belongs to it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// One complete top-level value, as standard JSON.
    Message { bytes: Vec<u8>, end: u64 },
    /// A lexical error or a broken limit: reply with `desc`.
    Error { desc: String, end: u64 },
    /// The end of a value whose error was already reported (what came with it is dropped).
    Skipped { end: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Start,
    Str {
        quote: u8,
    },
    StrEscape {
        quote: u8,
    },
    Number,
    Keyword,
    /// After an error: skipping to a resynchronisation point.
    Recovery,
}

/// The incremental splitter. Feed it bytes; take frames.
pub(crate) struct Splitter {
    lex: Lex,
    /// The current message from its first token, rewritten to standard JSON.
    buf: Vec<u8>,
    in_msg: bool,
    /// Where the current token starts in `buf` (quoted in a stray-byte error).
    token_start: usize,
    /// A limit was broken: the rest of this message is counted but not kept.
    skipping: bool,
    braces: i64,
    brackets: i64,
    tokens: usize,
    /// Stream position of the next byte fed.
    pos: u64,
    out: VecDeque<Frame>,
}

impl Default for Splitter {
    fn default() -> Self {
        Self::new()
    }
}

fn is_structural(b: u8) -> bool {
    matches!(b, b'{' | b'}' | b'[' | b']' | b':' | b',')
}

impl Splitter {
    pub(crate) fn new() -> Self {
        Splitter {
            lex: Lex::Start,
            buf: Vec::new(),
            in_msg: false,
            token_start: 0,
            skipping: false,
            braces: 0,
            brackets: 0,
            tokens: 0,
            pos: 0,
            out: VecDeque::new(),
        }
    }

    /// The next complete frame, if any.
    pub(crate) fn next_frame(&mut self) -> Option<Frame> {
        self.out.pop_front()
    }

    /// Stream position of the next byte to be fed.
    pub(crate) fn position(&self) -> u64 {
        self.pos
    }

    pub(crate) fn feed(&mut self, data: &[u8]) {
        let base = self.pos;
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            let at = base + i as u64;
            match self.lex {
                Lex::Str { quote } => {
                    // Most of a long string is plain bytes: copy the run in one go.
                    let run = data[i..]
                        .iter()
                        .position(|&c| {
                            c == quote
                                || c == b'\\'
                                || !(0x20..0xFE).contains(&c)
                                || (quote == b'\'' && c == b'"')
                        })
                        .unwrap_or(data.len() - i);
                    if run > 0 {
                        self.push(&data[i..i + run], at + run as u64);
                        i += run;
                        continue;
                    }
                    i += 1;
                    if b == quote {
                        self.push(b"\"", at + 1);
                        self.lex = Lex::Start;
                        self.token(at + 1);
                    } else if b == b'\\' {
                        self.lex = Lex::StrEscape { quote };
                    } else if b == b'"' {
                        // An unescaped `"` inside a single-quoted string.
                        self.push(b"\\\"", at + 1);
                    } else {
                        self.stray(b, at + 1);
                    }
                }
                Lex::StrEscape { quote } => {
                    i += 1;
                    if (0x20..0xFE).contains(&b) {
                        // `\'` is QEMU's; standard JSON has only `'`.
                        if b == b'\'' {
                            self.push(b"'", at + 1);
                        } else {
                            self.push(&[b'\\', b], at + 1);
                        }
                        self.lex = Lex::Str { quote };
                    } else {
                        self.stray(b, at + 1);
                    }
                }
                Lex::Number | Lex::Keyword => {
                    let more = if self.lex == Lex::Number {
                        b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-')
                    } else {
                        b.is_ascii_lowercase()
                    };
                    if more {
                        self.push(&[b], at + 1);
                        i += 1;
                    } else {
                        // The token ended before this byte, which is looked at again.
                        self.lex = Lex::Start;
                        self.token(at);
                    }
                }
                Lex::Recovery => {
                    if (b < 0x20 && b != b'\t') || b >= 0xFE || is_structural(b) {
                        self.lex = Lex::Start;
                    } else {
                        i += 1;
                    }
                }
                Lex::Start => {
                    i += 1;
                    if matches!(b, b' ' | b'\t' | b'\r' | b'\n') {
                        if self.in_msg {
                            self.push(&[b], at + 1);
                        }
                        continue;
                    }
                    let next = match b {
                        b'"' | b'\'' => Lex::Str { quote: b },
                        b'0'..=b'9' | b'-' => Lex::Number,
                        b'a'..=b'z' => Lex::Keyword,
                        _ if is_structural(b) => Lex::Start,
                        _ => {
                            self.stray(b, at + 1);
                            continue;
                        }
                    };
                    if !self.in_msg {
                        self.in_msg = true;
                        self.buf.clear();
                    }
                    self.token_start = self.buf.len();
                    self.push(if b == b'\'' { b"\"" } else { &data[i - 1..i] }, at + 1);
                    self.lex = next;
                    if next == Lex::Start {
                        match b {
                            b'{' => self.braces += 1,
                            b'}' => self.braces -= 1,
                            b'[' => self.brackets += 1,
                            b']' => self.brackets -= 1,
                            _ => {}
                        }
                        self.token(at + 1);
                    }
                }
            }
        }
        self.pos = base + data.len() as u64;
    }

    /// Appends to the message (unless it is being skipped) and checks its size.
    fn push(&mut self, bytes: &[u8], end: u64) {
        if self.skipping {
            return;
        }
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > MAX_MESSAGE {
            self.limit(
                format!(
                    "JSON token size limit exceeded (message too long: more than {MAX_MESSAGE} bytes)"
                ),
                end,
            );
        }
    }

    /// One token ended at `end`; brace and bracket counts are already updated.
    fn token(&mut self, end: u64) {
        self.tokens += 1;
        if self.braces < 0 || self.brackets < 0 || (self.braces == 0 && self.brackets == 0) {
            let frame = if self.skipping {
                Frame::Skipped { end }
            } else {
                Frame::Message {
                    bytes: std::mem::take(&mut self.buf),
                    end,
                }
            };
            self.out.push_back(frame);
            self.reset();
            return;
        }
        if self.skipping {
            return;
        }
        if self.tokens > MAX_TOKENS {
            self.limit("JSON token count limit exceeded".into(), end);
        } else if (self.braces + self.brackets) as usize > MAX_NESTING {
            self.limit("JSON nesting depth limit exceeded".into(), end);
        }
    }

    /// A broken limit: one error now, the rest of the message skipped as it arrives.
    fn limit(&mut self, desc: String, end: u64) {
        self.out.push_back(Frame::Error { desc, end });
        self.skipping = true;
        self.buf = Vec::new();
        self.token_start = 0;
    }

    /// A byte that no token can take: an error (unless one was already reported for this
    /// message), the message dropped, then recovery.
    fn stray(&mut self, b: u8, end: u64) {
        if !self.skipping {
            let mut bad: Vec<u8> = if self.in_msg && self.lex != Lex::Start {
                self.buf[self.token_start.min(self.buf.len())..].to_vec()
            } else {
                Vec::new()
            };
            bad.push(b);
            let shown = String::from_utf8_lossy(&bad[..bad.len().min(STRAY_QUOTE)]).into_owned();
            let more = if bad.len() > STRAY_QUOTE { "..." } else { "" };
            self.out.push_back(Frame::Error {
                desc: format!("JSON parse error, stray '{shown}{more}'"),
                end,
            });
        } else {
            self.out.push_back(Frame::Skipped { end });
        }
        self.reset();
        self.lex = Lex::Recovery;
    }

    fn reset(&mut self) {
        self.buf = Vec::new();
        self.in_msg = false;
        self.skipping = false;
        self.braces = 0;
        self.brackets = 0;
        self.tokens = 0;
        self.token_start = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[&[u8]]) -> Vec<Frame> {
        let mut s = Splitter::new();
        let mut out = Vec::new();
        for part in input {
            s.feed(part);
            while let Some(f) = s.next_frame() {
                out.push(f);
            }
        }
        out
    }

    fn msgs(input: &[&[u8]]) -> Vec<String> {
        frames(input)
            .into_iter()
            .map(|f| match f {
                Frame::Message { bytes, .. } => String::from_utf8(bytes).unwrap(),
                Frame::Error { desc, .. } => format!("ERR {desc}"),
                Frame::Skipped { .. } => "SKIP".into(),
            })
            .collect()
    }

    #[test]
    fn objects_need_no_separator() {
        assert_eq!(
            msgs(&[br#"{"a":1}{"b":[2, 3]}"#, b"\r\n{\"c\"", b":\"}\"}\n"]),
            vec![r#"{"a":1}"#, r#"{"b":[2, 3]}"#, r#"{"c":"}"}"#]
        );
    }

    #[test]
    fn positions_are_past_the_last_byte() {
        let f = frames(&[b"  {}\n{\"x\":1}"]);
        assert_eq!(
            f,
            vec![
                Frame::Message {
                    bytes: b"{}".to_vec(),
                    end: 4
                },
                Frame::Message {
                    bytes: br#"{"x":1}"#.to_vec(),
                    end: 12
                }
            ]
        );
    }

    #[test]
    fn scalars_end_at_the_next_byte() {
        assert_eq!(msgs(&[b"42", b" true{}"]), vec!["42", "true", "{}"]);
    }

    #[test]
    fn qemu_string_extensions_become_json() {
        let m = msgs(&[br#"{'execute': 'it\'s "x"', "y": "\'\n"}"#]);
        assert_eq!(m, vec![r#"{"execute": "it's \"x\"", "y": "'\n"}"#]);
        let v: serde_json::Value = serde_json::from_str(&m[0]).unwrap();
        assert_eq!(v["execute"], "it's \"x\"");
    }

    #[test]
    fn garbage_gets_one_error_then_resync() {
        // Recovery skips to the newline (a control character), then parses on.
        assert_eq!(
            msgs(&[b"@not json at all\n{\"a\":1}"]),
            vec!["ERR JSON parse error, stray '@'", r#"{"a":1}"#]
        );
        // A control character inside a string ends it with an error; the structural
        // character after the garbage starts a new value.
        assert_eq!(
            msgs(&[b"{\"execute\": \"abc\x01def\" {\"b\":2}"]),
            vec!["ERR JSON parse error, stray '\"abc\u{1}'", r#"{"b":2}"#]
        );
        // 0xFF forces a reset, as QEMU documents for clients in an unknown state.
        assert_eq!(
            msgs(&[b"{\"execute\": [1, 2", b"\xff{}"]),
            vec!["ERR JSON parse error, stray '\u{fffd}'", "{}"]
        );
    }

    #[test]
    fn unbalanced_closers_end_a_message() {
        assert_eq!(msgs(&[b"]{}"]), vec!["]", "{}"]);
        assert_eq!(msgs(&[b"{]}"]), vec!["{]", "}"]);
    }

    #[test]
    fn too_many_tokens_refused_while_scanning() {
        let mut s = Splitter::new();
        s.feed(b"[");
        let chunk = b"1,".repeat(1 << 16);
        for _ in 0..40 {
            s.feed(&chunk);
            assert!(s.buf.len() <= 2 * (MAX_TOKENS + 10), "kept {}", s.buf.len());
        }
        s.feed(b"1]{}");
        let f: Vec<Frame> = std::iter::from_fn(|| s.next_frame()).collect();
        assert_eq!(f.len(), 3, "{f:?}");
        assert!(matches!(&f[0], Frame::Error { desc, .. } if desc.contains("count limit")));
        assert!(matches!(&f[1], Frame::Skipped { .. }));
        assert!(matches!(&f[2], Frame::Message { bytes, .. } if bytes == b"{}"));
    }

    #[test]
    fn deep_nesting_refused() {
        let deep = b"[".repeat(100_000);
        let m = msgs(&[&deep, &b"]".repeat(100_000), b"{}"]);
        assert_eq!(
            m,
            vec!["ERR JSON nesting depth limit exceeded", "SKIP", "{}"]
        );
        let ok = [b"[".repeat(MAX_NESTING), b"]".repeat(MAX_NESTING)].concat();
        assert_eq!(msgs(&[&ok]).len(), 1);
    }

    #[test]
    fn over_long_message_refused_and_skipped() {
        let mut s = Splitter::new();
        s.feed(b"{\"a\": \"");
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..70 {
            s.feed(&chunk);
            assert!(s.buf.len() <= MAX_MESSAGE + (1 << 20));
        }
        s.feed(b"\"}{}");
        let f: Vec<Frame> = std::iter::from_fn(|| s.next_frame()).collect();
        assert!(matches!(&f[0], Frame::Error { desc, .. } if desc.contains("too long")));
        assert!(matches!(&f[1], Frame::Skipped { .. }));
        assert!(matches!(&f[2], Frame::Message { bytes, .. } if bytes == b"{}"));
        assert_eq!(f.len(), 3);
    }

    #[test]
    fn unterminated_string_ends_at_newline() {
        // A newline is not allowed in a string: the bad message ends there.
        assert_eq!(
            msgs(&[b"{\"execute\": \"query-migrate\n{\"a\":1}"]),
            vec![
                "ERR JSON parse error, stray '\"query-migrate\n'",
                r#"{"a":1}"#
            ]
        );
    }
}
