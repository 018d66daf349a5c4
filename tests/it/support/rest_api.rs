//! The Redis Software REST API's availability requests, played over real HTTPS: a CA and a
//! server certificate made at start (rcgen), rustls, and axum answering as Redis Software
//! documents (200; 503 with `{error_code, description}`; 401 without the right Basic auth;
//! 404 for another database). Each test switches the answers of the plain and the
//! lag-aware request on its own server.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// The database uid the API knows.
pub const BDB: u64 = 1;
pub const USER: &str = "geoproxy@example.com";
pub const PASSWORD: &str = "api-s3cret";

/// What a request answers: 200, or this status with this `error_code`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Available,
    Unavailable(u16, &'static str),
}

#[derive(Default)]
struct Answers {
    plain: Option<Answer>,
    lag: Option<Answer>,
    /// Path and query of the requests received, in order.
    seen: Vec<String>,
}

pub struct RestApi {
    pub addr: SocketAddr,
    /// The CA, to sign a sibling's certificate.
    ca_params: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
    /// The CA that signed the server's certificate, as a PEM file.
    pub ca_file: tempfile::NamedTempFile,
    answers: Arc<Mutex<Answers>>,
    stop: CancellationToken,
}

impl RestApi {
    /// Starts an API answering 200 to both requests, with a CA of its own.
    pub async fn start() -> RestApi {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "test cluster CA");
        RestApi::signed_by(ca, ca_key, None).await
    }

    /// Another API (another member's cluster) whose certificate the same CA signed.
    pub async fn sibling(&self) -> RestApi {
        let ca_key = rcgen::KeyPair::from_pem(&self.ca_key.serialize_pem()).expect("key");
        let ca_pem = std::fs::read_to_string(self.ca_file.path()).expect("CA file");
        RestApi::signed_by(self.ca_params.clone(), ca_key, Some(ca_pem)).await
    }

    /// A server whose certificate the CA (`ca_params`, `ca_key`) signs; `ca_pem`: the CA's
    /// certificate as already handed out.
    async fn signed_by(
        ca_params: rcgen::CertificateParams,
        ca_key: rcgen::KeyPair,
        ca_pem: Option<String>,
    ) -> RestApi {
        let ca_cert = ca_params.clone().self_signed(&ca_key).expect("CA");
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("server params");
        let cert = params.signed_by(&key, &ca_cert, &ca_key).expect("cert");
        let ca_file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(ca_file.path(), ca_pem.unwrap_or_else(|| ca_cert.pem())).expect("write CA");

        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let config = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("TLS config");
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let answers = Arc::new(Mutex::new(Answers {
            plain: Some(Answer::Available),
            lag: Some(Answer::Available),
            seen: Vec::new(),
        }));
        let app = Router::new()
            .route(
                "/v1/local/bdbs/{uid}/endpoint/availability",
                get(availability),
            )
            .route("/v1/bdbs/{uid}/availability", get(availability))
            .with_state(answers.clone());
        let listener = Tls {
            tcp,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        };
        let stop = CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { until.cancelled().await })
                .await;
        });
        RestApi {
            addr,
            ca_params,
            ca_key,
            ca_file,
            answers,
            stop,
        }
    }

    /// `https://127.0.0.1:PORT`, a member's `api`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// What the plain availability request answers from now on.
    pub fn set(&self, answer: Answer) {
        self.lock().plain = Some(answer);
    }

    /// What the lag-aware request (`extend_check=lag`) answers from now on.
    pub fn set_lag(&self, answer: Answer) {
        self.lock().lag = Some(answer);
    }

    /// The paths and queries received so far.
    pub fn seen(&self) -> Vec<String> {
        self.lock().seen.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Answers> {
        self.answers.lock().unwrap()
    }
}

impl Drop for RestApi {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn availability(
    State(answers): State<Arc<Mutex<Answers>>>,
    Path(uid): Path<u64>,
    Query(query): Query<Vec<(String, String)>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let expected = format!("Basic {}", base64(format!("{USER}:{PASSWORD}").as_bytes()));
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    let error = |status: StatusCode, code: &str, description: &str| {
        let body = serde_json::json!({ "error_code": code, "description": description });
        (status, Json(body)).into_response()
    };
    if auth != Some(expected.as_str()) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized", "bad credentials");
    }
    if uid != BDB {
        return error(StatusCode::NOT_FOUND, "bdb_not_found", "no such database");
    }
    let lag = query.iter().any(|(k, v)| k == "extend_check" && v == "lag");
    let mut a = answers.lock().unwrap();
    a.seen.push(uri.to_string());
    let answer = if lag { a.lag.clone() } else { a.plain.clone() };
    match answer {
        Some(Answer::Available) | None => StatusCode::OK.into_response(),
        Some(Answer::Unavailable(status, code)) => error(
            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            code,
            "played by the test",
        ),
    }
}

/// Standard base64 (for the expected `Authorization` header).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A TLS listener for axum: handshakes each accepted connection; a failed handshake
/// (a client that does not trust the CA) is dropped.
struct Tls {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for Tls {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(stream).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

#[test]
fn base64_matches_rfc_4648() {
    for (input, want) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
    ] {
        assert_eq!(base64(input.as_bytes()), want);
    }
}
