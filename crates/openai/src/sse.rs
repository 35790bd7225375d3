//! Server-sent events as the OpenAI API streams them: `data: <json>\n\n`
//! frames, ended by `data: [DONE]`; and the one decoder of SSE bytes that
//! the gateway's relay, the bench and the tests share.
//!
//! The decoder follows the WHATWG event-stream rules: lines end with LF, CR
//! or CRLF (a CR at the end of one chunk and an LF at the start of the next
//! are one line end); a blank line dispatches the event; `data:` lines are
//! joined with `\n`; `event:` names the event; lines starting with `:` are
//! comments; one space after the colon is dropped. llama.cpp's server writes
//! stream errors as an `error:` field, which the decoder reports as an event
//! named `error`. Bytes are decoded as UTF-8 a whole line at a time, so a
//! character split across chunks is put back together, and a line that is not
//! UTF-8 is an error rather than something to wait on.

/// The frame that ends a stream.
pub const DONE: &str = "[DONE]";

/// The largest event the decoder holds by default (data and the line being
/// read): 16 MiB, far above any chunk an OpenAI-compatible server sends.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 16 << 20;

/// Encodes one event's data as an SSE frame.
pub fn frame(data: &str) -> String {
    let mut out = String::with_capacity(data.len() + 8);
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    out
}

/// One decoded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` name (`error` for llama.cpp's `error:` lines), if any.
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

impl SseEvent {
    /// Whether the stream said this is an error (`event: error` or an
    /// `error:` field).
    pub fn is_error(&self) -> bool {
        self.event.as_deref() == Some("error")
    }
}

/// Why a byte stream is not a valid event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SseError {
    /// A line is not UTF-8.
    InvalidUtf8,
    /// An event grew past the decoder's limit without ending.
    EventTooLarge,
}

impl std::fmt::Display for SseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SseError::InvalidUtf8 => "the event stream is not UTF-8",
            SseError::EventTooLarge => "an event of the stream is too large",
        })
    }
}

impl std::error::Error for SseError {}

/// Splits an SSE byte stream into events.
#[derive(Debug)]
pub struct SseDecoder {
    /// Bytes of the line not yet ended.
    line: Vec<u8>,
    /// The last byte fed was a CR: an LF that follows belongs to it.
    after_cr: bool,
    /// The event being read.
    event: Option<String>,
    data: String,
    has_data: bool,
    max_event_bytes: usize,
}

impl Default for SseDecoder {
    fn default() -> Self {
        Self::with_max_event_bytes(DEFAULT_MAX_EVENT_BYTES)
    }
}

impl SseDecoder {
    /// A decoder with nothing buffered and the default event limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder that refuses events larger than `max` bytes.
    pub fn with_max_event_bytes(max: usize) -> Self {
        SseDecoder {
            line: Vec::new(),
            after_cr: false,
            event: None,
            data: String::new(),
            has_data: false,
            max_event_bytes: max,
        }
    }

