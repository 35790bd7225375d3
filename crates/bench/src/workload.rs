//! What the bench sends: synthetic prompts of a controlled length (exact
//! token counts through the target's `/tokenize` when it has one), an
//! optional shared prefix, or requests read from a JSONL dataset.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::client::Client;
use crate::error::BenchError;
use crate::target::Target;

/// Which API the requests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
}

/// One request to send.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    /// A prompt (completions) or one user message (chat) ...
    pub prompt: Option<String>,
    /// ... or whole chat messages from a dataset.
    pub messages: Option<Vec<Value>>,
    /// Tokens to generate.
    pub max_tokens: u32,
    /// Prompt tokens as counted while preparing (`None` when unknown).
    pub input_tokens: Option<usize>,
}

/// Words the synthetic prompts are made of: common English, so that token
/// counts per word are typical.
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there",
    "been", "if", "more", "when", "will", "would", "who", "so", "no", "time", "people", "water",
    "river", "mountain", "city", "market", "engine", "signal", "garden", "winter", "history",
    "language", "number", "light", "story", "music", "system", "energy", "question", "world",
    "morning", "island", "library", "machine", "forest", "journey", "letter", "window", "silver",
];

/// Counts tokens with a target's tokenizer, or estimates them.
pub struct TokenCounter<'a> {
    client: &'a Client,
    target: &'a Target,
    /// Whether the target answered `/tokenize`; `None` until tried.
    exact: Option<bool>,
}

/// Tokens per word assumed when the target has no `/tokenize` (English
/// text in common BPE vocabularies runs about 1.3 tokens per word).
pub const TOKENS_PER_WORD_ESTIMATE: f64 = 1.3;

impl<'a> TokenCounter<'a> {
    /// A counter using `target`'s tokenizer when it has one.
    pub fn new(client: &'a Client, target: &'a Target) -> Self {
        TokenCounter {
            client,
            target,
            exact: None,
        }
    }

    /// Whether counts are exact (the target tokenises) rather than estimated.
    pub fn is_exact(&self) -> bool {
        self.exact == Some(true)
    }

    /// Tokens in `text` (without special tokens).
    pub async fn count(&mut self, text: &str) -> usize {
        if self.exact != Some(false) {
            if let Some(n) = self.client.tokenize(self.target, text).await {
                self.exact = Some(true);
                return n;
            }
            self.exact = Some(false);
        }
        (text.split_whitespace().count() as f64 * TOKENS_PER_WORD_ESTIMATE).round() as usize
    }
}

/// Synthetic prompt lengths: a mean and a standard deviation in tokens.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Length {
    /// Mean tokens.
    pub mean: usize,
    /// Standard deviation (0: every prompt has the mean).
    pub stddev: usize,
}

impl Length {
    /// Parses `MEAN[:STDDEV]`.
    pub fn parse(spec: &str) -> Result<Self, BenchError> {
        let bad = || BenchError::InvalidArgument(format!("{spec:?}: expected MEAN[:STDDEV]"));
        let (mean, stddev) = match spec.split_once(':') {
            Some((m, s)) => (m, s),
            None => (spec, "0"),
        };
        Ok(Length {
            mean: mean.trim().parse().map_err(|_| bad())?,
            stddev: stddev.trim().parse().map_err(|_| bad())?,
        })
    }

    fn draw(&self, rng: &mut StdRng) -> usize {
        if self.stddev == 0 {
            return self.mean.max(1);
        }
        // Box-Muller.
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random();
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        (self.mean as f64 + z * self.stddev as f64).round().max(1.0) as usize
    }
}

/// Text of about `tokens` tokens: whole words, adjusted until the count is
/// exact when the counter is exact.
async fn text_of_tokens(
    counter: &mut TokenCounter<'_>,
    rng: &mut StdRng,
    tokens: usize,
) -> (String, usize) {
    let mut words: Vec<&str> = Vec::new();
    let grow = |words: &mut Vec<&str>, n: usize, rng: &mut StdRng| {
        for _ in 0..n {
            words.push(WORDS[rng.random_range(0..WORDS.len())]);
        }
    };
    grow(
        &mut words,
        ((tokens as f64 / TOKENS_PER_WORD_ESTIMATE).ceil() as usize).max(1),
        rng,
    );
    let mut count = counter.count(&words.join(" ")).await;
    // Scale toward the target, then step one word at a time.
    for _ in 0..4 {
        if count == tokens || count == 0 {
            break;
        }
        let want = (words.len() as f64 * tokens as f64 / count as f64)
            .round()
            .max(1.0) as usize;
        if want > words.len() {
            let more = want - words.len();
            grow(&mut words, more, rng);
        } else {
            words.truncate(want);
        }
        count = counter.count(&words.join(" ")).await;
    }
    for _ in 0..64 {
        if count == tokens || !counter.is_exact() {
            break;
        }
        if count < tokens {
            grow(&mut words, 1, rng);
        } else if words.len() > 1 {
            words.pop();
        } else {
            break;
        }
        count = counter.count(&words.join(" ")).await;
    }
    (words.join(" "), count)
}

/// Synthetic requests: `n` prompts of `input` tokens (after a shared prefix
/// of `prefix_tokens`), each asking for `output_tokens`.
pub async fn synthetic(
    counter: &mut TokenCounter<'_>,
    seed: u64,
    n: usize,
    input: Length,
    prefix_tokens: usize,
    output_tokens: u32,
) -> Vec<RequestSpec> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (prefix, prefix_count) = if prefix_tokens > 0 {
        let (text, count) = text_of_tokens(counter, &mut rng, prefix_tokens).await;
        (format!("{text}\n"), count)
    } else {
        (String::new(), 0)
    };
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let want = input.draw(&mut rng).saturating_sub(prefix_count).max(1);
        let (text, count) = text_of_tokens(counter, &mut rng, want).await;
        out.push(RequestSpec {
            prompt: Some(format!("{prefix}{text}")),
            messages: None,
            max_tokens: output_tokens,
            input_tokens: Some(prefix_count + count),
        });
    }
    out
}

