//! File bytes: inputs, outputs and error files, behind [`object_store`].
//!
//! [`Blob`] is a thin wrapper over `Arc<dyn ObjectStore>` chosen at boot (a local directory
//! by default; an S3-compatible store slots in through the same constructor). Writes are
//! streamed and become visible only when [`BlobWriter::finish`] completes, so a crash or an
//! abort never leaves a half-written object under its key.

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

/// A backend-neutral blob error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("blob not found: {0}")]
    NotFound(String),
    #[error("blob store unavailable: {0}")]
    Unavailable(String),
    #[error("blob store error: {0}")]
    Other(String),
}

impl From<object_store::Error> for Error {
    fn from(e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { path, .. } => Error::NotFound(path),
            other => Error::Other(other.to_string()),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Unavailable(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Size of one ranged read when streaming an object.
pub const READ_CHUNK: u64 = 1 << 20;
/// Buffer of a streaming upload before a part is sent: S3 and its kin refuse smaller parts.
pub const WRITE_BUFFER: usize = 5 << 20;
/// The same for a local directory, which takes parts of any size: less memory held while
/// an upload or a finalization streams.
pub const LOCAL_WRITE_BUFFER: usize = 1 << 20;

#[derive(Clone)]
pub struct Blob {
    store: Arc<dyn ObjectStore>,
    part: usize,
}

impl Blob {
    /// A blob store in a local directory, created if missing.
    pub fn local(dir: &Path) -> Result<Blob> {
        std::fs::create_dir_all(dir)?;
        let store: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(dir)?);
        Ok(Blob { store, part: LOCAL_WRITE_BUFFER })
    }

    pub fn new(store: Arc<dyn ObjectStore>) -> Blob {
        Blob { store, part: WRITE_BUFFER }
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

    /// Reads a range as [`READ_CHUNK`]-sized ranged reads, two in flight: large reads keep
    /// a local disk or an object store busy without holding more than two chunks.
    fn chunks(&self, key: &str, range: Range<u64>) -> BoxStream<'static, Result<Bytes>> {
        let (store, path) = (self.store.clone(), ObjectPath::from(key));
        let starts = (range.start..range.end).step_by(READ_CHUNK as usize);
        futures::stream::iter(starts)
            .map(move |start| {
                let (store, path) = (store.clone(), path.clone());
                let end = (start + READ_CHUNK).min(range.end);
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
    async fn aborted_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let blob = Blob::local(dir.path()).unwrap();
        let mut w = blob.writer("files/b");
        w.write(&vec![7u8; 12 * 1024 * 1024]).await.unwrap();
        w.abort().await;
        assert!(matches!(blob.size("files/b").await, Err(Error::NotFound(_))));
    }
}
