//! A loaded model bundle and the single-sequence generation loop: prefill the
//! prompt, then sample token by token until a stop token, a stop string, the
//! token limit or the context limit, streaming UTF-8-safe text as it goes.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::chat_template::ChatTemplate;
use crate::error::EngineError;
use crate::gguf::GgufFile;
use crate::json_grammar::{Grammar, JsonPrefix};
use crate::model::{KvCache, Model};
use crate::sampler::{Sampled, Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// A model ready to serve: weights, tokenizer and chat template.
#[derive(Debug)]
pub struct LoadedModel {
    /// The network.
    pub model: Model,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template, when it has one.
    pub chat_template: Option<ChatTemplate>,
    /// How long loading took.
    pub load_time: Duration,
    /// Text bytes of every token (empty for control tokens), built on the
    /// first constrained generation.
    token_bytes: OnceLock<Vec<Box<[u8]>>>,
}

impl LoadedModel {
    /// Opens a GGUF file and prepares everything needed to generate.
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        let start = Instant::now();
        let gguf = GgufFile::open(path)?;
        let model = Model::load(&gguf)?;
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        if tokenizer.vocab_size() < model.config.vocab_size {
            return Err(EngineError::Model(format!(
                "the vocabulary has {} tokens but the output head {} rows",
                tokenizer.vocab_size(),
                model.config.vocab_size
            )));
        }
        let text_of = |id: Option<u32>| {
            id.and_then(|i| tokenizer.token_text(i))
                .unwrap_or("")
                .to_string()
        };
        let chat_template =
            ChatTemplate::from_gguf(&gguf, &text_of(tokenizer.bos), &text_of(tokenizer.eos))?;
        Ok(LoadedModel {
            model,
            tokenizer,
            chat_template,
            load_time: start.elapsed(),
            token_bytes: OnceLock::new(),
        })
    }

    /// The text bytes of every token of the output head (empty for control
    /// tokens), computed once.
    pub fn token_bytes_table(&self) -> &[Box<[u8]>] {
        self.token_bytes.get_or_init(|| {
            (0..self.model.config.vocab_size as u32)
                .map(|id| self.tokenizer.token_bytes(id, false).into_boxed_slice())
                .collect()
        })
    }

    /// Tokenises a rendered chat prompt: special tokens are parsed, and BOS is
    /// added only when the template did not write it already.
    pub fn encode_chat_prompt(&self, prompt: &str) -> Vec<u32> {
        let tok = &self.tokenizer;
        let bos_text = tok.bos.and_then(|b| tok.token_text(b)).unwrap_or("");
        let starts_with_bos = !bos_text.is_empty() && prompt.starts_with(bos_text);
        tok.encode(prompt, !starts_with_bos, true)
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// The token limit or the context limit.
    Length,
    /// The consumer of the text asked to stop (a client went away).
    Cancelled,
}

impl FinishReason {
    /// The OpenAI name of the reason.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Upper bound on generated tokens.
    pub max_tokens: usize,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Strings that end the generation; they are not part of the text.
    pub stop: Vec<String>,
    /// Extra token ids that end the generation.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    /// End-of-generation and stop tokens are not sampled before this many
    /// tokens were generated.
    pub min_tokens: usize,
    /// A constraint on the text; the generation stops when it is complete.
    pub grammar: Option<Grammar>,
}

impl GenerateRequest {
    /// A greedy request for `max_tokens` tokens after `prompt`.
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Self {
        GenerateRequest {
            prompt,
            max_tokens,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            min_tokens: 0,
            grammar: None,
        }
    }
}

/// The result of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated token ids (stop tokens excluded).
    pub tokens: Vec<u32>,
    /// Generated text, cut before any stop string.
    pub text: String,
    /// Per generated token: its log-probability and the top alternatives.
    pub steps: Vec<Sampled>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Time spent on the prompt.
    pub prefill_time: Duration,
    /// Time spent generating after the prompt.
    pub decode_time: Duration,
    /// Prompt tokens whose keys and values came from the [`PrefixCache`]
    /// instead of a forward pass.
    pub cached_prompt_tokens: usize,
}

/// The keys and values of the last sequence one model ran, kept so that
/// the next prompt starting the same way (a system prompt, an earlier turn
/// of the conversation) skips that part of the prefill.
///
/// Only positions computed in whole prefill chunks (of [`PREFILL_CHUNK`]
/// tokens, starting at a multiple of it) are reused, and reuse starts a
/// chunk: the rest of the prompt then goes through exactly the forward
/// passes a fresh prefill would make, so a cached answer is the same, bit
/// for bit, as an uncached one. (Small batches take the integer kernels and
/// large ones the dequantising kernels, whose results differ in the last
/// bits; finer reuse would need kernels whose rows do not depend on the
/// batch.)
#[derive(Debug, Default)]
pub struct PrefixCache {
    /// The tokens whose positions `kv` holds.
    tokens: Vec<u32>,
    /// Leading positions computed in whole prefill chunks.
    reusable: usize,
    kv: Option<KvCache>,
}

