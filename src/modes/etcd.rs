//! The few etcd v3 calls an election needs, through etcd's JSON gateway (`/v3/...`, keys and
//! values in base64): grant and renew a lease, take a key only if nobody holds it, read and
//! write a key, revoke. Written here on top of reqwest (already a dependency for the Redis
//! Software API): the `etcd-client` crate speaks gRPC and needs `protoc` at build time,
//! which the README's two commands and the Dockerfile would then have to install.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde_json::{json, Value};

/// An etcd cluster, reached at the first of its endpoints that answers.
#[derive(Clone)]
pub struct Etcd {
    endpoints: Vec<String>,
    http: reqwest::Client,
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("no etcd endpoint answered: {0}")]
    Unreachable(String),
    #[error("etcd answered {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("etcd answered something unexpected: {0}")]
    Unexpected(String),
}

/// The outcome of trying to take the leader key.
#[derive(Debug, PartialEq, Eq)]
pub enum Campaign {
    /// Taken under the lease; the route key's value, if there is one.
    Won { route: Option<String> },
    /// Someone holds it (their value).
    Held { by: String },
}

impl Etcd {
    /// `timeout` bounds every request (a partition must not hold an election step).
    pub fn new(endpoints: Vec<String>, timeout: Duration) -> Etcd {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .unwrap_or_default();
        Etcd { endpoints, http }
    }

    async fn call(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        let mut last = String::from("no endpoints");
        for endpoint in &self.endpoints {
            let sent = self
                .http
                .post(format!("{endpoint}{path}"))
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await;
            let response = match sent {
                Ok(r) => r,
                Err(e) => {
                    last = format!("{endpoint}: {e}");
                    continue;
                }
            };
            let status = response.status().as_u16();
            let text = response
                .text()
                .await
                .map_err(|e| EtcdError::Unreachable(format!("{endpoint}: {e}")))?;
            if status != 200 {
                return Err(EtcdError::Refused { status, body: text });
            }
            return serde_json::from_str(&text).map_err(|_| EtcdError::Unexpected(text));
        }
        Err(EtcdError::Unreachable(last))
    }

    /// A new lease of `ttl` (whole seconds); its id.
    pub async fn grant(&self, ttl: Duration) -> Result<String, EtcdError> {
        let reply = self
            .call("/v3/lease/grant", json!({ "TTL": ttl.as_secs().max(1) }))
            .await?;
        reply["ID"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| EtcdError::Unexpected(reply.to_string()))
    }

    /// Renews a lease; false when etcd no longer has it (expired or revoked).
    pub async fn keep_alive(&self, lease: &str) -> Result<bool, EtcdError> {
        let reply = self
            .call("/v3/lease/keepalive", json!({ "ID": lease }))
            .await?;
        let ttl = reply["result"]["TTL"]
            .as_str()
            .and_then(|t| t.parse::<i64>().ok())
            .unwrap_or(0);
        Ok(ttl > 0)
    }

    pub async fn revoke(&self, lease: &str) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", json!({ "ID": lease }))
            .await
            .map(|_| ())
    }

    /// Puts `value` at `key` under `lease` if nobody holds `key`, and reads `route_key` in
    /// the same transaction.
    pub async fn campaign(
        &self,
        key: &str,
        value: &str,
        lease: &str,
        route_key: &str,
    ) -> Result<Campaign, EtcdError> {
        let body = json!({
            "compare": [{ "key": b64(key), "target": "CREATE", "create_revision": "0" }],
            "success": [
                { "requestPut": { "key": b64(key), "value": b64(value), "lease": lease } },
                { "requestRange": { "key": b64(route_key) } }
            ],
            "failure": [{ "requestRange": { "key": b64(key) } }]
        });
        let reply = self.call("/v3/kv/txn", body).await?;
        let responses = reply["responses"].as_array().cloned().unwrap_or_default();
        let value_of = |i: usize| {
            responses
                .get(i)
                .and_then(|r| r["response_range"]["kvs"][0]["value"].as_str())
                .and_then(unb64)
        };
        if reply["succeeded"].as_bool() == Some(true) {
            Ok(Campaign::Won { route: value_of(1) })
        } else {
            Ok(Campaign::Held {
                by: value_of(0).unwrap_or_default(),
            })
        }
    }

    /// Puts `value` at `key` if `guard` still holds `guard_value` (this proxy still leads).
    pub async fn put_if(
        &self,
        key: &str,
        value: &str,
        guard: &str,
        guard_value: &str,
    ) -> Result<bool, EtcdError> {
        let body = json!({
            "compare": [{ "key": b64(guard), "target": "VALUE", "result": "EQUAL", "value": b64(guard_value) }],
            "success": [{ "requestPut": { "key": b64(key), "value": b64(value) } }]
        });
        let reply = self.call("/v3/kv/txn", body).await?;
        Ok(reply["succeeded"].as_bool() == Some(true))
    }

    /// Puts `value` at `key` under `lease`.
    pub async fn put(&self, key: &str, value: &str, lease: &str) -> Result<(), EtcdError> {
        let body = json!({ "key": b64(key), "value": b64(value), "lease": lease });
        self.call("/v3/kv/put", body).await.map(|_| ())
    }

    /// Every value under `prefix`, with its key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, String)>, EtcdError> {
        // The range end is the prefix with its last byte plus one (etcd's prefix idiom).
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let body = json!({ "key": b64(prefix), "range_end": BASE64.encode(&end) });
        let reply = self.call("/v3/kv/range", body).await?;
        let kvs = reply["kvs"].as_array().cloned().unwrap_or_default();
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                let key = unb64(kv["key"].as_str()?)?;
                let value = kv["value"].as_str().and_then(unb64).unwrap_or_default();
                Some((key, value))
            })
            .collect())
    }

    /// The value at `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<String>, EtcdError> {
        let reply = self
            .call("/v3/kv/range", json!({ "key": b64(key) }))
            .await?;
        Ok(reply["kvs"][0]["value"].as_str().and_then(unb64))
    }
}

fn b64(text: &str) -> String {
    BASE64.encode(text)
}

fn unb64(text: &str) -> Option<String> {
    String::from_utf8(BASE64.decode(text).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_as_rfc_4648_says() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
            ("/gp/leader", "L2dwL2xlYWRlcg=="),
        ] {
            assert_eq!(b64(plain), encoded);
            assert_eq!(unb64(encoded).as_deref(), Some(plain));
        }
    }
}
