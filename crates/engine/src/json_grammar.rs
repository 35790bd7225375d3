//! JSON mode: a byte-level recogniser of JSON-object prefixes, small enough
//! to copy (the container stack is a bit set), so that every token of the
//! vocabulary can be tried against the current state. Generation with
//! `Grammar::JsonObject` only samples tokens that keep the output a prefix
//! of one JSON object, and stops when the object closes.

/// A constraint on generated text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grammar {
    /// One JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
}

/// Deepest nesting of objects and arrays accepted.
pub const MAX_DEPTH: u8 = 64;
/// Longest run of whitespace between tokens of the JSON text. Sampled
/// models otherwise drift into endless runs of spaces and newlines, which
/// are valid JSON but never close the object (llama.cpp's JSON grammar
/// bounds whitespace for the same reason).
pub const MAX_WHITESPACE_RUN: u8 = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    Backslash,
    /// Hex digits still to come in `\uXXXX`.
    Unicode(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Number {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigit,
}

impl Number {
    /// Whether the number may end here.
    fn complete(self) -> bool {
        matches!(
            self,
            Number::Zero | Number::Int | Number::Frac | Number::ExpDigit
        )
    }

    fn next(self, b: u8) -> Option<Number> {
        use Number::*;
        Some(match (self, b) {
            (Minus, b'0') => Zero,
            (Minus, b'1'..=b'9') => Int,
            (Int, b'0'..=b'9') => Int,
            (Zero | Int, b'.') => Dot,
            (Dot | Frac, b'0'..=b'9') => Frac,
            (Zero | Int | Frac, b'e' | b'E') => Exp,
            (Exp, b'+' | b'-') => ExpSign,
            (Exp | ExpSign | ExpDigit, b'0'..=b'9') => ExpDigit,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the top-level object.
    Start,
    /// A value must come (after `:`, or `,` in an array).
    Value,
    /// After `[`: a value or `]`.
    ArrayFirst,
    /// After `{`: a key or `}`.
    KeyOrEnd,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value inside a container: `,` or the closing bracket.
    AfterValue,
    /// Inside a string (an object key when `key`).
    Str { key: bool, escape: Escape },
    /// Inside a number.
    Num(Number),
    /// Inside `true`, `false` or `null`: the bytes still to come.
    Literal(&'static [u8]),
    /// The top-level object is closed; only whitespace may follow.
    Done,
}

/// Where a JSON text stands after the bytes fed so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonPrefix {
    /// Bit `i` set: container `i` (from the outside) is an array.
    arrays: u64,
    depth: u8,
    /// Whitespace bytes since the last other byte (outside strings).
    whitespace_run: u8,
    state: State,
}

impl Default for JsonPrefix {
    fn default() -> Self {
        JsonPrefix {
            arrays: 0,
            depth: 0,
            whitespace_run: 0,
            state: State::Start,
        }
    }
}

impl JsonPrefix {
    /// Whether the top-level object is complete.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Feeds bytes; `false` (state unspecified) when they cannot continue a
    /// JSON object.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.feed_byte(b))
    }

    /// Whether `bytes` would continue the text, leaving `self` unchanged.
    pub fn accepts(&self, bytes: &[u8]) -> bool {
        let mut probe = *self;
        probe.feed(bytes)
    }

    fn top_is_array(&self) -> bool {
        self.depth > 0 && self.arrays & (1 << (self.depth - 1)) != 0
    }

    fn push(&mut self, array: bool) -> bool {
        if self.depth >= MAX_DEPTH {
            return false;
        }
        if array {
            self.arrays |= 1 << self.depth;
        } else {
            self.arrays &= !(1 << self.depth);
        }
        self.depth += 1;
        self.state = if array {
            State::ArrayFirst
        } else {
            State::KeyOrEnd
        };
        true
    }

    /// A value just ended.
    fn value_done(&mut self) {
        self.state = if self.depth == 0 {
            State::Done
        } else {
            State::AfterValue
        };
    }

    fn close(&mut self, array: bool) -> bool {
        if self.depth == 0 || self.top_is_array() != array {
            return false;
        }
        self.depth -= 1;
        self.value_done();
        true
    }

    fn start_value(&mut self, b: u8) -> bool {
        match b {
            b'{' => self.push(false),
            b'[' => self.push(true),
            b'"' => {
                self.state = State::Str {
                    key: false,
                    escape: Escape::None,
                };
                true
            }
            b'-' => {
                self.state = State::Num(Number::Minus);
                true
            }
            b'0' => {
                self.state = State::Num(Number::Zero);
                true
            }
            b'1'..=b'9' => {
                self.state = State::Num(Number::Int);
                true
            }
            b't' => {
                self.state = State::Literal(b"rue");
                true
            }
            b'f' => {
                self.state = State::Literal(b"alse");
                true
            }
            b'n' => {
                self.state = State::Literal(b"ull");
                true
            }
            _ => false,
        }
    }

    fn feed_byte(&mut self, b: u8) -> bool {
        let in_string = matches!(self.state, State::Str { .. });
        let space = !in_string && matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        if space {
            if self.whitespace_run >= MAX_WHITESPACE_RUN {
                return false;
            }
            self.whitespace_run += 1;
        } else {
            self.whitespace_run = 0;
        }
        match self.state {
            // The object starts at once: no leading whitespace.
            State::Start => b == b'{' && self.push(false),
            State::Done if space => true,
            State::Done => false,
            State::Value | State::ArrayFirst | State::KeyOrEnd | State::Key | State::Colon
                if space =>
            {
                true
            }
            State::AfterValue if space => true,
            State::Value => self.start_value(b),
            State::ArrayFirst => {
                if b == b']' {
                    self.close(true)
                } else {
                    self.start_value(b)
                }
            }
            State::KeyOrEnd | State::Key => match b {
                b'"' => {
                    self.state = State::Str {
                        key: true,
                        escape: Escape::None,
                    };
                    true
                }
                b'}' if self.state == State::KeyOrEnd => self.close(false),
                _ => false,
            },
            State::Colon => {
                if b == b':' {
                    self.state = State::Value;
                    true
                } else {
                    false
                }
            }
            State::AfterValue => match b {
                b',' => {
                    self.state = if self.top_is_array() {
                        State::Value
                    } else {
                        State::Key
                    };
                    true
                }
                b'}' => self.close(false),
                b']' => self.close(true),
                _ => false,
            },
            State::Str { key, escape } => self.feed_string(key, escape, b),
            State::Num(n) => match n.next(b) {
                Some(next) => {
                    self.state = State::Num(next);
                    true
                }
                None if n.complete() => {
                    self.value_done();
                    self.feed_byte(b)
                }
                None => false,
            },
            State::Literal(rest) => match rest.split_first() {
                Some((&want, tail)) if want == b => {
                    if tail.is_empty() {
                        self.value_done();
                    } else {
                        self.state = State::Literal(tail);
                    }
                    true
                }
                _ => false,
            },
        }
    }

    fn feed_string(&mut self, key: bool, escape: Escape, b: u8) -> bool {
        let escape = match escape {
            Escape::None => match b {
                b'"' => {
                    if key {
                        self.state = State::Colon;
                    } else {
                        self.value_done();
                    }
                    return true;
                }
                b'\\' => Escape::Backslash,
                0x00..=0x1f => return false,
                _ => Escape::None,
            },
            Escape::Backslash => match b {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Escape::None,
                b'u' => Escape::Unicode(4),
                _ => return false,
            },
            Escape::Unicode(left) => {
                if !b.is_ascii_hexdigit() {
                    return false;
                }
                if left == 1 {
                    Escape::None
                } else {
                    Escape::Unicode(left - 1)
                }
            }
        };
        self.state = State::Str { key, escape };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(text: &str) -> bool {
        let mut p = JsonPrefix::default();
        p.feed(text.as_bytes()) && p.is_done()
    }

    fn prefix_ok(text: &str) -> bool {
        JsonPrefix::default().accepts(text.as_bytes())
    }

    #[test]
    fn accepts_json_objects() {
        for text in [
            "{}",
            "{\"a\": 1}\n",
            r#"{"a": [1, -2.5e+3, 0, true, false, null, "x\"y\\u00e9", {"b": []}]}"#,
            r#"{"nested": {"deeper": {"k": "v"}}, "n": 0.5}"#,
            "{\"emoji\": \"😀\"}",
        ] {
            assert!(complete(text), "{text}");
            assert!(serde_json::from_str::<serde_json::Value>(text).is_ok());
        }
    }

    #[test]
    fn refuses_what_is_not_a_json_object_prefix() {
        for text in [
            "[1]",
            "\"a\"",
            "{'a': 1}",
            "{\"a\" 1}",
            "{\"a\": 01}",
            "{\"a\": 1,}",
            "{\"a\": tru }",
            "{\"a\": \"line\nbreak\"}",
            "{\"a\": \"\\x\"}",
            "{\"a\": [1}",
            "{} {}",
            "```json",
        ] {
            let mut p = JsonPrefix::default();
            assert!(!(p.feed(text.as_bytes()) && p.is_done()), "{text}");
        }
        assert!(!prefix_ok("{} x"));
        assert!(!prefix_ok(" {"), "the object starts at once");
        assert!(!prefix_ok("{,"));
    }

    #[test]
    fn prefixes_stay_open() {
        for text in [
            "",
            "{",
            "{\"a",
            "{\"a\":",
            "{\"a\": -",
            "{\"a\": 1.",
            "{\"a\": [tr",
        ] {
            let mut p = JsonPrefix::default();
            assert!(p.feed(text.as_bytes()), "{text}");
            assert!(!p.is_done(), "{text}");
        }
    }

    #[test]
    fn whitespace_runs_are_bounded_outside_strings() {
        let run = " ".repeat(MAX_WHITESPACE_RUN as usize);
        assert!(prefix_ok(&format!("{{{run}\"a\":{run}1}}")));
        assert!(!prefix_ok(&format!("{{{run} ")));
        // Inside a string, spaces are text.
        assert!(prefix_ok(&format!("{{\"a\": \"{run}{run}\"}}")));
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = format!("{{\"a\": {}", "[".repeat(MAX_DEPTH as usize));
        assert!(!prefix_ok(&deep));
        let ok = format!("{{\"a\": {}", "[".repeat(MAX_DEPTH as usize - 1));
        assert!(prefix_ok(&ok));
    }

    #[test]
    fn agrees_with_serde_json_on_random_texts() {
        // Byte strings from a small alphabet: whenever the recogniser calls
        // one a complete object, serde_json parses it as an object.
        let alphabet = b"{}[]\":,01-.e tfalsnru\\";
        let mut state = 0x9e37_79b9_u64;
        let mut seen_complete = 0;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = 2 + (state % 12) as usize;
            let text: Vec<u8> = (0..len)
                .map(|i| {
                    alphabet[(state.rotate_right(i as u32 * 5) % alphabet.len() as u64) as usize]
                })
                .collect();
            let mut p = JsonPrefix::default();
            if p.feed(&text) && p.is_done() {
                seen_complete += 1;
                let parsed: serde_json::Value = serde_json::from_slice(&text).unwrap();
                assert!(parsed.is_object(), "{}", String::from_utf8_lossy(&text));
            }
        }
        assert!(seen_complete > 10, "{seen_complete}");
    }
}
