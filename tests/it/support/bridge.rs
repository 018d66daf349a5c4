//! Active-Active replication of pub/sub, played between plain `redis-server` members: the
//! bridge subscribes to every member (`PSUBSCRIBE geoproxy:*`) and re-publishes each message
//! that first appeared on one member on the others, after a delay and unless the direction
//! is cut. A message is forwarded once, from where it first appeared: its copies on the
//! other members are recognized and not sent back.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// What happens to messages from one member to another.
#[derive(Clone, Copy, Debug, Default)]
struct Direction {
    delay: Duration,
    cut: bool,
}

struct Shared {
    /// `[from][to]`.
    directions: Vec<Vec<Direction>>,
    /// `(channel, payload)` of every message seen, so copies are not forwarded again.
    seen: HashSet<(Vec<u8>, Vec<u8>)>,
}

pub struct Bridge {
    shared: Arc<Mutex<Shared>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Bridge {
    /// Bridges the members at `addrs` (`host:port`), forwarding at once both ways.
    pub async fn start(addrs: &[String]) -> Bridge {
        let n = addrs.len();
        let shared = Arc::new(Mutex::new(Shared {
            directions: vec![vec![Direction::default(); n]; n],
            seen: HashSet::new(),
        }));
        let mut tasks = Vec::new();
        for from in 0..n {
            let mut sub = TcpStream::connect(&addrs[from])
                .await
                .expect("bridge connects");
            sub.write_all(b"*2\r\n$10\r\nPSUBSCRIBE\r\n$10\r\ngeoproxy:*\r\n")
                .await
                .expect("PSUBSCRIBE");
            // Subscribed before the bridge is said to be up.
            let mut buf = BytesMut::new();
            next_frame(&mut sub, &mut buf)
                .await
                .expect("PSUBSCRIBE confirmed");
            let (shared, addrs) = (shared.clone(), addrs.to_vec());
            tasks.push(tokio::spawn(async move {
                loop {
                    let Some(frame) = next_frame(&mut sub, &mut buf).await else {
                        return;
                    };
                    // pmessage, pattern, channel, payload
                    let OwnedFrame::Array(parts) = frame else {
                        continue;
                    };
                    let [OwnedFrame::BulkString(kind), _, OwnedFrame::BulkString(channel), OwnedFrame::BulkString(payload)] =
                        &parts[..]
                    else {
                        continue;
                    };
                    if kind != b"pmessage" {
                        continue;
                    }
                    let targets: Vec<(usize, Direction)> = {
                        let mut s = shared.lock().unwrap();
                        if !s.seen.insert((channel.clone(), payload.clone())) {
                            continue; // a copy the bridge put there
                        }
                        (0..addrs.len())
                            .filter(|&to| to != from)
                            .map(|to| (to, s.directions[from][to]))
                            .filter(|(_, d)| !d.cut)
                            .collect()
                    };
                    for (to, d) in targets {
                        let (addr, channel, payload) =
                            (addrs[to].clone(), channel.clone(), payload.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(d.delay).await;
                            publish(&addr, &channel, &payload).await;
                        });
                    }
                }
            }));
        }
        Bridge { shared, tasks }
    }

    /// Stops (`true`) or resumes forwarding from member `from` to member `to`.
    pub fn cut(&self, from: usize, to: usize, cut: bool) {
        self.shared.lock().unwrap().directions[from][to].cut = cut;
    }

    /// Messages seen so far (each once, wherever it first appeared).
    pub fn seen(&self) -> usize {
        self.shared.lock().unwrap().seen.len()
    }

    /// Delays messages from `from` to `to`.
    pub fn delay(&self, from: usize, to: usize, delay: Duration) {
        self.shared.lock().unwrap().directions[from][to].delay = delay;
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn next_frame(conn: &mut TcpStream, buf: &mut BytesMut) -> Option<OwnedFrame> {
    loop {
        if let Ok(Some((frame, used))) = decode(buf) {
            let _ = buf.split_to(used);
            return Some(frame);
        }
        if conn.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

/// `PUBLISH channel payload` on a connection of its own (a member being gone is fine).
async fn publish(addr: &str, channel: &[u8], payload: &[u8]) {
    let Ok(mut conn) = TcpStream::connect(addr).await else {
        return;
    };
    let mut command = format!("*3\r\n$7\r\nPUBLISH\r\n${}\r\n", channel.len()).into_bytes();
    command.extend_from_slice(channel);
    command.extend_from_slice(format!("\r\n${}\r\n", payload.len()).as_bytes());
    command.extend_from_slice(payload);
    command.extend_from_slice(b"\r\n");
    if conn.write_all(&command).await.is_ok() {
        let mut buf = BytesMut::new();
        let _ = next_frame(&mut conn, &mut buf).await;
    }
}
