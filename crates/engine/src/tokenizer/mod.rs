//! Tokenizers built from GGUF metadata: SentencePiece-style (`llama`) and
//! byte-level BPE (`gpt2`), with special-token parsing and incremental,
//! UTF-8-safe detokenisation. Behaviour follows llama.cpp's `llama-vocab`.

mod bpe;
pub mod pretokenize;
mod spm;

use std::collections::HashMap;

use crate::error::EngineError;
use crate::gguf::GgufFile;
use pretokenize::PreTokenizer;

/// The kind of a vocabulary entry (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Ordinary text piece.
    Normal,
    /// The unknown token.
    Unknown,
    /// Control token (BOS, EOS, turn markers); text only when asked for.
    Control,
    /// Added token matched literally in text.
    UserDefined,
    /// Reserved, never produced.
    Unused,
    /// A raw byte (`<0xAB>`) for byte fallback.
    Byte,
}

impl TokenKind {
    fn from_id(v: i64) -> Self {
        match v {
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => TokenKind::Normal,
        }
    }
}

#[derive(Debug)]
enum Algorithm {
    Spm,
    Bpe {
        pre: PreTokenizer,
        /// Merge rank by (left id, right id).
        ranks: HashMap<(u32, u32), u32>,
        ignore_merges: bool,
    },
}

/// A tokenizer read from a GGUF file.
#[derive(Debug)]
pub struct Tokenizer {
    algorithm: Algorithm,
    tokens: Vec<String>,
    kinds: Vec<TokenKind>,
    scores: Vec<f32>,
    token_to_id: HashMap<String, u32>,
    /// Tokens matched literally in text, longest first.
    specials: Vec<u32>,
    /// One automaton over every special token's text (pattern `k` is
    /// `specials[k]`), leftmost-longest: text is split in one pass,
    /// whatever the number of specials.
    special_matcher: Option<aho_corasick::AhoCorasick>,
    /// The same over the specials that are not control tokens (those
    /// parsed even when special-token parsing is off).
    plain_matcher: Option<(aho_corasick::AhoCorasick, Vec<u32>)>,
    byte_tokens: [Option<u32>; 256],
    /// Beginning-of-sequence token.
    pub bos: Option<u32>,
    /// End-of-sequence token.
    pub eos: Option<u32>,
    unknown: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    end_of_generation: Vec<u32>,
}

/// A piece of input text: raw text, or a special token already recognised.
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

