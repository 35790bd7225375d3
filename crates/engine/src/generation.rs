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
use crate::kv_cache::{KvCache, KvPool};
use crate::model::{BatchSequence, ForwardScratch, Model};
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

    /// Renders `messages` through the model's chat template and tokenises
    /// the prompt so that only the template's own markup is special: text
    /// from users, the system and tools that spells a control token
    /// (`<start_of_turn>`, `<|im_start|>`) is tokenised as plain text, so
    /// that no message can forge a turn or a role. Assistant messages keep
    /// theirs (the model's own tool-call markup in the history). Prompts
    /// whose messages spell no control token are tokenised exactly as
    /// [`LoadedModel::encode_chat_prompt`] does.
    pub fn encode_chat(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, EngineError> {
        let template =
            self.chat_template
                .as_ref()
                .ok_or_else(|| EngineError::InvalidParameter {
                    param: "messages",
                    message: "this model has no chat template".into(),
                })?;
        let mut plain = Vec::new();
        let guarded: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| self.guard_message(m, &mut plain))
            .collect();
        let rendered = template.render(&guarded, tools, add_generation_prompt)?;
        if plain.is_empty() {
            return Ok(self.encode_chat_prompt(&rendered));
        }
        // The rendered text alternates template text and placeholders.
        let mut out = Vec::new();
        for (k, piece) in rendered.split(PLACEHOLDER_MARK).enumerate() {
            if k % 2 == 0 {
                if k == 0 {
                    out.extend(self.encode_chat_prompt(piece));
                } else {
                    out.extend(self.tokenizer.encode(piece, false, true));
                }
            } else {
                let text = piece
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| plain.get(i))
                    .ok_or_else(|| {
                        EngineError::Template(
                            "the chat template altered a message it was given".into(),
                        )
                    })?;
                out.extend(self.tokenizer.encode(text, false, false));
            }
        }
        Ok(out)
    }

    /// `message` with each text of a user, system or tool message that
    /// spells a control token (or holds [`PLACEHOLDER_MARK`]) replaced by a
    /// placeholder; the texts go to `plain`.
    fn guard_message(
        &self,
        message: &serde_json::Value,
        plain: &mut Vec<String>,
    ) -> serde_json::Value {
        let mut m = message.clone();
        if m.get("role").and_then(|r| r.as_str()) == Some("assistant") {
            return m;
        }
        let mut guard = |text: &mut serde_json::Value| {
            let Some(s) = text.as_str() else {
                return;
            };
            if s.contains(PLACEHOLDER_MARK) || self.tokenizer.spells_control_token(s) {
                let placeholder = format!("{PLACEHOLDER_MARK}{}{PLACEHOLDER_MARK}", plain.len());
                plain.push(s.replace(PLACEHOLDER_MARK, ""));
                *text = serde_json::Value::String(placeholder);
            }
        };
        match m.get_mut("content") {
            Some(serde_json::Value::Array(parts)) => {
                for part in parts {
                    if let Some(text) = part.get_mut("text") {
                        guard(text);
                    }
                }
            }
            Some(content) => guard(content),
            None => {}
        }
        m
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

/// Marks the placeholders of guarded message texts in a rendered prompt
/// (a private-use character no template writes).
const PLACEHOLDER_MARK: char = '\u{10FFFD}';

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
    /// Also score the prompt: each prompt token after the first gets its
    /// log-probability and this many alternatives
    /// ([`Generation::prompt_scores`]), computed in the prompt's own
    /// passes (chunks of [`SCORE_CHUNK`]).
    pub score_prompt: Option<usize>,
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
            score_prompt: None,
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
    /// Prompt tokens whose keys and values came from the key/value pool's
    /// prefix index instead of a forward pass.
    pub cached_prompt_tokens: usize,
    /// Per prompt token after the first, when the request asked for
    /// [`GenerateRequest::score_prompt`]: its log-probability and the top
    /// alternatives at its position.
    pub prompt_scores: Vec<ScoredToken>,
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
    let positions = (req.prompt.len() + req.max_tokens).min(lm.model.config.context_length);
    let mut pool = KvPool::for_positions(&lm.model.config, positions, 1);
    generate_cached(lm, req, &mut pool, on_progress)
}

