//! A client's socket as hyper uses it, watched: each read or write that moves a byte marks
//! the connection active (for the idle timeout), each completed flush may end an exchange
//! (see [`super::crowd::Phase`]), and an answer hyper writes while no request is being served
//! — its own answer to a head it could not parse — is replaced by batchd's
//! ([`super::refusal`]).

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::crowd::{Conn, Phase};

pub struct Watched {
    pub inner: TcpStream,
    conn: Arc<Conn>,
    /// batchd's answer in place of hyper's, and how much of it is written.
    replacing: Option<(Vec<u8>, usize)>,
}

impl Watched {
    pub fn new(inner: TcpStream, conn: Arc<Conn>) -> Watched {
        Watched { inner, conn, replacing: None }
    }

    /// Takes over what hyper writes when it is its own answer to an unparsable request:
    /// hyper is told its bytes are written, and batchd's answer goes out in their place.
    fn intercept(&mut self, first: &[u8]) -> bool {
        if self.replacing.is_some() {
            return true;
        }
        if self.conn.phase() != Phase::Waiting {
            return false;
        }
        match super::refusal::replacement(first) {
            Some(answer) => {
                self.replacing = Some((answer, 0));
                true
            }
            None => false,
        }
    }

    /// Writes what is left of the replacing answer.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while let Some((answer, done)) = self.replacing.as_mut().filter(|(a, d)| *d < a.len()) {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &answer[*done..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            *done += n;
            self.conn.touch();
        }
        Poll::Ready(Ok(()))
    }

    fn wrote(&self, r: &Poll<std::io::Result<usize>>) {
        if matches!(r, Poll::Ready(Ok(n)) if *n > 0) {
            self.conn.touch();
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.conn.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        if self.intercept(data) {
            return Poll::Ready(Ok(data.len()));
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        self.wrote(&r);
        r
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
        if self.intercept(first) {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_replacement(cx))?;
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.conn.flushed();
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_replacement(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