fn string_array(gguf: &GgufFile, key: &str) -> Result<Option<Vec<String>>, EngineError> {
    match gguf.meta(key) {
        None => Ok(None),
        Some(v) => {
            let arr = v
                .as_array()
                .ok_or_else(|| EngineError::Tokenizer(format!("{key} is not an array")))?;
            arr.iter()
                .map(|s| {
                    s.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| EngineError::Tokenizer(format!("{key} holds a non-string")))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
        }
    }
}

fn token_id(gguf: &GgufFile, key: &str, n: usize) -> Option<u32> {
    gguf.meta(key)
        .and_then(|v| v.as_u64())
        .filter(|&v| (v as usize) < n)
        .map(|v| v as u32)
}

impl Tokenizer {
    /// Builds the tokenizer described by the GGUF metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, EngineError> {
        let model = gguf
            .meta("tokenizer.ggml.model")
            .and_then(|v| v.as_str())
            .ok_or_else(|| EngineError::Tokenizer("tokenizer.ggml.model is missing".into()))?
            .to_string();
        let tokens = string_array(gguf, "tokenizer.ggml.tokens")?
            .ok_or_else(|| EngineError::Tokenizer("tokenizer.ggml.tokens is missing".into()))?;
        let n = tokens.len();
        if n == 0 || n > u32::MAX as usize {
            return Err(EngineError::Tokenizer("empty vocabulary".into()));
        }
        let scores = match gguf
            .meta("tokenizer.ggml.scores")
            .and_then(|v| v.as_array())
        {
            Some(a) if a.len() == n => a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect(),
            Some(_) => {
                return Err(EngineError::Tokenizer(
                    "scores and tokens differ in length".into(),
                ))
            }
            None => vec![0.0; n],
        };
        let kinds = match gguf
            .meta("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
        {
            Some(a) if a.len() == n => a
                .iter()
                .map(|v| TokenKind::from_id(v.as_f64().unwrap_or(1.0) as i64))
                .collect(),
            Some(_) => {
                return Err(EngineError::Tokenizer(
                    "token types and tokens differ in length".into(),
                ))
            }
            None => vec![TokenKind::Normal; n],
        };
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            token_to_id.entry(t.clone()).or_insert(i as u32);
        }
        let flag =
            |key: &str, default: bool| gguf.meta(key).and_then(|v| v.as_bool()).unwrap_or(default);
        let pre_name = gguf
            .meta("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default")
            .to_string();
        let (algorithm, add_bos_default, add_space_default) = match model.as_str() {
            "llama" => (Algorithm::Spm, true, true),
            "gpt2" => {
                let pre = PreTokenizer::from_name(&pre_name).ok_or_else(|| {
                    EngineError::Tokenizer(format!("pre-tokenizer {pre_name:?} is not supported"))
                })?;
                let merges = string_array(gguf, "tokenizer.ggml.merges")?.ok_or_else(|| {
                    EngineError::Tokenizer("tokenizer.ggml.merges is missing".into())
                })?;
                let mut ranks = HashMap::with_capacity(merges.len());
                for (rank, m) in merges.iter().enumerate() {
                    let Some((l, r)) = m.split_once(' ') else {
                        return Err(EngineError::Tokenizer(format!("malformed merge {m:?}")));
                    };
                    if let (Some(&l), Some(&r)) = (token_to_id.get(l), token_to_id.get(r)) {
                        ranks.entry((l, r)).or_insert(rank as u32);
                    }
                }
                let ignore_merges = pre == PreTokenizer::Llama3;
                (
                    Algorithm::Bpe {
                        pre,
                        ranks,
                        ignore_merges,
                    },
                    false,
                    false,
                )
            }
            other => {
                return Err(EngineError::Tokenizer(format!(
                    "tokenizer model {other:?} is not supported (llama, gpt2 are)"
                )))
            }
        };
        let mut specials: Vec<u32> = (0..n as u32)
            .filter(|&i| {
                matches!(
                    kinds[i as usize],
                    TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown
                ) && !tokens[i as usize].is_empty()
            })
            .collect();
        specials.sort_by(|a, b| tokens[*b as usize].len().cmp(&tokens[*a as usize].len()));
        let matcher = |ids: &[u32]| {
            aho_corasick::AhoCorasick::builder()
                .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                .build(ids.iter().map(|&i| tokens[i as usize].as_str()))
                .map_err(|e| EngineError::Tokenizer(format!("special tokens: {e}")))
        };
        let special_matcher = if specials.is_empty() {
            None
        } else {
            Some(matcher(&specials)?)
        };
        let plain_specials: Vec<u32> = specials
            .iter()
            .copied()
            .filter(|&i| !matches!(kinds[i as usize], TokenKind::Control | TokenKind::Unknown))
            .collect();
        let plain_matcher = if plain_specials.is_empty() {
            None
        } else {
            Some((matcher(&plain_specials)?, plain_specials))
        };
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            let key = match algorithm {
                Algorithm::Spm => format!("<0x{b:02X}>"),
                Algorithm::Bpe { .. } => bpe::byte_to_char(b as u8).to_string(),
            };
            *slot = token_to_id.get(&key).copied();
        }
        let bos = token_id(gguf, "tokenizer.ggml.bos_token_id", n);
        let eos = token_id(gguf, "tokenizer.ggml.eos_token_id", n);
        let mut end_of_generation: Vec<u32> = eos.into_iter().collect();
        for name in [
            "<end_of_turn>",
            "<|im_end|>",
            "<|endoftext|>",
            "<|eot_id|>",
            "<|end_of_text|>",
            "<|eom_id|>",
        ] {
            if let Some(&id) = token_to_id.get(name) {
                if kinds[id as usize] == TokenKind::Control && !end_of_generation.contains(&id) {
                    end_of_generation.push(id);
                }
            }
        }
        if let Some(id) = token_id(gguf, "tokenizer.ggml.eot_token_id", n) {
            if !end_of_generation.contains(&id) {
                end_of_generation.push(id);
            }
        }
        Ok(Tokenizer {
            algorithm,
            bos,
            eos,
            unknown: token_id(gguf, "tokenizer.ggml.unknown_token_id", n),
            add_bos: flag("tokenizer.ggml.add_bos_token", add_bos_default),
            add_eos: flag("tokenizer.ggml.add_eos_token", false),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix", add_space_default),
            tokens,
            kinds,
            scores,
            token_to_id,
            specials,
            special_matcher,
            plain_matcher,
            byte_tokens,
            end_of_generation,
        })
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Whether `add_special` inserts a BOS token.
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Whether SentencePiece encoding prefixes the text with a space.
    pub fn adds_space_prefix(&self) -> bool {
        self.add_space_prefix && matches!(self.algorithm, Algorithm::Spm)
    }

    /// Tokens that end a generation (EOS, end of turn).
    pub fn end_of_generation(&self) -> &[u32] {
        &self.end_of_generation
    }

    /// The id of a token given its exact text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// The vocabulary text of a token.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The kind of a token.
    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// Tokenises `text`. `add_special` adds BOS/EOS as the model asks;
    /// `parse_special` recognises control tokens written in the text
    /// (user-defined added tokens are always recognised, as in llama.cpp).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let fragments = self.partition(text, parse_special);
        let mut out = Vec::new();
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        match &self.algorithm {
            Algorithm::Spm => {
                let mut prev_special = true;
                for f in fragments {
                    match f {
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                        Fragment::Text(t) => {
                            let mut s = String::with_capacity(t.len() + 3);
                            if self.add_space_prefix && prev_special {
                                s.push(' ');
                            }
                            s.push_str(t);
                            let escaped = s.replace(' ', "\u{2581}");
                            spm::encode(self, &escaped, &mut out);
                            prev_special = false;
                        }
                    }
                }
            }
            Algorithm::Bpe {
                pre,
                ranks,
                ignore_merges,
            } => {
                for f in fragments {
                    match f {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text(t) => {
                            for word in pre.split(t) {
                                bpe::encode_word(self, ranks, *ignore_merges, word, &mut out);
                            }
                        }
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    /// Whether `text` spells a control token (one that special-token
    /// parsing would turn into markup).
    pub fn spells_control_token(&self, text: &str) -> bool {
        self.partition(text, true).iter().any(
            |f| matches!(f, Fragment::Token(id) if self.kinds[*id as usize] == TokenKind::Control),
        )
    }

    /// Splits text at occurrences of special tokens, in one pass: at each
    /// place the longest special token that starts there. Control tokens
    /// are only recognised when `parse_special` is set.
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        if text.is_empty() {
            return Vec::new();
        }
        let matcher = if parse_special {
            self.special_matcher
                .as_ref()
                .map(|m| (m, self.specials.as_slice()))
        } else {
            self.plain_matcher
                .as_ref()
                .map(|(m, ids)| (m, ids.as_slice()))
        };
        let Some((matcher, ids)) = matcher else {
            return vec![Fragment::Text(text)];
        };
        let mut fragments = Vec::new();
        let mut at = 0;
        for found in matcher.find_iter(text) {
            if found.start() > at {
                fragments.push(Fragment::Text(&text[at..found.start()]));
            }
            fragments.push(Fragment::Token(ids[found.pattern().as_usize()]));
            at = found.end();
        }
        if at < text.len() {
            fragments.push(Fragment::Text(&text[at..]));
        }
        fragments
    }

    /// The bytes a token stands for. Control tokens give their text only when
    /// `special` is set.
    pub fn token_bytes(&self, id: u32, special: bool) -> Vec<u8> {
        let (Some(text), Some(kind)) = (self.tokens.get(id as usize), self.kinds.get(id as usize))
        else {
            return Vec::new();
        };
        match kind {
            TokenKind::Control => {
                if special {
                    text.as_bytes().to_vec()
                } else {
                    Vec::new()
                }
            }
            TokenKind::Unknown => "\u{2585}".as_bytes().to_vec(),
            TokenKind::Unused => Vec::new(),
            TokenKind::Byte if matches!(self.algorithm, Algorithm::Spm) => {
                parse_byte_token(text).map(|b| vec![b]).unwrap_or_default()
            }
            TokenKind::UserDefined => text.as_bytes().to_vec(),
            _ => match self.algorithm {
                Algorithm::Spm => text.replace('\u{2581}', " ").into_bytes(),
                Algorithm::Bpe { .. } => bpe::decode_piece(text),
            },
        }
    }

    /// Text of a whole token sequence (control tokens omitted unless `special`).
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| self.token_bytes(id, special))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn unknown_or_zero(&self) -> u32 {
        self.unknown.unwrap_or(0)
    }
}

fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// Turns a stream of tokens into text without ever splitting a UTF-8 character:
/// bytes of an incomplete character wait for the next token.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// A decoder with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token and returns the text that is now complete.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.pending.extend(tokenizer.token_bytes(id, false));
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // SAFETY-free: from_utf8 validated the prefix.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // An invalid sequence: replace it and go on.
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + bad);
                        }
                        // Incomplete at the end: keep it for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// Flushes what is left (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}
