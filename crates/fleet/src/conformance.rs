//! Conformance profiles: what each kind of upstream does with each request
//! parameter. A parameter an upstream rejects or ignores is either removed
//! and reported (it does not change what the client gets beyond the
//! sampling details it names) or refused with a 400 (it would change the
//! answer's shape: `n`, `logprobs`). Nothing is dropped silently: the names
//! go back in `x-neocloud-dropped-params`.

use serde_json::Value;

use crate::config::Profile;

/// The header that lists removed parameters.
pub const DROPPED_PARAMS_HEADER: &str = "x-neocloud-dropped-params";

/// Extensions of vLLM, llama.cpp and neocloud that OpenAI-style hosted APIs
/// do not take.
const SERVER_EXTENSIONS: &[&str] = &[
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "min_tokens",
    "return_tokens_as_token_ids",
];

/// What a profile does with one parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Treatment {
    /// Removed before sending, and listed.
    Drop,
    /// The request is refused: the answer would not be what was asked.
    Refuse,
}

fn treatment(profile: Profile, param: &str, value: &Value) -> Option<Treatment> {
    let extension = SERVER_EXTENSIONS.contains(&param);
    let several = param == "n" && value.as_u64().is_some_and(|n| n > 1);
    match profile {
        Profile::Vllm
        | Profile::Neocloud
        | Profile::Furiosa
        | Profile::Rbln
        | Profile::Llamacpp => None,
        Profile::Openai | Profile::Cerebras => extension.then_some(Treatment::Drop),
        Profile::Groq => match param {
            "logprobs" | "top_logprobs" if !value.is_null() && value != &Value::Bool(false) => {
                Some(Treatment::Refuse)
            }
            "logit_bias" => Some(Treatment::Drop),
            "n" if several => Some(Treatment::Refuse),
            _ => extension.then_some(Treatment::Drop),
        },
        Profile::Sambanova => match param {
            // Accepted by the API but without effect: said rather than implied.
            "presence_penalty" | "frequency_penalty" => Some(Treatment::Drop),
            _ => extension.then_some(Treatment::Drop),
        },
    }
}

/// A request body made fit for an upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapted {
    /// The body to send.
    pub body: Value,
    /// Parameters removed, in the body's order.
    pub dropped: Vec<String>,
}

/// Adapts `body` to `profile`; `Err(param)` names a parameter the upstream
/// cannot honour and that cannot be dropped without changing the answer.
pub fn adapt(profile: Profile, mut body: Value) -> Result<Adapted, String> {
    let mut dropped = Vec::new();
    if let Some(map) = body.as_object_mut() {
        let mut refused = None;
        map.retain(|key, value| match treatment(profile, key, value) {
            None => true,
            Some(Treatment::Drop) => {
                dropped.push(key.clone());
                false
            }
            Some(Treatment::Refuse) => {
                refused.get_or_insert_with(|| key.clone());
                true
            }
        });
        if let Some(param) = refused {
            return Err(param);
        }
    }
    Ok(Adapted { body, dropped })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn servers_take_everything() {
        let body = json!({"model": "m", "top_k": 5, "ignore_eos": true, "n": 3, "logprobs": true});
        for p in [
            Profile::Vllm,
            Profile::Neocloud,
            Profile::Llamacpp,
            Profile::Furiosa,
            Profile::Rbln,
        ] {
            let a = adapt(p, body.clone()).unwrap();
            assert_eq!(a.body, body);
            assert!(a.dropped.is_empty());
        }
    }

    #[test]
    fn hosted_apis_lose_extensions_and_say_so() {
        let body = json!({"model": "m", "top_k": 5, "min_tokens": 8, "temperature": 0.5});
        let a = adapt(Profile::Openai, body).unwrap();
        assert_eq!(a.body, json!({"model": "m", "temperature": 0.5}));
        assert_eq!(a.dropped, vec!["top_k", "min_tokens"]);
    }

    #[test]
    fn groq_refuses_what_changes_the_answer_and_drops_the_rest() {
        let err = adapt(Profile::Groq, json!({"model": "m", "logprobs": true})).unwrap_err();
        assert_eq!(err, "logprobs");
        assert_eq!(
            adapt(Profile::Groq, json!({"model": "m", "n": 2})).unwrap_err(),
            "n"
        );
        let a = adapt(
            Profile::Groq,
            json!({"model": "m", "n": 1, "logprobs": false, "logit_bias": {"1": 5}}),
        )
        .unwrap();
        assert_eq!(a.body, json!({"model": "m", "n": 1, "logprobs": false}));
        assert_eq!(a.dropped, vec!["logit_bias"]);
    }

    #[test]
    fn sambanova_penalties_are_listed_as_dropped() {
        let a = adapt(
            Profile::Sambanova,
            json!({"model": "m", "presence_penalty": 1.0, "top_p": 0.9}),
        )
        .unwrap();
        assert_eq!(a.dropped, vec!["presence_penalty"]);
        assert_eq!(a.body, json!({"model": "m", "top_p": 0.9}));
    }
}
