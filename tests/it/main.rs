//! The `it` integration-test binary: real `redis-server` members, geoproxy in-process, a
//! real client (redis-rs) or raw RESP bytes at the edge. Shared fixtures in `support`.

mod failover;
mod support;
mod support_selftest;
mod transparency;
