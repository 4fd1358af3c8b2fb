//! File bytes: inputs, outputs and error files, behind [`object_store`].
//!
//! [`Blob`] is a thin wrapper over `Arc<dyn ObjectStore>` chosen at boot from a
//! [`BlobUrl`]: a local directory by default, or an S3-compatible bucket (`s3://bucket/prefix`,
//! configured by the usual `AWS_*` environment). The rest of the program never learns which.
//! Writes are streamed (multipart uploads on S3) and become visible only when
//! [`BlobWriter::finish`] completes, so a crash or an abort never leaves a half-written object
//! under its key; reads are ranged, [`READ_CHUNK`] at a time ([`REMOTE_READ_CHUNK`] on S3). Behaviour every backend shows
//! is checked by `conformance` (built for tests and the `test-support` feature).

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use tokio::io::AsyncWriteExt;

mod backend;
#[cfg(any(test, feature = "test-support"))]
pub mod conformance;

pub use backend::BlobUrl;

/// What a blob error carries: the object store's or the file system's own error.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A backend-neutral blob error; the store's own error stays attached as its source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("blob not found: {0}")]
    NotFound(String),
    #[error("blob store unavailable")]
    Unavailable(#[source] Cause),
    /// The blob store cannot write because its disk is full.
    #[error("blob store is out of space")]
    Full(#[source] Cause),
    #[error("blob store error")]
    Other(#[source] Cause),
}

impl From<object_store::Error> for Error {
    fn from(e: object_store::Error) -> Self {
        let class: fn(Cause) -> Error = match &e {
            object_store::Error::NotFound { path, .. } => return Error::NotFound(path.clone()),
            other if out_of_space(other) => Error::Full,
            other if backend::is_transient(other) => Error::Unavailable,
            _ => Error::Other,
        };
        class(Box::new(e))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::StorageFull || out_of_space(&e) {
            return Error::Full(Box::new(e));
        }
        Error::Unavailable(Box::new(e))
    }
}

/// Whether an error's cause chain holds an I/O error for a full disk (ENOSPC).
fn out_of_space(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull) {
            return true;
        }
        cur = err.source();
    }
    e.to_string().contains("No space left on device")
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Size of one ranged read when streaming an object from a local directory.
pub const READ_CHUNK: u64 = 1 << 20;
/// Size of one ranged read from an object store over the network, where every read is a
/// request with its own latency: fewer, larger reads (two in flight still hold only 8 MiB).
pub const REMOTE_READ_CHUNK: u64 = 4 << 20;
/// Buffer of a streaming upload before a part is sent: S3 and its kin refuse smaller parts.
pub const WRITE_BUFFER: usize = 5 << 20;
/// The same for a local directory, which takes parts of any size: less memory held while
/// an upload or a finalization streams.
pub const LOCAL_WRITE_BUFFER: usize = 1 << 20;

#[derive(Clone)]
pub struct Blob {
    store: Arc<dyn ObjectStore>,
    /// The directory of a local blob store (where interrupted uploads leave staging files).
    local_root: Option<Arc<Path>>,
    /// Bytes per ranged read when streaming ([`READ_CHUNK`] or [`REMOTE_READ_CHUNK`]).
    read_chunk: u64,
    /// Bytes of an upload part ([`WRITE_BUFFER`], or [`LOCAL_WRITE_BUFFER`] for a local
    /// directory, which takes any size).
    part: usize,
}

/// A stored object: its key and when it was last written.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    pub key: String,
    pub modified: std::time::SystemTime,
    pub size: u64,
}

impl Blob {
    /// A blob store in a local directory, created if missing.
    pub fn local(dir: &Path) -> Result<Blob> {
        std::fs::create_dir_all(dir)?;
        let root: Arc<Path> = std::fs::canonicalize(dir)?.into();
        Ok(Blob { store: Arc::new(LocalFileSystem::new_with_prefix(&root)?), local_root: Some(root), read_chunk: READ_CHUNK, part: LOCAL_WRITE_BUFFER })
    }

    /// A blob store over the network (S3), read [`REMOTE_READ_CHUNK`] at a time.
    pub fn new(store: Arc<dyn ObjectStore>) -> Blob {
        Blob { store, local_root: None, read_chunk: REMOTE_READ_CHUNK, part: WRITE_BUFFER }
    }

    /// Bytes per ranged read when this store streams an object.
    pub fn read_chunk(&self) -> u64 {
        self.read_chunk
    }

