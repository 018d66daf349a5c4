//! Session tests that need no member: the pump's own behaviour with the control path gone.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Context, Session};
use crate::member::{Members, Roster};
use crate::metrics::Metrics;
use crate::router::Route;

/// CPU time (user + system, in clock ticks of 10 ms) of the calling thread so far.
fn thread_cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("Linux /proc");
    // Fields after the command name (which ends with ')'): utime is the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// A router that ends (a bug, or shutdown ordering) must leave sessions on their last
/// route, not spinning on a closed channel.
#[test]
fn a_session_does_not_spin_when_the_router_is_gone() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ticks = runtime.block_on(async {
        let members = Roster::new(Members::new(
            &[],
            Default::default(),
            &[],
            false,
            Instant::now(),
        ));
        let ctx = Arc::new(Context {
            members,
            history: Default::default(),
            metrics: Metrics::new(prometheus::Registry::new()),
            reply_timeout: Duration::from_secs(5),
            unavailable_timeout: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(1),
            oom_refuses: false,
            retry_reads: false,
            client_idle_timeout: None,
            query_buffer_limit: 1 << 30,
            rules: Default::default(),
            fence: None,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (route_tx, route_rx) = watch::channel(Route::default());
        drop(route_tx);
        let session = Session::new(ctx, crate::stream::Stream::Tcp(server), route_rx, None);
        tokio::spawn(session.run(CancellationToken::new()));
        let before = thread_cpu_ticks();
        // The session still serves: no member, so the proxy's own error, in time.
        client.write_all(b"PING\r\n").await.unwrap();
        let mut reply = [0u8; 13];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"-UNAVAILABLE ");
        tokio::time::sleep(Duration::from_millis(500)).await;
        thread_cpu_ticks() - before
    });
    // A spinning session would burn all of the 600 ms on this thread.
    assert!(
        ticks < 20,
        "{ticks} ticks of CPU in 600 ms of an idle session"
    );
}

#[test]
fn answered_lines_are_found_and_replaced_in_place() {
    let data = b"+OK\r\n+QUEUED\r\n-ERR member's own\r\n-ERR other\r\n:1\r\n";
    let first = data.len() - b"-ERR member's own\r\n-ERR other\r\n:1\r\n".len();
    let second = data.len() - b"-ERR other\r\n:1\r\n".len();
    let third = data.len() - b":1\r\n".len();
    assert_eq!(super::line_start(data, second), first);
    assert_eq!(super::line_start(data, third), second);
    assert_eq!(super::line_start(b"-ERR x\r\n", 8), 0);
    let out = super::splice(
        data,
        vec![
            (first..second, Box::from(&b"-ERR a\r\n"[..])),
            (second..third, Box::from(&b"-ERR b\r\n"[..])),
        ],
    );
    assert_eq!(out, b"+OK\r\n+QUEUED\r\n-ERR a\r\n-ERR b\r\n:1\r\n");
}
