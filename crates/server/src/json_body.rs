//! The one way request bodies come in: JSON, read up to the configured limit
//! (413 past it, nothing kept beyond), gzip or deflate decoded under the
//! same cap, and parse errors that name the field at fault.

use std::io::Read;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap};
use serde::de::DeserializeOwned;
use tokio_stream::StreamExt;

use crate::error::ServerError;
use crate::lifecycle::Front;
use crate::preparation::prepare;

/// A request body parsed as `T`.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned + Send + 'static, S: Front> FromRequest<S> for JsonBody<T> {
    type Rejection = ServerError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ServerError> {
        let bytes = read_json_bytes(req, state.body_limit(), state.body_timeout()).await?;
        prepare(bytes.len(), move || parse_json(&bytes).map(JsonBody)).await
    }
}

/// A request body as a JSON object, with the bytes it was parsed from (so
/// that a typed parse of the same bytes needs no re-serialisation).
#[derive(Debug)]
pub struct JsonRequest {
    /// The parsed object.
    pub value: serde_json::Value,
    /// The body as the client sent it (decompressed).
    pub bytes: Bytes,
}

impl<S: Front> FromRequest<S> for JsonRequest {
    type Rejection = ServerError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ServerError> {
        let bytes = read_json_bytes(req, state.body_limit(), state.body_timeout()).await?;
        prepare(bytes.len(), move || {
            let value = parse_json(&bytes)?;
            Ok(JsonRequest { value, bytes })
        })
        .await
    }
}

/// Checks the headers, then reads and decodes the body within `limit`
/// bytes and `timeout`.
async fn read_json_bytes(
    req: Request,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ServerError> {
    let (parts, body) = req.into_parts();
    check_content_type(&parts.headers)?;
    let encoding = content_encoding(&parts.headers)?;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bytes = tokio::time::timeout(timeout, read_capped(body, limit, declared))
        .await
        .map_err(|_| ServerError::BodyTimeout(timeout.as_secs()))??;
    Ok(match encoding {
        Encoding::Identity => bytes,
        Encoding::Gzip => Bytes::from(inflate(flate2::read::GzDecoder::new(&bytes[..]), limit)?),
        Encoding::Deflate => {
            Bytes::from(inflate(flate2::read::ZlibDecoder::new(&bytes[..]), limit)?)
        }
    })
}

/// Bytes of an over-long body read and thrown away before the 413 goes
/// out, so that a client still writing sees the answer rather than a reset.
const DRAIN_LIMIT: usize = 64 << 20;
/// Time allowed for that.
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Reads the body into memory up to `limit` bytes. Past it, nothing more is
/// kept: the rest is drained (up to a bound) and the answer is a 413.
async fn read_capped(
    body: Body,
    limit: usize,
    declared: Option<u64>,
) -> Result<Bytes, ServerError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut too_large = declared.is_some_and(|n| n > limit as u64);
    if !too_large {
        if let Some(n) = declared {
            buf.reserve(n as usize);
        }
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| ServerError::InvalidBody(format!("could not read the body: {e}")))?;
            if buf.len() + chunk.len() > limit {
                too_large = true;
                break;
            }
            buf.extend_from_slice(&chunk);
        }
    }
    if !too_large {
        return Ok(Bytes::from(buf));
    }
    drop(buf);
    let drain = async {
        let mut drained = 0usize;
        while let Some(Ok(chunk)) = stream.next().await {
            drained += chunk.len();
            if drained > DRAIN_LIMIT {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
    Err(ServerError::TooLarge(limit))
}

/// Parses JSON, naming the field at fault in the error.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ServerError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => {
            return Err(ServerError::InvalidBody(
                "the body is empty; send a JSON object".into(),
            ))
        }
        Some(b'{') => {}
        Some(_) => {
            return Err(ServerError::InvalidBody(
                "the body must be a JSON object".into(),
            ))
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut de);
    let value = parsed.map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let param = match path.as_str() {
            "" | "." | "?" => {
                missing_field(&inner.to_string()).or_else(|| field_at_fault::<T>(bytes))
            }
            _ => Some(path),
        };
        let message = format!("the body is not a valid request: {inner}");
        match param {
            Some(param) if !inner.is_syntax() && !inner.is_eof() => {
                ServerError::InvalidParam { param, message }
            }
            _ => ServerError::InvalidBody(message),
        }
    })?;
    de.end()
        .map_err(|e| ServerError::InvalidBody(format!("the body is not a valid request: {e}")))?;
    Ok(value)
}

/// Bytes of JSON the search for the field at fault may deserialise, over
/// all its probes: the search costs at most a few milliseconds, whatever
/// the body holds.
const FAULT_SEARCH_BUDGET: usize = 2 << 20;

/// The top-level field at fault when serde could not say (it loses the
/// path inside flattened structs). The search first grows a skeleton of
/// the required fields (from "missing field" errors), then tries each
/// other field alone on that skeleton: the first that fails is at fault.
/// Each probe is charged its size against [`FAULT_SEARCH_BUDGET`]; past
/// it the field is left unnamed.
fn field_at_fault<T: DeserializeOwned>(bytes: &[u8]) -> Option<String> {
    field_at_fault_within::<T>(bytes, FAULT_SEARCH_BUDGET)
}

