//! The availability check: Redis Software's REST API says whether the member's database
//! endpoint can serve, the check Redis recommends for Active-Active failover.
//!
//! `GET https://HOST:9443/v1/local/bdbs/UID/endpoint/availability` (the node-local endpoint,
//! `endpoint = "local"`) or `GET .../v1/bdbs/UID/availability` (`"database"`), with HTTP
//! Basic auth. 200 is available; any other status, a timeout or a connection error is not,
//! and the JSON `error_code` (`no_quorum`, `bdb_unavailable`, ...) is kept for the log and
//! `/v1/status`. The lag-aware variant (`extend_check=lag&availability_lag_tolerance_ms=N`)
//! is the `lag` check: a sync check unless configured as health.
//!
//! The client is reqwest with rustls: a cluster's own CA file, or verification off for a
//! self-signed cluster (logged as a warning at start).

use std::error::Error as _;

use reqwest::{Client, StatusCode};
use serde::Deserialize;

use super::check::Check;
use crate::config::{ApiEndpoint, AvailabilityConfig, Secret};
use crate::member::Member;

pub struct AvailabilityCheck {
    client: Client,
    endpoint: ApiEndpoint,
    username: Option<String>,
    password: Option<Secret>,
    /// `availability_lag_tolerance_ms`, for the lag-aware request.
    lag_tolerance_ms: Option<u128>,
}

/// An error body, as Redis Software documents it.
#[derive(Deserialize)]
struct ApiError {
    error_code: Option<String>,
    description: Option<String>,
}

impl AvailabilityCheck {
    /// The plain check, or with `lag` the lag-aware one.
    pub fn new(config: &AvailabilityConfig, lag: bool) -> anyhow::Result<AvailabilityCheck> {
        let timing = match (&config.lag, lag) {
            (Some(l), true) => l.timing,
            _ => config.timing,
        };
        let mut builder = Client::builder()
            .use_rustls_tls()
            .timeout(timing.timeout)
            .connect_timeout(timing.timeout)
            .pool_max_idle_per_host(1);
        if let Some(pem) = &config.ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        if !config.verify_tls {
            builder = builder.danger_accept_invalid_certs(true);
        }
        Ok(AvailabilityCheck {
            client: builder.build()?,
            endpoint: config.endpoint,
            username: config.username.clone(),
            password: config.password.clone(),
            lag_tolerance_ms: config
                .lag
                .as_ref()
                .filter(|_| lag)
                .map(|l| l.tolerance.as_millis()),
        })
    }

    fn url(&self, member: &Member) -> Result<String, String> {
        let (Some(api), Some(uid)) = (&member.config.api, member.config.bdb) else {
            return Err("the member has no api and bdb".into());
        };
        let api = api.trim_end_matches('/');
        let mut url = match self.endpoint {
            ApiEndpoint::Local => format!("{api}/v1/local/bdbs/{uid}/endpoint/availability"),
            ApiEndpoint::Database => format!("{api}/v1/bdbs/{uid}/availability"),
        };
        if let Some(ms) = self.lag_tolerance_ms {
            url.push_str(&format!(
                "?extend_check=lag&availability_lag_tolerance_ms={ms}"
            ));
        }
        Ok(url)
    }
}

impl Check for AvailabilityCheck {
    async fn run(&mut self, member: &Member) -> Result<(), String> {
        let url = self.url(member)?;
        let mut request = self
            .client
            .get(&url)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(user) = &self.username {
            request = request.basic_auth(user, self.password.as_ref().map(Secret::expose));
        }
        let response = request.send().await.map_err(|e| {
            // reqwest's own message is terse ("error sending request"): add its causes.
            let mut why = e.to_string();
            let mut source = e.source();
            while let Some(s) = source {
                why.push_str(": ");
                why.push_str(&s.to_string());
                source = s.source();
            }
            why
        })?;
        let status = response.status();
        if status == StatusCode::OK {
            return Ok(());
        }
        let body = response.bytes().await.unwrap_or_default();
        let what = match serde_json::from_slice::<ApiError>(&body) {
            Ok(ApiError {
                error_code: Some(code),
                description,
            }) => format!("{code}: {}", description.unwrap_or_default()),
            _ => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        };
        let kind = if self.lag_tolerance_ms.is_some() {
            "lag-aware availability"
        } else {
            "availability"
        };
        Err(format!("{kind} API answered {status}: {what}"))
    }
}