    /// The blob store a URL names (see [`BlobUrl`]).
    pub fn open(url: &BlobUrl) -> Result<Blob> {
        match url {
            BlobUrl::Local(dir) => Blob::local(dir),
            BlobUrl::S3 { bucket, prefix } => Ok(Blob::new(backend::s3(bucket, prefix, object_store::aws::AmazonS3Builder::from_env())?)),
        }
    }

    /// Every object under `prefix` (listing pages through the store; each entry is small).
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        use futures::TryStreamExt;
        let metas: Vec<_> = self.store.list(Some(&ObjectPath::from(prefix))).try_collect().await?;
        Ok(metas.into_iter().map(|m| ObjectInfo { key: m.location.to_string(), modified: m.last_modified.into(), size: m.size }).collect())
    }

    /// Removes what interrupted uploads left behind in a local blob directory: the staging
    /// files `NAME#N` of uploads that never finished (a crash mid-upload or mid-finalization),
    /// older than `min_age` (zero at the start of a process that owns the directory). An S3
    /// store keeps no such files here; its unfinished multipart uploads are removed by the
    /// bucket's `AbortIncompleteMultipartUpload` lifecycle rule (docs/deploy.md). Returns the
    /// bytes removed.
    pub fn sweep_staging(&self, min_age: std::time::Duration) -> Result<u64> {
        let Some(root) = &self.local_root else { return Ok(0) };
        let mut freed = 0;
        let mut dirs = vec![root.to_path_buf()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    dirs.push(entry.path());
                } else if is_staging(&entry.file_name().to_string_lossy()) && age(&meta) >= min_age && std::fs::remove_file(entry.path()).is_ok() {
                    freed += meta.len();
                }
            }
        }
        Ok(freed)
    }

    /// A streaming writer; nothing is visible under `key` until `finish`. It buffers at most
    /// one part ([`WRITE_BUFFER`], or [`LOCAL_WRITE_BUFFER`] for a local directory), with at
    /// most two more in flight.
    pub fn writer(&self, key: &str) -> BlobWriter {
        let inner = BufWriter::with_capacity(self.store.clone(), ObjectPath::from(key), self.part).with_max_concurrency(2);
        BlobWriter { inner, written: 0 }
    }

    /// Writes a whole object at once.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        self.store.put(&ObjectPath::from(key), bytes.into()).await?;
        Ok(())
    }

    /// Streams an object's bytes.
    pub async fn get_stream(&self, key: &str) -> Result<BoxStream<'static, Result<Bytes>>> {
        let size = self.size(key).await?;
        Ok(self.chunks(key, 0..size))
    }

    /// Streams a byte range of an object.
    pub async fn get_range_stream(&self, key: &str, range: Range<u64>) -> Result<BoxStream<'static, Result<Bytes>>> {
        Ok(self.chunks(key, range))
    }

    /// Reads a range as [`Blob::read_chunk`]-sized ranged reads, two in flight: large reads keep
    /// a local disk or an object store busy without holding more than two chunks.
    fn chunks(&self, key: &str, range: Range<u64>) -> BoxStream<'static, Result<Bytes>> {
        let (store, path) = (self.store.clone(), ObjectPath::from(key));
        let chunk = self.read_chunk;
        let starts = (range.start..range.end).step_by(chunk as usize);
        futures::stream::iter(starts)
            .map(move |start| {
                let (store, path) = (store.clone(), path.clone());
                let end = (start + chunk).min(range.end);
                async move { store.get_range(&path, start..end).await.map_err(Error::from) }
            })
            .buffered(2)
            .boxed()
    }

    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        Ok(self.store.get_range(&ObjectPath::from(key), range).await?)
    }

    pub async fn size(&self, key: &str) -> Result<u64> {
        Ok(self.store.head(&ObjectPath::from(key)).await?.size)
    }

    /// Deletes an object; a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// `NAME#DIGITS`: the staging file of an unfinished local upload (object_store's naming).
