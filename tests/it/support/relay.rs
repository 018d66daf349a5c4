//! Owns a fault-injecting TCP relay that sits between the proxy and one
//! member, to play a far region (latency), a partition (black hole) or a
//! crash (reset). Faults apply at once to existing and new connections.

use std::future::pending;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::{sleep_until, Instant};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// Plain forwarding both ways.
    None,
    /// Every chunk read in either direction is delivered this much later, in order; a new
    /// connection reaches the target this much later (a far region's handshake).
    Latency(Duration),
    /// Nothing flows; sockets stay open. New connections are accepted and held
    /// without ever reaching the target. Connections that saw a black hole stay
    /// dead even after switching back (only `Reset` or dropping the relay ends them).
    BlackHole,
    /// Existing connections are closed with RST; new ones are accepted and reset.
    Reset,
}

/// Connection tasks to abort on drop; `None` once the relay is dropped.
type Tasks = Arc<Mutex<Option<Vec<AbortHandle>>>>;

pub struct FaultRelay {
    addr: SocketAddr,
    fault: watch::Sender<Fault>,
    task: JoinHandle<()>,
    conns: Tasks,
}

impl FaultRelay {
    /// Listens on 127.0.0.1:0 and forwards each accepted connection to `target`.
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay local addr");
        let (fault, rx) = watch::channel(Fault::None);
        let conns: Tasks = Arc::new(Mutex::new(Some(Vec::new())));
        let task = tokio::spawn(accept_loop(listener, target.to_string(), rx, conns.clone()));
        FaultRelay {
            addr,
            fault,
            task,
            conns,
        }
    }

    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }
}

impl Drop for FaultRelay {
    fn drop(&mut self) {
        self.task.abort();
        let tasks = self.conns.lock().unwrap().take().unwrap_or_default();
        for task in tasks {
            task.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: String,
    fault: watch::Receiver<Fault>,
    conns: Tasks,
) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        let mut guard = conns.lock().unwrap();
        let Some(tasks) = guard.as_mut() else { return };
        let conn = tokio::spawn(serve(inbound, target.clone(), fault.clone()));
        tasks.retain(|t| !t.is_finished());
        tasks.push(conn.abort_handle());
    }
}

async fn serve(mut inbound: TcpStream, target: String, mut fault: watch::Receiver<Fault>) {
    let current = *fault.borrow_and_update();
    match current {
        Fault::Reset => return reset(&inbound),
        Fault::BlackHole => return hold(&[&inbound], fault).await,
        Fault::None | Fault::Latency(_) => {}
    }
    if let Fault::Latency(d) = current {
        tokio::time::sleep(d).await;
    }
    let Ok(mut outbound) = TcpStream::connect(&target).await else {
        return reset(&inbound);
    };
    let (up, down) = (fault.clone(), fault.clone());
    let broken = {
        let (client_r, client_w) = inbound.split();
        let (server_r, server_w) = outbound.split();
        let forward =
            async { tokio::join!(pipe(client_r, server_w, up), pipe(server_r, client_w, down)) };
        tokio::select! {
            _ = forward => return, // both sides closed normally
            broken = fault.wait_for(|f| matches!(f, Fault::BlackHole | Fault::Reset)) => {
                broken.map(|f| *f)
            }
        }
    };
    match broken {
        Ok(Fault::Reset) => {
            reset(&inbound);
            reset(&outbound);
        }
        Ok(_) => hold(&[&inbound, &outbound], fault).await,
        Err(_) => {} // relay gone
    }
}

/// Copies `from` to `to`, delaying each chunk by the latency in force when it
/// was read. Stops writing (without finishing) once a black hole or reset is set;
/// the caller then drops this future, discarding anything queued.
async fn pipe(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    fault: watch::Receiver<Fault>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer_fault = fault.clone();
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            let delay = match *fault.borrow() {
                Fault::Latency(d) => d,
                _ => Duration::ZERO,
            };
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
        // EOF: `tx` drops here; the writer drains the queue, then shuts down.
    };
    let write = async move {
        while let Some((at, chunk)) = rx.recv().await {
            sleep_until(at).await;
            if matches!(*writer_fault.borrow(), Fault::BlackHole | Fault::Reset) {
                pending::<()>().await;
            }
            if to.write_all(&chunk).await.is_err() {
                return; // drops `rx`, so the reader stops at its next chunk
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

/// Keeps the sockets open without reading or writing until a `Reset`.
async fn hold(streams: &[&TcpStream], mut fault: watch::Receiver<Fault>) {
    if fault.wait_for(|f| *f == Fault::Reset).await.is_ok() {
        for stream in streams {
            reset(stream);
        }
    }
}

/// Arms an RST for when the stream is dropped (SO_LINGER = 0).
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}
