//! Turning logits into the next token: logit bias, repetition / presence /
//! frequency penalties, temperature, top-k, top-p, min-p, a per-request
//! seeded RNG, and the top log-probabilities of the model's raw distribution.

use std::collections::HashMap;

use crate::error::EngineError;

/// Sampling parameters of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1: off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0: off).
    pub min_p: f32,
    /// Divides positive logits (multiplies negative ones) of tokens already seen (1: off).
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every generated token seen so far.
    pub presence_penalty: f32,
    /// Subtracted from a generated token's logit once per occurrence.
    pub frequency_penalty: f32,
    /// Added to the logits of the given tokens.
    pub logit_bias: Vec<(u32, f32)>,
    /// Seed of the request's RNG; `None` draws one.
    pub seed: Option<u64>,
    /// How many top log-probabilities to report per step.
    pub top_logprobs: usize,
    /// Whether the chosen token's log-probability is computed: a pass over
    /// the whole vocabulary per step. When not, [`Sampled::token`] carries
    /// NaN.
    pub logprobs: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            top_logprobs: 0,
            logprobs: true,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks the ranges, naming the offending parameter. The one check
    /// of sampling parameters: the server calls it before it queues a
    /// request, and every run calls it again when it starts.
    pub fn validate(&self, vocab_size: usize) -> Result<(), EngineError> {
        let bad = |param: &'static str, message: String| {
            Err(EngineError::InvalidParameter { param, message })
        };
        for (name, v, lo, hi) in [
            ("temperature", self.temperature, 0.0, 2.0),
            ("top_p", self.top_p, 0.0, 1.0),
            ("min_p", self.min_p, 0.0, 1.0),
            (
                "repetition_penalty",
                self.repetition_penalty,
                MIN_REPETITION_PENALTY,
                MAX_REPETITION_PENALTY,
            ),
            ("presence_penalty", self.presence_penalty, -2.0, 2.0),
            ("frequency_penalty", self.frequency_penalty, -2.0, 2.0),
        ] {
            if !(v.is_finite() && (lo..=hi).contains(&v)) {
                return bad(name, format!("{name} must be within [{lo}, {hi}], got {v}"));
            }
        }
        if self.top_p == 0.0 {
            return bad("top_p", "top_p must be greater than 0".into());
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return bad(
                "logit_bias",
                format!(
                    "logit_bias takes at most {MAX_LOGIT_BIAS} tokens, got {}",
                    self.logit_bias.len()
                ),
            );
        }
        for &(id, b) in &self.logit_bias {
            if id as usize >= vocab_size {
                return bad(
                    "logit_bias",
                    format!("\"{id}\" is not a token id of this model"),
                );
            }
            if !(b.is_finite() && (-100.0..=100.0).contains(&b)) {
                return bad(
                    "logit_bias",
                    "bias values must be within [-100, 100]".into(),
                );
            }
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return bad(
                "top_logprobs",
                format!("at most {MAX_TOP_LOGPROBS} alternatives per token"),
            );
        }
        Ok(())
    }
}

/// Smallest `repetition_penalty` accepted.
pub const MIN_REPETITION_PENALTY: f32 = 0.01;
/// Largest `repetition_penalty` accepted.
pub const MAX_REPETITION_PENALTY: f32 = 10.0;
/// Most tokens `logit_bias` may name (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;
/// Most alternatives per token `top_logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A token and its log-probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLogprob {
    /// Token id.
    pub id: u32,
    /// Natural-log probability under the raw distribution.
    pub logprob: f32,
}

/// The outcome of one sampling step.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The chosen token and its raw log-probability (NaN unless
    /// [`SamplingParams::logprobs`]).
    pub token: TokenLogprob,
    /// The most likely tokens under the raw distribution, best first.
    pub top: Vec<TokenLogprob>,
}

/// xoshiro256** seeded through SplitMix64: small, fast, reproducible.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// An RNG whose stream depends only on `seed`.
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^ (x >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform float in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Samples tokens for one sequence; keeps the counts the penalties need.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Occurrences of each generated token.
    generated: HashMap<u32, u32>,
    /// Tokens of prompt and output, for the repetition penalty.
    seen: HashMap<u32, ()>,
    candidates: Vec<(u32, f32)>,
    raw_logits: Vec<f32>,
}