fn is_staging(name: &str) -> bool {
    name.rsplit_once('#').is_some_and(|(head, n)| !head.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn age(meta: &std::fs::Metadata) -> std::time::Duration {
    meta.modified().ok().and_then(|m| m.elapsed().ok()).unwrap_or_default()
}

/// A streaming upload. Dropping it without `finish` leaves nothing under the key.
pub struct BlobWriter {
    inner: BufWriter,
    written: u64,
}

impl BlobWriter {
    pub async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.inner.write_all(bytes).await?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Completes the upload and returns its size.
    pub async fn finish(mut self) -> Result<u64> {
        self.inner.shutdown().await?;
        Ok(self.written)
    }

    pub async fn abort(mut self) {
        if let Err(e) = self.inner.abort().await {
            tracing::warn!(error = %e, "aborting a blob upload failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    #[tokio::test]
    async fn write_read_range_delete() {
        let dir = tempfile::tempdir().unwrap();
        let blob = Blob::local(dir.path()).unwrap();
        let mut w = blob.writer("files/a");
        w.write(b"hello ").await.unwrap();
        w.write(b"world").await.unwrap();
        assert!(matches!(blob.size("files/a").await, Err(Error::NotFound(_))), "invisible before finish");
        assert_eq!(w.finish().await.unwrap(), 11);
        assert_eq!(blob.size("files/a").await.unwrap(), 11);
        assert_eq!(&blob.get_range("files/a", 6..11).await.unwrap()[..], b"world");
        let all: Vec<Bytes> = blob.get_stream("files/a").await.unwrap().try_collect().await.unwrap();
        assert_eq!(all.concat(), b"hello world");
        let big: Vec<u8> = (0..(READ_CHUNK * 2 + 17)).map(|i| (i % 251) as u8).collect();
        blob.put("files/big", Bytes::from(big.clone())).await.unwrap();
        let got: Vec<Bytes> = blob.get_stream("files/big").await.unwrap().try_collect().await.unwrap();
        assert_eq!(got.len(), 3, "read in chunks");
        assert_eq!(got.concat(), big);
        let part: Vec<Bytes> = blob.get_range_stream("files/big", 5..READ_CHUNK + 9).await.unwrap().try_collect().await.unwrap();
        assert_eq!(part.concat(), &big[5..(READ_CHUNK + 9) as usize]);
        blob.delete("files/a").await.unwrap();
        blob.delete("files/a").await.unwrap();
        assert!(matches!(blob.get_stream("files/a").await, Err(Error::NotFound(_))));
    }

    #[tokio::test]
    async fn staging_files_of_unfinished_uploads_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let blob = Blob::local(dir.path()).unwrap();
        blob.put("files/kept", Bytes::from_static(b"x")).await.unwrap();
        // What a crash mid-upload leaves: a staging file next to where the object would be.
        let mut w = blob.writer("files/crashed");
        w.write(&vec![1u8; WRITE_BUFFER + 10]).await.unwrap();
        std::mem::forget(w);
        std::fs::write(dir.path().join("files/other#12"), b"0123456789").unwrap();
        std::fs::write(dir.path().join("files/name#not-staging"), b"z").unwrap();
        assert_eq!(blob.sweep_staging(std::time::Duration::from_secs(3600)).unwrap(), 0, "recent staging files are kept");
        let freed = blob.sweep_staging(std::time::Duration::ZERO).unwrap();
        assert!(freed >= 10, "freed {freed}");
        let mut left: Vec<String> = std::fs::read_dir(dir.path().join("files")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["kept", "name#not-staging"]);
        let listed: Vec<String> = blob.list("files").await.unwrap().into_iter().map(|o| o.key).collect();
        assert!(listed.contains(&"files/kept".to_string()));
    }

    /// Errors are classified once and keep what caused them.
    #[test]
    fn errors_keep_their_source() {
        let full = Error::from(std::io::Error::from(std::io::ErrorKind::StorageFull));
        assert!(matches!(full, Error::Full(_)), "{full:?}");
        let io = std::error::Error::source(&full).and_then(|c| c.downcast_ref::<std::io::Error>());
        assert_eq!(io.map(|e| e.kind()), Some(std::io::ErrorKind::StorageFull));
        let missing = Error::from(object_store::Error::NotFound { path: "files/x".into(), source: "gone".into() });
        assert!(matches!(missing, Error::NotFound(ref p) if p == "files/x"), "{missing:?}");
        let other = Error::from(object_store::Error::NotImplemented);
        assert!(std::error::Error::source(&other).and_then(|c| c.downcast_ref::<object_store::Error>()).is_some(), "{other:?}");
    }

    #[tokio::test]
    async fn aborted_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let blob = Blob::local(dir.path()).unwrap();
        let mut w = blob.writer("files/b");
        w.write(&vec![7u8; 12 * 1024 * 1024]).await.unwrap();
        w.abort().await;
        assert!(matches!(blob.size("files/b").await, Err(Error::NotFound(_))));
    }
}
