//! A connection on either side of the proxy: plain TCP, TLS (to a member: the proxy is the
//! TLS client; from a client: the proxy is the TLS server), or a unix socket from a client.
//! Sessions, upstreams and health checks hold a [`Stream`] and do not care which.
//!
//! TLS buffers what is written: every write that must reach the peer now goes through
//! [`Stream::send`] (write, then flush). For TCP the flush costs nothing.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::{client, server};

#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    /// To a member with `tls = true`.
    TlsToMember(Box<client::TlsStream<TcpStream>>),
    /// From a client of the TLS listener (`[proxy.tls]`).
    TlsFromClient(Box<server::TlsStream<TcpStream>>),
    /// From a client of the unix socket (`proxy.unixsocket`).
    Unix(UnixStream),
}

impl Stream {
    /// Writes all of `buf` and flushes it to the socket.
    pub async fn send(&mut self, buf: &[u8]) -> io::Result<()> {
        self.write_all(buf).await?;
        self.flush().await
    }

    /// Writes what the socket takes now without waiting (`WouldBlock` when it takes
    /// nothing). The fast path of a batch: when it takes everything, no timer is armed.
    pub fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_write(buf),
            Stream::Unix(s) => s.try_write(buf),
            // A TLS stream encrypts into its own buffer first: poll it once. The waker is
            // replaced by the real one at the next wait; `try_flush` pushes the rest out.
            tls => match Pin::new(tls).poll_write(&mut Context::from_waker(Waker::noop()), buf) {
                Poll::Ready(r) => r,
                Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
            },
        }
    }

    /// Pushes out what TLS still buffers without waiting; true when nothing is left (always,
    /// for plain sockets). The fast path's second half after [`Stream::try_write`].
    pub fn try_flush(&mut self) -> bool {
        match self {
            Stream::Tcp(_) | Stream::Unix(_) => true,
            tls => matches!(
                Pin::new(tls).poll_flush(&mut Context::from_waker(Waker::noop())),
                Poll::Ready(Ok(()))
            ),
        }
    }

    /// Reads into `buf`, taking `size` more bytes of room only once there is something to
    /// read: a connection that waits holds no read buffer (thousands of idle clients are
    /// the common case, and each buffer would be 16 KiB or more). TLS reads through its
    /// own buffered plaintext, so it takes the room first.
    pub async fn read_when_ready(&mut self, buf: &mut BytesMut, size: usize) -> io::Result<usize> {
        let room = |buf: &mut BytesMut| {
            if buf.capacity() - buf.len() < size / 4 {
                buf.reserve(size);
            }
        };
        loop {
            let read = match self {
                Stream::Tcp(s) => {
                    s.readable().await?;
                    room(buf);
                    read_now(s, buf)
                }
                Stream::Unix(s) => {
                    s.readable().await?;
                    room(buf);
                    read_now(s, buf)
                }
                tls => {
                    room(buf);
                    return tls.read_buf(buf).await;
                }
            };
            match read {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    /// Is the connection still open with nothing to read (a kept idle connection that the
    /// peer has not closed)? Never waits.
    pub fn is_idle(&mut self) -> bool {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        let waker = Waker::noop();
        matches!(
            Pin::new(self).poll_read(&mut Context::from_waker(waker), &mut buf),
            Poll::Pending
        )
    }
}

/// One read of a socket that tokio says is readable, without waiting. Through `poll_read`
/// rather than `try_read_buf`: tokio's `poll_read` clears the readiness itself when a read
/// leaves room in the buffer (the receive queue is empty then), where `try_read_buf` leaves
/// that to a second read that finds nothing, which would be one more system call on every
/// request.
fn read_now<S: AsyncRead + Unpin>(socket: &mut S, buf: &mut BytesMut) -> io::Result<usize> {
    let mut cx = Context::from_waker(Waker::noop());
    match tokio_util::io::poll_read_buf(Pin::new(socket), &mut cx, buf) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::TlsToMember(s) => Pin::new(s).poll_read(cx, buf),
            Stream::TlsFromClient(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::TlsToMember(s) => Pin::new(s).poll_write(cx, buf),
            Stream::TlsFromClient(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::TlsToMember(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::TlsFromClient(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::TlsToMember(s) => s.is_write_vectored(),
            Stream::TlsFromClient(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::TlsToMember(s) => Pin::new(s).poll_flush(cx),
            Stream::TlsFromClient(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::TlsToMember(s) => Pin::new(s).poll_shutdown(cx),
            Stream::TlsFromClient(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
