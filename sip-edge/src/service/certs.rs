//! The edge's own TLS certificate and key behind a swappable handle
//! ([`CertStore`]): both listeners and outgoing connections (mutual TLS)
//! ask it for the pair at each handshake, so a renewed certificate takes
//! effect for the next handshake while established connections keep the
//! session they negotiated.
//!
//! A new pair replaces the old only when it loads whole: both files
//! parse, and rustls' `CertifiedKey::from_der` finds the key is the
//! certificate's (`keys_match`, the check `with_single_cert` makes at
//! start). Anything else is refused with the reason and the old pair stays.
//!
//! Change detection polls the files' metadata (modification time, size,
//! inode, following symlinks) every `[agent] cert_check_secs` instead of
//! using inotify (the `notify` crate): certificate renewals arrive as a
//! rename over the file (certbot, most ACME clients) or a flip of a
//! symlinked directory (Kubernetes secrets, certbot's `live/`), which an
//! inotify watch on the old inode or directory misses or must re-arm after
//! each event; a `stat` of two files every few seconds sees all of them,
//! costs nothing measurable, needs no extra dependency and, with the
//! pair checked whole before use, tolerates catching the writer between
//! the certificate and the key (the next poll sees the key change and
//! retries).
//!
//! Data in: the `[proxy] cert`/`key` files. Data out: `CertifiedKey`s to
//! rustls through [`ServerResolver`] and [`ClientResolver`].

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::SystemTime,
};

use arc_swap::ArcSwap;
use rustls::{
    client::ResolvesClientCert,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ClientConfig, ServerConfig, SignatureScheme,
};

use crate::{
    config::ClientAuth,
    transport::tls::{client_builder, load_certs, load_key, provider, server_builder, TlsError},
};

/// What identifies a file's content without reading it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: m.modified().ok(),
        len: m.len(),
        ino: m.ino(),
    })
}

/// The certificate chain and key in force, and where they came from.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
    /// The files and their stamps when last looked at (loaded or refused).
    source: Mutex<Source>,
}

#[derive(Debug)]
struct Source {
    cert: PathBuf,
    key: PathBuf,
    seen: (Option<FileStamp>, Option<FileStamp>),
}

/// What a look at the files found.
#[derive(Debug)]
pub enum CertCheck {
    /// The files did not change since last time.
    Unchanged,
    /// A new pair is in force for new handshakes.
    Replaced {
        /// The new end-entity certificate's subject and serial.
        summary: String,
    },
}

/// Loads and checks one pair: both files parse and the key is the
/// certificate's.
pub fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    CertifiedKey::from_der(load_certs(cert)?, load_key(key)?, &provider()).map_err(|source| {
        TlsError::Config {
            what: "certificate/key pair",
            source,
        }
    })
}

/// Subject and serial of a pair's end-entity certificate, for logs.
pub fn summary(k: &CertifiedKey) -> String {
    k.cert
        .first()
        .and_then(|c| {
            x509_parser::parse_x509_certificate(c).ok().map(|(_, x)| {
                format!(
                    "subject {}, serial {}",
                    x.subject(),
                    x.raw_serial_as_string()
                )
            })
        })
        .unwrap_or_else(|| "unparsable certificate".into())
}