impl Sampler {
    /// A sampler for a sequence whose prompt is `prompt`.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(random_seed);
        let seen = if params.repetition_penalty != 1.0 {
            prompt.iter().map(|&t| (t, ())).collect()
        } else {
            HashMap::new()
        };
        Sampler {
            rng: Rng::new(seed),
            params,
            generated: HashMap::new(),
            seen,
            candidates: Vec::new(),
            raw_logits: Vec::new(),
        }
    }

    /// The parameters in use.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (modified in place) and records it.
    pub fn sample(&mut self, logits: &mut [f32]) -> Sampled {
        let top = top_logprobs(logits, self.params.top_logprobs);
        let raw_lse = self.raw_log_sum_exp(logits);
        self.process(logits);
        let id = self.pick(logits);
        self.finish(id, raw_lse, top, logits)
    }

    /// Like [`Sampler::sample`], among the tokens `allowed` accepts: the
    /// token drawn is kept when allowed; otherwise every token not allowed is
    /// masked and the draw repeated, which samples exactly the masked
    /// distribution while testing the whole vocabulary only when needed.
    /// `None` when no token is allowed.
    pub fn sample_allowed(
        &mut self,
        logits: &mut [f32],
        allowed: &dyn Fn(u32) -> bool,
    ) -> Option<Sampled> {
        let top = top_logprobs(logits, self.params.top_logprobs);
        let raw_lse = self.raw_log_sum_exp(logits);
        self.process(logits);
        let mut id = self.pick(logits);
        if !allowed(id) {
            for (i, l) in logits.iter_mut().enumerate() {
                if !allowed(i as u32) {
                    *l = f32::NEG_INFINITY;
                }
            }
            id = self.pick(logits);
            if !allowed(id) {
                return None;
            }
        }
        Some(self.finish(id, raw_lse, top, logits))
    }

    /// The log-sum-exp of the raw logits when the chosen token's
    /// log-probability is wanted; NaN when not.
    fn raw_log_sum_exp(&self, logits: &[f32]) -> f64 {
        if self.params.logprobs {
            log_sum_exp(logits)
        } else {
            f64::NAN
        }
    }

    /// Whether bias or penalties change logits before the pick.
    fn modifies_logits(&self) -> bool {
        let p = &self.params;
        !p.logit_bias.is_empty()
            || p.repetition_penalty != 1.0
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0
    }

    /// Keeps the raw logits when they are about to change, then applies
    /// bias and penalties in place.
    fn process(&mut self, logits: &mut [f32]) {
        if !self.modifies_logits() {
            return;
        }
        self.raw_logits.clear();
        self.raw_logits.extend_from_slice(logits);
        let p = &self.params;
        for &(id, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            for &id in self.seen.keys() {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&id, &n) in &self.generated {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            argmax(logits)
        } else {
            self.sample_stochastic(logits)
        }
    }

    /// The sample of `id`, its log-probability under the raw distribution
    /// (`logits` are the processed ones; a chosen token is never masked).
    fn finish(&mut self, id: u32, raw_lse: f64, top: Vec<TokenLogprob>, logits: &[f32]) -> Sampled {
        let raw = if self.modifies_logits() {
            &self.raw_logits
        } else {
            logits
        };
        let logprob = (raw[id as usize] as f64 - raw_lse) as f32;
        self.accept(id);
        Sampled {
            token: TokenLogprob { id, logprob },
            top,
        }
    }

    fn sample_stochastic(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let c = &mut self.candidates;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l * inv_t)),
        );
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, |a, b| b.1.total_cmp(&a.1));
            c.truncate(p.top_k);
        }
        let max = c.iter().map(|x| x.1).fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f64;
        for x in c.iter_mut() {
            x.1 = (x.1 - max).exp();
            sum += x.1 as f64;
        }
        // Masked tokens (-inf) weigh nothing: they must not be drawn even when
        // rounding walks the draw past the last positive weight.
        c.retain(|x| x.1 > 0.0);
        if p.min_p > 0.0 {
            // The largest weight is exp(0) = 1.
            let floor = p.min_p;
            c.retain(|x| x.1 >= floor);
            sum = c.iter().map(|x| x.1 as f64).sum();
        }
        if p.top_p < 1.0 && !c.is_empty() {
            // The nucleus is usually a few dozen tokens: select and sort a
            // head of the candidates, growing it only while the head's mass
            // falls short, rather than sorting the whole vocabulary.
            let descending = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
            let target = p.top_p as f64 * sum;
            let mut head = NUCLEUS_HEAD.min(c.len());
            loop {
                if head < c.len() {
                    c.select_nth_unstable_by(head - 1, descending);
                }
                c[..head].sort_unstable_by(descending);
                let mut acc = 0f64;
                let mut keep = None;
                for (i, x) in c[..head].iter().enumerate() {
                    acc += x.1 as f64;
                    if acc >= target {
                        keep = Some(i + 1);
                        break;
                    }
                }
                if let Some(keep) = keep {
                    c.truncate(keep);
                    sum = acc.min(sum);
                    break;
                }
                if head == c.len() {
                    sum = acc.min(sum);
                    break;
                }
                head = (head * 8).min(c.len());
            }
        }
        let mut r = self.rng.next_f64() * sum;
        for x in c.iter() {
            r -= x.1 as f64;
            if r < 0.0 {
                return x.0;
            }
        }
        c.last().map_or(0, |x| x.0)
    }

    /// Records a sampled token for the penalties (only when one is on, so
    /// that plain sampling allocates nothing per token).
    fn accept(&mut self, id: u32) {
        let p = &self.params;
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            *self.generated.entry(id).or_insert(0) += 1;
        }
        if p.repetition_penalty != 1.0 {
            self.seen.insert(id, ());
        }
    }
}