impl PrefixCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// What a generation reports while it runs.
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// A chunk of the prompt went through the model.
    Prefilled {
        /// Prompt tokens processed so far.
        done: usize,
        /// Prompt tokens in all.
        total: usize,
    },
    /// A token was generated. `text` is what became final with it: clear
    /// of every stop string and UTF-8 complete (often empty).
    Token {
        /// The token and its log-probabilities.
        sampled: &'a Sampled,
        /// Text that became final.
        text: &'a str,
    },
    /// The generation ended; `text` is the rest of the answer.
    Finished {
        /// Text not reported before.
        text: &'a str,
    },
}

/// Prompt tokens per forward pass during prefill: a consumer can cancel
/// between chunks, and activations stay bounded.
pub const PREFILL_CHUNK: usize = 512;

/// Generates a continuation of `req.prompt`, reporting each step to
/// `on_progress`; returning `ControlFlow::Break` from it cancels the
/// generation before the next forward pass.
pub fn generate(
    lm: &LoadedModel,
    req: &GenerateRequest,
    on_progress: &mut dyn FnMut(Progress<'_>) -> ControlFlow<()>,
) -> Result<Generation, EngineError> {
    generate_cached(lm, req, &mut PrefixCache::new(), on_progress)
}

/// [`generate`], reusing the positions of `cache` that the prompt starts
/// with, and leaving this sequence's in it for the next call. A failed
/// generation leaves the cache empty.
pub fn generate_cached(
    lm: &LoadedModel,
    req: &GenerateRequest,
    cache: &mut PrefixCache,
    on_progress: &mut dyn FnMut(Progress<'_>) -> ControlFlow<()>,
) -> Result<Generation, EngineError> {
    let mut kv = cache.kv.take().unwrap_or_else(|| KvCache::new(&lm.model));
    let mut kv_tokens = std::mem::take(&mut cache.tokens);
    // At least the prompt's last token goes through the model: its logits
    // give the first sampled token.
    let common = kv_tokens
        .iter()
        .zip(&req.prompt)
        .take_while(|(a, b)| a == b)
        .count()
        .min(req.prompt.len().saturating_sub(1))
        .min(cache.reusable)
        .min(kv.len());
    let reuse = common - common % PREFILL_CHUNK;
    kv.truncate(reuse, &lm.model);
    kv_tokens.truncate(reuse);
    cache.reusable = 0;
    let result = run_generation(lm, req, &mut kv, &mut kv_tokens, on_progress);
    if result.is_ok() {
        // Whole chunks of this prompt, from the reuse point on.
        cache.reusable = reuse + (req.prompt.len() - reuse) / PREFILL_CHUNK * PREFILL_CHUNK;
        cache.kv = Some(kv);
        cache.tokens = kv_tokens;
    }
    result
}

/// The generation itself, after `cache`'s first `kv_tokens.len()`
/// positions, which it extends as tokens go through the model.
fn run_generation(
    lm: &LoadedModel,
    req: &GenerateRequest,
    cache: &mut KvCache,
    kv_tokens: &mut Vec<u32>,
    on_progress: &mut dyn FnMut(Progress<'_>) -> ControlFlow<()>,
) -> Result<Generation, EngineError> {
    let model = &lm.model;
    let tok = &lm.tokenizer;
    let vocab = model.config.vocab_size;
    req.sampling.validate(vocab)?;
    if req.prompt.is_empty() {
        return Err(EngineError::InvalidRequest("the prompt is empty".into()));
    }
    let ctx = model.config.context_length;
    if req.prompt.len() >= ctx {
        return Err(EngineError::InvalidRequest(format!(
            "the prompt has {} tokens; the model's context is {ctx}",
            req.prompt.len()
        )));
    }
    if req.stop.iter().any(String::is_empty) {
        return Err(EngineError::InvalidRequest(
            "stop strings must not be empty".into(),
        ));
    }
    let mut sampler = Sampler::new(req.sampling.clone(), &req.prompt);
    let mut json = req.grammar.map(|Grammar::JsonObject| JsonPrefix::default());
    let reused = kv_tokens.len();
    let mut decoder = StreamDecoder::new();
    let hold_back = req.stop.iter().map(|s| s.len()).max().unwrap_or(1) - 1;
    let mut out = Generation {
        tokens: Vec::new(),
        text: String::new(),
        steps: Vec::new(),
        finish_reason: FinishReason::Length,
        prefill_time: Duration::ZERO,
        decode_time: Duration::ZERO,
        cached_prompt_tokens: reused,
    };
    let mut emitted = 0usize;
    let start = Instant::now();
    let total = req.prompt.len();
    let mut logits = Vec::new();
    let mut done = reused;
    for chunk in req.prompt[reused..].chunks(PREFILL_CHUNK) {
        done += chunk.len();
        logits = model.forward(chunk, cache, chunk.len() - 1)?;
        kv_tokens.extend_from_slice(chunk);
        if on_progress(Progress::Prefilled { done, total }).is_break() {
            out.finish_reason = FinishReason::Cancelled;
            out.prefill_time = start.elapsed();
            return Ok(out);
        }
    }
    out.prefill_time = start.elapsed();
    let decode_start = Instant::now();
    let budget = req.max_tokens.min(ctx - req.prompt.len());
    while out.tokens.len() < budget {
        if out.tokens.len() < req.min_tokens {
            let enders = tok.end_of_generation().iter().chain(&req.stop_token_ids);
            for &id in enders {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let sampled = match (&mut json, req.grammar) {
            (Some(state), Some(Grammar::JsonObject)) => {
                let table = lm.token_bytes_table();
                let current = *state;
                let allowed = |id: u32| {
                    table
                        .get(id as usize)
                        .is_some_and(|b| !b.is_empty() && current.accepts(b))
                };
                let Some(sampled) = sampler.sample_allowed(&mut logits, &allowed) else {
                    // Nothing can continue the text: end it here.
                    out.finish_reason = FinishReason::Stop;
                    break;
                };
                if let Some(bytes) = table.get(sampled.token.id as usize) {
                    state.feed(bytes);
                }
                sampled
            }
            _ => sampler.sample(&mut logits),
        };
        let id = sampled.token.id;
        let is_eog = tok.end_of_generation().contains(&id) && !req.ignore_eos;
        if is_eog || req.stop_token_ids.contains(&id) {
            out.finish_reason = FinishReason::Stop;
            break;
        }
        out.tokens.push(id);
        let search_from = out.text.len().saturating_sub(hold_back);
        out.text.push_str(&decoder.push(tok, id));
        let stopped = find_stop(&out.text, search_from, &req.stop);
        if let Some(cut) = stopped {
            out.text.truncate(cut);
            out.finish_reason = FinishReason::Stop;
        }
        let safe = match stopped {
            // The rest goes out with `Finished`.
            Some(_) => emitted,
            None => floor_char_boundary(&out.text, out.text.len().saturating_sub(hold_back)),
        };
        let flow = on_progress(Progress::Token {
            sampled: &sampled,
            text: &out.text[emitted..safe],
        });
        emitted = safe;
        out.steps.push(sampled);
        if stopped.is_some() {
            break;
        }
        if flow.is_break() {
            out.finish_reason = FinishReason::Cancelled;
            out.decode_time = decode_start.elapsed();
            return Ok(out);
        }
        if json.is_some_and(|state| state.is_done()) {
            out.finish_reason = FinishReason::Stop;
            break;
        }
        if out.tokens.len() == budget {
            break;
        }
        logits = model.forward(&[id], cache, 0)?;
        kv_tokens.push(id);
    }
    if out.finish_reason == FinishReason::Length {
        out.text.push_str(&decoder.finish());
    }
    // The generation is over: a request to stop changes nothing now.
    let _ = on_progress(Progress::Finished {
        text: &out.text[emitted..],
    });
    out.decode_time = decode_start.elapsed();
    Ok(out)
}

/// The log-probability a model gives one token of a sequence, with the most
/// likely alternatives at that position.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredToken {
    /// Log-probability of the token that is there.
    pub logprob: f32,
    /// The `top` most likely tokens at that position, best first.
    pub top: Vec<crate::sampler::TokenLogprob>,
}

/// Positions scored per forward pass: bounds the logits held at once.
const SCORE_CHUNK: usize = 64;

/// Teacher-forced scoring: for every token of `tokens` after the first, its
/// log-probability given the tokens before it (raw distribution), with the
/// `top` alternatives.
pub fn score(
    lm: &LoadedModel,
    tokens: &[u32],
    top: usize,
) -> Result<Vec<ScoredToken>, EngineError> {
    let model = &lm.model;
    let vocab = model.config.vocab_size;
    if tokens.len() > model.config.context_length {
        return Err(EngineError::InvalidRequest(format!(
            "the prompt has {} tokens; the model's context is {}",
            tokens.len(),
            model.config.context_length
        )));
    }
    let mut cache = KvCache::new(model);
    let mut out = Vec::with_capacity(tokens.len().saturating_sub(1));
    for (c, chunk) in tokens.chunks(SCORE_CHUNK).enumerate() {
        let logits = model.forward(chunk, &mut cache, 0)?;
        for (i, row) in logits.chunks_exact(vocab).enumerate() {
            let Some(&next) = tokens.get(c * SCORE_CHUNK + i + 1) else {
                break;
            };
            let lse = crate::sampler::log_sum_exp(row);
            out.push(ScoredToken {
                logprob: (row[next as usize] as f64 - lse) as f32,
                top: crate::sampler::top_logprobs(row, top),
            });
        }
    }
    Ok(out)
}

/// Byte offset where the earliest stop string starts, searching from `from`.
fn find_stop(text: &str, from: usize, stops: &[String]) -> Option<usize> {
    let from = floor_char_boundary(text, from);
    stops
        .iter()
        .filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i))
        .min()
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_search_finds_the_earliest_match() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(find_stop("abc\n\nxEND", 0, &stops), Some(3));
        assert_eq!(find_stop("abcEN", 0, &stops), None);
        assert_eq!(find_stop("héllo END", 2, &stops), Some(7));
    }
}
