//! Behaviour every blob backend must show, as `pub async fn` checks over `&Blob` (the
//! object_store integration style): the local directory runs them always, S3 when
//! `BATCHD_TEST_S3_URL` names a server (see [`testing`]). Each check uses its own keys.

use bytes::Bytes;
use futures::TryStreamExt;

use super::*;

/// Runs every check on a fresh, empty blob store.
pub async fn run_all(blob: &Blob) {
    put_get_range_delete(blob).await;
    streamed_write_is_invisible_until_finished(blob).await;
    aborted_write_leaves_nothing(blob).await;
    missing_objects_are_not_found(blob).await;
    list_under_a_prefix(blob).await;
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ seed).collect()
}

async fn read_all(blob: &Blob, key: &str) -> Vec<u8> {
    let parts: Vec<Bytes> = blob.get_stream(key).await.unwrap().try_collect().await.unwrap();
    parts.concat()
}

pub async fn put_get_range_delete(blob: &Blob) {
    let small = Bytes::from_static(b"hello world");
    blob.put("files/c-small", small.clone()).await.unwrap();
    assert_eq!(blob.size("files/c-small").await.unwrap(), 11);
    assert_eq!(&blob.get_range("files/c-small", 6..11).await.unwrap()[..], b"world");
    blob.put("files/c-small", Bytes::from_static(b"again")).await.unwrap();
    assert_eq!(read_all(blob, "files/c-small").await, b"again", "a put replaces the object");
    let chunk = blob.read_chunk();
    let big = pattern((chunk * 2 + 17) as usize, 3);
    blob.put("files/c-big", Bytes::from(big.clone())).await.unwrap();
    let chunks: Vec<Bytes> = blob.get_stream("files/c-big").await.unwrap().try_collect().await.unwrap();
    assert_eq!(chunks.len(), 3, "read in read_chunk ranges");
    assert!(chunks.iter().all(|c| c.len() as u64 <= chunk));
    assert_eq!(chunks.concat(), big);
    let part: Vec<Bytes> = blob.get_range_stream("files/c-big", 5..chunk + 9).await.unwrap().try_collect().await.unwrap();
    assert_eq!(part.concat(), &big[5..(chunk + 9) as usize]);
    blob.delete("files/c-big").await.unwrap();
    blob.delete("files/c-big").await.unwrap();
    assert!(matches!(blob.size("files/c-big").await, Err(Error::NotFound(_))), "deleted");
}

/// A write of several parts (a multipart upload on S3) is invisible until `finish`, and
/// reads back byte for byte.
pub async fn streamed_write_is_invisible_until_finished(blob: &Blob) {
    let data = pattern(WRITE_BUFFER * 2 + 12_345, 7);
    let mut w = blob.writer("files/c-multi");
    for piece in data.chunks(700_001) {
        w.write(piece).await.unwrap();
    }
    assert_eq!(w.written(), data.len() as u64);
    assert!(matches!(blob.size("files/c-multi").await, Err(Error::NotFound(_))), "invisible before finish");
    assert_eq!(w.finish().await.unwrap(), data.len() as u64);
    assert_eq!(blob.size("files/c-multi").await.unwrap(), data.len() as u64);
    assert!(read_all(blob, "files/c-multi").await == data, "the object reads back byte for byte");
    let tail = blob.get_range("files/c-multi", data.len() as u64 - 10..data.len() as u64).await.unwrap();
    assert_eq!(&tail[..], &data[data.len() - 10..]);
    let mut empty = blob.writer("files/c-empty");
    empty.write(b"").await.unwrap();
    assert_eq!(empty.finish().await.unwrap(), 0);
    assert_eq!(blob.size("files/c-empty").await.unwrap(), 0, "an empty object can be written");
}

pub async fn aborted_write_leaves_nothing(blob: &Blob) {
    let mut w = blob.writer("files/c-aborted");
    w.write(&pattern(WRITE_BUFFER + 1000, 9)).await.unwrap();
    w.abort().await;
    assert!(matches!(blob.size("files/c-aborted").await, Err(Error::NotFound(_))));
    let w = blob.writer("files/c-dropped");
    drop(w);
    assert!(matches!(blob.size("files/c-dropped").await, Err(Error::NotFound(_))));
}

pub async fn missing_objects_are_not_found(blob: &Blob) {
    assert!(matches!(blob.size("files/c-none").await, Err(Error::NotFound(_))));
    assert!(matches!(blob.get_stream("files/c-none").await, Err(Error::NotFound(_))));
    assert!(matches!(blob.get_range("files/c-none", 0..1).await, Err(Error::NotFound(_))));
    blob.delete("files/c-none").await.expect("deleting a missing object is not an error");
}

/// Listing returns keys as the caller wrote them (relative to the store's root or prefix).
pub async fn list_under_a_prefix(blob: &Blob) {
    for k in ["listed/a", "listed/sub/b", "unlisted/c"] {
        blob.put(k, Bytes::from_static(b"x")).await.unwrap();
    }
    let mut listed = blob.list("listed").await.unwrap();
    listed.sort_by(|a, b| a.key.cmp(&b.key));
    let keys: Vec<&str> = listed.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, ["listed/a", "listed/sub/b"]);
    assert!(listed.iter().all(|o| o.size == 1));
    assert!(listed[0].modified.elapsed().unwrap_or_default() < std::time::Duration::from_secs(600), "modification times are real");
}