/// Candidates first selected and sorted for top-p; grown eightfold while
/// their mass falls short of the nucleus.
const NUCLEUS_HEAD: usize = 64;

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// Index of the largest logit (first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    crate::kernels::argmax(logits) as u32
}

/// log(sum(exp(logits))), computed stably: f32 terms within about 2 ulp,
/// summed in f64 per chunk (see [`crate::kernels::sum_exp_below`]).
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = crate::kernels::max_f32(logits);
    if !max.is_finite() {
        return max as f64;
    }
    max as f64 + crate::kernels::sum_exp_below(logits, max).ln()
}

/// Log-probabilities of all tokens (softmax of the logits, in log space).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let lse = log_sum_exp(logits);
    logits.iter().map(|&l| (l as f64 - lse) as f32).collect()
}

/// The `k` most likely tokens with their log-probabilities, best first,
/// found by partial selection (the vocabulary is never sorted).
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<TokenLogprob> {
    if k == 0 || logits.is_empty() {
        return Vec::new();
    }
    let lse = log_sum_exp(logits);
    let k = k.min(logits.len());
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &l) in logits.iter().enumerate() {
        if best.len() < k || l > best[best.len() - 1].1 {
            let pos = best.partition_point(|x| x.1 >= l);
            best.insert(pos, (i as u32, l));
            best.truncate(k);
        }
    }
    best.into_iter()
        .map(|(id, l)| TokenLogprob {
            id,
            logprob: (l as f64 - lse) as f32,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabulary_reductions_match_plain_ones() {
        let logits: Vec<f32> = (0..10_007)
            .map(|i| ((i * 7919) % 2003) as f32 / 37.0 - 20.0)
            .collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let want = max as f64
            + logits
                .iter()
                .map(|&l| ((l - max) as f64).exp())
                .sum::<f64>()
                .ln();
        assert!(
            (log_sum_exp(&logits) - want).abs() < 1e-6,
            "{} {want}",
            log_sum_exp(&logits)
        );
        let best = logits
            .iter()
            .enumerate()
            .fold(0, |b, (i, &v)| if v > logits[b] { i } else { b });
        assert_eq!(argmax(&logits) as usize, best);
        let mut ties = vec![1.0f32; 100];
        ties[37] = 2.0;
        ties[80] = 2.0;
        assert_eq!(argmax(&ties), 37, "the first of equal maxima");
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
    }

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.5, -1.0, 0.0, 2.9]
    }

    fn draw(params: SamplingParams, n: usize) -> Vec<u32> {
        let mut s = Sampler::new(params, &[]);
        (0..n).map(|_| s.sample(&mut logits()).token.id).collect()
    }

    #[test]
    fn greedy_is_argmax_with_raw_logprob() {
        let mut s = Sampler::new(
            SamplingParams {
                top_logprobs: 3,
                ..SamplingParams::greedy()
            },
            &[],
        );
        let out = s.sample(&mut logits());
        let lp = log_softmax(&logits());
        assert_eq!(out.token.id, 1);
        assert!((out.token.logprob - lp[1]).abs() < 1e-6);
        assert_eq!(
            out.top.iter().map(|t| t.id).collect::<Vec<_>>(),
            vec![1, 5, 2]
        );
    }

    #[test]
    fn without_logprobs_the_same_tokens_come_unscored() {
        for temperature in [0.0, 0.8] {
            let params = |logprobs| SamplingParams {
                temperature,
                seed: Some(7),
                logprobs,
                ..SamplingParams::default()
            };
            let (mut scored, mut unscored) = (
                Sampler::new(params(true), &[]),
                Sampler::new(params(false), &[]),
            );
            for _ in 0..20 {
                let (a, b) = (scored.sample(&mut logits()), unscored.sample(&mut logits()));
                assert_eq!(a.token.id, b.token.id);
                assert!(a.token.logprob.is_finite() && b.token.logprob.is_nan());
            }
        }
    }

    #[test]
    fn constrained_draws_follow_the_masked_distribution() {
        // Token 1 is the likeliest but not allowed; 0 and 2 are, with
        // logits 0.0 and 2.0, so 2 should come about e^2 times as often.
        let allowed = |id: u32| id == 0 || id == 2;
        for temperature in [0.0, 1.0] {
            let mut s = Sampler::new(
                SamplingParams {
                    temperature,
                    seed: Some(3),
                    ..SamplingParams::default()
                },
                &[],
            );
            let mut counts = [0usize; 4];
            for _ in 0..4000 {
                let mut l = vec![0.0, 5.0, 2.0, f32::NEG_INFINITY];
                let out = s.sample_allowed(&mut l, &allowed).unwrap();
                counts[out.token.id as usize] += 1;
            }
            assert_eq!(counts[1] + counts[3], 0, "{counts:?}");
            if temperature == 0.0 {
                assert_eq!(counts[2], 4000);
            } else {
                let ratio = counts[2] as f64 / counts[0] as f64;
                assert!((ratio - 2f64.exp()).abs() < 1.5, "{counts:?}");
            }
        }
        let mut s = Sampler::new(SamplingParams::default(), &[]);
        assert!(s.sample_allowed(&mut [1.0, 2.0], &|_| false).is_none());
    }

    #[test]
    fn a_wide_nucleus_grows_past_the_sorted_head() {
        // Slowly falling logits: half the mass lies in about 700 tokens,
        // far more than the first sorted head of 64.
        let vocab = 10_000;
        let logits: Vec<f32> = (0..vocab).map(|i| -(i as f32) * 0.001).collect();
        let weights: Vec<f64> = logits.iter().map(|&l| (l as f64).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let nucleus = weights
            .iter()
            .position(|w| {
                acc += w;
                acc >= 0.5 * total
            })
            .unwrap()
            + 1;
        assert!(nucleus > 8 * NUCLEUS_HEAD, "{nucleus}");
        let mut s = Sampler::new(
            SamplingParams {
                seed: Some(3),
                top_p: 0.5,
                ..SamplingParams::default()
            },
            &[],
        );
        let drawn: Vec<u32> = (0..2000)
            .map(|_| s.sample(&mut logits.clone()).token.id)
            .collect();
        let highest = *drawn.iter().max().unwrap() as usize;
        assert!(highest < nucleus, "{highest} >= {nucleus}");
        assert!(highest > nucleus * 9 / 10, "{highest} of {nucleus}");
    }

    #[test]
    fn same_seed_same_draws_different_seed_different_draws() {
        let p = |seed| SamplingParams {
            seed: Some(seed),
            ..SamplingParams::default()
        };
        assert_eq!(draw(p(7), 64), draw(p(7), 64));
        assert_ne!(draw(p(7), 64), draw(p(8), 64));
    }

    #[test]
    fn top_k_top_p_min_p_restrict_the_support() {
        let base = SamplingParams {
            seed: Some(1),
            temperature: 1.5,
            ..SamplingParams::default()
        };
        let k2 = draw(
            SamplingParams {
                top_k: 2,
                ..base.clone()
            },
            200,
        );
        assert!(k2.iter().all(|&t| t == 1 || t == 5));
        let p = draw(
            SamplingParams {
                top_p: 0.01,
                ..base.clone()
            },
            50,
        );
        assert!(p.iter().all(|&t| t == 1));
        let m = draw(
            SamplingParams {
                min_p: 0.5,
                temperature: 1.0,
                ..base.clone()
            },
            200,
        );
        assert!(m.iter().all(|&t| t == 1 || t == 5 || t == 2), "{m:?}");
        let all = draw(base, 400);
        assert!(
            all.contains(&0) && all.contains(&4),
            "high temperature reaches unlikely tokens"
        );
    }

    #[test]
    fn bias_and_penalties_move_the_choice() {
        let biased = draw(
            SamplingParams {
                logit_bias: vec![(3, 100.0)],
                ..SamplingParams::greedy()
            },
            3,
        );
        assert_eq!(biased, vec![3, 3, 3]);
        // Presence penalty: each pick is penalised once, so greedy walks down the ranking.
        let walk = draw(
            SamplingParams {
                presence_penalty: 2.0,
                ..SamplingParams::greedy()
            },
            3,
        );
        assert_eq!(walk, vec![1, 5, 2]);
        let freq = draw(
            SamplingParams {
                frequency_penalty: 0.6,
                ..SamplingParams::greedy()
            },
            4,
        );
        assert_eq!(freq, vec![1, 5, 2, 1]);
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..SamplingParams::greedy()
            },
            &[1],
        );
        assert_eq!(s.sample(&mut logits()).token.id, 5);
    }

    #[test]
    fn validation_names_the_parameter() {
        let err = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        }
        .validate(10)
        .unwrap_err();
        assert!(err.to_string().contains("top_p"));
        let err = SamplingParams {
            logit_bias: vec![(10, 1.0)],
            ..SamplingParams::default()
        }
        .validate(10)
        .unwrap_err();
        assert!(err.to_string().contains("logit_bias"));
        assert!(SamplingParams::default().validate(10).is_ok());
    }

    #[test]
    fn every_refusal_names_its_parameter() {
        let d = SamplingParams::default;
        let cases: Vec<(&str, SamplingParams)> = vec![
            (
                "temperature",
                SamplingParams {
                    temperature: 2.5,
                    ..d()
                },
            ),
            (
                "temperature",
                SamplingParams {
                    temperature: f32::NAN,
                    ..d()
                },
            ),
            ("top_p", SamplingParams { top_p: 0.0, ..d() }),
            ("top_p", SamplingParams { top_p: 1.5, ..d() }),
            ("min_p", SamplingParams { min_p: -0.1, ..d() }),
            (
                "repetition_penalty",
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..d()
                },
            ),
            (
                "repetition_penalty",
                SamplingParams {
                    repetition_penalty: 11.0,
                    ..d()
                },
            ),
            (
                "presence_penalty",
                SamplingParams {
                    presence_penalty: 2.5,
                    ..d()
                },
            ),
            (
                "frequency_penalty",
                SamplingParams {
                    frequency_penalty: -3.0,
                    ..d()
                },
            ),
            (
                "logit_bias",
                SamplingParams {
                    logit_bias: vec![(3, 101.0)],
                    ..d()
                },
            ),
            (
                "logit_bias",
                SamplingParams {
                    logit_bias: vec![(1, 0.0); 301],
                    ..d()
                },
            ),
            (
                "top_logprobs",
                SamplingParams {
                    top_logprobs: 21,
                    ..d()
                },
            ),
        ];
        for (name, params) in cases {
            match params.validate(10) {
                Err(EngineError::InvalidParameter { param, .. }) => assert_eq!(param, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert!(SamplingParams {
            repetition_penalty: 0.01,
            ..d()
        }
        .validate(10)
        .is_ok());
    }
}
