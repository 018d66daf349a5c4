//! Configuration: the file format (a contract, see DESIGN.md), environment overrides, and
//! validation into the typed [`Config`] the rest of the program uses.
//!
//! Loading happens in two steps, as in rathole and sozu: the file (plus `GEOPROXY__SECTION__KEY`
//! environment overrides) is deserialized into `raw` structs that reject unknown keys, and
//! [`validate`] turns those into a [`Config`], collecting *every* error with the path of the key
//! that caused it. Nothing binds a port before this has succeeded.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::tls::{Acceptor, Connector, ListenerTls, MemberTls, MinVersion};

pub use crate::health::verdict::{Policy, Role};

/// Longest duration any key accepts: deadlines are instants, which a duration of years
/// could overflow.
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Largest `[[members]]` list accepted; a sanity bound, not a design limit.
const MAX_MEMBERS: usize = 64;

/// Default for `proxy.max_clients`: Redis's own `maxclients` default.
pub const DEFAULT_MAX_CLIENTS: usize = 10_000;
/// Default for `proxy.reply_timeout`: a member silent this long while a (non-blocking) reply
/// is owed is *suspected*: the checker probes it at once on a fresh connection, and only a
/// failed probe marks it down. A false alarm costs one probe, so it can be short; the session
/// keeps waiting for a slow reply from a member the probe found healthy.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// Default for `proxy.unavailable_timeout`: how long a command waits for any member to become
/// available before it gets `-UNAVAILABLE`. Short: clients must not hang.
pub const DEFAULT_UNAVAILABLE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default for `proxy.connect_timeout`: TCP connect plus session-state handshake to a member.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default for `proxy.client_query_buffer_limit`: Redis's `client-query-buffer-limit`, 1 GB.
/// Only a command the proxy must hold whole (one whose arguments it reads, or one waiting
/// for a member) can come near it: large arguments stream to the member as they arrive.
pub const DEFAULT_QUERY_BUFFER_LIMIT: usize = 1024 * 1024 * 1024;
/// Default for `proxy.shutdown_timeout`: how long in-flight replies may take after SIGTERM.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for `proxy.shared_connections`: one per worker, member and state, so that every
/// session's commands of a turn go out in one write.
const DEFAULT_SHARED_CONNECTIONS: usize = 1;
/// Default for `proxy.idle_pinned`.
const DEFAULT_IDLE_PINNED: usize = 16;
/// Default for `proxy.threads` in the co-located mode: one worker (in the centralized and
/// pooled modes, and for `threads = 0`: one per core, as HAProxy does; a worker with no
/// traffic costs nothing). Beside the application
/// it keeps to one core, and with multiplexing one worker gathers the commands of all
/// clients into one shared connection (two workers on two cores shared with the clients
/// and Redis: 0.75 of direct Redis at 50 clients, one worker 0.82-1.00; benches/README.md).
pub const COLOCATED_THREADS: usize = 1;
/// Default for `health.interval` (time between two PING checks of one member).
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Default for `health.timeout` (a check not answered within it has failed). It starts once
/// the check's connection is open: connecting has its own `health.connect_timeout`.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_millis(500);
/// Default for `health.connect_timeout`: the handshake of a check's fresh connection (TCP
/// connect and AUTH). Over 1 s, so one SYN lost in a reconnect storm (retransmitted after
/// 1 s) is not a failed check.
pub const DEFAULT_CHECK_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default for `health.fast_interval`: after a failed check of a member that is still up,
/// the next check comes this soon (HAProxy's `fastinter`), so `fall` failures take
/// one interval, not `fall` intervals.
pub const DEFAULT_FAST_INTERVAL: Duration = Duration::from_millis(100);
/// Default for `health.reconnect_interval`: the check connection is opened anew this often
/// (host names resolved again, and proof that the member still accepts connections).
pub const DEFAULT_RECONNECT_INTERVAL: Duration = Duration::from_secs(30);
/// Defaults for the error window (`health.error_window`, `error_min_count`, `error_rate`):
/// a member whose replies in the last 10 s hold at least 20 "cannot serve" errors making at
/// least half of all its replies is marked down, as Envoy's outlier detection ejects a host.
pub const DEFAULT_ERROR_WINDOW: Duration = Duration::from_secs(10);
pub const DEFAULT_ERROR_MIN_COUNT: u64 = 20;
pub const DEFAULT_ERROR_RATE: f64 = 0.5;
/// Default for `failover.flap_hold_max`: a member that fails again soon after traffic
/// returned to it waits twice as long before the next failback, up to this.
pub const DEFAULT_FLAP_HOLD_MAX: Duration = Duration::from_secs(600);
/// Default for `health.keyspace.ttl`: check keys vanish by themselves.
pub const DEFAULT_KEYSPACE_TTL: Duration = Duration::from_secs(10);
/// Default for `health.availability.lag_tolerance`: Redis Software's own default.
pub const DEFAULT_LAG_TOLERANCE: Duration = Duration::from_millis(100);
/// Default for `health.replication.tolerance`: a token that takes longer to reach a member
/// means the pair is not syncing.
pub const DEFAULT_REPLICATION_TOLERANCE: Duration = Duration::from_secs(2);
/// Default for `health.availability.timeout` and `health.custom.timeout`: an HTTPS request or
/// a program takes longer than a PING.
pub const DEFAULT_SLOW_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Default for `health.rise` and `health.fall` (consecutive results that flip a member).
pub const DEFAULT_RISE_FALL: u32 = 2;
/// Default for `failover.failback_after`: a recovered preferred member must stay healthy this
/// long before traffic returns to it (it may still be re-syncing with the others).
pub const DEFAULT_FAILBACK_AFTER: Duration = Duration::from_secs(30);

/// How the proxy is deployed (DESIGN.md "Modes").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A sidecar next to each app server: its own preference, its region first.
    Colocated,
    /// One active proxy and a standby.
    Centralized,
    /// N active proxies sharing a view of the members.
    Pooled,
}

/// Whether the router returns to a recovered preferred member by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Failback {
    /// After `failback_after` of continuous health.
    Auto,
    /// Never by itself; an operator switches over.
    Manual,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    /// Members in preference order: this proxy's `region` first, then file order.
    pub members: Vec<MemberConfig>,
    pub health: HealthConfig,
    pub failover: FailoverConfig,
    pub log: LogConfig,
    pub commands: CommandPolicy,
    /// `Some` in centralized mode: how the active proxy is elected.
    pub centralized: Option<CentralizedConfig>,
    /// `Some` in pooled mode: how the pool shares its views of the members.
    pub pooled: Option<PooledConfig>,
    /// The file as written (with environment overrides): a reload compares it section by
    /// section to say what needs a restart.
    pub source: Source,
}

/// The configuration's keys and values before validation. Never printed: it holds secrets.
#[derive(Clone, Default, PartialEq)]
pub struct Source(serde_json::Value);

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Source(..)")
    }
}

impl Source {
    /// Takes sections `names` from `other` (what a reload applied).
    pub fn adopt(&mut self, other: &Source, names: &[&str]) {
        let Some(mine) = self.0.as_object_mut() else {
            return;
        };
        for name in names {
            match other.0.get(*name) {
                Some(v) => mine.insert(name.to_string(), v.clone()),
                None => mine.remove(*name),
            };
        }
    }

    /// Does section `name` differ between `self` and `other`?
    pub fn section_changed(&self, other: &Source, name: &str) -> bool {
        self.0.get(name) != other.0.get(name)
    }

    /// The keys (`section` or `section.key`) whose values differ between `self` and
    /// `other`, leaving out the sections in `except`.
    pub fn changed_keys(&self, other: &Source, except: &[&str]) -> Vec<String> {
        let empty = serde_json::Map::new();
        let sections = |s: &Source| s.0.as_object().cloned().unwrap_or_default();
        let (a, b) = (sections(self), sections(other));
        let mut names: Vec<&String> = a.keys().chain(b.keys()).collect();
        names.sort();
        names.dedup();
        let mut changed = Vec::new();
        for name in names.into_iter().filter(|n| !except.contains(&n.as_str())) {
            let (x, y) = (a.get(name), b.get(name));
            if x == y {
                continue;
            }
            match (x.and_then(|v| v.as_object()), y.and_then(|v| v.as_object())) {
                (Some(_), _) | (_, Some(_)) => {
                    let x = x.and_then(|v| v.as_object()).unwrap_or(&empty);
                    let y = y.and_then(|v| v.as_object()).unwrap_or(&empty);
                    let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                    keys.sort();
                    keys.dedup();
                    for k in keys.into_iter().filter(|k| x.get(*k) != y.get(*k)) {
                        changed.push(format!("{name}.{k}"));
                    }
                }
                _ => changed.push(name.clone()),
            }
        }
        changed
    }
}

/// `[pooled]`: the proxies of a pool share their views of the members; a member is down
/// for the pool when `quorum` live proxies see it down.
#[derive(Clone, Debug)]
pub struct PooledConfig {
    /// This proxy's name in the pool (`proxy.name`).
    pub name: String,
    pub views: PoolViews,
    /// Live proxies (this one included) that must see a member down for the pool to call
    /// it down; a proxy that cannot see this many live proxies uses its own view.
    pub quorum: usize,
    /// How often views are published and read.
    pub interval: Duration,
}

