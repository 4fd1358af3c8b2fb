//! Extractors whose rejections become OpenAI error envelopes instead of axum's plain text.
//!
//! A JSON body is bounded before it is read: a declared `Content-Length` over
//! [`MAX_JSON_BODY`] is refused at once, and a chunked body is refused as soon as it passes
//! the limit (413), so nothing larger is ever buffered. It must be one JSON object in which no
//! object repeats a key.

use std::fmt;

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::{self, DeserializeOwned, MapAccess, SeqAccess, Visitor};
use serde::Deserializer;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// The largest JSON request body read (a batch create is a few kilobytes at most).
pub const MAX_JSON_BODY: usize = 256 * 1024;

/// A JSON object body; anything else is a 400 (413 when too large) that says what is wrong.
pub struct JsonObject(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::bad_request("The request body must be JSON, sent with 'Content-Type: application/json'."));
        }
        let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_JSON_BODY as u64) {
            return Err(body_too_large());
        }
        let bytes = match Limited::new(req.into_body(), MAX_JSON_BODY).collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(body_too_large()),
            Err(e) => return Err(ApiError::bad_request(format!("The request body could not be read: {e}"))),
        };
        match parse_strict(&bytes) {
            Ok(Value::Object(m)) => Ok(JsonObject(m)),
            Ok(_) => Err(ApiError::bad_request("The request body must be a JSON object.")),
            Err(e) => Err(ApiError::bad_request(format!("We could not parse the JSON body of your request: {e}"))),
        }
    }
}

fn body_too_large() -> ApiError {
    ApiError::too_large(format!("The request body is larger than {MAX_JSON_BODY} bytes.")).code("request_too_large")
}

/// `application/json` or `application/*+json`, as axum's `Json` accepts.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let essence = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Parses JSON like `serde_json::from_slice`, but refuses an object that repeats a key
/// (which serde_json would silently resolve to the last value).
pub fn parse_strict(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v = de.deserialize_any(StrictVisitor)?;
    de.end()?;
    Ok(v)
}

struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!("the key {key:?} appears twice in one object")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Query parameters; a bad one is a 400 naming the problem.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e: QueryRejection| ApiError::bad_request(format!("Invalid query parameters: {}", e.body_text())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_parsing_refuses_repeated_keys_at_any_depth() {
        assert_eq!(parse_strict(br#"{"a":1,"b":[1,{"c":null}],"d":1.5}"#).unwrap(), serde_json::json!({"a":1,"b":[1,{"c":null}],"d":1.5}));
        let e = parse_strict(br#"{"endpoint":"x","endpoint":"y"}"#).unwrap_err().to_string();
        assert!(e.contains("\"endpoint\" appears twice"), "{e}");
        assert!(parse_strict(br#"{"m":{"k":1,"k":2}}"#).is_err());
        assert!(parse_strict(br#"{"a":1} x"#).is_err(), "trailing data");
        assert!(parse_strict(&[b'['; 10_000]).is_err(), "deep nesting is an error, not a stack overflow");
        assert_eq!(parse_strict(b"18446744073709551615").unwrap(), serde_json::json!(u64::MAX));
    }
}
