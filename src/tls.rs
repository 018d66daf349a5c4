//! TLS settings turned into rustls configurations: the [`Connector`] of a member with
//! `tls = true` (sessions and health checks use the same one, and its session cache lets a
//! failover resume TLS sessions instead of paying full handshakes), and the [`Acceptor`] of
//! the TLS listener, whose certificate and key are read again on reload.
//!
//! Files are read when the configuration is validated: a missing or malformed certificate
//! is a configuration error naming its key, never a surprise at the first connection.

use std::fmt;
use std::io;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::client::Resumption;
use tokio_rustls::rustls::crypto::{ring, CryptoProvider, WebPkiSupportedAlgorithms};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{
    self, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    SupportedProtocolVersion,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::stream::Stream;

/// Entries of the member connector's session cache. rustls keeps at most 8 TLS 1.3 tickets
/// per server name whatever this says, and a ticket serves one resumption, so a reconnect
/// storm to one member resumes few sessions (measured in benches/README.md, "TLS").
/// TODO: a cache that keeps more tickets per member would make failovers to TLS members
/// cheaper (about 1 ms of member CPU per full RSA handshake).
const RESUMPTION_CACHE: usize = 4096;

/// How long a client has to finish its TLS handshake with the listener.
pub const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A member's TLS settings as configured (the paths, for `/v1/status` and reload).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberTls {
    /// PEM file of the CAs that sign the member's certificate; `None`: the Mozilla roots.
    pub ca_file: Option<String>,
    /// The name the member's certificate must carry (SNI too); defaults to the host.
    pub server_name: String,
    /// Client certificate and key (mTLS), PEM.
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    /// `false`: any certificate is accepted (logged as a warning at start).
    pub verify: bool,
}

/// Opens TLS connections to one member.
#[derive(Clone)]
pub struct Connector {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    pub settings: MemberTls,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("settings", &self.settings)
            .finish()
    }
}

/// Two connectors are the same when configured alike (a reload compares members this way).
impl PartialEq for Connector {
    fn eq(&self, other: &Connector) -> bool {
        self.settings == other.settings
    }
}

impl Connector {
    /// Reads the files of `settings`; the error names the key (under `key`) at fault.
    pub fn new(key: &str, settings: MemberTls) -> Result<Connector, String> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("{key}.tls: {e}"))?;
        let builder = if settings.verify {
            let mut roots = RootCertStore::empty();
            match &settings.ca_file {
                Some(path) => {
                    for cert in certificates(&format!("{key}.tls_ca_file"), path)? {
                        roots
                            .add(cert)
                            .map_err(|e| format!("{key}.tls_ca_file: \"{path}\": {e}"))?;
                    }
                }
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            }
            builder.with_root_certificates(roots)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(
                    provider.signature_verification_algorithms,
                )))
        };
        let mut config = match (&settings.cert_file, &settings.key_file) {
            (Some(cert), Some(key_path)) => {
                let chain = certificates(&format!("{key}.tls_cert_file"), cert)?;
                let private = private_key(&format!("{key}.tls_key_file"), key_path)?;
                builder
                    .with_client_auth_cert(chain, private)
                    .map_err(|e| format!("{key}.tls_cert_file: {e}"))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(format!(
                    "{key}: tls_cert_file and tls_key_file go together (mTLS)"
                ))
            }
        };
        config.resumption = Resumption::in_memory_sessions(RESUMPTION_CACHE);
        let server_name = ServerName::try_from(settings.server_name.clone()).map_err(|_| {
            format!(
                "{key}.tls_server_name: \"{}\" is not a DNS name or IP address",
                settings.server_name
            )
        })?;
        Ok(Connector {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            settings,
        })
    }

    /// The TLS handshake on a connected socket.
    pub async fn connect(&self, tcp: TcpStream) -> io::Result<Stream> {
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await?;
        Ok(Stream::TlsToMember(Box::new(tls)))
    }
}

/// The TLS listener's settings as configured.
#[derive(Clone, Debug)]
pub struct ListenerTls {
    pub cert_file: String,
    pub key_file: String,
    /// Clients must present a certificate signed by one of these CAs (mTLS).
    pub client_ca_file: Option<String>,
    /// `"1.2"` (default) or `"1.3"`.
    pub min_version: MinVersion,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize)]
pub enum MinVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// The TLS listener's acceptor, replaced whole on reload (sessions already open keep the
/// configuration they were accepted with).
pub struct Acceptor {
    settings: ListenerTls,
    current: RwLock<TlsAcceptor>,
}

impl fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acceptor")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Acceptor {
    pub fn new(settings: ListenerTls) -> Result<Acceptor, String> {
        let acceptor = server_config(&settings)?;
        Ok(Acceptor {
            settings,
            current: RwLock::new(acceptor),
        })
    }

    /// Reads the certificate, key and client CA files again; on error the running ones stay.
    pub fn reload(&self) -> Result<(), String> {
        let acceptor = server_config(&self.settings)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = acceptor;
        Ok(())
    }

    /// The TLS handshake of a client, within [`CLIENT_HANDSHAKE_TIMEOUT`].
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<Stream> {
        let acceptor = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match tokio::time::timeout(CLIENT_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(tls) => Ok(Stream::TlsFromClient(Box::new(tls?))),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake not finished within 10 s",
            )),
        }
    }
}

fn server_config(s: &ListenerTls) -> Result<TlsAcceptor, String> {
    let versions: &[&SupportedProtocolVersion] = match s.min_version {
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| format!("proxy.tls: {e}"))?;
    let builder = match &s.client_ca_file {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("proxy.tls.client_ca_file", path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("proxy.tls.client_ca_file: \"{path}\": {e}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| format!("proxy.tls.client_ca_file: \"{path}\": {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let chain = certificates("proxy.tls.cert_file", &s.cert_file)?;
    let key = private_key("proxy.tls.key_file", &s.key_file)?;
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("proxy.tls.key_file: does not match proxy.tls.cert_file: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// ring: pure Rust and assembly, no C toolchain beyond what the build already needs.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn certificates(key: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{key}: cannot read \"{path}\": {e}"))?
        .collect();
    match certs {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(format!("{key}: \"{path}\" holds no PEM certificate")),
        Err(e) => Err(format!("{key}: \"{path}\": {e}")),
    }
}

fn private_key(key: &str, path: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("{key}: cannot read a PEM private key from \"{path}\": {e}"))
}

/// `tls_verify = false`: any certificate passes (signatures are still checked, so the
/// handshake is sound; who holds the key is not).
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