#[derive(Clone, Debug)]
pub enum PoolViews {
    /// Each proxy writes its view to `<prefix>/views/<name>` under a lease of its own (so a
    /// proxy that dies leaves the pool after `lease_ttl`) and reads everyone's.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
        lease_ttl: Duration,
    },
    /// A static list of the other proxies' admin URLs; their `/v1/status` is their view.
    Peers(Vec<String>),
}

/// `[centralized]`: how the active proxy is chosen among this proxy and its standbys.
#[derive(Clone, Debug)]
pub struct CentralizedConfig {
    /// This proxy's name among its peers (`proxy.name`; default: host name and process id).
    pub name: String,
    pub election: Election,
}

#[derive(Clone, Debug)]
pub enum Election {
    /// A lease in etcd (through its JSON gateway): the holder serves.
    Etcd {
        /// `http://host:2379`, tried in order.
        endpoints: Vec<String>,
        /// Keys `<prefix>/leader` (the lease holder) and `<prefix>/route` (its last route).
        prefix: String,
        /// The lease's TTL; the holder renews every third of it and stops serving when it
        /// has not renewed for two thirds of it (before etcd can expire the lease).
        lease_ttl: Duration,
    },
    /// Two proxies without etcd: the standby polls the active one's `/ready` and takes over
    /// after `down_after` failures in a row. Not partition-safe: both can serve.
    Peer {
        /// The other proxy's admin API, `http://host:9380`.
        peer: String,
        /// This proxy is the active one at start (exactly one of the two says so).
        primary: bool,
        interval: Duration,
        down_after: u32,
    },
}

/// Default `[centralized]` lease TTL.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(6);
/// Default `failover.strict_timeout`: how long a strict switch waits for in-flight replies.
pub const DEFAULT_STRICT_TIMEOUT: Duration = Duration::from_secs(1);

/// How sessions move at a switch.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SwitchMode {
    /// Each session at its own quiescent point (co-located and pooled default).
    PerSession,
    /// Break before make: no session sends to the new member before every session left
    /// the old one (centralized default).
    Strict,
}

/// Who checks a client's password.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// The member: the client's AUTH / HELLO AUTH is forwarded, and replayed on a switch.
    #[default]
    Passthrough,
    /// geoproxy, against `[[proxy.users]]`; members get their own `username`/`password`.
    Proxy,
}

/// A user clients authenticate as with `proxy.auth = "proxy"`.
#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub password: Secret,
}

/// The TLS listener beside the plain one (Redis's `tls-port`).
#[derive(Clone, Debug)]
pub struct TlsListenerConfig {
    pub listen: SocketAddr,
    pub acceptor: Arc<Acceptor>,
}

/// Commands clients may not run through the proxy (`[commands]`). Names are lower case.
#[derive(Clone, Debug, Default)]
pub struct CommandPolicy {
    /// Answered with an error and counted (`deny`).
    pub deny: HashSet<Vec<u8>>,
    /// Redis's `rename-command`: the new name (lower case) -> the command's own name, as
    /// the member knows it.
    pub renamed: HashMap<Vec<u8>, Vec<u8>>,
    /// Original names that were renamed (or renamed to ""): unknown to clients, as in Redis.
    pub hidden: HashSet<Vec<u8>>,
}

impl CommandPolicy {
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.renamed.is_empty() && self.hidden.is_empty()
    }
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Where Redis clients connect.
    pub listen: SocketAddr,
    pub mode: Mode,
    /// This proxy's region: members in it are preferred.
    pub region: Option<String>,
    /// Connections beyond this get `-ERR max number of clients reached`, as Redis says.
    pub max_clients: usize,
    pub reply_timeout: Duration,
    pub unavailable_timeout: Duration,
    pub connect_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// Close a client idle this long (Redis's `timeout`); `None` (the file's "0s", the
    /// default) never does. Subscribed, blocked and MONITOR clients are exempt, as in Redis.
    pub client_idle_timeout: Option<Duration>,
    /// Most bytes of client input the proxy holds for one client (Redis's
    /// `client-query-buffer-limit`); beyond it the client is closed, as Redis closes it.
    pub client_query_buffer_limit: usize,
    /// Worker threads, each a single-threaded runtime with its own listening socket on the
    /// same port (SO_REUSEPORT), serving the sessions it accepted (0 in the file = one per
    /// core, resolved here).
    pub threads: usize,
    /// Sessions share member connections (see `pool`); `false`: one each (1:1).
    pub multiplex: bool,
    /// Shared connections per worker, member and connection state.
    pub shared_connections: usize,
    /// Idle pinned connections a worker keeps per member.
    pub idle_pinned: usize,
    /// `[proxy.tls]`: a TLS listener beside the plain one.
    pub tls: Option<TlsListenerConfig>,
    /// `proxy.unixsocket`: a unix socket beside the TCP listener (Redis's `unixsocket`),
    /// with `proxy.unixsocketperm` (Redis's `unixsocketperm`, default 700).
    pub unixsocket: Option<(std::path::PathBuf, u32)>,
    pub auth: AuthMode,
    /// `[[proxy.users]]`, with `auth = "proxy"`.
    pub users: Vec<User>,
}

#[derive(Clone, Debug)]
pub struct AdminConfig {
    /// `/live /ready /metrics /v1/...`.
    pub listen: SocketAddr,
    /// Bearer token every write (POST) must carry; `None`: writes are open to whoever
    /// reaches the admin port (loopback by default).
    pub token: Option<Secret>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MemberConfig {
    /// Stable name used in logs, metrics and the admin API.
    pub id: String,
    /// `host:port`; a host name is resolved again at every new connection.
    pub address: String,
    pub region: Option<String>,
    /// Credentials the health checks use (sessions replay their clients' own AUTH).
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// The member's Redis Software REST API (`https://host:9443`), for `[health.availability]`.
    pub api: Option<String>,
    /// The database's uid in that cluster.
    pub bdb: Option<u64>,
    /// `tls = true`: sessions and checks reach this member over TLS.
    pub tls: Option<Connector>,
}

#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// How a member's health checks combine.
    pub policy: Policy,
    /// The PING check (always on): the keys of `[health]` and `[health.ping]`.
    pub ping: PingConfig,
    pub keyspace: Option<KeyspaceConfig>,
    pub availability: Option<AvailabilityConfig>,
    pub replication: Option<ReplicationConfig>,
    pub custom: Vec<CustomConfig>,
    /// The handshake of a check's fresh connection: TCP connect and AUTH.
    pub connect_timeout: Duration,
    /// Time to the next check after a failed one, while the member is still up.
    pub fast_interval: Duration,
    /// How often the check connection is opened anew.
    pub reconnect_interval: Duration,
    pub errors: ErrorWindowConfig,
}

/// When and how often one check runs, and what its result decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub role: Role,
}

#[derive(Clone, Debug)]
pub struct PingConfig {
    /// `ECHO <random token>` instead of `PING` (the reply must be the token).
    pub echo: bool,
    pub timing: Timing,
}

/// `SET <key> <token> PX <ttl>` then `GET`, on one key per shard.
#[derive(Clone, Debug)]
pub struct KeyspaceConfig {
    /// Shards of the database: its 16384 slots split evenly, as Redis Software does.
    pub shards: u16,
    /// How long a check key lives (`PX`).
    pub ttl: Duration,
    pub timing: Timing,
}

/// Which Redis Software availability request to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiEndpoint {
    /// `GET /v1/local/bdbs/UID/endpoint/availability`: the member's node-local endpoint.
    Local,
    /// `GET /v1/bdbs/UID/availability`: the database as a whole.
    Database,
}

/// The Redis Software REST API of each member (`members[].api` and `members[].bdb`).
#[derive(Clone, Debug)]
pub struct AvailabilityConfig {
    pub endpoint: ApiEndpoint,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// PEM certificates trusted for the API (a cluster's own CA).
    pub ca_pem: Option<Vec<u8>>,
    /// Verify the API's certificate (off for self-signed clusters; logged as a warning).
    pub verify_tls: bool,
    pub timing: Timing,
    /// The lag-aware request (`extend_check=lag`), a sync check by default.
    pub lag: Option<LagConfig>,
}

#[derive(Clone, Debug)]
pub struct LagConfig {
    /// `availability_lag_tolerance_ms`.
    pub tolerance: Duration,
    pub timing: Timing,
}

/// Tokens published on each member and expected on the others.
#[derive(Clone, Debug)]
pub struct ReplicationConfig {
    /// A token not received within this is late: the pair is not syncing.
    pub tolerance: Duration,
    /// Shards to reach (one channel each, hash-tagged into each shard's slots).
    pub shards: u16,
    pub timing: Timing,
}

#[derive(Clone, Debug)]
pub struct CustomConfig {
    /// Names the check in status, metrics and logs.
    pub name: String,
    pub action: CustomAction,
    pub timing: Timing,
}

#[derive(Clone, Debug)]
pub enum CustomAction {
    /// Commands sent in order on a fresh connection, each reply matched against its pattern
    /// (`*` matches any run of characters).
    Commands(Vec<(Vec<String>, String)>),
    /// A program run with the member in its environment: exit 0 = healthy.
    Program(Vec<String>),
}

