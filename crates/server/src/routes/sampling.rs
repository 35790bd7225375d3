//! Sampling parameters shared by the chat and text completion endpoints:
//! the wire's shapes turned into the engine's parameters, which the engine
//! checks (its errors name the parameter at fault).

use neocloud_engine::generation::check_stop;
use neocloud_engine::sampler::SamplingParams;
use neocloud_openai::chat::SamplingOptions;

use crate::error::ServerError;

/// Builds the engine's parameters from the request's and checks them;
/// `logprobs` says whether the request reports the chosen tokens'
/// log-probabilities.
pub(crate) fn sampling_params(
    f: &SamplingOptions,
    logprobs: bool,
    top_logprobs: usize,
    vocab: usize,
) -> Result<SamplingParams, ServerError> {
    let defaults = SamplingParams::default();
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
    let mut logit_bias = Vec::new();
    for (k, &v) in f.logit_bias.iter().flatten() {
        // The wire names tokens by decimal strings; the engine checks the
        // ids and the values.
        let id: u32 = k.parse().map_err(|_| {
            ServerError::param(
                "logit_bias",
                format!("{k:?} is not a token id of this model"),
            )
        })?;
        logit_bias.push((id, v));
    }
    let params = SamplingParams {
        temperature: f.temperature.unwrap_or(defaults.temperature),
        top_k,
        top_p: f.top_p.unwrap_or(defaults.top_p),
        min_p: f.min_p.unwrap_or(defaults.min_p),
        repetition_penalty: f.repetition_penalty.unwrap_or(defaults.repetition_penalty),
        presence_penalty: f.presence_penalty.unwrap_or(defaults.presence_penalty),
        frequency_penalty: f.frequency_penalty.unwrap_or(defaults.frequency_penalty),
        logit_bias,
        seed: f.seed.map(|s| s as u64),
        top_logprobs,
        logprobs,
    };
    params.validate(vocab)?;
    Ok(params)
}

/// The stop strings of `stop`, checked by the engine's rule.
pub(crate) fn stop_strings(
    stop: Option<neocloud_openai::chat::StopSequences>,
) -> Result<Vec<String>, ServerError> {
    let stop = stop.map(|s| s.into_vec()).unwrap_or_default();
    check_stop(&stop)?;
    Ok(stop)
}