/// [`generate`] in `pool`: the prompt's start is taken from the pool's
/// prefix index where it holds it, and the sequence's full blocks are left
/// there for later prompts that start the same way. A reused prefix gives
/// the same answer, bit for bit, as a fresh prefill (the pool only indexes
/// prefixes for models whose rows are computed independently).
pub fn generate_cached(
    lm: &LoadedModel,
    req: &GenerateRequest,
    pool: &mut KvPool,
    on_progress: &mut dyn FnMut(Progress<'_>) -> ControlFlow<()>,
) -> Result<Generation, EngineError> {
    let mut run = SequenceRun::start(lm, req.clone())?;
    run.attach(pool);
    // One set of buffers for every pass, as the server's scheduler keeps.
    let mut scratch = ForwardScratch::default();
    let outcome = loop {
        let Some(pass) = run.next_pass(PREFILL_CHUNK) else {
            break Ok(());
        };
        match lm.model.forward_batch_with(pool, &mut [pass], &mut scratch) {
            Ok(logits) => run.advance(logits, on_progress),
            Err(e) => break Err(e),
        }
    };
    let generation = run.finish(pool);
    outcome.map(|()| generation)
}

/// Where a [`SequenceRun`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The prompt is going through the model; its last row is sampled.
    Prefill,
    /// The positions lost to a preemption are computed again; then the
    /// pending token runs.
    Recompute(u32),
    /// The last sampled token waits for its forward pass.
    Decode(u32),
    /// Nothing more to run.
    Done,
}

/// One generation as a sequence of forward passes that someone else runs:
/// [`SequenceRun::next_pass`] says what to run next (a prompt chunk or the
/// last sampled token), and [`SequenceRun::advance`] takes the logits of its
/// last row. The engine's scheduler runs many at once in batched passes;
/// [`generate_cached`] runs one alone. Either way the text, the stop rules
/// and the progress reports are the same.
///
/// The run's keys and values live in blocks of a [`KvPool`]. The scheduler
/// may take them back between passes ([`SequenceRun::preempt`]); the run
/// then computes its positions again before it goes on, and its answer is
/// unchanged.
#[derive(Debug)]
pub struct SequenceRun<'a> {
    lm: &'a LoadedModel,
    req: GenerateRequest,
    sampler: Sampler,
    json: Option<JsonPrefix>,
    decoder: StreamDecoder,
    hold_back: usize,
    out: Generation,
    emitted: usize,
    kv: KvCache,
    /// Every token that belongs in the cache before the next sample: the
    /// prompt, then each generated token once it is handed out to run.
    context: Vec<u32>,
    /// Whether the run took its prefix from the pool yet.
    attached: bool,
    budget: usize,
    phase: Phase,
    start: Instant,
    decode_start: Option<Instant>,
}

/// Most stop strings a request may give (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// Longest stop string, in bytes: the stream holds back this much text,
/// and every token is checked against every stop string.
pub const MAX_STOP_BYTES: usize = 256;

/// Checks stop strings: at most [`MAX_STOP`], none empty, none longer than
/// [`MAX_STOP_BYTES`]. The one check:
/// the server calls it before it queues a request, and every run when it
/// starts.
pub fn check_stop(stop: &[String]) -> Result<(), EngineError> {
    let bad = |message: String| {
        Err(EngineError::InvalidParameter {
            param: "stop",
            message,
        })
    };
    if stop.len() > MAX_STOP {
        return bad(format!(
            "stop takes at most {MAX_STOP} strings, got {}",
            stop.len()
        ));
    }
    if stop.iter().any(String::is_empty) {
        return bad("stop strings must not be empty".into());
    }
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return bad(format!(
            "stop strings may be at most {MAX_STOP_BYTES} bytes long, got {}",
            long.len()
        ));
    }
    Ok(())
}

impl<'a> SequenceRun<'a> {
    /// Checks `req` and prepares its run, with no keys and values yet.
    pub fn start(lm: &'a LoadedModel, req: GenerateRequest) -> Result<Self, EngineError> {
        let model = &lm.model;
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
        model.check_tokens(&req.prompt)?;
        check_stop(&req.stop)?;
        let hold_back = req.stop.iter().map(|s| s.len()).max().unwrap_or(1) - 1;
        Ok(SequenceRun {
            lm,
            sampler: Sampler::new(req.sampling.clone(), &req.prompt),
            json: req.grammar.map(|Grammar::JsonObject| JsonPrefix::default()),
            decoder: StreamDecoder::new(),
            hold_back,
            out: Generation {
                tokens: Vec::new(),
                text: String::new(),
                steps: Vec::new(),
                finish_reason: FinishReason::Length,
                prefill_time: Duration::ZERO,
                decode_time: Duration::ZERO,
                cached_prompt_tokens: 0,
                prompt_scores: Vec::new(),
            },
            emitted: 0,
            kv: KvCache::new(),
            context: req.prompt.clone(),
            attached: false,
            budget: req.max_tokens.min(ctx - req.prompt.len()),
            phase: Phase::Prefill,
            start: Instant::now(),
            decode_start: None,
            req,
        })
    }

