//! The frame scanners on the data path, against redis-protocol's decoders as a baseline:
//! a pipeline of 16 GET/SET commands (requests) and their replies, and a 16 KiB value; and
//! the ledger's bookkeeping for the same pipeline.
//!
//! `cargo bench --bench scan`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use geoproxy::resp::command::{classify, Kind};
use geoproxy::resp::reply::ReplyScanner;
use geoproxy::resp::request::RequestScanner;
use geoproxy::session::ledger::{Command, Ledger};

fn pipeline() -> Vec<u8> {
    let mut buf = Vec::new();
    for i in 0..16 {
        let key = format!("key:{i:012}");
        if i % 2 == 0 {
            buf.extend(
                format!(
                    "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n$3\r\nxxx\r\n",
                    key.len()
                )
                .bytes(),
            );
        } else {
            buf.extend(format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).bytes());
        }
    }
    buf
}

fn replies(value: usize) -> Vec<u8> {
    let mut buf = Vec::new();
    for i in 0..16 {
        if i % 2 == 0 {
            buf.extend_from_slice(b"+OK\r\n");
        } else {
            buf.extend(format!("${value}\r\n").bytes());
            buf.extend(std::iter::repeat_n(b'x', value));
            buf.extend_from_slice(b"\r\n");
        }
    }
    buf
}

fn requests(c: &mut Criterion) {
    let buf = pipeline();
    let mut g = c.benchmark_group("requests");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("geoproxy", |b| {
        b.iter(|| {
            let mut scanner = RequestScanner::default();
            let (mut at, mut n) = (0, 0);
            while let Ok(Some(f)) = scanner.next(&buf[at..]) {
                n += usize::from(classify(&buf[at..][f.name.clone()]) == Kind::Plain);
                at += f.len;
            }
            (at, n)
        })
    });
    g.bench_function("redis-protocol", |b| {
        b.iter(|| {
            let mut at = 0;
            while let Ok(Some((_, len))) = redis_protocol::resp2::decode::decode_range(&buf[at..]) {
                at += len;
            }
            at
        })
    });
    g.finish();
}

fn reply_streams(c: &mut Criterion) {
    let mut g = c.benchmark_group("replies");
    for value in [3usize, 16 * 1024] {
        let buf = replies(value);
        g.throughput(Throughput::Bytes(buf.len() as u64));
        g.bench_with_input(BenchmarkId::new("geoproxy", value), &buf, |b, buf| {
            b.iter(|| {
                let mut n = 0;
                let used = ReplyScanner::default().scan(buf, |_| n += 1).unwrap();
                (used, n)
            })
        });
        g.bench_with_input(BenchmarkId::new("redis-protocol", value), &buf, |b, buf| {
            b.iter(|| {
                let mut at = 0;
                while let Ok(Some((_, len))) =
                    redis_protocol::resp2::decode::decode_range(&buf[at..])
                {
                    at += len;
                }
                at
            })
        });
    }
    g.finish();
}

/// The session's bookkeeping for a pipeline: 16 commands recorded, their 16 replies
/// placed (the ledger's whole cost per batch, without I/O).
fn ledger(c: &mut Criterion) {
    let buf = replies(3);
    let mut g = c.benchmark_group("ledger");
    g.throughput(Throughput::Elements(16));
    g.bench_function("16 commands and replies", |b| {
        let mut ledger = Ledger::default();
        b.iter(|| {
            for _ in 0..16 {
                ledger.sent(Command {
                    kind: Kind::Plain,
                    args: &[],
                    retry: None,
                    answer: None,
                });
            }
            ReplyScanner::default()
                .scan(&buf, |r| {
                    ledger.frame(r);
                })
                .unwrap();
            ledger.in_flight()
        })
    });
    g.finish();
}

criterion_group!(benches, requests, reply_streams, ledger);
criterion_main!(benches);