impl CertStore {
    /// The pair from `cert` and `key`, or why not.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<CertStore>, TlsError> {
        let seen = (stamp(cert), stamp(key));
        let pair = load_pair(cert, key)?;
        Ok(Arc::new(CertStore {
            current: ArcSwap::from_pointee(pair),
            source: Mutex::new(Source {
                cert: cert.to_owned(),
                key: key.to_owned(),
                seen,
            }),
        }))
    }

    /// The pair in force.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    /// Loads `cert` and `key` (maybe new paths, from a reloaded config)
    /// and puts the pair in force; on error the old pair stays and the
    /// paths watched stay the old ones.
    pub fn replace(&self, cert: &Path, key: &Path) -> Result<CertCheck, TlsError> {
        let mut src = self.source.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = (stamp(cert), stamp(key));
        let pair = load_pair(cert, key)?;
        let summary = summary(&pair);
        self.current.store(Arc::new(pair));
        *src = Source {
            cert: cert.to_owned(),
            key: key.to_owned(),
            seen,
        };
        Ok(CertCheck::Replaced { summary })
    }

    /// Looks at the files in force: when either changed since the last
    /// look, loads the pair (as [`CertStore::replace`]). A refused pair is
    /// not retried until a file changes again.
    pub fn check_files(&self) -> Result<CertCheck, TlsError> {
        let mut src = self.source.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = (stamp(&src.cert), stamp(&src.key));
        if seen == src.seen {
            return Ok(CertCheck::Unchanged);
        }
        src.seen = seen;
        let pair = load_pair(&src.cert, &src.key)?;
        let summary = summary(&pair);
        self.current.store(Arc::new(pair));
        Ok(CertCheck::Replaced { summary })
    }

    /// Whether `cert`/`key` are the paths in force.
    pub fn serves(&self, cert: &Path, key: &Path) -> bool {
        let src = self.source.lock().unwrap_or_else(PoisonError::into_inner);
        src.cert == cert && src.key == key
    }
}

/// The listeners' side: the pair in force at each ClientHello.
#[derive(Debug)]
pub struct ServerResolver(pub Arc<CertStore>);

impl ResolvesServerCert for ServerResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }
}

/// Outgoing connections: the pair in force, offered to peers that ask for
/// a client certificate.
#[derive(Debug)]
pub struct ClientResolver(pub Arc<CertStore>);

impl ResolvesClientCert for ClientResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A listener's server config over `store` (as `transport::tls::server_config`,
/// with the certificate swappable).
pub fn server_config(
    store: &Arc<CertStore>,
    client_auth: ClientAuth,
    client_ca: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = server_builder(client_auth, client_ca)?;
    Ok(Arc::new(builder.with_cert_resolver(Arc::new(
        ServerResolver(store.clone()),
    ))))
}

/// The config for outgoing connections over `store` (as
/// `transport::tls::client_config`, with the certificate swappable).
pub fn client_config(
    ca_roots: &Path,
    store: &Arc<CertStore>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg = client_builder(ca_roots)?
        .with_client_cert_resolver(Arc::new(ClientResolver(store.clone())));
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![cn.to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).expect("write");
        std::fs::write(&k, key.serialize_pem()).expect("write");
        (c, k)
    }

    #[test]
    fn a_changed_pair_replaces_and_a_mismatched_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca, ka) = pair(dir.path(), "a", "a.example.net");
        let (cb, kb) = pair(dir.path(), "b", "b.example.net");
        let store = CertStore::load(&ca, &ka).expect("load a");
        let first = store.current();
        assert!(matches!(store.check_files(), Ok(CertCheck::Unchanged)));
        // Only the certificate renewed so far: B's certificate, A's key.
        std::fs::copy(&cb, &ca).expect("copy");
        let e = store.check_files().expect_err("mismatched pair");
        assert!(e.to_string().contains("certificate/key pair"), "{e}");
        assert!(Arc::ptr_eq(&store.current(), &first), "old pair kept");
        // ... and not retried until a file changes again.
        assert!(matches!(store.check_files(), Ok(CertCheck::Unchanged)));
        // The key arrives: the pair is whole again.
        std::fs::copy(&kb, &ka).expect("copy");
        match store.check_files() {
            Ok(CertCheck::Replaced { summary }) => {
                assert!(
                    summary.contains("b.example.net") || summary.contains("serial"),
                    "{summary}"
                )
            }
            other => panic!("expected a replacement: {other:?}"),
        }
        assert_eq!(store.current().cert, load_certs(&cb).expect("b"));
        // Explicit replace with a mismatch: refused, B stays.
        let (cc, _) = pair(dir.path(), "c", "c.example.net");
        assert!(store.replace(&cc, &kb).is_err());
        assert_eq!(store.current().cert, load_certs(&cb).expect("b"));
        assert!(store.serves(&ca, &ka));
    }
}
