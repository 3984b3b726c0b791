//! TLS for every Flotilla listener (rustls, ring), and the certificates it
//! uses (docs/SECURITY.md).
//!
//! One cluster CA signs one certificate per coordinator replica. Replica
//! `N`'s certificate names `flotilla-node-N` (its identity on the Raft
//! port) and the host names clients reach it by (its identity on the HTTP
//! API and the worker API). With the three files configured:
//! - the Raft port speaks mutual TLS: both sides present a certificate of
//!   the cluster CA, each side checks the other names the node it claims to
//!   be, so a peer's declared id is no longer taken on its word;
//! - the HTTP API serves HTTPS and the worker API serves TLS with the same
//!   certificate; clients and workers verify it against the CA.
//!
//! [`generate`] writes such a set (`flotilla certs`).

use crate::ids::NodeId;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// A TCP connection, in the clear or under TLS.
pub type Stream = tokio_util::either::Either<TcpStream, tokio_rustls::TlsStream<TcpStream>>;

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The name replica `id` carries in its certificate, and is checked for on
/// the Raft port.
pub fn node_name(id: NodeId) -> String {
    format!("flotilla-node-{}", id.0)
}

/// Why TLS could not be set up: names the file and the way out.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM.
    #[error("{flag} {path}: {why}")]
    File {
        /// The flag that named it.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The files do not go together.
    #[error("{0}")]
    Mismatch(String),
    /// Writing certificates failed.
    #[error("{0}")]
    Generate(String),
}

fn read_certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = |why: String| TlsError::File { flag, path: path.to_path_buf(), why };
    let pem = std::fs::read(path).map_err(|e| file(format!("cannot read it: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(file("holds no PEM certificate (BEGIN CERTIFICATE); see `flotilla certs`".into()));
    }
    Ok(certs)
}

fn read_key(flag: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| TlsError::File {
        flag,
        path: path.to_path_buf(),
        why: format!("cannot read it: {e}"),
    })?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::File {
        flag,
        path: path.to_path_buf(),
        why: format!("holds no PEM private key ({e}); see `flotilla certs`"),
    })
}

fn roots(flag: &'static str, ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(flag, ca)? {
        roots.add(cert).map_err(|e| TlsError::File {
            flag,
            path: ca.to_path_buf(),
            why: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether `cert` is valid for `name` (its subject alternative names).
fn names(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(server_name) = ServerName::try_from(name) else { return false };
    webpki::EndEntityCert::try_from(cert)
        .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&server_name).is_ok())
}

/// A replica's TLS: its certificate and key, and the cluster CA.
#[derive(Clone)]
pub struct NodeTls {
    me: NodeId,
    /// Raft port, server side: a client certificate of the CA is required.
    peer_server: Arc<ServerConfig>,
    /// Raft port, client side: presents this replica's certificate.
    peer_client: Arc<ClientConfig>,
    /// HTTP API and worker API: no client certificate (they use tokens).
    api_server: Arc<ServerConfig>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls").field("me", &self.me).finish_non_exhaustive()
    }
}

impl NodeTls {
    /// Loads `--tls-ca`, `--tls-cert` and `--tls-key` for replica `me`,
    /// checking that the certificate names `flotilla-node-<me>`, that the
    /// CA signed it, and that the key is its own.
    pub fn load(me: NodeId, ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let roots = roots("--tls-ca", ca)?;
        let chain = read_certs("--tls-cert", cert)?;
        let key = read_key("--tls-key", key)?;
        if !names(&chain[0], &node_name(me)) {
            return Err(TlsError::Mismatch(format!(
                "--tls-cert {} does not name {}: each replica needs its own certificate; make one with `flotilla certs --dir DIR --node {}`",
                cert.display(),
                node_name(me),
                me.0
            )));
        }
        check_signed(me, &roots, &chain, ca, cert)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Mismatch(format!("--tls-ca {}: {e}", ca.display())))?;
        let server = |client_auth: Arc<dyn rustls::server::danger::ClientCertVerifier>| {
            ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Mismatch(e.to_string()))?
                .with_client_cert_verifier(client_auth)
                .with_single_cert(chain.clone(), key.clone_key())
                .map_err(|e| {
                    TlsError::Mismatch(format!(
                        "--tls-key does not go with --tls-cert {}: {e}",
                        cert.display()
                    ))
                })
        };
        let peer_server = Arc::new(server(verifier)?);
        let api_server = Arc::new(server(rustls::server::WebPkiClientVerifier::no_client_auth())?);
        let peer_client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Mismatch(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Mismatch(format!("--tls-key does not go with --tls-cert: {e}")))?;
        Ok(Self { me, peer_server, peer_client: Arc::new(peer_client), api_server })
    }

    /// Opens mutual TLS to replica `peer` over `tcp`: its certificate must
    /// name `flotilla-node-<peer>`.
    pub async fn connect_peer(&self, tcp: TcpStream, peer: NodeId) -> std::io::Result<Stream> {
        let name = ServerName::try_from(node_name(peer)).map_err(std::io::Error::other)?;
        let connector = tokio_rustls::TlsConnector::from(self.peer_client.clone());
        let tls = timed(connector.connect(name, tcp)).await?;
        Ok(Stream::Right(tokio_rustls::TlsStream::Client(tls)))
    }

    /// Accepts mutual TLS on the Raft port: the client must present a
    /// certificate of the CA (checked by rustls); which node it names is
    /// checked against its Hello by [`peer_is`].
    pub async fn accept_peer(&self, tcp: TcpStream) -> std::io::Result<Stream> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.peer_server.clone());
        let tls = timed(acceptor.accept(tcp)).await?;
        Ok(Stream::Right(tokio_rustls::TlsStream::Server(tls)))
    }

    /// Accepts TLS on the HTTP API or the worker API (no client certificate).
    pub async fn accept_api(&self, tcp: TcpStream) -> std::io::Result<Stream> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.api_server.clone());
        let tls = timed(acceptor.accept(tcp)).await?;
        Ok(Stream::Right(tokio_rustls::TlsStream::Server(tls)))
    }
}