    /// Feeds bytes and returns every event they completed. After an error
    /// the stream is not to be trusted; the decoder keeps nothing of it.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let mut events = Vec::new();
        let mut rest = bytes;
        if self.after_cr && !rest.is_empty() {
            self.after_cr = false;
            if let Some(tail) = rest.strip_prefix(b"\n") {
                rest = tail;
            }
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&rest[..end]);
            let terminator = rest[end];
            rest = &rest[end + 1..];
            if terminator == b'\r' {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    None => self.after_cr = true,
                    Some(_) => {}
                }
            }
            let line = std::mem::take(&mut self.line);
            let text = match String::from_utf8(line) {
                Ok(text) => text,
                Err(_) => return Err(self.fail(SseError::InvalidUtf8)),
            };
            if let Some(event) = self.take_line(&text) {
                events.push(event);
            }
            if self.data.len() > self.max_event_bytes {
                return Err(self.fail(SseError::EventTooLarge));
            }
        }
        self.line.extend_from_slice(rest);
        if self.line.len() + self.data.len() > self.max_event_bytes {
            return Err(self.fail(SseError::EventTooLarge));
        }
        Ok(events)
    }

    /// Takes one whole line; a blank one gives the event read so far.
    fn take_line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            let event = self.event.take();
            if !self.has_data {
                return None;
            }
            self.has_data = false;
            return Some(SseEvent {
                event,
                data: std::mem::take(&mut self.data),
            });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => self.push_data(value),
            "event" => self.event = Some(value.to_owned()),
            "error" => {
                self.event = Some("error".to_owned());
                self.push_data(value);
            }
            // `id`, `retry` and unknown fields carry nothing we use.
            _ => {}
        }
        None
    }

    fn push_data(&mut self, value: &str) {
        if self.has_data {
            self.data.push('\n');
        }
        self.data.push_str(value);
        self.has_data = true;
    }

    fn fail(&mut self, error: SseError) -> SseError {
        *self = Self::with_max_event_bytes(self.max_event_bytes);
        error
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn data(events: &[SseEvent]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    /// Feeds `stream` in pieces of `size` bytes.
    fn feed_in_pieces(stream: &[u8], size: usize) -> Result<Vec<SseEvent>, SseError> {
        let mut dec = SseDecoder::new();
        let mut got = Vec::new();
        for piece in stream.chunks(size) {
            got.extend(dec.feed(piece)?);
        }
        Ok(got)
    }

    #[test]
    fn frames_round_trip_through_the_decoder_in_any_pieces() {
        let stream = format!(
            "{}: comment\n\n{}{}",
            frame("{\"a\":1}"),
            frame("two\nlines"),
            frame(DONE)
        );
        for size in 1..=stream.len() {
            let got = feed_in_pieces(stream.as_bytes(), size).unwrap();
            assert_eq!(
                data(&got),
                vec!["{\"a\":1}", "two\nlines", "[DONE]"],
                "{size}"
            );
        }
    }

    #[test]
    fn multi_byte_characters_split_across_chunks_come_back_whole() {
        let text = "{\"content\":\"안녕 — 世界 🙂\"}";
        let stream = frame(text);
        for size in 1..8 {
            let got = feed_in_pieces(stream.as_bytes(), size).unwrap();
            assert_eq!(data(&got), vec![text], "{size}");
        }
    }

    #[test]
    fn invalid_utf8_is_an_error_not_a_wait() {
        let mut dec = SseDecoder::new();
        assert_eq!(dec.feed(b"data: ok\n\n").unwrap().len(), 1);
        // A lone continuation byte, then the line ends: nothing can
        // complete it.
        assert_eq!(dec.feed(b"data: \x80abc\n"), Err(SseError::InvalidUtf8));
        // An overlong encoding too, fed byte by byte.
        let mut dec = SseDecoder::new();
        let mut result = Ok(Vec::new());
        for b in b"data: \xc0\xaf\n\n" {
            result = dec.feed(&[*b]);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(SseError::InvalidUtf8));
    }

    #[test]
    fn crlf_and_cr_line_ends_are_line_ends_even_split() {
        let stream = b"data: a\r\n\r\ndata: b\r\rdata: c\r\ndata: d\n\n";
        for size in 1..=stream.len() {
            let got = feed_in_pieces(stream, size).unwrap();
            assert_eq!(data(&got), vec!["a", "b", "c\nd"], "{size}");
        }
        // An empty chunk between a CR and its LF changes nothing.
        let mut dec = SseDecoder::new();
        let mut got = dec.feed(b"data: a\r").unwrap();
        got.extend(dec.feed(b"").unwrap());
        got.extend(dec.feed(b"\ndata: b\n\n").unwrap());
        assert_eq!(data(&got), vec!["a\nb"]);
    }

    #[test]
    fn event_and_error_fields_name_the_event() {
        let stream = b"event: error\ndata: {\"error\":{\"message\":\"x\"}}\n\n\
                       error: {\"code\":500,\"message\":\"boom\"}\n\n\
                       id: 7\nretry: 10\nunknown\ndata:no space\n\n\
                       event: ping\n\n";
        let got = feed_in_pieces(stream, 5).unwrap();
        assert_eq!(got.len(), 3);
        assert!(got[0].is_error());
        assert_eq!(got[0].data, "{\"error\":{\"message\":\"x\"}}");
        assert!(got[1].is_error());
        assert_eq!(got[1].data, "{\"code\":500,\"message\":\"boom\"}");
        assert!(!got[2].is_error());
        assert_eq!(got[2].event, None);
        assert_eq!(got[2].data, "no space");
    }

    #[test]
    fn comments_and_events_without_data_dispatch_nothing() {
        let got = feed_in_pieces(b": keep-alive\n\n:\n\nevent: x\n\ndata\n\n", 3).unwrap();
        assert_eq!(data(&got), vec![""]);
    }

    #[test]
    fn an_event_that_never_ends_is_refused_at_the_limit() {
        let mut dec = SseDecoder::with_max_event_bytes(64);
        assert!(dec.feed(b"data: 0123456789\n").is_ok());
        let mut result = Ok(Vec::new());
        for _ in 0..10 {
            result = dec.feed(b"data: 0123456789\n");
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(SseError::EventTooLarge));
        // One endless line, too.
        let mut dec = SseDecoder::with_max_event_bytes(64);
        assert_eq!(dec.feed(&[b'x'; 65]), Err(SseError::EventTooLarge));
        // After an error the decoder starts afresh.
        assert_eq!(data(&dec.feed(b"data: y\n\n").unwrap()), vec!["y"]);
    }
}
