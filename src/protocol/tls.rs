//! TLS on both sides of pgmux (rustls, ring).
//!
//! - Clients: a client that opens with SSLRequest gets `S` and a TLS
//!   handshake when `tls_mode` is not `disable` (the certificate and key
//!   from `tls_cert_file` / `tls_key_file`); with `require`, a client that
//!   does not is refused (`28000`).
//! - Servers: with `server_tls_mode`, pgmux opens each server connection
//!   with SSLRequest. `prefer` falls back to plain text when the server
//!   declines; `require` encrypts without checking the certificate (as
//!   libpq's `sslmode=require`); `verify-ca` checks the chain against
//!   `server_tls_ca_file`; `verify-full` also the host name.
//!
//! [`MaybeTls`] is the byte stream either way.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{ClientTlsMode, ServerTlsMode};

/// A connection, in plain text or TLS.
pub enum MaybeTls<S> {
    Plain(TcpStream),
    Tls(Box<S>),
}

/// A client's connection to pgmux.
pub type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;
/// pgmux's connection to a server.
pub type ServerStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

impl<S> MaybeTls<S> {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }

    /// Ready when a read would not block (plain text; a TLS stream may
    /// hold decrypted bytes already, so it is always ready to try). Waits
    /// through the socket's own registration: the waiting future holds
    /// nothing of its own.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            MaybeTls::Plain(s) => s.poll_read_ready(cx),
            MaybeTls::Tls(_) => Poll::Ready(Ok(())),
        }
    }
}

impl ServerStream {
    fn tcp(&self) -> &TcpStream {
        match self {
            MaybeTls::Plain(s) => s,
            MaybeTls::Tls(t) => t.get_ref().0,
        }
    }

    /// Whether an idle connection is closed (or, in plain text, has bytes
    /// nobody asked for), without reading from it.
    pub fn is_broken(&self) -> bool {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut probe = [0u8; 64];
        let mut buf = ReadBuf::new(&mut probe);
        match self.tcp().poll_peek(&mut cx, &mut buf) {
            Poll::Pending => false,
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => true,
            // TLS records (a session ticket) may arrive unasked.
            Poll::Ready(Ok(_)) => !self.is_tls(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}: {1}")]
    File(String, String),
    #[error("TLS setup: {0}")]
    Setup(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = |e: rustls::pki_types::pem::Error| TlsError::File(path.display().to_string(), e.to_string());
    CertificateDer::pem_file_iter(path).map_err(file)?.collect::<Result<Vec<_>, _>>().map_err(file)
}

/// What pgmux tells clients that ask for TLS.
pub struct ClientTls {
    pub mode: ClientTlsMode,
    pub acceptor: Option<tokio_rustls::TlsAcceptor>,
}

impl ClientTls {
    pub fn new(
        mode: ClientTlsMode,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> Result<ClientTls, TlsError> {
        let (Some(cert), Some(key), false) = (cert, key, mode == ClientTlsMode::Disable) else {
            return Ok(ClientTls { mode, acceptor: None });
        };
        let chain = certs(cert)?;
        let key =
            PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File(key.display().to_string(), e.to_string()))?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        Ok(ClientTls { mode, acceptor: Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))) })
    }
}

/// How pgmux opens server connections.
pub struct ServerTls {
    pub mode: ServerTlsMode,
    connector: Option<tokio_rustls::TlsConnector>,
    config: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerTls({:?})", self.mode)
    }
}

impl ServerTls {
    pub fn plain() -> ServerTls {
        ServerTls { mode: ServerTlsMode::Disable, connector: None, config: None }
    }

    /// Connect a tokio-postgres client (the lag monitor, the shard
    /// directory, shard moves, auth_query) as this mode says. The
    /// connection runs in the background; its asynchronous messages
    /// (notifications) go to `messages` when given.
    pub async fn pg_connect(
        &self,
        cfg: &tokio_postgres::Config,
        messages: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::AsyncMessage>>,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        match &self.config {
            None => {
                let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
                Ok((client, tokio::spawn(drive(conn, messages))))
            }
            Some(config) => {
                let mut cfg = cfg.clone();
                cfg.ssl_mode(match self.mode {
                    ServerTlsMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                    _ => tokio_postgres::config::SslMode::Require,
                });
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new((**config).clone());
                let (client, conn) = cfg.connect(tls).await?;
                Ok((client, tokio::spawn(drive(conn, messages))))
            }
        }
    }

    pub fn new(mode: ServerTlsMode, ca: Option<&std::path::Path>) -> Result<ServerTls, TlsError> {
        if mode == ServerTlsMode::Disable {
            return Ok(ServerTls::plain());
        }
        let provider = provider();
        let verifier: Arc<dyn ServerCertVerifier> = match (mode, ca) {
            (ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull, Some(ca)) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certs(ca)? {
                    roots.add(c)?;
                }
                let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Setup(rustls::Error::General(e.to_string())))?;
                Arc::new(Verify {
                    inner: Some(webpki),
                    names: mode == ServerTlsMode::VerifyFull,
                    provider: provider.clone(),
                })
            }
            (ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull, None) => {
                return Err(TlsError::File("server_tls_ca_file".into(), "needed to verify servers".into()))
            }
            _ => Arc::new(Verify { inner: None, names: false, provider: provider.clone() }),
        };
        let config = Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth(),
        );
        Ok(ServerTls { mode, connector: Some(tokio_rustls::TlsConnector::from(config.clone())), config: Some(config) })
    }

    /// Ask `stream`'s server for TLS (SSLRequest) as the mode says.
    pub async fn start(&self, mut stream: TcpStream, host: &str) -> io::Result<ServerStream> {
        let Some(connector) = &self.connector else { return Ok(MaybeTls::Plain(stream)) };
        stream.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
        let mut answer = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut stream, &mut answer).await?;
        match answer[0] {
            b'S' => {
                let name = ServerName::try_from(host.to_string())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
                Ok(MaybeTls::Tls(Box::new(connector.connect(name, stream).await?)))
            }
            b'N' if self.mode == ServerTlsMode::Prefer => Ok(MaybeTls::Plain(stream)),
            b'N' => Err(io::Error::new(io::ErrorKind::ConnectionRefused, "the server does not support TLS")),
            _ => Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected answer to SSLRequest")),
        }
    }
}

/// Run a tokio-postgres connection, passing its messages on.
async fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    messages: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::AsyncMessage>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    while let Some(Ok(m)) = stream.next().await {
        if let Some(tx) = &messages {
            if tx.send(m).is_err() {
                return;
            }
        }
    }
}

/// Certificate checks per mode: none (encryption only), the chain, or the
/// chain and the name.
#[derive(Debug)]
struct Verify {
    inner: Option<Arc<WebPkiServerVerifier>>,
    names: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verify {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(inner) = &self.inner else { return Ok(ServerCertVerified::assertion()) };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.names => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