/// Refuses a certificate of `chain` the CA of `roots` did not sign (every
/// peer would refuse it: better said at start).
fn check_signed(
    me: NodeId,
    roots: &Arc<RootCertStore>,
    chain: &[CertificateDer<'static>],
    ca: &Path,
    cert: &Path,
) -> Result<(), TlsError> {
    use rustls::client::danger::ServerCertVerifier;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| TlsError::Mismatch(e.to_string()))?;
    let name = ServerName::try_from(node_name(me)).map_err(|e| TlsError::Mismatch(e.to_string()))?;
    verifier
        .verify_server_cert(&chain[0], &chain[1..], &name, &[], rustls::pki_types::UnixTime::now())
        .map(|_| ())
        .map_err(|e| {
            TlsError::Mismatch(format!(
                "--tls-cert {} is not valid under --tls-ca {}: {e}; sign it with that CA (`flotilla certs --dir DIR --node {}`)",
                cert.display(),
                ca.display(),
                me.0
            ))
        })
}

/// Whether the peer at the other end of `stream` presented a certificate
/// naming replica `node`. A plain connection names no one.
pub fn peer_is(stream: &Stream, node: NodeId) -> bool {
    let Stream::Right(tls) = stream else { return false };
    let certs = match tls {
        tokio_rustls::TlsStream::Server(s) => s.get_ref().1.peer_certificates(),
        tokio_rustls::TlsStream::Client(s) => s.get_ref().1.peer_certificates(),
    };
    certs.and_then(|c| c.first()).is_some_and(|c| names(c, &node_name(node)))
}

/// A worker's or a client's TLS: the cluster CA it verifies servers with.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl ClientTls {
    /// Trusts the certificates of `ca` (the `flag` that named it, for errors).
    pub fn load(flag: &'static str, ca: &Path) -> Result<Self, TlsError> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Mismatch(e.to_string()))?
            .with_root_certificates(roots(flag, ca)?)
            .with_no_client_auth();
        Ok(Self { config: Arc::new(config) })
    }

    /// Opens TLS over `tcp` to the server at `addr` (`HOST:PORT`): its
    /// certificate must name `HOST`.
    pub async fn connect(&self, tcp: TcpStream, addr: &str) -> std::io::Result<Stream> {
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_matches(['[', ']']);
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{host} is not a TLS server name: {e}"),
            )
        })?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let tls = timed(connector.connect(name, tcp)).await?;
        Ok(Stream::Right(tokio_rustls::TlsStream::Client(tls)))
    }
}

async fn timed<T>(handshake: impl std::future::Future<Output = std::io::Result<T>>) -> std::io::Result<T> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("TLS handshake took over {HANDSHAKE_TIMEOUT:?}"),
        )
    })?
}

/// What [`generate`] wrote.
#[derive(Debug)]
pub struct Generated {
    /// Whether the CA was created now (or an existing one was used).
    pub new_ca: bool,
    /// The files written.
    pub files: Vec<PathBuf>,
}

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";

/// The CA's parameters, a function of its key alone (so that a later run
/// can sign with the CA on disk): its name carries a digest of the public
/// key, so two clusters' CAs never share a name and a certificate of the
/// other one is refused as unknown.
fn ca_params(key: &rcgen::KeyPair) -> rcgen::CertificateParams {
    let digest = xxhash_rust::xxh3::xxh3_64(key.public_key_raw());
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, format!("Flotilla cluster CA {digest:016x}"));
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    params
}

