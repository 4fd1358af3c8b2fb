//! Which blob store a node uses: [`BlobUrl`] (parsed once, at start-up), the S3 client built
//! from it, and which object-store errors mean "unreachable for now".

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};

use super::{Error, Result};

/// A blob store named by `--blob URL` / `[server] blob`: `file://PATH` (or a bare path), or
/// `s3://BUCKET[/PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobUrl {
    Local(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl std::str::FromStr for BlobUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<BlobUrl, String> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("blob URL {url:?} names no bucket (s3://BUCKET/PREFIX)"));
            }
            return Ok(BlobUrl::S3 { bucket: bucket.to_string(), prefix: prefix.trim_matches('/').to_string() });
        }
        if let Some(path) = url.strip_prefix("file://") {
            if path.is_empty() {
                return Err(format!("blob URL {url:?} names no directory (file:///PATH)"));
            }
            return Ok(BlobUrl::Local(PathBuf::from(path)));
        }
        if url.is_empty() || url.contains("://") {
            return Err(format!("blob URL {url:?} is neither s3://BUCKET/PREFIX nor file://PATH"));
        }
        Ok(BlobUrl::Local(PathBuf::from(url)))
    }
}

impl std::fmt::Display for BlobUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlobUrl::Local(p) => write!(f, "file://{}", p.display()),
            BlobUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            BlobUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// How long one object-store call keeps retrying before it reports the store unavailable:
/// long enough for a blip, short enough that an API call answers 503 rather than hanging.
const RETRY_TIMEOUT: Duration = Duration::from_secs(15);

/// An S3 bucket (under `prefix`), with everything else from `builder` (the `AWS_*`
/// environment: keys, region, `AWS_ENDPOINT_URL` for a non-AWS server). A plain `http://`
/// endpoint is allowed because the URL says so.
pub fn s3(bucket: &str, prefix: &str, builder: AmazonS3Builder) -> Result<Arc<dyn ObjectStore>> {
    let http = builder.get_config_value(&AmazonS3ConfigKey::Endpoint).is_some_and(|e| e.starts_with("http://"));
    let retry = RetryConfig { backoff: BackoffConfig::default(), max_retries: 5, retry_timeout: RETRY_TIMEOUT };
    let builder = if http { builder.with_allow_http(true) } else { builder };
    let s3 = builder.with_bucket_name(bucket).with_retry(retry).build().map_err(|e| Error::Other(Box::new(e)))?;
    Ok(if prefix.is_empty() { Arc::new(s3) } else { Arc::new(PrefixStore::new(s3, prefix)) })
}

/// Whether an object-store error means the store is unreachable or overloaded for now (a
/// connection or timeout error, a 5xx or 429 answer after the client's own retries), as
/// opposed to a problem with the request.
pub(super) fn is_transient(e: &(dyn std::error::Error + 'static)) -> bool {
    use object_store::client::HttpErrorKind;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<object_store::client::HttpError>() {
            if matches!(h.kind(), HttpErrorKind::Connect | HttpErrorKind::Request | HttpErrorKind::Timeout | HttpErrorKind::Interrupted) {
                return true;
            }
        }
        // object_store's request error is transparent: its source is the HTTP client's error.
        if let Some(r) = err.downcast_ref::<reqwest::Error>() {
            if r.is_connect() || r.is_timeout() || r.is_request() {
                return true;
            }
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(io.kind(), ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | TimedOut | BrokenPipe | UnexpectedEof) {
                return true;
            }
        }
        let text = err.to_string();
        if let Some(code) = text.split("status code: ").nth(1) {
            if code.starts_with('5') || code.starts_with("429") {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let p = |s: &str| s.parse::<BlobUrl>();
        assert_eq!(p("s3://b/some/prefix/"), Ok(BlobUrl::S3 { bucket: "b".into(), prefix: "some/prefix".into() }));
        assert_eq!(p("s3://b"), Ok(BlobUrl::S3 { bucket: "b".into(), prefix: "".into() }));
        assert_eq!(p("file:///var/lib/batchd"), Ok(BlobUrl::Local("/var/lib/batchd".into())));
        assert_eq!(p("./blobs"), Ok(BlobUrl::Local("./blobs".into())));
        assert!(p("s3:///x").unwrap_err().contains("no bucket"));
        assert!(p("gs://b").unwrap_err().contains("neither"));
        assert!(p("file://").is_err());
        assert_eq!(p("s3://b/p").unwrap().to_string(), "s3://b/p");
    }
}