/// Requests from a JSONL file: `{"prompt": ...}` or `{"messages": [...]}`
/// with an optional `max_tokens`, or ShareGPT conversations
/// (`{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}`,
/// where the first human turn is the prompt and the reply's length, in
/// estimated tokens, the output length).
pub fn dataset(path: &Path, default_max_tokens: u32) -> Result<Vec<RequestSpec>, BenchError> {
    let err = |message: String| BenchError::Data {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value =
            serde_json::from_str(line).map_err(|e| err(format!("line {}: {e}", i + 1)))?;
        let max_tokens = v
            .get("max_tokens")
            .and_then(Value::as_u64)
            .map_or(default_max_tokens, |m| m as u32);
        if let Some(p) = v.get("prompt").and_then(Value::as_str) {
            out.push(RequestSpec {
                prompt: Some(p.to_owned()),
                messages: None,
                max_tokens,
                input_tokens: None,
            });
        } else if let Some(m) = v.get("messages").and_then(Value::as_array) {
            out.push(RequestSpec {
                prompt: None,
                messages: Some(m.clone()),
                max_tokens,
                input_tokens: None,
            });
        } else if let Some(turns) = v.get("conversations").and_then(Value::as_array) {
            let value_of = |who: &str| {
                turns
                    .iter()
                    .find(|t| t.get("from").and_then(Value::as_str) == Some(who))
                    .and_then(|t| t.get("value").and_then(Value::as_str))
            };
            let Some(prompt) = value_of("human") else {
                continue;
            };
            let reply_tokens = value_of("gpt").map(|r| {
                (r.split_whitespace().count() as f64 * TOKENS_PER_WORD_ESTIMATE).round() as u32
            });
            out.push(RequestSpec {
                prompt: Some(prompt.to_owned()),
                messages: None,
                max_tokens: reply_tokens.filter(|&n| n > 0).unwrap_or(max_tokens),
                input_tokens: None,
            });
        } else {
            return Err(err(format!(
                "line {}: expected \"prompt\", \"messages\" or \"conversations\"",
                i + 1
            )));
        }
    }
    if out.is_empty() {
        return Err(err("no requests in the file".into()));
    }
    Ok(out)
}

/// The JSON body of a request.
pub fn request_body(
    spec: &RequestSpec,
    api: Api,
    model: &str,
    temperature: f32,
    fixed_output: bool,
) -> Value {
    let mut body = match api {
        Api::Chat => {
            let messages = spec.messages.clone().unwrap_or_else(|| {
                vec![json!({"role": "user", "content": spec.prompt.clone().unwrap_or_default()})]
            });
            json!({"model": model, "messages": messages})
        }
        Api::Completions => {
            let prompt = spec.prompt.clone().unwrap_or_else(|| {
                spec.messages
                    .iter()
                    .flatten()
                    .filter_map(|m| m.get("content").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            json!({"model": model, "prompt": prompt})
        }
    };
    body["max_tokens"] = json!(spec.max_tokens);
    body["temperature"] = json!(temperature);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    if fixed_output {
        // Extensions of vLLM, llama.cpp and neocloud: generate exactly
        // max_tokens tokens.
        body["ignore_eos"] = json!(true);
        body["min_tokens"] = json!(spec.max_tokens);
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_parse_and_draw_around_the_mean() {
        let l = Length::parse("200:20").unwrap();
        assert_eq!((l.mean, l.stddev), (200, 20));
        assert_eq!(Length::parse("64").unwrap().stddev, 0);
        assert!(Length::parse("x").is_err());
        let mut rng = StdRng::seed_from_u64(1);
        let draws: Vec<usize> = (0..2000).map(|_| l.draw(&mut rng)).collect();
        let mean = draws.iter().sum::<usize>() as f64 / draws.len() as f64;
        assert!((mean - 200.0).abs() < 3.0, "{mean}");
    }

    #[test]
    fn datasets_read_every_shape() {
        let dir = std::env::temp_dir().join(format!("nc-bench-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.jsonl");
        std::fs::write(
            &path,
            concat!(
                "{\"prompt\": \"hello\", \"max_tokens\": 7}\n",
                "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
                "\n",
                "{\"conversations\": [{\"from\": \"human\", \"value\": \"q\"}, {\"from\": \"gpt\", \"value\": \"one two three four five six seven eight nine ten\"}]}\n"
            ),
        )
        .unwrap();
        let reqs = dataset(&path, 32).unwrap();
        assert_eq!(reqs.len(), 3);
        assert_eq!(reqs[0].max_tokens, 7);
        assert_eq!(reqs[1].max_tokens, 32);
        assert_eq!(reqs[2].max_tokens, 13);
        std::fs::write(&path, "{\"nothing\": 1}\n").unwrap();
        assert!(dataset(&path, 32).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bodies_ask_for_streams_with_usage_and_fixed_lengths() {
        let spec = RequestSpec {
            prompt: Some("hi".into()),
            messages: None,
            max_tokens: 16,
            input_tokens: Some(1),
        };
        let chat = request_body(&spec, Api::Chat, "m", 0.0, true);
        assert_eq!(chat["messages"][0]["content"], "hi");
        assert_eq!(chat["stream_options"]["include_usage"], true);
        assert_eq!(chat["min_tokens"], 16);
        let text = request_body(&spec, Api::Completions, "m", 0.0, false);
        assert_eq!(text["prompt"], "hi");
        assert!(text.get("ignore_eos").is_none());
    }
}
