//! A real application client other than redis-rs: a redis-py script (pipelines, a
//! transaction, pub/sub) across a failover. `scripts/test.sh` installs redis-py.

use std::process::Command;
use std::time::Duration;

use crate::support::proxy::{Options, Proxy};
use crate::support::redis_server::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_pipelines_transactions_and_pubsub_across_a_failover() {
    let import = Command::new("python3")
        .args(["-c", "import redis"])
        .status();
    assert!(
        import.is_ok_and(|s| s.success()),
        "python3 with redis-py is needed: python3 -m pip install redis (scripts/test.sh does)"
    );
    let east = RedisServer::start();
    let west = RedisServer::start();
    let options = Options {
        failback_after: "60s",
        ..Options::default()
    };
    let members = [("us-east", east.addr()), ("eu-west", west.addr())];
    let proxy = Proxy::start(&members, options).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/failover_scenario.py");
    let args = [
        script.to_string(),
        proxy.addr.port().to_string(),
        east.port().to_string(),
        west.port().to_string(),
    ];
    let run = tokio::process::Command::new("python3")
        .args(&args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the scenario finishes within 60 s")
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("PASS"),
        "redis-py scenario failed:\n{stdout}\n{stderr}"
    );
    assert_eq!(proxy.active_member().await.as_deref(), Some("eu-west"));
}
