//! TLS for peer links: a cluster CA, each node's certificate and key, mutual
//! verification.
//!
//! Every node holds the cluster's CA certificate, its own certificate chain
//! and its private key (PEM). A link is TLS 1.3 with both sides verified:
//! - the dialer checks that the listener's certificate chains to the cluster
//!   CA and names [`PeerTls::server_name`] (a DNS name shared by every node's
//!   certificate, `berth-peer` by default: nodes are reached by addresses that
//!   change as containers move, so the name is the cluster's role, not a host,
//!   as Consul's `server.<dc>.consul` is);
//! - the listener requires a client certificate that chains to the cluster CA.
//!
//! The HMAC handshake of [`crate::peer`] still runs inside the TLS session:
//! the certificate proves "issued by this cluster's CA", the secret proves
//! "knows this cluster's secret", and a node needs both.
//!
//! This module only builds rustls configurations from PEM bytes; reading files
//! or environment variables is the binary's business.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The server name every node's certificate carries unless configured
/// otherwise (`cluster.tls.server_name`).
pub const DEFAULT_SERVER_NAME: &str = "berth-peer";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The PEM text holds no certificate.
    #[error("{what}: no PEM certificate found")]
    NoCertificate {
        /// Which input.
        what: &'static str,
    },
    /// The PEM text could not be read.
    #[error("{what}: {source}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// rustls' reason.
        source: rustls::pki_types::pem::Error,
    },
    /// A CA certificate could not be used as a trust anchor.
    #[error("the cluster CA certificate is not usable: {0}")]
    Ca(rustls::Error),
    /// The server name is not a DNS name or an IP address.
    #[error("{0:?} is not a DNS name or IP address")]
    ServerName(String),
    /// rustls refused the configuration (e.g. the key does not match the
    /// certificate, or is of a kind it does not support).
    #[error("{0}")]
    Config(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The TLS side of a node's peer links: what it dials with and what it
/// accepts with. Cheap to clone.
#[derive(Clone)]
pub struct PeerTls {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerTls(server name {:?})", self.server_name)
    }
}

fn certs(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(certs)
}

impl PeerTls {
    /// Builds both sides from PEM text: the cluster CA certificate(s), this
    /// node's certificate chain (leaf first) and its private key (PKCS#8,
    /// PKCS#1 or SEC1), and the name every node's certificate must carry.
    pub fn from_pem(
        ca: &[u8],
        chain: &[u8],
        key: &[u8],
        server_name: &str,
    ) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in certs("cluster CA", ca)? {
            roots.add(c).map_err(TlsError::Ca)?;
        }
        let roots = Arc::new(roots);
        let chain = certs("node certificate", chain)?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|source| TlsError::Pem {
            what: "node private key",
            source,
        })?;
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| TlsError::ServerName(server_name.to_owned()))?;
        let versions = &[&rustls::version::TLS13];

        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        Ok(PeerTls {
            client: Arc::new(client),
            server: Arc::new(server),
            server_name: name,
        })
    }

    /// The name a listener's certificate must carry.
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }

    pub(crate) fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.client.clone())
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server.clone())
    }
}

/// A throwaway cluster CA for tests and `berth-loadtest local` (cargo
/// feature `dev-certs`): real certificates, made in memory, never for
/// production (the CA key is not kept anywhere an operator could protect).
#[cfg(any(test, feature = "dev-certs"))]
pub mod dev {
    use super::{PeerTls, TlsError, DEFAULT_SERVER_NAME};
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };

    /// A cluster CA (ECDSA P-256) that issues node certificates.
    pub struct DevCa {
        issuer: CertifiedIssuer<'static, KeyPair>,
    }

    /// A node's certificate and private key, PEM.
    #[derive(Debug, Clone)]
    pub struct NodeCert {
        /// The certificate (leaf only; the CA is the trust anchor).
        pub cert_pem: String,
        /// Its PKCS#8 private key.
        pub key_pem: String,
    }

    impl DevCa {
        /// A new CA whose subject is `common_name`.
        pub fn new(common_name: &str) -> Self {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("no names is valid");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, common_name);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().expect("a P-256 key");
            DevCa {
                issuer: CertifiedIssuer::self_signed(p, key).expect("a self-signed CA"),
            }
        }

        /// The CA certificate, PEM.
        pub fn ca_pem(&self) -> String {
            self.issuer.pem()
        }

        /// A node certificate for the DNS names `names` (server and client
        /// authentication).
        pub fn issue(&self, names: &[&str]) -> NodeCert {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let mut p = CertificateParams::new(names).expect("valid DNS names");
            p.distinguished_name.push(DnType::CommonName, "berth node");
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let key = KeyPair::generate().expect("a P-256 key");
            let cert = p.signed_by(&key, &self.issuer).expect("signed by the CA");
            NodeCert {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            }
        }

        /// A node's [`PeerTls`] with a fresh certificate naming
        /// [`DEFAULT_SERVER_NAME`].
        pub fn peer_tls(&self) -> Result<PeerTls, TlsError> {
            let n = self.issue(&[DEFAULT_SERVER_NAME]);
            PeerTls::from_pem(
                self.ca_pem().as_bytes(),
                n.cert_pem.as_bytes(),
                n.key_pem.as_bytes(),
                DEFAULT_SERVER_NAME,
            )
        }
    }
}