/// Writes `DIR/ca.pem` and `DIR/ca.key` unless they exist, then for each
/// node `N` of `nodes` `DIR/node-N.pem` and `DIR/node-N.key`, naming
/// `flotilla-node-N` and every host of `hosts` (DNS names or IP addresses
/// clients and workers reach it by). An existing node file is refused, not
/// overwritten. Keys are written readable by their owner only.
pub fn generate(dir: &Path, nodes: &[NodeId], hosts: &[String]) -> Result<Generated, TlsError> {
    let gen = |e: rcgen::Error| TlsError::Generate(format!("cannot make a certificate: {e}"));
    let io = |path: &Path, e: std::io::Error| TlsError::Generate(format!("{}: {e}", path.display()));
    if let Some(bad) = hosts.iter().find(|h| ServerName::try_from(h.as_str()).is_err()) {
        return Err(TlsError::Generate(format!(
            "--host {bad:?} is not a DNS name or IP address; list the names clients and workers use, comma-separated"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let (ca_cert, ca_key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let mut files = Vec::new();
    let new_ca = !ca_key.exists();
    let ca_keypair = if new_ca {
        if ca_cert.exists() {
            return Err(TlsError::Generate(format!(
                "{} exists without {}: remove it, or give a directory holding both",
                ca_cert.display(),
                ca_key.display()
            )));
        }
        let key = rcgen::KeyPair::generate().map_err(gen)?;
        let cert = ca_params(&key).self_signed(&key).map_err(gen)?;
        write_new(&ca_key, key.serialize_pem().as_bytes(), true)?;
        write_new(&ca_cert, cert.pem().as_bytes(), false)?;
        files.extend([ca_cert.clone(), ca_key.clone()]);
        key
    } else {
        let pem = std::fs::read_to_string(&ca_key).map_err(|e| io(&ca_key, e))?;
        rcgen::KeyPair::from_pem(&pem)
            .map_err(|e| TlsError::Generate(format!("{}: not a CA key: {e}", ca_key.display())))?
    };
    // the issuer as rcgen needs it: the same name and key as the CA on disk
    let issuer = ca_params(&ca_keypair).self_signed(&ca_keypair).map_err(gen)?;
    for &node in nodes {
        let mut sans = vec![node_name(node)];
        sans.extend(hosts.iter().cloned());
        let mut params = rcgen::CertificateParams::new(sans).map_err(|e| {
            TlsError::Generate(format!("--host {hosts:?}: not a DNS name or IP address: {e}"))
        })?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, node_name(node));
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().map_err(gen)?;
        let cert = params.signed_by(&key, &issuer, &ca_keypair).map_err(gen)?;
        let (cert_path, key_path) =
            (dir.join(format!("node-{}.pem", node.0)), dir.join(format!("node-{}.key", node.0)));
        for path in [&cert_path, &key_path] {
            if path.exists() {
                return Err(TlsError::Generate(format!(
                    "{} exists; remove it to make a new certificate for node {}",
                    path.display(),
                    node.0
                )));
            }
        }
        write_new(&key_path, key.serialize_pem().as_bytes(), true)?;
        write_new(&cert_path, cert.pem().as_bytes(), false)?;
        files.extend([cert_path, key_path]);
    }
    Ok(Generated { new_ca, files })
}

fn write_new(path: &Path, bytes: &[u8], secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path).map_err(|e| TlsError::Generate(format!("{}: {e}", path.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| TlsError::Generate(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn load(dir: &Path, node: u64) -> Result<NodeTls, TlsError> {
        NodeTls::load(
            NodeId(node),
            &dir.join("ca.pem"),
            &dir.join(format!("node-{node}.pem")),
            &dir.join(format!("node-{node}.key")),
        )
    }

    /// Node `server` accepts one peer connection; node `client` connects
    /// claiming to be `claims`. What the server saw: `Ok(true)` when the
    /// client's certificate names `claims`.
    async fn peer_pair(
        server: &NodeTls,
        client: &NodeTls,
        server_id: u64,
        claims: u64,
    ) -> Result<bool, String> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = server.clone();
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut s = server.accept_peer(tcp).await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            assert_eq!(&buf, b"hello");
            Ok::<_, String>(peer_is(&s, NodeId(claims)))
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let connected = client.connect_peer(tcp, NodeId(server_id)).await;
        if let Ok(mut s) = connected {
            let _ = s.write_all(b"hello").await;
            let _ = s.flush().await;
        }
        accept.await.unwrap()
    }

    #[tokio::test]
    async fn replicas_of_one_ca_authenticate_each_other_by_node_name() {
        let dir = tempfile::tempdir().unwrap();
        let made =
            generate(dir.path(), &[NodeId(1), NodeId(2)], &["127.0.0.1".into(), "localhost".into()]).unwrap();
        assert!(made.new_ca);
        assert_eq!(made.files.len(), 6);
        let (one, two) = (load(dir.path(), 1).unwrap(), load(dir.path(), 2).unwrap());
        assert!(peer_pair(&two, &one, 2, 1).await.unwrap(), "node 2 sees node 1's certificate");
        assert!(!peer_pair(&two, &one, 2, 3).await.unwrap(), "node 1's certificate does not name node 3");

        // a node added later is signed by the same CA
        let later = generate(dir.path(), &[NodeId(3)], &[]).unwrap();
        assert!(!later.new_ca);
        let three = load(dir.path(), 3).unwrap();
        assert!(peer_pair(&three, &one, 3, 1).await.unwrap());
        let refused = generate(dir.path(), &[NodeId(3)], &[]).unwrap_err().to_string();
        assert!(refused.contains("node-3.pem exists"), "{refused}");
    }

    #[tokio::test]
    async fn a_certificate_of_another_ca_or_none_is_refused() {
        let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        generate(ours.path(), &[NodeId(1), NodeId(2)], &[]).unwrap();
        generate(theirs.path(), &[NodeId(1)], &[]).unwrap();
        let two = load(ours.path(), 2).unwrap();
        let stranger = load(theirs.path(), 1).unwrap();
        let seen = peer_pair(&two, &stranger, 2, 1).await;
        assert!(seen.is_err(), "another CA's certificate is refused: {seen:?}");

        // a client without a certificate: refused during the handshake
        let client = ClientTls::load("--tls-ca", &ours.path().join("ca.pem")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut s = two.accept_peer(tcp).await?;
            let mut buf = [0u8; 1];
            s.read_exact(&mut buf).await.map(|_| ())
        });
        // the server names flotilla-node-2, not 127.0.0.1: connect by its node name
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from(node_name(NodeId(2))).unwrap();
        let connector = tokio_rustls::TlsConnector::from(client.config.clone());
        if let Ok(mut s) = connector.connect(name, tcp).await {
            let _ = s.write_all(b"x").await;
        }
        assert!(accept.await.unwrap().is_err(), "a client without a certificate is refused");
    }

    #[test]
    fn mismatched_files_are_refused_naming_the_flag() {
        let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        generate(ours.path(), &[NodeId(1), NodeId(2)], &[]).unwrap();
        generate(theirs.path(), &[NodeId(1)], &[]).unwrap();
        let p = ours.path();
        let err = |r: Result<NodeTls, TlsError>| r.unwrap_err().to_string();
        let wrong_node =
            err(NodeTls::load(NodeId(2), &p.join("ca.pem"), &p.join("node-1.pem"), &p.join("node-1.key")));
        assert!(wrong_node.contains("does not name flotilla-node-2"), "{wrong_node}");
        let wrong_key =
            err(NodeTls::load(NodeId(1), &p.join("ca.pem"), &p.join("node-1.pem"), &p.join("node-2.key")));
        assert!(wrong_key.contains("--tls-key"), "{wrong_key}");
        let wrong_ca = err(NodeTls::load(
            NodeId(1),
            &theirs.path().join("ca.pem"),
            &p.join("node-1.pem"),
            &p.join("node-1.key"),
        ));
        assert!(wrong_ca.contains("is not valid under --tls-ca"), "{wrong_ca}");
        let missing =
            err(NodeTls::load(NodeId(1), &p.join("nope.pem"), &p.join("node-1.pem"), &p.join("node-1.key")));
        assert!(missing.starts_with("--tls-ca ") && missing.contains("cannot read it"), "{missing}");
        let not_pem = err(NodeTls::load(
            NodeId(1),
            &p.join("node-1.key"),
            &p.join("node-1.pem"),
            &p.join("node-1.key"),
        ));
        assert!(not_pem.contains("--tls-ca") && not_pem.contains("no PEM certificate"), "{not_pem}");
    }

    #[tokio::test]
    async fn a_worker_verifies_the_api_certificate_by_host() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &[NodeId(1)], &["127.0.0.1".into()]).unwrap();
        let node = load(dir.path(), 1).unwrap();
        let client = ClientTls::load("--tls-ca", &dir.path().join("ca.pem")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.unwrap();
                if let Ok(mut s) = node.accept_api(tcp).await {
                    let _ = s.write_all(b"ok").await;
                    let _ = s.shutdown().await;
                }
            }
        });
        let mut s = client.connect(TcpStream::connect(addr).await.unwrap(), &addr.to_string()).await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ok");
        // reached by a name the certificate does not carry: refused
        let other = format!("localhost:{}", addr.port());
        let refused = client.connect(TcpStream::connect(addr).await.unwrap(), &other).await;
        assert!(refused.is_err(), "a certificate without the host is refused");
    }
}
