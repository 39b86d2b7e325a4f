//! TLS material for the transport: reads PEM certificate chains, keys and CA
//! roots from the files named in `[proxy]` and builds the rustls server
//! configs (both listeners; optional client-certificate verification on the
//! external side for federation peers) and the client config used for
//! outgoing connections (server-name verification against `ca_roots`,
//! presenting the edge's certificate for mutual TLS).
//!
//! TLS 1.2 and 1.3 only (RFC 8446/5246; rustls implements nothing older),
//! with the ring provider.

use std::{path::Path, sync::Arc};

use rustls::{
    client::WantsClientCert,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::{WantsServerCert, WebPkiClientVerifier},
    ClientConfig, ConfigBuilder, RootCertStore, ServerConfig,
};

use crate::config::ClientAuth;

/// Errors of loading TLS material; each names the file and what to try.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read PEM {what} from {path}: {source}; check the path in [proxy] and that the file is PEM")]
    Pem {
        /// Certificate, key or CA roots.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The PEM error.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate or CA file held no certificate.
    #[error("{path} contains no certificate")]
    NoCertificates {
        /// The file.
        path: std::path::PathBuf,
    },
    /// A CA certificate could not be added to the root store.
    #[error("CA certificate in {path} rejected: {source}")]
    BadRoot {
        /// The file.
        path: std::path::PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// rustls refused the configuration (e.g. key does not match cert).
    #[error("TLS {what} configuration refused: {source}")]
    Config {
        /// Server or client.
        what: &'static str,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built.
    #[error("client certificate verifier: {source}; is client_ca a CA certificate?")]
    Verifier {
        /// rustls' reason.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Pem {
            what: "certificates",
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Pem {
        what: "private key",
        path: path.to_owned(),
        source,
    })
}

/// A root store from a PEM CA file.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c).map_err(|source| TlsError::BadRoot {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

/// The part of a server config every listener shares (protocol versions
/// and client authentication), before its certificate source is chosen:
/// a fixed pair here, a swappable store in `service::certs`.
pub(crate) fn server_builder(
    client_auth: ClientAuth,
    client_ca: &Path,
) -> Result<ConfigBuilder<ServerConfig, WantsServerCert>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|source| TlsError::Config {
            what: "server",
            source,
        })?;
    Ok(match client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Optional | ClientAuth::Required => {
            let roots = Arc::new(load_roots(client_ca)?);
            let v = WebPkiClientVerifier::builder_with_provider(roots, provider());
            let v = if client_auth == ClientAuth::Optional {
                v.allow_unauthenticated()
            } else {
                v
            };
            builder.with_client_cert_verifier(
                v.build().map_err(|source| TlsError::Verifier { source })?,
            )
        }
    })
}

/// The part of a client config every outgoing connection shares: protocol
/// versions and the roots server names are verified against (RFC 5922 §7).
pub(crate) fn client_builder(
    ca_roots: &Path,
) -> Result<ConfigBuilder<ClientConfig, WantsClientCert>, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|source| TlsError::Config {
            what: "client",
            source,
        })?
        .with_root_certificates(load_roots(ca_roots)?))
}

/// Server config for a listener.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_auth: ClientAuth,
    client_ca: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let cfg = server_builder(client_auth, client_ca)?
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|source| TlsError::Config {
            what: "server",
            source,
        })?;
    Ok(Arc::new(cfg))
}

/// Client config for outgoing connections: verifies the server name
/// against `ca_roots` (RFC 5922 §7) and offers the edge's certificate for
/// peers that require mutual TLS.
pub fn client_config(
    ca_roots: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg = client_builder(ca_roots)?
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|source| TlsError::Config {
            what: "client",
            source,
        })?;
    Ok(Arc::new(cfg))
}
