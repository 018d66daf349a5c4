//! The `it` integration-test binary: real `redis-server` members, geoproxy in-process, a
//! real client (redis-rs) or raw RESP bytes at the edge. Shared fixtures in `support`.

mod binary;
mod checks;
mod commands;
mod decisions;
mod deploy;
mod differential;
mod failover;
mod limits;
mod modes;
mod multiplex;
mod network;
mod operations;
mod python;
mod reload;
mod security;
mod sessions;
mod support;
mod support_selftest;
mod transparency;
