//! Tool calls in model output: the `<tool_call>{"name": ..., "arguments":
//! ...}</tool_call>` blocks that Qwen2.5 (and Hermes-style templates) write,
//! parsed into OpenAI `tool_calls`. Small models often drop the tags and
//! answer with the bare JSON object, fenced or not; as llama.cpp does, such
//! an answer is a call too, when it names one of the request's tools. The
//! streaming side lets plain text through at once and holds back what may
//! be a call.

use neocloud_openai::chat::{FunctionCall, ToolCall};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// Whether a chat template writes tool calls in the form parsed here.
pub fn template_uses_tool_call_tags(template_source: &str) -> bool {
    template_source.contains(OPEN)
}

/// An answer split into text and tool calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedAnswer {
    /// Text before the first call (`None` when there is none).
    pub content: Option<String>,
    /// The calls, in order.
    pub calls: Vec<ToolCall>,
}

/// Splits `text` into content and tool calls. `None` when it holds no call,
/// or when a block is not a well-formed call: then the whole text is
/// content, never a half-parsed call. `tools` names the request's tools.
pub fn parse(text: &str, tools: &[String], id_prefix: &str) -> Option<ParsedAnswer> {
    let Some(first) = text.find(OPEN) else {
        return parse_bare(text, tools, id_prefix);
    };
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(after_open) = rest.strip_prefix(OPEN) {
        let (body, after) = match after_open.find(CLOSE) {
            Some(end) => (&after_open[..end], &after_open[end + CLOSE.len()..]),
            // A call cut off by the end of generation is still a call when its
            // JSON is complete.
            None => (after_open, ""),
        };
        let value = serde_json::from_str(body.trim()).ok()?;
        calls.push(call_of(&value, &format!("{id_prefix}_{}", calls.len()))?);
        rest = after.trim_start();
    }
    if !rest.trim().is_empty() {
        return None;
    }
    let content = text[..first].trim();
    Some(ParsedAnswer {
        content: (!content.is_empty()).then(|| content.to_owned()),
        calls,
    })
}

