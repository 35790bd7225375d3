//! Server-sent events as the OpenAI API streams them: `data: <json>\n\n`
//! frames, ended by `data: [DONE]`.

/// The frame that ends a stream.
pub const DONE: &str = "[DONE]";

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

/// Splits an SSE byte stream into event data payloads.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buffer: String,
}

impl SseDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds text and returns the data of every event it completed.
    pub fn feed(&mut self, text: &str) -> Vec<String> {
        self.buffer.push_str(&text.replace("\r\n", "\n"));
        let mut events = Vec::new();
        while let Some(end) = self.buffer.find("\n\n") {
            let block: String = self.buffer.drain(..end + 2).collect();
            let data: Vec<&str> = block
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                events.push(data.join("\n"));
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_the_decoder() {
        let mut dec = SseDecoder::new();
        let stream = format!(
            "{}{}: comment\n\n{}",
            frame("{\"a\":1}"),
            "",
            frame("two\nlines")
        );
        let mut got = Vec::new();
        // Fed in awkward pieces, as a network delivers it.
        for piece in stream.as_bytes().chunks(3) {
            got.extend(dec.feed(std::str::from_utf8(piece).unwrap()));
        }
        got.extend(dec.feed(&frame(DONE)));
        assert_eq!(got, vec!["{\"a\":1}", "two\nlines", "[DONE]"]);
    }
}
