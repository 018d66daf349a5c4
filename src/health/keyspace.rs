//! The keyspace check: every shard of the member takes a write and reads it back.
//!
//! One key per shard: `SET <key> <token> PX <ttl>` then `GET <key>`, where the key's hash
//! tag puts it in that shard's slots (16384 slots split evenly over `shards`, as Redis
//! Software splits them). A member that refuses writes (`-OOM`, `-READONLY`), lost a shard,
//! or answers with another value fails. Keys name this proxy process and the member, so
//! neither other proxies nor the member's own replicas of another member's check can answer
//! for it.
//!
//! Cost: every run writes `shards` small keys that replicate to every member of the
//! Active-Active database; with P proxies and M members that is P x M x shards writes per
//! interval, each expiring after `ttl`.

use std::time::Duration;

use crate::stream::Stream;
use bytes::BytesMut;

use super::check::Check;
use super::ping::{open, request, within};
use crate::config::{HealthConfig, KeyspaceConfig};
use crate::member::Member;
use crate::upstream::error_line;

/// Slots of a Redis cluster.
const SLOTS: u32 = 16384;

pub struct KeyspaceCheck {
    /// The hash tag of each shard.
    tags: Vec<String>,
    ttl: Duration,
    connect_timeout: Duration,
    timeout: Duration,
    conn: Option<Stream>,
    buf: BytesMut,
}

impl KeyspaceCheck {
    pub fn new(health: &HealthConfig, config: &KeyspaceConfig) -> KeyspaceCheck {
        KeyspaceCheck {
            tags: shard_tags(config.shards),
            ttl: config.ttl,
            connect_timeout: health.connect_timeout,
            timeout: config.timing.timeout,
            conn: None,
            buf: BytesMut::new(),
        }
    }

    async fn write_and_read(&mut self, member: &Member) -> Result<(), String> {
        let conn = self.conn.as_mut().ok_or("no connection")?;
        let token = format!("{:016x}", rand::random::<u64>());
        let px = self.ttl.as_millis().max(1).to_string();
        for tag in &self.tags {
            let key = format!(
                "geoproxy:keyspace:{{{tag}}}:{}:{}",
                crate::instance_id(),
                member.id()
            );
            let set = [
                b"SET".as_ref(),
                key.as_bytes(),
                token.as_bytes(),
                b"PX",
                px.as_bytes(),
            ];
            let reply = request(conn, &mut self.buf, &set.map(<[u8]>::to_vec)).await?;
            if &reply[..] != b"+OK\r\n" {
                return Err(format!("SET {key} answered: {}", error_line(&reply)));
            }
            let get = [b"GET".as_ref(), key.as_bytes()];
            let reply = request(conn, &mut self.buf, &get.map(<[u8]>::to_vec)).await?;
            let want = format!("${}\r\n{token}\r\n", token.len());
            if reply[..] != *want.as_bytes() {
                return Err(format!(
                    "GET {key} answered {:?}, not the value just written",
                    String::from_utf8_lossy(&reply).trim_end()
                ));
            }
        }
        Ok(())
    }
}

impl Check for KeyspaceCheck {
    async fn run(&mut self, member: &Member) -> Result<(), String> {
        if self.conn.is_none() {
            let conn = open(&member.config, &mut self.buf, self.connect_timeout).await?;
            self.conn = Some(conn);
        }
        let limit = self.timeout;
        let checked = within(limit, "keyspace check", "health.keyspace.timeout", async {
            self.write_and_read(member).await
        })
        .await;
        if checked.is_err() {
            // A late reply must never be read as the next check's answer.
            self.conn = None;
            self.buf.clear();
        }
        checked
    }
}

/// One hash tag per shard, each landing near the middle of its shard's slot range, so a
/// split that rounds its boundaries differently still puts it in that shard.
pub fn shard_tags(shards: u16) -> Vec<String> {
    let n = u32::from(shards.max(1));
    (0..n)
        .map(|i| {
            let (lo, hi) = (i * SLOTS / n, (i + 1) * SLOTS / n);
            let middle = (lo + hi) / 2;
            (0..100_000u32)
                .map(|t| t.to_string())
                .min_by_key(|t| {
                    let slot = u32::from(redis_protocol::redis_keyslot(t.as_bytes()));
                    slot.abs_diff(middle)
                })
                .expect("candidates are not empty")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_tag_lands_in_its_shard() {
        for shards in [1u16, 2, 3, 7, 16] {
            let tags = shard_tags(shards);
            assert_eq!(tags.len(), usize::from(shards));
            for (i, tag) in tags.iter().enumerate() {
                let slot = u32::from(redis_protocol::redis_keyslot(tag.as_bytes()));
                let (i, n) = (i as u32, u32::from(shards));
                let (lo, hi) = (i * SLOTS / n, (i + 1) * SLOTS / n);
                assert!(
                    (lo..hi).contains(&slot),
                    "{shards} shards: tag {tag} has slot {slot}, not in {lo}..{hi}"
                );
                // Within the middle half: robust to a split rounded another way.
                assert!(slot.abs_diff((lo + hi) / 2) <= (hi - lo) / 4);
            }
        }
        // A hash tag is what Redis hashes: the key's slot is the tag's.
        let key = format!("geoproxy:keyspace:{{{}}}:x:y", shard_tags(2)[1]);
        assert!(redis_protocol::redis_keyslot(key.as_bytes()) >= 8192);
    }
}
