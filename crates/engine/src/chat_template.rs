//! Chat templates: the GGUF's Jinja `tokenizer.chat_template`, rendered with
//! minijinja the way Hugging Face's `apply_chat_template` renders it
//! (`trim_blocks`, `lstrip_blocks`, Python string methods, `tojson` with
//! Python's separators, `raise_exception`), and a built-in Gemma turn
//! template for Gemma files that carry none.

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};

use crate::error::EngineError;
use crate::gguf::GgufFile;

/// Gemma's turn format: a system message is folded into the first user turn,
/// roles alternate, and the assistant is called `model`.
const GEMMA_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set first_user_prefix = '' -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
  {%- endif -%}
  {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
  {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}
  {{- message['content'] | trim }}
  {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{ '<start_of_turn>model\n' }}
{%- endif -%}"#;

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template with the model's special-token texts.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles a template from source.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", python_tojson);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| EngineError::Template(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            source: source.to_owned(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The template a GGUF file carries, or the built-in Gemma template for
    /// Gemma files without one. `None` when the model has neither.
    pub fn from_gguf(
        gguf: &GgufFile,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Option<Self>, EngineError> {
        if let Some(src) = gguf
            .meta("tokenizer.chat_template")
            .and_then(|v| v.as_str())
        {
            return Self::new(src, bos_token, eos_token).map(Some);
        }
        let arch = gguf
            .meta("general.architecture")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if arch.starts_with("gemma") {
            return Self::new(GEMMA_TEMPLATE, bos_token, eos_token).map(Some);
        }
        Ok(None)
    }

    /// Renders `messages` (OpenAI-style JSON objects) and optional `tools`.
    /// Text-part arrays in `content` are joined into one string first, and
    /// tool-call arguments are parsed from JSON text.
    pub fn render(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let messages: Vec<serde_json::Value> = messages.iter().map(normalize_message).collect();
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| EngineError::Template(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(&messages),
            tools => tools.map(Value::from_serialize),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        tmpl.render(ctx).map_err(|e| {
            let mut msg = e.to_string();
            if let Some(detail) = e.detail() {
                msg = format!("{msg}: {detail}");
            }
            EngineError::Template(msg)
        })
    }
}

/// Puts a message in the shape templates expect: `developer` becomes
/// `system`, text-part arrays in `content` are joined into one string, and
/// tool-call arguments, which the API carries as JSON text, become objects
/// again (templates write them with `tojson`).
fn normalize_message(message: &serde_json::Value) -> serde_json::Value {
    let mut m = message.clone();
    // OpenAI's `developer` role is the system role of newer models; templates
    // know only `system`.
    if m.get("role").and_then(|r| r.as_str()) == Some("developer") {
        m["role"] = serde_json::Value::String("system".into());
    }
    if let Some(parts) = m.get("content").and_then(|c| c.as_array()) {
        let text: String = parts
            .iter()
            .filter(|p| p.get("type").and_then(|t| t.as_str()) == Some("text"))
            .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
            .collect();
        m["content"] = serde_json::Value::String(text);
    }
    if let Some(calls) = m.get_mut("tool_calls").and_then(|c| c.as_array_mut()) {
        for call in calls {
            let Some(args) = call.pointer_mut("/function/arguments") else {
                continue;
            };
            if let Some(parsed) = args
                .as_str()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
            {
                *args = parsed;
            }
        }
    }
    m
}

/// `tojson` as Python's `json.dumps` writes it: `", "` and `": "` separators,
/// keys in insertion order, non-ASCII kept.
fn python_tojson(value: Value) -> Result<Value, JinjaError> {
    let json = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_python_json(&json, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_python_json(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_python_json(item, out);
            }
            out.push(']');
        }
        serde_json::Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_python_json(item, out);
            }
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn gemma_builtin_template_renders_turns() {
        let t = ChatTemplate::new(GEMMA_TEMPLATE, "<bos>", "<eos>").unwrap();
        let out = t
            .render(
                &[
                    json!({"role": "system", "content": "Be brief."}),
                    json!({"role": "user", "content": [{"type": "text", "text": " Hi "}]}),
                    json!({"role": "assistant", "content": "Hello"}),
                    json!({"role": "user", "content": "Bye"}),
                ],
                None,
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let t = ChatTemplate::new(GEMMA_TEMPLATE, "<bos>", "<eos>").unwrap();
        let err = t
            .render(&[json!({"role": "assistant", "content": "x"})], None, true)
            .unwrap_err();
        assert!(err.to_string().contains("alternate"), "{err}");
    }

    #[test]
    fn tojson_uses_python_separators_and_keeps_order() {
        let t = ChatTemplate::new("{{ messages[0] | tojson }}|{{ 'a,b'.split(',') | join('+') }}|{{ ' x '.strip() }}|{{ 'abc'.startswith('ab') }}", "", "").unwrap();
        let out = t
            .render(
                &[json!({"role": "user", "content": "é\"", "b": [1, 2.5, null]})],
                None,
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            r#"{"role": "user", "content": "é\"", "b": [1, 2.5, null]}|a+b|x|True"#
        );
    }

    #[test]
    fn messages_are_normalised_for_templates() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.role }}:{{ m.content }}{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments.city }}]{% endfor %};{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let out = t
            .render(
                &[
                    json!({"role": "developer", "content": "Be brief."}),
                    json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
                    json!({"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Seoul\"}"}}]}),
                ],
                None,
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "system:Be brief.;user:ab;assistant:[get_weather Seoul];"
        );
    }
}