/// When error replies that mean "this member cannot serve" mark it down.
#[derive(Clone, Debug)]
pub struct ErrorWindowConfig {
    pub window: Duration,
    /// At least this many such errors in the window...
    pub min_count: u64,
    /// ...making at least this share (0..=1) of the member's replies in it.
    pub rate: f64,
    /// Whether `-OOM` counts (a full member cannot take writes, but still serves reads).
    pub oom: bool,
}

#[derive(Clone, Debug)]
pub struct FailoverConfig {
    pub failback: Failback,
    pub failback_after: Duration,
    /// Re-send in-flight read-only commands to the new member when their member fails
    /// (writes never are). Off by default: a retried read may see older data.
    pub retry_reads: bool,
    /// Longest hold of a flapping member (its grace doubles at each flap, up to this).
    pub flap_hold_max: Duration,
    pub switch: SwitchMode,
    /// With the strict switch: how long it waits for sessions' in-flight replies on the
    /// old member before evicting them.
    pub strict_timeout: Duration,
}

#[derive(Clone, Debug, Default)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// A secret value: printed as `***` in logs, `Debug` and `/v1/status`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Every problem found in a configuration, each naming its key.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration:")?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn one(problem: String) -> Self {
        ConfigError {
            problems: vec![problem],
        }
    }
}

impl Config {
    /// Loads `path` (TOML) with `GEOPROXY__SECTION__KEY` environment overrides and validates it.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = config::File::from(path).format(config::FileFormat::Toml);
        Self::build(source)
    }

    /// Parses a TOML document (with environment overrides) and validates it.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::build(config::File::from_str(text, config::FileFormat::Toml))
    }

    fn build<S>(source: S) -> Result<Config, ConfigError>
    where
        S: config::Source + Send + Sync + 'static,
    {
        let env = config::Environment::with_prefix("GEOPROXY")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true);
        let built = config::Config::builder()
            .add_source(source)
            .add_source(env)
            .build()
            .map_err(|e| ConfigError::one(e.to_string()))?;
        let source = built
            .clone()
            .try_deserialize::<serde_json::Value>()
            .map_err(|e| ConfigError::one(e.to_string()))?;
        let raw: raw::File = built
            .try_deserialize()
            .map_err(|e| ConfigError::one(e.to_string()))?;
        let mut config = validate(raw)?;
        config.source = Source(source);
        Ok(config)
    }
}

/// The file as written, before validation. Every struct rejects unknown keys.
mod raw {
    use super::*;

    /// A size in bytes: a number, or a string with a unit as Redis writes them in
    /// redis.conf (`kb`/`mb`/`gb` are powers of 1024, `k`/`m`/`g` of 1000).
    #[derive(Deserialize, Debug)]
    #[serde(untagged)]
    pub enum Size {
        Bytes(u64),
        Text(String),
    }

    impl Size {
        pub fn bytes(&self) -> Option<usize> {
            let text = match self {
                Size::Bytes(n) => return usize::try_from(*n).ok(),
                Size::Text(t) => t.trim().to_ascii_lowercase(),
            };
            let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
            let unit: u64 = match &text[digits.len()..] {
                "" | "b" => 1,
                "k" => 1000,
                "kb" => 1024,
                "m" => 1000 * 1000,
                "mb" => 1024 * 1024,
                "g" => 1000 * 1000 * 1000,
                "gb" => 1024 * 1024 * 1024,
                _ => return None,
            };
            let n: u64 = digits.trim().parse().ok()?;
            usize::try_from(n.checked_mul(unit)?).ok()
        }
    }