fn field_at_fault_within<T: DeserializeOwned>(bytes: &[u8], budget: usize) -> Option<String> {
    let serde_json::Value::Object(map) = serde_json::from_slice(bytes).ok()? else {
        return None;
    };
    let mut budget = budget.checked_sub(bytes.len())?;
    let mut charge = |value: &serde_json::Value| -> Option<()> {
        budget = budget.checked_sub(json_size(value))?;
        Some(())
    };
    let mut skeleton = serde_json::Map::new();
    loop {
        let probe = serde_json::Value::Object(skeleton.clone());
        charge(&probe)?;
        match serde_json::from_value::<T>(probe) {
            Ok(_) => break,
            Err(e) => {
                let field = missing_field(&e.to_string())?;
                let value = map.get(&field)?;
                if skeleton.insert(field, value.clone()).is_some() {
                    return None;
                }
            }
        }
    }
    let skeleton_size = json_size(&serde_json::Value::Object(skeleton.clone()));
    for (key, value) in &map {
        if skeleton.contains_key(key) {
            continue;
        }
        budget = budget.checked_sub(skeleton_size + json_size(value))?;
        let mut probe = skeleton.clone();
        probe.insert(key.clone(), value.clone());
        if serde_json::from_value::<T>(serde_json::Value::Object(probe)).is_err() {
            return Some(key.clone());
        }
    }
    None
}

/// The length of `value` written as compact JSON, counted without keeping
/// the text.
fn json_size(value: &serde_json::Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// The field of a `missing field `x`` message.
fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest[..rest.find('`')?].to_owned())
}

fn check_content_type(headers: &HeaderMap) -> Result<(), ServerError> {
    // None is refused too: a browser's blind cross-site POST sends none (or
    // a form type), and no API client leaves it out.
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(ServerError::InvalidBody(
            "the Content-Type must be application/json, and there is none (with curl, add -H 'content-type: application/json')".into(),
        ));
    };
    let media = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media == "application/json"
        || (media.starts_with("application/") && media.ends_with("+json"))
    {
        Ok(())
    } else {
        Err(ServerError::InvalidBody(format!(
            "the Content-Type must be application/json, not {media:?} (with curl, add -H 'content-type: application/json')"
        )))
    }
}

enum Encoding {
    Identity,
    Gzip,
    Deflate,
}

fn content_encoding(headers: &HeaderMap) -> Result<Encoding, ServerError> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(Encoding::Identity);
    };
    match value
        .to_str()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
        .as_str()
    {
        "" | "identity" => Ok(Encoding::Identity),
        "gzip" | "x-gzip" => Ok(Encoding::Gzip),
        "deflate" => Ok(Encoding::Deflate),
        other => Err(ServerError::InvalidBody(format!(
            "the Content-Encoding {other:?} is not supported; use gzip, deflate or none"
        ))),
    }
}

/// Decompresses up to `limit` bytes; more is a 413, decoded no further.
fn inflate(decoder: impl Read, limit: usize) -> Result<Vec<u8>, ServerError> {
    let mut out = Vec::new();
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| ServerError::InvalidBody(format!("the compressed body is corrupt: {e}")))?;
    if out.len() > limit {
        return Err(ServerError::TooLarge(limit));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Request {
        model: String,
        #[serde(default)]
        max_tokens: Option<u32>,
        #[serde(default)]
        messages: Vec<Message>,
        #[serde(flatten)]
        sampling: Sampling,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Sampling {
        #[serde(default)]
        temperature: Option<f32>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Message {
        role: String,
    }

    fn param_of(body: &str) -> Option<String> {
        match parse_json::<Request>(body.as_bytes()) {
            Err(ServerError::InvalidParam { param, .. }) => Some(param),
            Err(_) => None,
            Ok(_) => panic!("{body} parsed"),
        }
    }

    #[test]
    fn type_errors_name_the_field() {
        assert_eq!(
            param_of(r#"{"model":"m","max_tokens":"x"}"#).as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            param_of(r#"{"model":"m","messages":[{"role":1}]}"#).as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(param_of(r#"{"max_tokens":1}"#).as_deref(), Some("model"));
        assert_eq!(
            param_of(r#"{"model":"m","temperature":"hot"}"#).as_deref(),
            Some("temperature")
        );
    }

    /// A body of many filler keys and two mistyped fields of the
    /// flattened sampling options: the field at fault is named, by a
    /// search whose work is bounded (it once re-parsed the whole body once
    /// per key, and named nothing when two fields were wrong).
    #[test]
    fn the_field_at_fault_is_found_in_bounded_work_among_many_keys() {
        let mut body = String::from(r#"{"model":"m","messages":[{"role":"user"}]"#);
        for i in 0..26_000 {
            body.push_str(&format!(r#","filler{i:05}":1"#));
        }
        body.push_str(r#","temperature":"x","top_p":"y"}"#);
        assert!(body.len() > 250_000);
        let param = param_of(&body);
        assert!(
            matches!(param.as_deref(), Some("temperature" | "top_p")),
            "{param:?}"
        );
        // The same search with a budget below one pass over the body
        // gives up rather than work on.
        assert_eq!(
            field_at_fault_within::<Request>(body.as_bytes(), 100_000),
            None
        );
        let small = r#"{"model":"m","a":1,"b":2,"temperature":"x"}"#;
        assert_eq!(
            field_at_fault_within::<Request>(small.as_bytes(), 4096).as_deref(),
            Some("temperature")
        );
    }

    #[test]
    fn syntax_errors_and_empty_bodies_are_plain_400s() {
        for body in ["", "  ", "{", "[1,", r#"{"model":"m"} x"#] {
            assert!(param_of(body).is_none(), "{body:?}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        let deep = format!(
            r#"{{"model":"m","tools":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(parse_json::<serde_json::Value>(deep.as_bytes()).is_err());
    }

    #[test]
    fn a_compressed_bomb_stops_at_the_limit() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![b' '; 64 << 20]).unwrap();
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 1 << 20);
        let err = inflate(flate2::read::GzDecoder::new(&bomb[..]), 2 << 20).unwrap_err();
        assert!(matches!(err, ServerError::TooLarge(_)), "{err:?}");
    }
}
