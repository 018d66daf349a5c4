//! Certificates for TLS tests (made by rcgen at the start of a test), `redis-server` started
//! with a TLS port, and a raw TLS client of the proxy's TLS listener.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use super::free_port;
use super::redis_server::RedisServer;

/// A CA and the files it signed, in a temp dir that lives as long as this value.
pub struct Pki {
    pub dir: tempfile::TempDir,
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

/// A certificate and its key, as PEM file paths.
pub struct Pair {
    pub cert: String,
    pub key: String,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let ca_cert = params.self_signed(&ca_key).expect("CA");
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).expect("write CA");
        Pki {
            dir,
            ca_cert,
            ca_key,
        }
    }

    /// The CA certificate's PEM file.
    pub fn ca_file(&self) -> String {
        self.path("ca.pem")
    }

    fn path(&self, file: &str) -> String {
        self.dir
            .path()
            .join(file)
            .to_str()
            .expect("utf-8")
            .to_string()
    }

    /// A certificate for 127.0.0.1 and localhost (server or client), written as
    /// `<name>.pem` and `<name>.key`.
    pub fn issue(&self, name: &str) -> Pair {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("sign");
        let pair = Pair {
            cert: self.path(&format!("{name}.pem")),
            key: self.path(&format!("{name}.key")),
        };
        std::fs::write(&pair.cert, cert.pem()).expect("write cert");
        std::fs::write(&pair.key, key.serialize_pem()).expect("write key");
        pair
    }

    /// A rustls client config trusting this CA, with an optional client certificate.
    pub fn client_config(&self, client: Option<&Pair>) -> Arc<ClientConfig> {
        self.client_config_with(client, rustls::DEFAULT_VERSIONS)
    }

    /// The same, speaking only the TLS versions given.
    pub fn client_config_with(
        &self,
        client: Option<&Pair>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(self.ca_file()).expect("CA"))
            .expect("add CA");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some(pair) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_file(&pair.cert).expect("cert")],
                    PrivateKeyDer::from_pem_file(&pair.key).expect("key"),
                )
                .expect("client auth"),
        };
        Arc::new(config)
    }
}

/// A `redis-server` serving TLS on [`TlsRedis::tls_addr`] (its plain port stays for the
/// fixture's own queries), its certificate signed by `pki`'s CA. With `auth_clients`,
/// clients must present a certificate the CA signed.
pub struct TlsRedis {
    pub server: RedisServer,
    pub tls_port: u16,
}

impl TlsRedis {
    pub fn start(pki: &Pki, auth_clients: bool) -> TlsRedis {
        let server_pair = pki.issue(&format!("redis-{}", rand_suffix()));
        let tls_port = free_port();
        let port = tls_port.to_string();
        let ca = pki.ca_file();
        let auth = if auth_clients { "yes" } else { "no" };
        let server = RedisServer::start_with(&[
            "--tls-port",
            &port,
            "--tls-cert-file",
            &server_pair.cert,
            "--tls-key-file",
            &server_pair.key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            auth,
        ]);
        TlsRedis { server, tls_port }
    }

    pub fn tls_addr(&self) -> String {
        format!("127.0.0.1:{}", self.tls_port)
    }
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A raw RESP client over TLS.
pub struct TlsRaw(pub TlsStream<TcpStream>);

impl TlsRaw {
    pub async fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> std::io::Result<TlsRaw> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("127.0.0.1").expect("name");
        let tls = TlsConnector::from(config).connect(name, tcp).await?;
        Ok(TlsRaw(tls))
    }

    /// Sends `bytes` and reads until exactly `reply` arrived (5 s at most).
    pub async fn roundtrip(&mut self, bytes: &[u8], reply: &[u8]) {
        self.0.write_all(bytes).await.expect("write");
        self.0.flush().await.expect("flush");
        let mut got = vec![0u8; reply.len()];
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            self.0.read_exact(&mut got),
        )
        .await
        .expect("a reply within 5 s")
        .expect("read");
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(reply),
            "after sending {:?}",
            String::from_utf8_lossy(bytes)
        );
    }
}