    /// The longest start of the run's context whose positions `pool`'s
    /// prefix index can give (at least the prompt's last token is left to
    /// run: its logits give the first sampled token).
    fn reusable(&self, pool: &KvPool) -> usize {
        pool.cached_prefix(&self.context, self.reuse_limit())
    }

    /// Positions of the context that may come from the prefix index: all
    /// but the prompt's last token while prefilling (its logits give the
    /// first sampled token), all of them when recomputing.
    fn reuse_limit(&self) -> usize {
        match self.phase {
            // Positions not scored yet must run: their rows give the scores.
            Phase::Prefill if self.scores_prompt() => {
                (self.context.len() - 1).min(self.out.prompt_scores.len())
            }
            Phase::Prefill => self.context.len() - 1,
            _ => self.context.len(),
        }
    }

    /// Whether the run's prompt passes return the logits of every row, to
    /// score the prompt.
    fn scores_prompt(&self) -> bool {
        self.req.score_prompt.is_some() && self.phase == Phase::Prefill
    }

    /// Blocks the run needs from `pool` to hold its context as it stands
    /// (the prompt, or the positions lost to a preemption) beyond what the
    /// prefix index gives, plus one position to go on with.
    pub fn blocks_to_resume(&self, pool: &KvPool) -> usize {
        pool.blocks_for_span(self.reusable(pool), self.context.len() + 1)
    }

    /// Takes from `pool` the positions of the run's context that its
    /// prefix index holds; called before the first pass and after a
    /// preemption.
    pub fn attach(&mut self, pool: &mut KvPool) {
        let limit = self.reuse_limit();
        let reused = pool.attach_prefix(&mut self.kv, &self.context, limit);
        let generated = self.out.tokens.len();
        pool.reserve(
            &mut self.kv,
            self.req.prompt.len() + self.budget.max(generated) + 1,
        );
        if !self.attached {
            self.out.cached_prompt_tokens = reused;
            self.attached = true;
        }
        if let Phase::Recompute(id) = self.phase {
            if self.kv.len() == self.context.len() {
                self.phase = Phase::Decode(id);
            }
        }
    }

    /// Gives the run's blocks back to `pool`; the run computes its
    /// positions again once [`SequenceRun::attach`]ed anew.
    pub fn preempt(&mut self, pool: &mut KvPool) {
        if let Phase::Decode(id) = self.phase {
            // A token handed out but never run is not part of the context.
            self.context.truncate(self.kv.len());
            self.phase = Phase::Recompute(id);
        }
        pool.release(&mut self.kv);
    }

    /// The number of tokens [`SequenceRun::next_pass`] would hand out now.
    pub fn next_pass_len(&self, max_prefill: usize) -> usize {
        match self.phase {
            Phase::Prefill if self.scores_prompt() => {
                (self.context.len() - self.kv.len()).min(max_prefill.clamp(1, SCORE_CHUNK))
            }
            Phase::Prefill | Phase::Recompute(_) => {
                (self.context.len() - self.kv.len()).min(max_prefill.clamp(1, PREFILL_CHUNK))
            }
            Phase::Decode(_) => 1,
            Phase::Done => 0,
        }
    }