pub mod testing {
    //! A fresh bucket per test on the S3-compatible server named by `BATCHD_TEST_S3_URL` (an
    //! endpoint such as `http://127.0.0.1:9000`; `scripts/s3-server.sh` starts one), with the
    //! keys of `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_REGION` (placeholders when
    //! unset, which an emulator accepts). Buckets are created with a signed `PUT` and left
    //! behind (an emulator keeps them in memory).

    use object_store::aws::{AmazonS3Builder, AwsAuthorizer, AwsCredential};

    use super::super::{backend, Blob, BlobUrl};

    /// The variable that enables the S3 tests.
    pub const ENV: &str = "BATCHD_TEST_S3_URL";

    pub struct TestBucket {
        pub endpoint: String,
        pub bucket: String,
        key_id: String,
        secret: String,
        region: String,
    }

    fn env_or(name: &str, default: &str) -> String {
        std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_string())
    }

    impl TestBucket {
        /// Creates a fresh bucket; `None` (after printing why) when `ENV` is unset.
        pub async fn create(test: &str) -> Option<TestBucket> {
            let Ok(endpoint) = std::env::var(ENV) else {
                eprintln!("skipping the S3 part of {test}: set {ENV}=http://HOST:PORT (an S3-compatible server) to run it");
                return None;
            };
            let bucket = format!("batchd-test-{}", crate::ids::batch_id().trim_start_matches("batch_").to_lowercase());
            let t = TestBucket {
                endpoint: endpoint.trim_end_matches('/').to_string(),
                bucket,
                key_id: env_or("AWS_ACCESS_KEY_ID", "test"),
                secret: env_or("AWS_SECRET_ACCESS_KEY", "test"),
                region: env_or("AWS_REGION", "us-east-1"),
            };
            t.create_bucket().await;
            Some(t)
        }

        async fn create_bucket(&self) {
            let url = format!("{}/{}", self.endpoint, self.bucket);
            let mut req = axum::http::Request::builder().method("PUT").uri(&url).body(object_store::client::HttpRequestBody::empty()).unwrap();
            let cred = AwsCredential { key_id: self.key_id.clone(), secret_key: self.secret.clone(), token: None };
            AwsAuthorizer::new(&cred, "s3", &self.region).authorize(&mut req, None);
            let mut put = reqwest::Client::new().put(&url);
            for (name, value) in req.headers() {
                put = put.header(name.as_str(), value.as_bytes());
            }
            let resp = put.send().await.unwrap_or_else(|e| panic!("cannot reach {ENV}={}: {e}", self.endpoint));
            let status = resp.status();
            assert!(status.is_success(), "creating bucket {}: {status} {}", self.bucket, resp.text().await.unwrap_or_default());
        }

        /// `s3://BUCKET/PREFIX`.
        pub fn url(&self, prefix: &str) -> BlobUrl {
            BlobUrl::S3 { bucket: self.bucket.clone(), prefix: prefix.to_string() }
        }

        /// The environment a `batchd` process needs to reach the bucket.
        pub fn env(&self) -> Vec<(&'static str, String)> {
            vec![
                ("AWS_ENDPOINT_URL", self.endpoint.clone()),
                ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
                ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
                ("AWS_REGION", self.region.clone()),
            ]
        }

        /// The bucket (under `prefix`) as this process's [`Blob`].
        pub fn blob(&self, prefix: &str) -> Blob {
            let builder = AmazonS3Builder::new()
                .with_endpoint(&self.endpoint)
                .with_access_key_id(&self.key_id)
                .with_secret_access_key(&self.secret)
                .with_region(&self.region);
            Blob::new(backend::s3(&self.bucket, prefix, builder).expect("an S3 client"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::TestBucket;
    use super::*;

    #[tokio::test]
    async fn conformance_local_directory() {
        let dir = tempfile::tempdir().unwrap();
        run_all(&Blob::local(dir.path()).unwrap()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_s3() {
        let Some(bucket) = TestBucket::create("conformance_s3").await else { return };
        run_all(&bucket.blob("")).await;
        // The same store under a prefix: keys stay relative to it, and nothing leaks outside.
        let prefixed = bucket.blob("tenant-data/v1");
        run_all(&prefixed).await;
        let root: Vec<String> = bucket.blob("").list("tenant-data").await.unwrap().into_iter().map(|o| o.key).collect();
        assert!(root.iter().all(|k| k.starts_with("tenant-data/v1/")), "{root:?}");
        assert!(root.contains(&"tenant-data/v1/listed/a".to_string()));
    }

    /// An S3 endpoint where nothing listens is `Unavailable` (the API answers 503, the engine
    /// waits), not a failure of the request.
    #[tokio::test]
    async fn unreachable_s3_is_unavailable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let builder = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(format!("http://127.0.0.1:{port}"))
            .with_access_key_id("k")
            .with_secret_access_key("s")
            .with_region("us-east-1");
        let blob = Blob::new(backend::s3("b", "", builder).unwrap());
        let err = blob.size("files/x").await.unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    }
}