/// An answer that is only a call object (or a list of them), perhaps in a
/// Markdown code fence, naming known tools.
fn parse_bare(text: &str, tools: &[String], id_prefix: &str) -> Option<ParsedAnswer> {
    let mut body = text.trim();
    if let Some(fenced) = body.strip_prefix("```") {
        let (_lang, inner) = fenced.split_once('\n')?;
        body = inner.trim_end().strip_suffix("```")?.trim();
    }
    if !body.starts_with('{') && !body.starts_with('[') {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    let values = match value {
        serde_json::Value::Array(items) if !items.is_empty() => items,
        v @ serde_json::Value::Object(_) => vec![v],
        _ => return None,
    };
    let calls = values
        .iter()
        .enumerate()
        .map(|(i, v)| call_of(v, &format!("{id_prefix}_{i}")))
        .collect::<Option<Vec<_>>>()?;
    if !calls.iter().all(|c| tools.contains(&c.function.name)) {
        return None;
    }
    Some(ParsedAnswer {
        content: None,
        calls,
    })
}

fn call_of(value: &serde_json::Value, id: &str) -> Option<ToolCall> {
    let name = value.get("name")?.as_str()?.to_owned();
    let arguments = match value.get("arguments").or_else(|| value.get("parameters")) {
        None | Some(serde_json::Value::Null) => "{}".to_owned(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => serde_json::to_string(v).ok()?,
    };
    Some(ToolCall {
        id: id.to_owned(),
        kind: "function".into(),
        function: FunctionCall { name, arguments },
    })
}

/// Streams content while holding back anything that may be a tool call.
#[derive(Debug)]
pub struct ToolCallStream {
    tools: Vec<String>,
    text: String,
    emitted: usize,
    /// The answer began like a bare call object: all of it waits for the end.
    held: bool,
    /// Enough text came to know whether the answer begins like a call.
    decided: bool,
}

impl ToolCallStream {
    /// A stream for a request offering `tools`.
    pub fn new(tools: Vec<String>) -> Self {
        ToolCallStream {
            tools,
            text: String::new(),
            emitted: 0,
            held: false,
            decided: false,
        }
    }

    /// Adds generated text; returns the content that can go out now.
    pub fn push(&mut self, text: &str) -> String {
        self.text.push_str(text);
        if !self.decided {
            let start = self.text.trim_start();
            if start.is_empty() || "```".starts_with(start) {
                return String::new();
            }
            self.decided = true;
            self.held =
                start.starts_with('{') || start.starts_with('[') || start.starts_with("```");
        }
        if self.held {
            return String::new();
        }
        let limit = match self.text.find(OPEN) {
            Some(i) => i,
            None => self.text.len() - partial_tag_suffix(&self.text),
        };
        let limit = limit.max(self.emitted);
        let out = self.text[self.emitted..limit].to_owned();
        self.emitted = limit;
        out
    }

    /// Ends the stream: the content not sent yet, and the calls (empty when
    /// the answer held none or they were malformed, in which case the held
    /// back text is content).
    pub fn finish(self, id_prefix: &str) -> (String, Vec<ToolCall>) {
        match parse(&self.text, &self.tools, id_prefix) {
            Some(answer) => {
                let before = self.text.find(OPEN).unwrap_or(self.emitted);
                let rest = self.text[self.emitted.min(before)..before].trim_end();
                (rest.to_owned(), answer.calls)
            }
            None => (self.text[self.emitted..].to_owned(), Vec::new()),
        }
    }
}

/// Length of the longest end of `text` that starts the opening tag.
fn partial_tag_suffix(text: &str) -> usize {
    (1..OPEN.len())
        .rev()
        .find(|&n| text.ends_with(&OPEN[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<String> {
        vec!["get_weather".into(), "now".into()]
    }

    #[test]
    fn parses_qwen_tool_calls() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Seoul\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        let answer = parse(text, &tools(), "call_x").unwrap();
        assert_eq!(answer.content.as_deref(), Some("Let me check."));
        assert_eq!(answer.calls.len(), 2);
        assert_eq!(answer.calls[0].function.name, "get_weather");
        assert_eq!(answer.calls[0].function.arguments, r#"{"city":"Seoul"}"#);
        assert_eq!(answer.calls[0].id, "call_x_0");
        assert_eq!(answer.calls[1].function.arguments, "{}");
    }

    #[test]
    fn bare_and_fenced_call_objects_naming_a_tool_are_calls() {
        let fenced = "```json\n{\n  \"name\": \"get_weather\",\n  \"arguments\": {\"city\": \"Seoul\"}\n}\n```";
        let answer = parse(fenced, &tools(), "c").unwrap();
        assert_eq!(answer.content, None);
        assert_eq!(answer.calls[0].function.arguments, r#"{"city":"Seoul"}"#);
        let bare = r#"{"name": "now", "arguments": {}}"#;
        assert_eq!(parse(bare, &tools(), "c").unwrap().calls.len(), 1);
        // Not a tool of the request: plain JSON content.
        assert!(parse(r#"{"name": "rm_rf", "arguments": {}}"#, &tools(), "c").is_none());
        assert!(parse(r#"{"city": "Seoul"}"#, &tools(), "c").is_none());
    }

    #[test]
    fn malformed_calls_leave_the_text_as_content() {
        let t = tools();
        assert!(parse("no calls here", &t, "c").is_none());
        assert!(parse("<tool_call>{\"name\": }</tool_call>", &t, "c").is_none());
        assert!(parse("<tool_call>{\"arguments\": {}}</tool_call>", &t, "c").is_none());
        assert!(parse(
            "<tool_call>{\"name\":\"now\"}</tool_call> trailing words",
            &t,
            "c"
        )
        .is_none());
    }

    #[test]
    fn an_unclosed_but_complete_call_is_a_call() {
        let text = "<tool_call>\n{\"name\": \"now\", \"arguments\": {\"a\": 1}}\n";
        let answer = parse(text, &tools(), "c").unwrap();
        assert_eq!(answer.content, None);
        assert_eq!(answer.calls[0].function.arguments, r#"{"a":1}"#);
    }

    #[test]
    fn streaming_holds_back_only_what_may_be_a_call() {
        let mut s = ToolCallStream::new(tools());
        assert_eq!(s.push("Hello <to"), "Hello ");
        assert_eq!(s.push("ol"), "");
        assert_eq!(s.push("s are fun"), "<tools are fun");
        let (rest, calls) = s.finish("c");
        assert_eq!(rest, "");
        assert!(calls.is_empty());

        let mut s = ToolCallStream::new(tools());
        let mut out = s.push("Sure.\n<tool_");
        out += &s.push("call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>");
        assert_eq!(out, "Sure.\n");
        let (rest, calls) = s.finish("c");
        assert_eq!(rest, "");
        assert_eq!(calls.len(), 1);

        let mut s = ToolCallStream::new(tools());
        assert_eq!(s.push("<tool_call>{\"name\": oops"), "");
        let (rest, calls) = s.finish("c");
        assert_eq!(rest, "<tool_call>{\"name\": oops");
        assert!(calls.is_empty());

        // An answer that opens like a bare call waits for the end.
        let mut s = ToolCallStream::new(tools());
        assert_eq!(s.push("``"), "");
        assert_eq!(s.push("`json\n{\"name\": \"now\","), "");
        assert_eq!(s.push(" \"arguments\": {}}\n```"), "");
        let (rest, calls) = s.finish("c");
        assert_eq!((rest.as_str(), calls.len()), ("", 1));

        let mut s = ToolCallStream::new(tools());
        assert_eq!(s.push("{\"city\": 1}"), "");
        let (rest, calls) = s.finish("c");
        assert_eq!((rest.as_str(), calls.len()), ("{\"city\": 1}", 0));
    }
}