    /// The next forward pass of this sequence (a prompt chunk of at most
    /// `max_prefill` tokens, and at most [`PREFILL_CHUNK`], or the last
    /// sampled token), asking for the logits of its last row only (of every
    /// row when it scores its prompt); `None` when the run is over.
    pub fn next_pass(&mut self, max_prefill: usize) -> Option<BatchSequence<'_>> {
        let at = self.kv.len();
        if let Phase::Decode(id) = self.phase {
            // The pending token joins the context before the pass, so
            // that the pass can borrow it.
            if self.context.len() == at {
                self.context.push(id);
            }
        }
        let len = self.next_pass_len(max_prefill);
        if len == 0 {
            return None;
        }
        let logits_from = if self.scores_prompt() { 0 } else { len - 1 };
        Some(BatchSequence {
            tokens: &self.context[at..at + len],
            cache: &mut self.kv,
            logits_from,
        })
    }

    /// Tokens still to go through the model before the next sample (0 once
    /// decoding).
    pub fn prompt_left(&self) -> usize {
        match self.phase {
            Phase::Prefill | Phase::Recompute(_) => self.context.len() - self.kv.len(),
            _ => 0,
        }
    }

    /// Positions held in the sequence's cache.
    pub fn positions(&self) -> usize {
        self.kv.len()
    }

    /// Blocks the next pass of `len` tokens needs from `pool`.
    pub fn blocks_for_next(&self, pool: &KvPool, len: usize) -> usize {
        pool.blocks_to_grow(&self.kv, len)
    }

    /// Whether the run is over.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Whether the run has generated a token yet.
    pub fn has_output(&self) -> bool {
        !self.out.tokens.is_empty()
    }

    /// Ends the run as if it reached its token limit (the pool cannot hold
    /// it any longer).
    pub fn end_for_length(&mut self, on_progress: &mut dyn FnMut(Progress<'_>) -> ControlFlow<()>) {
        if self.phase == Phase::Done {
            return;
        }
        self.phase = Phase::Done;
        self.out.finish_reason = FinishReason::Length;
        self.out.text.push_str(&self.decoder.finish());
        let _ = on_progress(Progress::Finished {
            text: &self.out.text[self.emitted..],
        });
    }

    /// Takes the logits the pass that ran `next_pass`'s tokens returned
    /// for this run (`vocab_size` values per row; they are modified): scores
    /// the prompt's rows when asked to, samples the next token from the
    /// last row when the prompt is done, applies the stop rules and reports
    /// to `on_progress`. Returning `Break` from it cancels the run.
    pub fn advance(
        &mut self,
        logits: &mut [f32],
        on_progress: &mut dyn FnMut(Progress<'_>) -> ControlFlow<()>,
    ) {
        let vocab = self.lm.model.config.vocab_size;
        let rows = logits.len() / vocab.max(1);
        if self.scores_prompt() {
            self.score_rows(&logits[..rows * vocab], rows);
        }
        let logits = match rows {
            0 => logits,
            _ => &mut logits[(rows - 1) * vocab..rows * vocab],
        };
        match self.phase {
            Phase::Done => return,
            Phase::Recompute(id) => {
                if self.kv.len() >= self.context.len() {
                    self.phase = Phase::Decode(id);
                }
                return;
            }
            Phase::Prefill => {
                let (done, total) = (self.kv.len(), self.context.len());
                if on_progress(Progress::Prefilled { done, total }).is_break() {
                    self.out.finish_reason = FinishReason::Cancelled;
                    self.out.prefill_time = self.start.elapsed();
                    self.phase = Phase::Done;
                    return;
                }
                if done < total {
                    return;
                }
                self.out.prefill_time = self.start.elapsed();
                self.decode_start = Some(Instant::now());
            }
            Phase::Decode(_) => {}
        }
        self.phase = match self.sample(logits, on_progress) {
            Some(id) => Phase::Decode(id),
            None => Phase::Done,
        };
        if self.phase == Phase::Done && self.out.finish_reason != FinishReason::Cancelled {
            if self.out.finish_reason == FinishReason::Length {
                self.out.text.push_str(&self.decoder.finish());
            }
            // The generation is over: a request to stop changes nothing now.
            let _ = on_progress(Progress::Finished {
                text: &self.out.text[self.emitted..],
            });
        }
    }

    /// Scores the prompt tokens that the `rows` rows of `logits` (the
    /// pass's last positions) predict, skipping those scored before a
    /// preemption.
    fn score_rows(&mut self, logits: &[f32], rows: usize) {
        let Some(top) = self.req.score_prompt else {
            return;
        };
        let vocab = self.lm.model.config.vocab_size;
        let first = self.kv.len().saturating_sub(rows);
        for (r, row) in logits.chunks_exact(vocab).enumerate() {
            let position = first + r;
            let Some(&next) = self.req.prompt.get(position + 1) else {
                break;
            };
            if position < self.out.prompt_scores.len() {
                continue;
            }
            let lse = crate::sampler::log_sum_exp(row);
            self.out.prompt_scores.push(ScoredToken {
                logprob: (row[next as usize] as f64 - lse) as f32,
                top: crate::sampler::top_logprobs(row, top),
            });
        }
    }

    /// One decode step on `logits`: the token to run next, or `None` when
    /// the generation ended (its reason set).
    fn sample(
        &mut self,
        logits: &mut [f32],
        on_progress: &mut dyn FnMut(Progress<'_>) -> ControlFlow<()>,
    ) -> Option<u32> {
        let lm = self.lm;
        let tok = &lm.tokenizer;
        let req = &self.req;
        let out = &mut self.out;
        if out.tokens.len() >= self.budget {
            return None;
        }
        if out.tokens.len() < req.min_tokens {
            let enders = tok.end_of_generation().iter().chain(&req.stop_token_ids);
            for &id in enders {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let sampled = match (&mut self.json, req.grammar) {
            (Some(state), Some(Grammar::JsonObject)) => {
                let table = lm.token_bytes_table();
                let current = *state;
                let allowed = |id: u32| {
                    table
                        .get(id as usize)
                        .is_some_and(|b| !b.is_empty() && current.accepts(b))
                };
                let Some(sampled) = self.sampler.sample_allowed(logits, &allowed) else {
                    // Nothing can continue the text: end it here.
                    out.finish_reason = FinishReason::Stop;
                    return None;
                };
                if let Some(bytes) = table.get(sampled.token.id as usize) {
                    state.feed(bytes);
                }
                sampled
            }
            _ => self.sampler.sample(logits),
        };
        let id = sampled.token.id;
        let is_eog = tok.end_of_generation().contains(&id) && !req.ignore_eos;
        if is_eog || req.stop_token_ids.contains(&id) {
            out.finish_reason = FinishReason::Stop;
            return None;
        }
        out.tokens.push(id);
        let search_from = out.text.len().saturating_sub(self.hold_back);
        out.text.push_str(&self.decoder.push(tok, id));
        let stopped = find_stop(&out.text, search_from, &req.stop);
        if let Some(cut) = stopped {
            out.text.truncate(cut);
            out.finish_reason = FinishReason::Stop;
        }
        let safe = match stopped {
            // The rest goes out with `Finished`.
            Some(_) => self.emitted,
            None => floor_char_boundary(&out.text, out.text.len().saturating_sub(self.hold_back)),
        };
        let flow = on_progress(Progress::Token {
            sampled: &sampled,
            text: &out.text[self.emitted..safe],
        });
        self.emitted = safe;
        out.steps.push(sampled);
        if stopped.is_some() {
            return None;
        }
        if flow.is_break() {
            out.finish_reason = FinishReason::Cancelled;
            return None;
        }
        if self.json.is_some_and(|state| state.is_done()) {
            out.finish_reason = FinishReason::Stop;
            return None;
        }
        if out.tokens.len() == self.budget {
            return None;
        }
        Some(id)
    }

    /// Cancels the run (the client left); `finish` then reports `Cancelled`.
    pub fn cancel(&mut self) {
        if self.phase != Phase::Done {
            self.out.finish_reason = FinishReason::Cancelled;
            self.phase = Phase::Done;
        }
    }

    /// Ends the run: its result. Its blocks go back to `pool`, whose
    /// prefix index keeps the full ones for later prompts that start the
    /// same way.
    pub fn finish(mut self, pool: &mut KvPool) -> Generation {
        if let Some(t) = self.decode_start {
            self.out.decode_time = t.elapsed();
        } else if self.out.prefill_time.is_zero() {
            self.out.prefill_time = self.start.elapsed();
        }
        pool.release(&mut self.kv);
        self.out
    }
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
pub const SCORE_CHUNK: usize = 64;

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
    #[test]
    fn stop_strings_are_few_non_empty_and_short() {
        use super::{check_stop, MAX_STOP_BYTES};
        let ok = vec!["x".repeat(MAX_STOP_BYTES), "\n\n".into()];
        assert!(check_stop(&ok).is_ok());
        for bad in [
            vec!["x".repeat(MAX_STOP_BYTES + 1)],
            vec!["a".into(), String::new()],
            vec!["a".into(); 5],
            vec!["é".repeat(MAX_STOP_BYTES)],
        ] {
            match check_stop(&bad) {
                Err(crate::EngineError::InvalidParameter { param, .. }) => {
                    assert_eq!(param, "stop")
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    use super::*;

    #[test]
    fn stop_search_finds_the_earliest_match() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(find_stop("abc\n\nxEND", 0, &stops), Some(3));
        assert_eq!(find_stop("abcEN", 0, &stops), None);
        assert_eq!(find_stop("héllo END", 2, &stops), Some(7));
    }
}
