//! Sampling parameters shared by the chat and text completion endpoints,
//! validated with the offending parameter named.

use neocloud_engine::sampler::SamplingParams;
use neocloud_openai::chat::SamplingOptions;

use crate::error::ServerError;

/// Most tokens `logit_bias` may name (OpenAI's limit).
const MAX_LOGIT_BIAS: usize = 300;
/// Most stop strings (OpenAI's limit).
const MAX_STOP: usize = 4;

fn within(name: &str, v: Option<f32>, default: f32, lo: f32, hi: f32) -> Result<f32, ServerError> {
    let v = v.unwrap_or(default);
    if v.is_finite() && (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(ServerError::param(
            name,
            format!("{name} must be within [{lo}, {hi}], got {v}"),
        ))
    }
}

/// Checks every field and builds the engine's parameters; `logprobs`
/// says whether the request reports the chosen tokens' log-probabilities.
pub(crate) fn sampling_params(
    f: &SamplingOptions,
    logprobs: bool,
    top_logprobs: usize,
    vocab: usize,
) -> Result<SamplingParams, ServerError> {
    let temperature = within("temperature", f.temperature, 1.0, 0.0, 2.0)?;
    let top_p = within("top_p", f.top_p, 1.0, 0.0, 1.0)?;
    if top_p == 0.0 {
        return Err(ServerError::param("top_p", "top_p must be greater than 0"));
    }
    let top_k = match f.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ServerError::param(
                "top_k",
                format!("top_k must be -1 or positive, got {k}"),
            ))
        }
    };
    let entries = f.logit_bias.as_ref().map_or(0, |b| b.len());
    if entries > MAX_LOGIT_BIAS {
        return Err(ServerError::param(
            "logit_bias",
            format!("logit_bias takes at most {MAX_LOGIT_BIAS} tokens, got {entries}"),
        ));
    }
    let mut logit_bias = Vec::new();
    for (k, &v) in f.logit_bias.iter().flatten() {
        let id: u32 = k
            .parse()
            .ok()
            .filter(|&id: &u32| (id as usize) < vocab)
            .ok_or_else(|| {
                ServerError::param(
                    "logit_bias",
                    format!("{k:?} is not a token id of this model"),
                )
            })?;
        if !(-100.0..=100.0).contains(&v) {
            return Err(ServerError::param(
                "logit_bias",
                "bias values must be within [-100, 100]",
            ));
        }
        logit_bias.push((id, v));
    }
    if top_logprobs > 20 {
        return Err(ServerError::param(
            "top_logprobs",
            "at most 20 alternatives per token",
        ));
    }
    Ok(SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p: within("min_p", f.min_p, 0.0, 0.0, 1.0)?,
        repetition_penalty: within("repetition_penalty", f.repetition_penalty, 1.0, 0.01, 10.0)?,
        presence_penalty: within("presence_penalty", f.presence_penalty, 0.0, -2.0, 2.0)?,
        frequency_penalty: within("frequency_penalty", f.frequency_penalty, 0.0, -2.0, 2.0)?,
        logit_bias,
        seed: f.seed.map(|s| s as u64),
        top_logprobs,
        logprobs,
    })
}

/// Validates `stop`: up to four non-empty strings.
pub(crate) fn stop_strings(
    stop: Option<neocloud_openai::chat::StopSequences>,
) -> Result<Vec<String>, ServerError> {
    let stop = stop.map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > MAX_STOP {
        return Err(ServerError::param(
            "stop",
            format!("stop takes at most {MAX_STOP} strings, got {}", stop.len()),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ServerError::param("stop", "stop strings must not be empty"));
    }
    Ok(stop)
}