    impl fmt::Display for Size {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                Size::Bytes(n) => write!(f, "{n}"),
                Size::Text(t) => write!(f, "{t:?}"),
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        pub proxy: Proxy,
        pub admin: Admin,
        #[serde(default)]
        pub members: Vec<Member>,
        #[serde(default)]
        pub health: Health,
        #[serde(default)]
        pub failover: Failover,
        #[serde(default)]
        pub log: Log,
        #[serde(default)]
        pub commands: Commands,
        pub centralized: Option<Centralized>,
        pub pooled: Option<Pooled>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Commands {
        #[serde(default)]
        pub deny: Vec<String>,
        #[serde(default)]
        pub rename: HashMap<String, String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ProxyTls {
        pub listen: String,
        pub cert_file: String,
        pub key_file: String,
        pub client_ca_file: Option<String>,
        pub min_version: Option<MinVersion>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct User {
        pub name: String,
        pub password: Option<String>,
        pub password_file: Option<String>,
        pub password_env: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Proxy {
        pub listen: String,
        pub mode: Mode,
        pub region: Option<String>,
        pub max_clients: Option<usize>,
        #[serde(default, with = "humantime_serde")]
        pub reply_timeout: Option<Duration>,
        #[serde(default, with = "humantime_serde")]
        pub unavailable_timeout: Option<Duration>,
        #[serde(default, with = "humantime_serde")]
        pub connect_timeout: Option<Duration>,
        #[serde(default, with = "humantime_serde")]
        pub shutdown_timeout: Option<Duration>,
        #[serde(default, with = "humantime_serde")]
        pub client_idle_timeout: Option<Duration>,
        pub client_query_buffer_limit: Option<Size>,
        pub threads: Option<usize>,
        pub multiplex: Option<bool>,
        pub shared_connections: Option<usize>,
        pub idle_pinned: Option<usize>,
        pub tls: Option<ProxyTls>,
        pub unixsocket: Option<String>,
        /// This proxy's name among its peers (centralized and pooled modes).
        pub name: Option<String>,
        /// Octal digits, as Redis writes it (`700`).
        pub unixsocketperm: Option<u32>,
        pub auth: Option<AuthMode>,
        #[serde(default)]
        pub users: Vec<User>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Admin {
        pub listen: String,
        pub token: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Member {
        pub id: String,
        pub address: String,
        pub region: Option<String>,
        pub api: Option<String>,
        pub bdb: Option<u64>,
        pub username: Option<String>,
        pub password: Option<String>,
        /// A file holding the password (trailing newline stripped), for secrets mounted by
        /// an orchestrator.
        pub password_file: Option<String>,
        /// An environment variable holding the password.
        pub password_env: Option<String>,
        pub tls: Option<bool>,
        pub tls_ca_file: Option<String>,
        pub tls_server_name: Option<String>,
        pub tls_cert_file: Option<String>,
        pub tls_key_file: Option<String>,
        pub tls_verify: Option<bool>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Health {
        #[serde(default, with = "humantime_serde")]
        pub interval: Option<Duration>,
        #[serde(default, with = "humantime_serde")]
        pub timeout: Option<Duration>,
        #[serde(default, with = "humantime_serde")]
        pub connect_timeout: Option<Duration>,
        #[serde(default, with = "humantime_serde")]
        pub fast_interval: Option<Duration>,
        #[serde(default, with = "humantime_serde")]
        pub reconnect_interval: Option<Duration>,
        pub rise: Option<u32>,
        pub fall: Option<u32>,
        #[serde(default, with = "humantime_serde")]
        pub error_window: Option<Duration>,
        pub error_min_count: Option<u64>,
        pub error_rate: Option<f64>,
        pub error_oom: Option<bool>,
        pub policy: Option<Policy>,
        pub ping: Option<Ping>,
        pub keyspace: Option<Keyspace>,
        pub availability: Option<Availability>,
        pub replication: Option<Replication>,
        #[serde(default)]
        pub custom: Vec<Custom>,
    }

    /// A check's table: its own `interval`, `timeout`, `rise`, `fall` and `role` (each
    /// defaulting to `[health]`'s and the kind's role), then the kind's own keys.
    macro_rules! check_table {
        ($name:ident { $($(#[$m:meta])* $field:ident: $ty:ty,)* }) => {
            #[derive(Deserialize, Default)]
            #[serde(deny_unknown_fields)]
            pub struct $name {
                #[serde(default, with = "humantime_serde")]
                pub interval: Option<Duration>,
                #[serde(default, with = "humantime_serde")]
                pub timeout: Option<Duration>,
                pub rise: Option<u32>,
                pub fall: Option<u32>,
                pub role: Option<Role>,
                $($(#[$m])* pub $field: $ty,)*
            }

            impl $name {
                pub fn timing(&self) -> RawTiming {
                    RawTiming {
                        interval: self.interval,
                        timeout: self.timeout,
                        rise: self.rise,
                        fall: self.fall,
                        role: self.role,
                    }
                }
            }
        };
    }

    pub struct RawTiming {
        pub interval: Option<Duration>,
        pub timeout: Option<Duration>,
        pub rise: Option<u32>,
        pub fall: Option<u32>,
        pub role: Option<Role>,
    }

    check_table!(Ping { echo: Option<bool>, });
    check_table!(Keyspace {
        shards: Option<u16>,
        #[serde(default, with = "humantime_serde")]
        ttl: Option<Duration>,
    });
    check_table!(Availability {
        endpoint: Option<ApiEndpoint>,
        username: Option<String>,
        password: Option<String>,
        password_file: Option<String>,
        password_env: Option<String>,
        ca_file: Option<String>,
        verify_tls: Option<bool>,
        lag: Option<bool>,
        #[serde(default, with = "humantime_serde")]
        lag_tolerance: Option<Duration>,
        #[serde(default, with = "humantime_serde")]
        lag_interval: Option<Duration>,
        lag_role: Option<Role>,
    });
    check_table!(Replication {
        #[serde(default, with = "humantime_serde")]
        tolerance: Option<Duration>,
        shards: Option<u16>,
    });
    check_table!(Custom {
        name: String,
        commands: Option<Vec<Vec<String>>>,
        expect: Option<Vec<String>>,
        program: Option<Vec<String>>,
    });

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Failover {
        pub failback: Option<Failback>,
        #[serde(default, with = "humantime_serde")]
        pub failback_after: Option<Duration>,
        pub retry_reads: Option<bool>,
        #[serde(default, with = "humantime_serde")]
        pub flap_hold_max: Option<Duration>,
        pub switch: Option<SwitchMode>,
        #[serde(default, with = "humantime_serde")]
        pub strict_timeout: Option<Duration>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Pooled {
        #[serde(default)]
        pub etcd_endpoints: Vec<String>,
        pub etcd_prefix: Option<String>,
        #[serde(default, with = "humantime_serde")]
        pub lease_ttl: Option<Duration>,
        #[serde(default)]
        pub peers: Vec<String>,
        pub quorum: Option<usize>,
        #[serde(default, with = "humantime_serde")]
        pub interval: Option<Duration>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Centralized {
        /// "etcd" or "peer".
        pub election: String,
        #[serde(default)]
        pub etcd_endpoints: Vec<String>,
        pub etcd_prefix: Option<String>,
        #[serde(default, with = "humantime_serde")]
        pub lease_ttl: Option<Duration>,
        pub peer: Option<String>,
        pub primary: Option<bool>,
        #[serde(default, with = "humantime_serde")]
        pub peer_interval: Option<Duration>,
        pub peer_down_after: Option<u32>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Log {
        #[serde(default)]
        pub format: LogFormat,
    }
}

/// Turns the file as written into a [`Config`], listing every problem with its key.
fn validate(raw: raw::File) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();
    let addr =
        |problems: &mut Vec<String>, key: &str, value: &str| match value.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                problems.push(format!(
                    "{key}: \"{value}\" is not an ip:port address (for example \"127.0.0.1:6380\")"
                ));
                None
            }
        };
    let listen = addr(&mut problems, "proxy.listen", &raw.proxy.listen);
    let admin_listen = addr(&mut problems, "admin.listen", &raw.admin.listen);
    if listen.is_some_and(|l| l.port() != 0) && listen == admin_listen {
        problems.push("admin.listen: must differ from proxy.listen".into());
    }

    let p = &raw.proxy;
    let reply_timeout = positive(
        &mut problems,
        "proxy.reply_timeout",
        p.reply_timeout,
        DEFAULT_REPLY_TIMEOUT,
    );
    let unavailable_timeout = positive(
        &mut problems,
        "proxy.unavailable_timeout",
        p.unavailable_timeout,
        DEFAULT_UNAVAILABLE_TIMEOUT,
    );
    let connect_timeout = positive(
        &mut problems,
        "proxy.connect_timeout",
        p.connect_timeout,
        DEFAULT_CONNECT_TIMEOUT,
    );
    let shutdown_timeout = positive(
        &mut problems,
        "proxy.shutdown_timeout",
        p.shutdown_timeout,
        DEFAULT_SHUTDOWN_TIMEOUT,
    );
    let client_idle_timeout = p.client_idle_timeout.filter(|d| !d.is_zero());
    if client_idle_timeout.is_some_and(|d| d > MAX_DURATION) {
        problems.push("proxy.client_idle_timeout: must be at most 30 days".into());
    }
    let client_query_buffer_limit = match &p.client_query_buffer_limit {
        None => DEFAULT_QUERY_BUFFER_LIMIT,
        Some(size) => match size.bytes() {
            Some(n) if n >= 1024 * 1024 => n,
            _ => {
                problems.push(format!(
                    "proxy.client_query_buffer_limit: {size} is not a size of at least 1mb \
                     (bytes, or a number with kb, mb or gb)"
                ));
                DEFAULT_QUERY_BUFFER_LIMIT
            }
        },
    };
    let max_clients = p.max_clients.unwrap_or(DEFAULT_MAX_CLIENTS);
    if max_clients == 0 {
        problems.push("proxy.max_clients: must be greater than zero".into());
    }
    let pooled = validate_pooled(&mut problems, p.mode, p.name.as_deref(), &raw.pooled);
    let centralized =
        validate_centralized(&mut problems, p.mode, p.name.as_deref(), &raw.centralized);

    let h = &raw.health;
    let interval = positive(
        &mut problems,
        "health.interval",
        h.interval,
        DEFAULT_CHECK_INTERVAL,
    );
    let timeout = positive(
        &mut problems,
        "health.timeout",
        h.timeout,
        DEFAULT_CHECK_TIMEOUT,
    );
    let check_connect_timeout = positive(
        &mut problems,
        "health.connect_timeout",
        h.connect_timeout,
        DEFAULT_CHECK_CONNECT_TIMEOUT,
    );
    let fast_interval = positive(
        &mut problems,
        "health.fast_interval",
        h.fast_interval,
        DEFAULT_FAST_INTERVAL,
    );
    let reconnect_interval = positive(
        &mut problems,
        "health.reconnect_interval",
        h.reconnect_interval,
        DEFAULT_RECONNECT_INTERVAL,
    );
    let error_window = positive(
        &mut problems,
        "health.error_window",
        h.error_window,
        DEFAULT_ERROR_WINDOW,
    );
    if error_window < Duration::from_secs(1) {
        problems.push("health.error_window: must be at least 1s".into());
    }
    let error_min_count = h.error_min_count.unwrap_or(DEFAULT_ERROR_MIN_COUNT);
    if error_min_count == 0 {
        problems.push("health.error_min_count: must be at least 1".into());
    }
    let error_rate = h.error_rate.unwrap_or(DEFAULT_ERROR_RATE);
    if !(error_rate > 0.0 && error_rate <= 1.0) {
        problems.push(format!(
            "health.error_rate: {error_rate} must be a share greater than 0 and at most 1"
        ));
    }
    let rise = h.rise.unwrap_or(DEFAULT_RISE_FALL);
    let fall = h.fall.unwrap_or(DEFAULT_RISE_FALL);
    for (key, v) in [("health.rise", rise), ("health.fall", fall)] {
        if v == 0 {
            problems.push(format!("{key}: must be at least 1"));
        }
    }

    if raw.members.is_empty() {
        problems.push("members: at least one [[members]] entry is required".into());
    }
    if raw.members.len() > MAX_MEMBERS {
        problems.push(format!("members: at most {MAX_MEMBERS} members"));
    }
    let mut seen = HashSet::new();
    let mut members = Vec::with_capacity(raw.members.len());
    for (i, m) in raw.members.into_iter().enumerate() {
        let key = format!("members[{i}]");
        if m.id.is_empty() || !m.id.chars().all(|c| c.is_ascii_graphic()) {
            problems.push(format!(
                "{key}.id: \"{}\" must be non-empty printable ASCII without spaces",
                m.id
            ));
        } else if !seen.insert(m.id.clone()) {
            problems.push(format!("{key}.id: duplicate member id \"{}\"", m.id));
        }
        if !valid_host_port(&m.address) {
            problems.push(format!(
                "{key}.address: \"{}\" is not host:port (for example \"redis-east.internal:6379\")",
                m.address
            ));
        }
        let password = secret(
            &mut problems,
            &key,
            m.password.as_deref(),
            m.password_file.as_deref(),
            m.password_env.as_deref(),
        );
        if let Some(api) = &m.api {
            if !(api.starts_with("https://") || api.starts_with("http://")) {
                problems.push(format!(
                    "{key}.api: \"{api}\" is not a URL (for example \"https://cluster.east:9443\")"
                ));
            }
        }
        let tls = member_tls(&mut problems, &key, &m);
        members.push(MemberConfig {
            id: m.id,
            address: m.address,
            region: m.region,
            username: m.username,
            password,
            api: m.api,
            bdb: m.bdb,
            tls,
        });
    }
    if let Some(region) = &p.region {
        if !members
            .iter()
            .any(|m| m.region.as_deref() == Some(region.as_str()))
        {
            problems.push(format!("proxy.region: no member is in region \"{region}\""));
        }
        // Preference: this proxy's region first, file order otherwise (stable sort).
        members.sort_by_key(|m| m.region.as_deref() != Some(region.as_str()));
    }

    let defaults = Timing {
        interval,
        timeout,
        rise,
        fall,
        role: Role::Health,
    };
    let checks = validate_checks(h, defaults, &members, &mut problems);

    let f = &raw.failover;
    let failback_after = positive(
        &mut problems,
        "failover.failback_after",
        f.failback_after,
        DEFAULT_FAILBACK_AFTER,
    );
    let flap_hold_max = positive(
        &mut problems,
        "failover.flap_hold_max",
        f.flap_hold_max,
        DEFAULT_FLAP_HOLD_MAX.max(failback_after),
    );
    if flap_hold_max < failback_after {
        problems.push("failover.flap_hold_max: must be at least failover.failback_after".into());
    }
    let strict_timeout = positive(
        &mut problems,
        "failover.strict_timeout",
        f.strict_timeout,
        DEFAULT_STRICT_TIMEOUT,
    );
    if p.mode == Mode::Centralized && f.switch == Some(SwitchMode::PerSession) {
        problems.push(
            "failover.switch: centralized mode switches strictly (it is what the mode \
             guarantees); remove the key"
                .into(),
        );
    }

    let tls = p.tls.as_ref().and_then(|t| {
        let listen = addr(&mut problems, "proxy.tls.listen", &t.listen)?;
        let settings = ListenerTls {
            cert_file: t.cert_file.clone(),
            key_file: t.key_file.clone(),
            client_ca_file: t.client_ca_file.clone(),
            min_version: t.min_version.unwrap_or_default(),
        };
        match Acceptor::new(settings) {
            Ok(acceptor) => Some(TlsListenerConfig {
                listen,
                acceptor: Arc::new(acceptor),
            }),
            Err(e) => {
                problems.push(e);
                None
            }
        }
    });
    if let (Some(t), Some(l)) = (&tls, listen) {
        if t.listen.port() != 0 && (t.listen == l || Some(t.listen) == admin_listen) {
            problems
                .push("proxy.tls.listen: must differ from proxy.listen and admin.listen".into());
        }
    }
    let unixsocket = p.unixsocket.as_ref().map(|path| {
        let digits = p.unixsocketperm.unwrap_or(700).to_string();
        let mode = u32::from_str_radix(&digits, 8).ok().filter(|m| *m <= 0o777);
        if mode.is_none() {
            problems.push(format!(
                "proxy.unixsocketperm: {digits} is not a file mode in octal digits (as 700)"
            ));
        }
        if path.is_empty() {
            problems.push("proxy.unixsocket: must be a path".into());
        }
        (std::path::PathBuf::from(path), mode.unwrap_or(0o700))
    });
    if p.unixsocketperm.is_some() && p.unixsocket.is_none() {
        problems.push("proxy.unixsocketperm: needs proxy.unixsocket".into());
    }
    let auth = p.auth.unwrap_or_default();
    let users = validate_users(&mut problems, auth, &p.users);
    let commands = validate_commands(&mut problems, &raw.commands);

    let (Some(listen), Some(admin_listen), true) = (listen, admin_listen, problems.is_empty())
    else {
        return Err(ConfigError { problems });
    };
    Ok(Config {
        proxy: ProxyConfig {
            listen,
            mode: p.mode,
            region: p.region.clone(),
            max_clients,
            reply_timeout,
            unavailable_timeout,
            connect_timeout,
            shutdown_timeout,
            client_idle_timeout,
            client_query_buffer_limit,
            threads: match p.threads {
                None if p.mode == Mode::Colocated => COLOCATED_THREADS,
                None | Some(0) => std::thread::available_parallelism().map_or(1, |n| n.get()),
                Some(n) => n,
            },
            multiplex: p.multiplex.unwrap_or(true),
            shared_connections: match p.shared_connections {
                Some(0) => {
                    problems.push("proxy.shared_connections: must be at least 1".into());
                    1
                }
                n => n.unwrap_or(DEFAULT_SHARED_CONNECTIONS),
            },
            idle_pinned: p.idle_pinned.unwrap_or(DEFAULT_IDLE_PINNED),
            tls,
            unixsocket,
            auth,
            users,
        },
        admin: AdminConfig {
            listen: admin_listen,
            token: raw.admin.token.filter(|t| !t.is_empty()).map(Secret),
        },
        members,
        health: HealthConfig {
            policy: h.policy.unwrap_or_default(),
            ping: checks.ping,
            keyspace: checks.keyspace,
            availability: checks.availability,
            replication: checks.replication,
            custom: checks.custom,
            connect_timeout: check_connect_timeout,
            fast_interval,
            reconnect_interval,
            errors: ErrorWindowConfig {
                window: error_window,
                min_count: error_min_count,
                rate: error_rate,
                oom: h.error_oom.unwrap_or(false),
            },
        },
        failover: FailoverConfig {
            failback: f.failback.unwrap_or(Failback::Auto),
            failback_after,
            retry_reads: f.retry_reads.unwrap_or(false),
            flap_hold_max,
            switch: f.switch.unwrap_or(if p.mode == Mode::Centralized {
                SwitchMode::Strict
            } else {
                SwitchMode::PerSession
            }),
            strict_timeout,
        },
        log: LogConfig {
            format: raw.log.format,
        },
        commands,
        centralized,
        pooled,
        source: Source::default(),
    })
}

/// This proxy's name among its peers: `proxy.name`, else the host name and process id.
fn proxy_name(problems: &mut Vec<String>, name: Option<&str>) -> String {
    match name {
        Some(n) if !n.is_empty() && n.chars().all(|c| c.is_ascii_graphic()) => n.to_string(),
        Some(n) => {
            problems.push(format!(
                "proxy.name: \"{n}\" must be printable ASCII without spaces"
            ));
            String::new()
        }
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        }
    }
}

fn check_url(problems: &mut Vec<String>, key: &str, u: &str) {
    if !(u.starts_with("http://") || u.starts_with("https://")) {
        problems.push(format!(
            "{key}: \"{u}\" is not a URL (for example \"http://127.0.0.1:2379\")"
        ));
    }
}

/// The URLs of list `key`, checked, without a trailing `/`.
fn check_urls(problems: &mut Vec<String>, key: &str, urls: &[String]) -> Vec<String> {
    for (i, u) in urls.iter().enumerate() {
        check_url(problems, &format!("{key}[{i}]"), u);
    }
    urls.iter()
        .map(|u| u.trim_end_matches('/').to_string())
        .collect()
}

/// `[pooled]`: required in pooled mode, refused otherwise; etcd or a static peer list.
fn validate_pooled(
    problems: &mut Vec<String>,
    mode: Mode,
    name: Option<&str>,
    raw: &Option<raw::Pooled>,
) -> Option<PooledConfig> {
    let raw = match (mode, raw) {
        (Mode::Pooled, Some(p)) => p,
        (Mode::Pooled, None) => {
            problems.push("pooled: proxy.mode = \"pooled\" needs a [pooled] table".into());
            return None;
        }
        (_, Some(_)) => {
            problems.push("pooled: only used with proxy.mode = \"pooled\"".into());
            return None;
        }
        (_, None) => return None,
    };
    let name = proxy_name(problems, name);
    let (views, pool_size) = match (raw.etcd_endpoints.is_empty(), raw.peers.is_empty()) {
        (false, true) => {
            let lease_ttl = positive(
                problems,
                "pooled.lease_ttl",
                raw.lease_ttl,
                DEFAULT_LEASE_TTL,
            );
            if lease_ttl < Duration::from_secs(2) {
                problems.push(
                    "pooled.lease_ttl: must be at least 2s (etcd counts whole seconds)".into(),
                );
            }
            let endpoints = check_urls(problems, "pooled.etcd_endpoints", &raw.etcd_endpoints);
            let prefix = raw
                .etcd_prefix
                .clone()
                .unwrap_or_else(|| "/geoproxy/pool".into());
            (
                PoolViews::Etcd {
                    endpoints,
                    prefix,
                    lease_ttl,
                },
                None,
            )
        }
        (true, false) => {
            let peers = check_urls(problems, "pooled.peers", &raw.peers);
            let size = peers.len() + 1;
            (PoolViews::Peers(peers), Some(size))
        }
        _ => {
            problems.push("pooled: set either etcd_endpoints or peers".into());
            return None;
        }
    };
    // A majority of a static pool; with etcd the pool's size is not known ahead: 2 (of 3).
    let quorum = raw.quorum.unwrap_or(pool_size.map_or(2, |n| n / 2 + 1));
    if quorum == 0 || pool_size.is_some_and(|n| quorum > n) {
        problems.push(format!(
            "pooled.quorum: {quorum} must be 1 to the pool's size"
        ));
    }
    let interval = positive(
        problems,
        "pooled.interval",
        raw.interval,
        Duration::from_secs(1),
    );
    if let PoolViews::Etcd { lease_ttl, .. } = &views {
        if interval * 2 > *lease_ttl {
            problems.push(format!(
                "pooled.interval: {interval:?} must be at most half of pooled.lease_ttl \
                 ({lease_ttl:?}), or the views expire between two renewals"
            ));
        }
    }
    Some(PooledConfig {
        name,
        views,
        quorum,
        interval,
    })
}

/// `[centralized]`: required in centralized mode, refused otherwise.
fn validate_centralized(
    problems: &mut Vec<String>,
    mode: Mode,
    name: Option<&str>,
    raw: &Option<raw::Centralized>,
) -> Option<CentralizedConfig> {
    let raw = match (mode, raw) {
        (Mode::Centralized, Some(c)) => c,
        (Mode::Centralized, None) => {
            problems.push(
                "centralized: proxy.mode = \"centralized\" needs a [centralized] table".into(),
            );
            return None;
        }
        (_, Some(_)) => {
            problems.push("centralized: only used with proxy.mode = \"centralized\"".into());
            return None;
        }
        (_, None) => return None,
    };
    let name = proxy_name(problems, name);
    let url = check_url;
    let election = match raw.election.as_str() {
        "etcd" => {
            if raw.etcd_endpoints.is_empty() {
                problems.push("centralized.etcd_endpoints: at least one etcd endpoint".into());
            }
            for (i, e) in raw.etcd_endpoints.iter().enumerate() {
                url(problems, &format!("centralized.etcd_endpoints[{i}]"), e);
            }
            let lease_ttl = positive(
                problems,
                "centralized.lease_ttl",
                raw.lease_ttl,
                DEFAULT_LEASE_TTL,
            );
            if lease_ttl < Duration::from_secs(2) {
                problems.push(
                    "centralized.lease_ttl: must be at least 2s (etcd counts whole seconds)".into(),
                );
            }
            Election::Etcd {
                endpoints: raw
                    .etcd_endpoints
                    .iter()
                    .map(|e| e.trim_end_matches('/').to_string())
                    .collect(),
                prefix: raw
                    .etcd_prefix
                    .clone()
                    .unwrap_or_else(|| "/geoproxy/default".into()),
                lease_ttl,
            }
        }
        "peer" => {
            let peer = raw.peer.clone().unwrap_or_default();
            if peer.is_empty() {
                problems.push(
                    "centralized.peer: election = \"peer\" needs the other proxy's admin URL"
                        .into(),
                );
            } else {
                url(problems, "centralized.peer", &peer);
            }
            let down_after = raw.peer_down_after.unwrap_or(3);
            if down_after == 0 {
                problems.push("centralized.peer_down_after: must be at least 1".into());
            }
            Election::Peer {
                peer: peer.trim_end_matches('/').to_string(),
                primary: raw.primary.unwrap_or(false),
                interval: positive(
                    problems,
                    "centralized.peer_interval",
                    raw.peer_interval,
                    Duration::from_secs(1),
                ),
                down_after,
            }
        }
        other => {
            problems.push(format!(
                "centralized.election: \"{other}\" is not \"etcd\" or \"peer\""
            ));
            return None;
        }
    };
    Some(CentralizedConfig { name, election })
}

/// A member's `tls*` keys, its files read now.
fn member_tls(problems: &mut Vec<String>, key: &str, m: &raw::Member) -> Option<Connector> {
    let any_key = m.tls_ca_file.is_some()
        || m.tls_server_name.is_some()
        || m.tls_cert_file.is_some()
        || m.tls_key_file.is_some()
        || m.tls_verify.is_some();
    if !m.tls.unwrap_or(false) {
        if any_key {
            problems.push(format!("{key}: tls_* keys need tls = true"));
        }
        return None;
    }
    let host = m
        .address
        .rsplit_once(':')
        .map_or(m.address.as_str(), |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let settings = MemberTls {
        ca_file: m.tls_ca_file.clone(),
        server_name: m
            .tls_server_name
            .clone()
            .unwrap_or_else(|| host.to_string()),
        cert_file: m.tls_cert_file.clone(),
        key_file: m.tls_key_file.clone(),
        verify: m.tls_verify.unwrap_or(true),
    };
    if !settings.verify && settings.ca_file.is_some() {
        problems.push(format!(
            "{key}.tls_ca_file: not used with tls_verify = false"
        ));
    }
    Connector::new(key, settings)
        .map_err(|e| problems.push(e))
        .ok()
}

/// `[[proxy.users]]`: required (and only allowed) with `auth = "proxy"`.
fn validate_users(problems: &mut Vec<String>, auth: AuthMode, raw: &[raw::User]) -> Vec<User> {
    if auth == AuthMode::Passthrough {
        if !raw.is_empty() {
            problems.push("proxy.users: only used with proxy.auth = \"proxy\"".into());
        }
        return Vec::new();
    }
    if raw.is_empty() {
        problems
            .push("proxy.users: proxy.auth = \"proxy\" needs at least one [[proxy.users]]".into());
    }
    let mut names = HashSet::new();
    let mut users = Vec::new();
    for (i, u) in raw.iter().enumerate() {
        let key = format!("proxy.users[{i}]");
        if u.name.is_empty() || !u.name.chars().all(|c| c.is_ascii_graphic()) {
            problems.push(format!(
                "{key}.name: must be non-empty printable ASCII without spaces"
            ));
        } else if !names.insert(u.name.clone()) {
            problems.push(format!("{key}.name: duplicate user \"{}\"", u.name));
        }
        let password = secret(
            problems,
            &key,
            u.password.as_deref(),
            u.password_file.as_deref(),
            u.password_env.as_deref(),
        );
        let given = u.password.is_some() || u.password_file.is_some() || u.password_env.is_some();
        match password {
            Some(password) => users.push(User {
                name: u.name.clone(),
                password,
            }),
            None if !given => problems.push(format!("{key}: a password is required")),
            None => {} // its problem is listed already
        }
    }
    users
}

/// `[commands]`: `deny` and `rename` (Redis's `rename-command`; "" disables a command).
fn validate_commands(problems: &mut Vec<String>, raw: &raw::Commands) -> CommandPolicy {
    // At most 64 bytes: the session compares names in a buffer of that size.
    let name_ok = |n: &str| (1..=64).contains(&n.len()) && n.chars().all(|c| c.is_ascii_graphic());
    let mut policy = CommandPolicy::default();
    for (i, name) in raw.deny.iter().enumerate() {
        if !name_ok(name) {
            problems.push(format!(
                "commands.deny[{i}]: \"{name}\" is not a command name"
            ));
        }
        policy.deny.insert(name.to_ascii_lowercase().into_bytes());
    }
    for (from, to) in &raw.rename {
        if !name_ok(from) {
            problems.push(format!("commands.rename: \"{from}\" is not a command name"));
        }
        if !to.is_empty() && !name_ok(to) {
            problems.push(format!(
                "commands.rename.{from}: \"{to}\" is not a command name (\"\" disables it)"
            ));
        }
        let from = from.to_ascii_lowercase().into_bytes();
        policy.hidden.insert(from.clone());
        if !to.is_empty() {
            let to = to.to_ascii_lowercase().into_bytes();
            if policy.renamed.insert(to.clone(), from).is_some() {
                problems.push(format!(
                    "commands.rename: two commands renamed to \"{}\"",
                    String::from_utf8_lossy(&to)
                ));
            }
        }
    }
    policy
}

/// The checks beyond `[health]`'s own keys.
struct Checks {
    ping: PingConfig,
    keyspace: Option<KeyspaceConfig>,
    availability: Option<AvailabilityConfig>,
    replication: Option<ReplicationConfig>,
    custom: Vec<CustomConfig>,
}

/// Most shards a keyspace or replication check reaches (a key or channel each).
const MAX_SHARDS: u16 = 1024;

fn validate_checks(
    h: &raw::Health,
    defaults: Timing,
    members: &[MemberConfig],
    problems: &mut Vec<String>,
) -> Checks {
    let timing = |problems: &mut Vec<String>, key: &str, raw: raw::RawTiming, role, timeout| {
        check_timing(problems, defaults, key, raw, role, timeout)
    };
    let ping = match &h.ping {
        None => PingConfig {
            echo: false,
            timing: defaults,
        },
        Some(p) => PingConfig {
            echo: p.echo.unwrap_or(false),
            timing: timing(
                problems,
                "health.ping",
                p.timing(),
                Role::Health,
                defaults.timeout,
            ),
        },
    };
    if ping.timing.role != Role::Health {
        problems.push("health.ping.role: the PING check is always a health check".into());
    }
    let shards = |problems: &mut Vec<String>, key: &str, n: Option<u16>| {
        let n = n.unwrap_or(1);
        if n == 0 || n > MAX_SHARDS {
            problems.push(format!("{key}: must be 1 to {MAX_SHARDS}"));
        }
        n
    };
    let keyspace = h.keyspace.as_ref().map(|k| {
        let timing = timing(
            problems,
            "health.keyspace",
            k.timing(),
            Role::Health,
            defaults.timeout,
        );
        KeyspaceConfig {
            shards: shards(problems, "health.keyspace.shards", k.shards),
            ttl: positive(problems, "health.keyspace.ttl", k.ttl, DEFAULT_KEYSPACE_TTL),
            timing,
        }
    });
    let availability = h.availability.as_ref().map(|a| {
        let key = "health.availability";
        let health = timing(
            problems,
            key,
            a.timing(),
            Role::Health,
            DEFAULT_SLOW_CHECK_TIMEOUT,
        );
        let lag = a.lag.unwrap_or(false).then(|| {
            let raw = raw::RawTiming {
                interval: a.lag_interval.or(a.interval),
                timeout: a.timeout,
                rise: a.rise,
                fall: a.fall,
                role: a.lag_role,
            };
            LagConfig {
                tolerance: positive(
                    problems,
                    "health.availability.lag_tolerance",
                    a.lag_tolerance,
                    DEFAULT_LAG_TOLERANCE,
                ),
                timing: timing(
                    problems,
                    "health.availability.lag",
                    raw,
                    Role::Sync,
                    health.timeout,
                ),
            }
        });
        for (i, m) in members.iter().enumerate() {
            if m.api.is_none() || m.bdb.is_none() {
                problems.push(format!(
                    "members[{i}]: [health.availability] needs every member's api and bdb"
                ));
            }
        }
        let password = secret(
            problems,
            key,
            a.password.as_deref(),
            a.password_file.as_deref(),
            a.password_env.as_deref(),
        );
        let ca_pem = a
            .ca_file
            .as_ref()
            .and_then(|path| match std::fs::read(path) {
                Ok(pem) => Some(pem),
                Err(e) => {
                    problems.push(format!("{key}.ca_file: cannot read \"{path}\": {e}"));
                    None
                }
            });
        AvailabilityConfig {
            endpoint: a.endpoint.unwrap_or(ApiEndpoint::Local),
            username: a.username.clone(),
            password,
            ca_pem,
            verify_tls: a.verify_tls.unwrap_or(true),
            timing: health,
            lag,
        }
    });
    let replication = h.replication.as_ref().map(|r| {
        let timing = timing(
            problems,
            "health.replication",
            r.timing(),
            Role::Sync,
            defaults.timeout,
        );
        let tolerance = positive(
            problems,
            "health.replication.tolerance",
            r.tolerance,
            DEFAULT_REPLICATION_TOLERANCE,
        );
        if members.len() < 2 {
            problems.push("health.replication: needs at least two members".into());
        }
        ReplicationConfig {
            tolerance,
            shards: shards(problems, "health.replication.shards", r.shards),
            timing,
        }
    });
    let mut names = HashSet::new();
    let mut custom = Vec::new();
    for (i, c) in h.custom.iter().enumerate() {
        let key = format!("health.custom[{i}]");
        let timing = timing(
            problems,
            &key,
            c.timing(),
            Role::Health,
            DEFAULT_SLOW_CHECK_TIMEOUT,
        );
        let reserved = ["ping", "keyspace", "availability", "lag", "replication"];
        if c.name.is_empty() || !c.name.chars().all(|ch| ch.is_ascii_graphic()) {
            problems.push(format!("{key}.name: must be non-empty printable ASCII"));
        } else if reserved.contains(&c.name.as_str()) || !names.insert(c.name.clone()) {
            problems.push(format!(
                "{key}.name: \"{}\" is already a check's name",
                c.name
            ));
        }
        let action = match (&c.commands, &c.expect, &c.program) {
            (Some(commands), Some(expect), None)
                if commands.len() == expect.len()
                    && !commands.is_empty()
                    && commands.iter().all(|c| !c.is_empty()) =>
            {
                CustomAction::Commands(commands.iter().cloned().zip(expect.clone()).collect())
            }
            (None, None, Some(program)) if !program.is_empty() => {
                CustomAction::Program(program.clone())
            }
            _ => {
                problems.push(format!(
                    "{key}: set either commands (a list of commands, each a list of words) \
                     with expect (one pattern per command), or program (the program and its \
                     arguments)"
                ));
                continue;
            }
        };
        custom.push(CustomConfig {
            name: c.name.clone(),
            action,
            timing,
        });
    }
    Checks {
        ping,
        keyspace,
        availability,
        replication,
        custom,
    }
}

/// A duration key's value (or its default), which must be greater than zero and at most
/// 30 days.
fn positive(
    problems: &mut Vec<String>,
    key: &str,
    value: Option<Duration>,
    default: Duration,
) -> Duration {
    let d = value.unwrap_or(default);
    if d.is_zero() {
        problems.push(format!("{key}: must be greater than zero"));
    }
    if d > MAX_DURATION {
        problems.push(format!("{key}: must be at most 30 days"));
    }
    d
}

/// A check's timing: its own keys, else `[health]`'s, else the kind's `timeout` and `role`.
fn check_timing(
    problems: &mut Vec<String>,
    defaults: Timing,
    key: &str,
    raw: raw::RawTiming,
    role: Role,
    timeout: Duration,
) -> Timing {
    let interval = positive(
        problems,
        &format!("{key}.interval"),
        raw.interval,
        defaults.interval,
    );
    let timeout = positive(problems, &format!("{key}.timeout"), raw.timeout, timeout);
    let mut count = |name: &str, v: Option<u32>, default: u32| {
        let n = v.unwrap_or(default);
        if n == 0 {
            problems.push(format!("{key}.{name}: must be at least 1"));
        }
        n
    };
    Timing {
        interval,
        timeout,
        rise: count("rise", raw.rise, defaults.rise),
        fall: count("fall", raw.fall, defaults.fall),
        role: raw.role.unwrap_or(role),
    }
}

/// A secret given inline, in a file, or in an environment variable (one of them).
fn secret(
    problems: &mut Vec<String>,
    key: &str,
    inline: Option<&str>,
    file: Option<&str>,
    env: Option<&str>,
) -> Option<Secret> {
    match (inline, file, env) {
        (None, None, None) => None,
        (Some(p), None, None) => Some(Secret(p.to_string())),
        (None, Some(path), None) => match std::fs::read_to_string(path) {
            Ok(s) => Some(Secret(s.trim_end_matches(['\r', '\n']).to_string())),
            Err(e) => {
                problems.push(format!("{key}.password_file: cannot read \"{path}\": {e}"));
                None
            }
        },
        (None, None, Some(var)) => match std::env::var(var) {
            Ok(s) => Some(Secret(s)),
            Err(_) => {
                problems.push(format!("{key}.password_env: ${var} is not set"));
                None
            }
        },
        _ => {
            problems.push(format!(
                "{key}: set one of password, password_file and password_env"
            ));
            None
        }
    }
}

/// `host:port` with a non-empty host and a port in 1..=65535 (`[v6]:port` allowed).
fn valid_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let host_ok = !host.is_empty() && !host.contains(char::is_whitespace);
    host_ok && matches!(port.parse::<u16>(), Ok(p) if p > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [proxy]
        listen = "127.0.0.1:6380"
        mode = "colocated"
        [admin]
        listen = "127.0.0.1:9380"
        [[members]]
        id = "us-east"
        address = "127.0.0.1:7001"
        region = "us-east"
        [[members]]
        id = "eu-west"
        address = "127.0.0.1:7002"
        region = "eu-west"
    "#;

    fn problems(text: &str) -> Vec<String> {
        Config::from_toml(text).unwrap_err().problems
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.members.len(), 2);
        assert_eq!(c.health.ping.timing.rise, DEFAULT_RISE_FALL);
        assert_eq!(c.failover.failback, Failback::Auto);
        assert_eq!(c.failover.failback_after, DEFAULT_FAILBACK_AFTER);
        assert_eq!(c.proxy.max_clients, DEFAULT_MAX_CLIENTS);
        assert!(c.proxy.multiplex);
        assert_eq!(c.proxy.threads, COLOCATED_THREADS);
    }

    #[test]
    fn threads_zero_is_one_worker_per_core() {
        let text = MINIMAL.replace("mode = \"colocated\"", "mode = \"colocated\"\nthreads = 0");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(Config::from_toml(&text).unwrap().proxy.threads, cores);
    }

    #[test]
    fn region_members_come_first() {
        let text = MINIMAL.replace(
            "mode = \"colocated\"",
            "mode = \"colocated\"\nregion = \"eu-west\"",
        );
        let c = Config::from_toml(&text).unwrap();
        let ids: Vec<_> = c.members.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["eu-west", "us-east"]);
    }

    #[test]
    fn every_problem_names_its_key() {
        let text = r#"
            [proxy]
            listen = "nowhere"
            mode = "colocated"
            region = "mars"
            [admin]
            listen = "127.0.0.1:9380"
            [health]
            rise = 0
            interval = "0s"
            [[members]]
            id = "a"
            address = "127.0.0.1"
            [[members]]
            id = "a"
            address = "127.0.0.1:7002"
        "#;
        let p = problems(text).join("\n");
        for key in [
            "proxy.listen",
            "proxy.region",
            "health.rise",
            "health.interval",
            "members[0].address",
            "members[1].id: duplicate",
        ] {
            assert!(p.contains(key), "no problem names {key}:\n{p}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_errors() {
        let p = problems(&MINIMAL.replace("[admin]", "[admin]\nlistne = 1")).join("\n");
        assert!(p.contains("listne"), "{p}");
        let p = problems(&format!("{MINIMAL}\n[failover]\nfailback_after = \"soon\"")).join("\n");
        assert!(p.contains("failback_after"), "{p}");
    }

    #[test]
    fn every_check_kind_is_configured_with_its_own_timing() {
        let text = format!(
            "{}\n{}",
            MINIMAL
                .replace(
                    "region = \"us-east\"",
                    "region = \"us-east\"\napi = \"https://a:9443\"\nbdb = 1"
                )
                .replace(
                    "region = \"eu-west\"",
                    "region = \"eu-west\"\napi = \"https://b:9443\"\nbdb = 1"
                ),
            r#"
            [health]
            policy = "majority"
            interval = "2s"
            [health.ping]
            echo = true
            [health.keyspace]
            shards = 3
            interval = "5s"
            [health.availability]
            username = "u"
            password = "p"
            lag = true
            lag_tolerance = "250ms"
            [health.replication]
            tolerance = "3s"
            role = "health"
            [[health.custom]]
            name = "role"
            commands = [["ROLE"]]
            expect = ["master*"]
            [[health.custom]]
            name = "script"
            program = ["/bin/true"]
            fall = 5
            "#
        );
        let c = Config::from_toml(&text).unwrap();
        let h = &c.health;
        assert_eq!(h.policy, Policy::Majority);
        assert!(h.ping.echo);
        let k = h.keyspace.as_ref().unwrap();
        assert_eq!((k.shards, k.timing.interval), (3, Duration::from_secs(5)));
        let a = h.availability.as_ref().unwrap();
        assert_eq!(
            (a.timing.role, a.timing.interval),
            (Role::Health, Duration::from_secs(2))
        );
        assert_eq!(a.timing.timeout, DEFAULT_SLOW_CHECK_TIMEOUT);
        let lag = a.lag.as_ref().unwrap();
        assert_eq!(
            (lag.timing.role, lag.tolerance),
            (Role::Sync, Duration::from_millis(250))
        );
        let r = h.replication.as_ref().unwrap();
        assert_eq!(
            r.timing.role,
            Role::Health,
            "a sync check can count as health"
        );
        assert_eq!(h.custom.len(), 2);
        assert_eq!(h.custom[1].timing.fall, 5);
        assert_eq!(h.custom[0].timing.fall, DEFAULT_RISE_FALL);
        let names: Vec<_> = crate::health::plan(h).into_iter().map(|s| s.name).collect();
        let want = [
            "ping",
            "keyspace",
            "availability",
            "lag",
            "replication",
            "role",
            "script",
        ];
        assert_eq!(names, want);
    }

    #[test]
    fn bad_checks_name_their_keys() {
        let text = format!(
            "{MINIMAL}\n{}",
            r#"
            [health.keyspace]
            shards = 0
            [health.availability]
            password = "p"
            password_env = "GEOPROXY_TEST_UNSET_VARIABLE"
            [health.ping]
            role = "sync"
            [[health.custom]]
            name = "ping"
            program = ["x"]
            [[health.custom]]
            name = "both"
            program = ["x"]
            commands = [["PING"]]
            expect = ["PONG"]
            [[health.custom]]
            name = "uneven"
            commands = [["PING"], ["PING"]]
            expect = ["PONG"]
            rise = 0
            "#
        );
        let p = problems(&text).join("\n");
        for key in [
            "health.keyspace.shards",
            "members[0]: [health.availability] needs every member's api and bdb",
            "health.availability: set one of password, password_file and password_env",
            "health.ping.role",
            "health.custom[0].name: \"ping\" is already a check's name",
            "health.custom[1]: set either commands",
            "health.custom[2]: set either commands",
            "health.custom[2].rise",
        ] {
            assert!(p.contains(key), "no problem names {key}:\n{p}");
        }
    }

    #[test]
    fn tls_auth_and_command_keys_name_their_problems() {
        let member = "region = \"us-east\"";
        let cases: &[(&str, &str, &str)] = &[
            (member, "region = \"us-east\"\ntls_verify = false", "members[0]: tls_* keys need tls = true"),
            (
                member,
                "region = \"us-east\"\ntls = true\ntls_ca_file = \"/nonexistent/ca.pem\"",
                "members[0].tls_ca_file: cannot read \"/nonexistent/ca.pem\"",
            ),
            (
                member,
                "region = \"us-east\"\ntls = true\ntls_cert_file = \"/x.pem\"",
                "members[0]: tls_cert_file and tls_key_file go together",
            ),
            (
                "mode = \"colocated\"",
                "mode = \"colocated\"\ntls = { listen = \"127.0.0.1:6390\", cert_file = \"/no.pem\", key_file = \"/no.key\" }",
                "proxy.tls.cert_file: cannot read \"/no.pem\"",
            ),
            (
                "mode = \"colocated\"",
                "mode = \"colocated\"\nauth = \"proxy\"",
                "proxy.users: proxy.auth = \"proxy\" needs at least one [[proxy.users]]",
            ),
            (
                "mode = \"colocated\"",
                "mode = \"colocated\"\nusers = [{ name = \"a\", password = \"b\" }]",
                "proxy.users: only used with proxy.auth = \"proxy\"",
            ),
            (
                "mode = \"colocated\"",
                "mode = \"colocated\"\nauth = \"proxy\"\nusers = [{ name = \"a\" }]",
                "proxy.users[0]: a password is required",
            ),
            (
                "[admin]",
                "[commands]\nrename = { GET = \"X\", SET = \"x\" }\n[admin]",
                "commands.rename: two commands renamed to \"x\"",
            ),
            (
                "mode = \"colocated\"",
                "mode = \"centralized\"",
                "centralized: proxy.mode = \"centralized\" needs a [centralized] table",
            ),
            (
                "[admin]",
                "[centralized]\nelection = \"etcd\"\n[admin]",
                "centralized: only used with proxy.mode = \"centralized\"",
            ),
        ];
        for (from, to, want) in cases {
            let text = MINIMAL.replacen(from, to, 1);
            let p = problems(&text);
            assert!(p.iter().any(|p| p.starts_with(want)), "{want}: got {p:?}");
        }
    }

    #[test]
    fn centralized_keys_name_their_problems() {
        let with = |table: &str| {
            MINIMAL
                .replacen("mode = \"colocated\"", "mode = \"centralized\"", 1)
                .replacen("[admin]", &format!("[centralized]\n{table}\n[admin]"), 1)
        };
        let cases = [
            (
                "election = \"etcd\"",
                "centralized.etcd_endpoints: at least one etcd endpoint",
            ),
            (
                "election = \"etcd\"\netcd_endpoints = [\"http://e:2379\"]\nlease_ttl = \"1s\"",
                "centralized.lease_ttl: must be at least 2s",
            ),
            (
                "election = \"raft\"",
                "centralized.election: \"raft\" is not \"etcd\" or \"peer\"",
            ),
            (
                "election = \"peer\"",
                "centralized.peer: election = \"peer\" needs",
            ),
        ];
        for (table, want) in cases {
            let p = problems(&with(table));
            assert!(p.iter().any(|p| p.starts_with(want)), "{want}: got {p:?}");
        }
        let c = Config::from_toml(&with(
            "election = \"etcd\"\netcd_endpoints = [\"http://e:2379/\"]",
        ))
        .unwrap();
        assert_eq!(c.failover.switch, SwitchMode::Strict);
        match c.centralized.unwrap().election {
            Election::Etcd {
                endpoints,
                lease_ttl,
                ..
            } => {
                assert_eq!(endpoints, ["http://e:2379"]);
                assert_eq!(lease_ttl, DEFAULT_LEASE_TTL);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pooled_keys_name_their_problems_and_default_the_quorum() {
        let with = |table: &str| {
            MINIMAL
                .replacen("mode = \"colocated\"", "mode = \"pooled\"", 1)
                .replacen("[admin]", &format!("[pooled]\n{table}\n[admin]"), 1)
        };
        let cases = [
            (
                "interval = \"1s\"",
                "pooled: set either etcd_endpoints or peers",
            ),
            (
                "peers = [\"h:9380\"]",
                "pooled.peers[0]: \"h:9380\" is not a URL",
            ),
            (
                "peers = [\"http://h:9380\"]\nquorum = 3",
                "pooled.quorum: 3 must be 1 to the pool's size",
            ),
            (
                "etcd_endpoints = [\"http://e:2379\"]\nlease_ttl = \"2s\"\ninterval = \"1500ms\"",
                "pooled.interval: 1.5s must be at most half of pooled.lease_ttl",
            ),
        ];
        for (table, want) in cases {
            let p = problems(&with(table));
            assert!(p.iter().any(|p| p.starts_with(want)), "{want}: got {p:?}");
        }
        let two_peers = with("peers = [\"http://b:9380\", \"http://c:9380/\"]");
        let c = Config::from_toml(&two_peers).unwrap().pooled.unwrap();
        assert_eq!(c.quorum, 2);
        let etcd = with("etcd_endpoints = [\"http://e:2379\"]");
        assert_eq!(Config::from_toml(&etcd).unwrap().pooled.unwrap().quorum, 2);
        let p = problems(&MINIMAL.replacen("[admin]", "[pooled]\npeers = []\n[admin]", 1));
        assert!(
            p.iter()
                .any(|p| p == "pooled: only used with proxy.mode = \"pooled\""),
            "{p:?}"
        );
    }

    /// Every example in `config/` is valid, but for the files and variables it names that
    /// exist only where it is deployed.
    #[test]
    fn every_example_in_config_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            seen += 1;
            if let Err(e) = Config::load(&path) {
                let elsewhere = |p: &String| p.contains("cannot read") || p.contains("is not set");
                assert!(e.problems.iter().all(elsewhere), "{}: {e}", path.display());
            }
        }
        assert!(seen >= 4);
    }

    #[test]
    fn secrets_do_not_print() {
        let text = MINIMAL.replace(
            "region = \"us-east\"",
            "region = \"us-east\"\npassword = \"hunter2\"",
        );
        let c = Config::from_toml(&text).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(c.members[0].password.as_ref().unwrap().expose(), "hunter2");
    }

    /// A reload names the keys it cannot apply, section by section.
    #[test]
    fn changed_keys_name_what_differs() {
        let a = Config::from_toml(MINIMAL).unwrap();
        let text =
            MINIMAL.replace("127.0.0.1:6380", "127.0.0.1:6390") + "[commands]\ndeny = [\"KEYS\"]\n";
        let b = Config::from_toml(&text).unwrap();
        assert_eq!(
            a.source.changed_keys(&b.source, &["members", "health"]),
            ["commands.deny", "proxy.listen"]
        );
        assert!(a.source.changed_keys(&a.source, &[]).is_empty());
        let mut c = a.source.clone();
        c.adopt(&b.source, &["proxy"]);
        assert_eq!(c.changed_keys(&b.source, &[]), ["commands.deny"]);
    }
}
