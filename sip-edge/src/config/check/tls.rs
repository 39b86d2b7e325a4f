//! The TLS material `[proxy]` names, checked the way the transport will
//! use it, with a message per mistake an admin makes: a file that is
//! missing, not PEM, holds the wrong kind of object (certificate and key
//! swapped, a CSR, an encrypted key), a key that is not the certificate's,
//! a CA file holding a server certificate, a CA certificate served as the
//! edge's own; expiry, not-yet-valid and names the certificate does not
//! carry are warned. Last, the rustls configs are built exactly as the
//! transport builds them (`transport::tls`), so `check-config` can never
//! accept what `run` refuses.
//!
//! Why these tools: PEM sections come from `rustls-pki-types` (the loader
//! the transport uses), so "which kind of object is in this file" is
//! answered by the same parser. Whether the key matches the certificate is
//! rustls' own `CertifiedKey::from_der` (it compares the SubjectPublicKeyInfo
//! derived from the private key with the certificate's, `keys_match`, the
//! same call `ServerConfig::with_single_cert` makes at start); a separate
//! comparison could disagree with rustls. Validity, SANs and the CA flag
//! need the parsed fields, which rustls/webpki do not expose: x509-parser.
//!
//! Data in: `[proxy]` paths, the clock. Data out: [`Finding`]s.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::SystemTime,
};

use rustls::pki_types::{pem::PemObject, pem::SectionKind, CertificateDer, PrivateKeyDer};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName};

use super::{Finding, Severity};
use crate::{
    config::{ClientAuth, ProxySection},
    sip::uri::Host as UriHost,
};

/// Certificates expiring within this many days are warned.
pub const EXPIRY_WARN_DAYS: i64 = 14;

/// What is wrong with a TLS file.
#[derive(Debug, thiserror::Error)]
pub enum TlsProblem {
    /// The file cannot be read.
    #[error(
        "cannot read {path}: {error}; check the path, and that the agent (root) may read the file"
    )]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: String,
    },
    /// The file is not PEM.
    #[error("{path} is not a PEM file ({error}); the agent reads PEM (`-----BEGIN CERTIFICATE-----`, `-----BEGIN PRIVATE KEY-----`): convert DER with `openssl x509 -inform der` or `openssl pkey -inform der`")]
    NotPem {
        /// The file.
        path: PathBuf,
        /// Why.
        error: String,
    },
    /// The file holds no certificate.
    #[error("{path} holds no certificate (found: {found}){hint}")]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// What it holds instead.
        found: String,
        /// What probably happened.
        hint: &'static str,
    },
    /// A certificate does not parse.
    #[error(
        "certificate {index} in {path} is not valid X.509 ({error}); re-export it from the CA"
    )]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// Its position in the file (0 = first).
        index: usize,
        /// The parser's reason.
        error: String,
    },
    /// The key file holds no private key.
    #[error("{path} holds no private key (found: {found}){hint}")]
    NoKey {
        /// The file.
        path: PathBuf,
        /// What it holds instead.
        found: String,
        /// What probably happened.
        hint: &'static str,
    },
    /// The key is not the certificate's.
    #[error("the private key in {key} does not belong to the certificate in {cert} (their public keys differ); use the key the certificate was issued for (`openssl x509 -noout -pubkey -in CERT` and `openssl pkey -pubout -in KEY` must print the same)")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rustls cannot use the key.
    #[error("the private key in {path} cannot be used: {error}; use an RSA (2048 bits or more), ECDSA P-256/P-384 or Ed25519 key in PKCS#8, PKCS#1 or SEC1 PEM")]
    KeyUnusable {
        /// The key file.
        path: PathBuf,
        /// rustls' reason.
        error: String,
    },
    /// The edge's own certificate is a CA certificate.
    #[error("the first certificate in {path} ({subject}) is a CA certificate; TLS peers refuse a CA certificate as a server's: put the edge's own certificate first, then its intermediates (is this the CA file meant for ca_roots?)")]
    LeafIsCa {
        /// The file.
        path: PathBuf,
        /// Its subject.
        subject: String,
    },
    /// A CA file holds a certificate that can verify nothing.
    #[error("certificate {index} in {path} ({subject}) is not a CA certificate (no basicConstraints CA:TRUE) and not self-signed, so it verifies no peer; this key takes the CA that issued the peers' certificates (is this the edge's own certificate, meant for proxy.cert?)")]
    NotCa {
        /// The file.
        path: PathBuf,
        /// Position in the file.
        index: usize,
        /// Its subject.
        subject: String,
    },
    /// A CA file holds a self-signed end-entity certificate (pinning).
    #[error("certificate {index} in {path} ({subject}) is a self-signed server certificate, not a CA: it verifies only a peer presenting exactly this certificate")]
    SelfSignedLeafAsCa {
        /// The file.
        path: PathBuf,
        /// Position in the file.
        index: usize,
        /// Its subject.
        subject: String,
    },
    /// A certificate has expired.
    #[error("certificate {index} in {path} ({subject}) expired on {not_after}; peers refuse every handshake with it: renew it")]
    Expired {
        /// The file.
        path: PathBuf,
        /// Position in the file.
        index: usize,
        /// Its subject.
        subject: String,
        /// End of validity.
        not_after: String,
    },
    /// A certificate is not valid yet.
    #[error("certificate {index} in {path} ({subject}) is not valid before {not_before}; peers refuse it until then (is this host's clock right?)")]
    NotYetValid {
        /// The file.
        path: PathBuf,
        /// Position in the file.
        index: usize,
        /// Its subject.
        subject: String,
        /// Start of validity.
        not_before: String,
    },
    /// A certificate expires soon.
    #[error("certificate {index} in {path} ({subject}) expires in {days} day(s), on {not_after}: renew it")]
    ExpiresSoon {
        /// The file.
        path: PathBuf,
        /// Position in the file.
        index: usize,
        /// Its subject.
        subject: String,
        /// Days left.
        days: i64,
        /// End of validity.
        not_after: String,
    },
    /// The certificate does not name what peers will verify.
    #[error("the certificate in {path} does not cover {name} ({via}); its names are [{sans}]. Peers that verify the edge (RFC 5922) refuse the handshake: add {name} as a subjectAltName, or set {advertise} to a name the certificate carries")]
    NameNotCovered {
        /// The file.
        path: PathBuf,
        /// The name or address.
        name: String,
        /// The key it comes from.
        via: &'static str,
        /// The key that sets the advertised name of that side.
        advertise: &'static str,
        /// What the certificate carries.
        sans: String,
    },
    /// The key file is readable by every user.
    #[error("{path} is readable by every user (mode {mode:o}); `chmod 600 {path}`")]
    KeyReadable {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// rustls refused the configuration built from the files.
    #[error("rustls refuses the TLS {what} configuration: {error}")]
    Refused {
        /// Server or client.
        what: &'static str,
        /// Why.
        error: String,
    },
}

fn kind_name(k: SectionKind) -> &'static str {
    match k {
        SectionKind::Certificate => "a certificate",
        SectionKind::PublicKey => "a public key",
        SectionKind::RsaPrivateKey | SectionKind::PrivateKey | SectionKind::EcPrivateKey => {
            "a private key"
        }
        SectionKind::Crl => "a CRL",
        SectionKind::Csr => "a certificate signing request",
        _ => "an unknown PEM object",
    }
}

fn is_key(k: SectionKind) -> bool {
    matches!(
        k,
        SectionKind::RsaPrivateKey | SectionKind::PrivateKey | SectionKind::EcPrivateKey
    )
}

/// A file's bytes and its PEM sections.
type Pem = (Vec<u8>, Vec<(SectionKind, Vec<u8>)>);

/// The PEM sections of a file, or the finding that says why not.
fn read_pem(key: &str, path: &Path) -> Result<Pem, Box<Finding>> {
    let bytes = std::fs::read(path).map_err(|e| {
        Box::new(Finding::error(
            key,
            TlsProblem::Unreadable {
                path: path.to_owned(),
                error: e.to_string(),
            },
        ))
    })?;
    let sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            Box::new(Finding::error(
                key,
                TlsProblem::NotPem {
                    path: path.to_owned(),
                    error: e.to_string(),
                },
            ))
        })?;
    if sections.is_empty() && !String::from_utf8_lossy(&bytes).contains("-----BEGIN") {
        return Err(Box::new(Finding::error(
            key,
            TlsProblem::NotPem {
                path: path.to_owned(),
                error: "no PEM section".to_owned(),
            },
        )));
    }
    Ok((bytes, sections))
}

fn found(sections: &[(SectionKind, Vec<u8>)], raw: &[u8]) -> String {
    let mut names: Vec<&str> = sections.iter().map(|(k, _)| kind_name(*k)).collect();
    if String::from_utf8_lossy(raw).contains("ENCRYPTED PRIVATE KEY") {
        names.push("an encrypted private key");
    }
    names.dedup();
    if names.is_empty() {
        "nothing the agent reads".to_owned()
    } else {
        names.join(", ")
    }
}

/// The certificates of a file, parsed once to check they are X.509.
fn read_certs(
    key: &str,
    path: &Path,
    out: &mut Vec<Finding>,
) -> Option<Vec<CertificateDer<'static>>> {
    let (raw, sections) = match read_pem(key, path) {
        Ok(s) => s,
        Err(f) => {
            out.push(*f);
            return None;
        }
    };
    let certs: Vec<CertificateDer<'static>> = sections
        .iter()
        .filter(|(k, _)| *k == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der.clone()))
        .collect();
    if certs.is_empty() {
        let hint = if sections.iter().any(|(k, _)| is_key(*k)) {
            "; it holds a private key: are the certificate and key files swapped?"
        } else if sections.iter().any(|(k, _)| *k == SectionKind::Csr) {
            "; a signing request is not a certificate: send it to the CA and use the certificate it returns"
        } else {
            "; the file must hold PEM `CERTIFICATE` blocks"
        };
        out.push(Finding::error(
            key,
            TlsProblem::NoCertificate {
                path: path.to_owned(),
                found: found(&sections, &raw),
                hint,
            },
        ));
        return None;
    }
    for (index, c) in certs.iter().enumerate() {
        if let Err(e) = x509_parser::parse_x509_certificate(c.as_ref()) {
            out.push(Finding::error(
                key,
                TlsProblem::BadCertificate {
                    path: path.to_owned(),
                    index,
                    error: e.to_string(),
                },
            ));
            return None;
        }
    }
    Some(certs)
}

fn read_key(key: &str, path: &Path, out: &mut Vec<Finding>) -> Option<PrivateKeyDer<'static>> {
    let (raw, sections) = match read_pem(key, path) {
        Ok(s) => s,
        Err(f) => {
            out.push(*f);
            return None;
        }
    };
    let pk = sections
        .iter()
        .find_map(|(k, der)| PrivateKeyDer::from_pem(*k, der.clone()));
    if pk.is_none() {
        let text = String::from_utf8_lossy(&raw);
        let hint = if text.contains("ENCRYPTED PRIVATE KEY")
            || text.contains("Proc-Type: 4,ENCRYPTED")
        {
            "; the key is encrypted and the agent has no passphrase: decrypt it (`openssl pkey -in KEY -out KEY.plain`) and keep it mode 600"
        } else if sections.iter().any(|(k, _)| *k == SectionKind::Certificate) {
            "; it holds a certificate: are the certificate and key files swapped?"
        } else if sections.iter().any(|(k, _)| *k == SectionKind::PublicKey) {
            "; a public key is not enough: the agent needs the private key"
        } else {
            "; the file must hold a PEM `PRIVATE KEY` (or `RSA`/`EC PRIVATE KEY`) block"
        };
        out.push(Finding::error(
            key,
            TlsProblem::NoKey {
                path: path.to_owned(),
                found: found(&sections, &raw),
                hint,
            },
        ));
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(m) = std::fs::metadata(path) {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o004 != 0 {
                out.push(Finding::warning(
                    key,
                    TlsProblem::KeyReadable {
                        path: path.to_owned(),
                        mode,
                    },
                ));
            }
        }
    }
    pk
}

/// A warning when the secret file `path` (config field `key`) is
/// readable by every user.
pub fn world_readable(key: &str, path: &Path) -> Option<Finding> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        if mode & 0o004 != 0 {
            return Some(Finding::warning(
                key,
                TlsProblem::KeyReadable {
                    path: path.to_owned(),
                    mode,
                },
            ));
        }
    }
    let _ = (key, path);
    None
}

fn subject(c: &X509Certificate<'_>) -> String {
    let s = c.subject().to_string();
    if s.is_empty() {
        "no subject".to_owned()
    } else {
        s
    }
}

/// Expiry findings of one certificate.
fn validity(
    key: &str,
    path: &Path,
    index: usize,
    c: &X509Certificate<'_>,
    now: i64,
    out: &mut Vec<Finding>,
) {
    let v = c.validity();
    let (nb, na) = (v.not_before.timestamp(), v.not_after.timestamp());
    let problem = if now < nb {
        Some(TlsProblem::NotYetValid {
            path: path.to_owned(),
            index,
            subject: subject(c),
            not_before: v.not_before.to_string(),
        })
    } else if now > na {
        Some(TlsProblem::Expired {
            path: path.to_owned(),
            index,
            subject: subject(c),
            not_after: v.not_after.to_string(),
        })
    } else if na - now < EXPIRY_WARN_DAYS * 86_400 {
        Some(TlsProblem::ExpiresSoon {
            path: path.to_owned(),
            index,
            subject: subject(c),
            days: (na - now) / 86_400,
            not_after: v.not_after.to_string(),
        })
    } else {
        None
    };
    if let Some(p) = problem {
        out.push(Finding::warning(key, p));
    }
}

/// A certificate's names: DNS names and IP addresses.
fn sans(c: &X509Certificate<'_>) -> (Vec<String>, Vec<IpAddr>) {
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    if let Ok(Some(ext)) = c.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                GeneralName::DNSName(d) => dns.push(d.to_ascii_lowercase()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => ips.push(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())),
                    16 => ips.push(IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    (dns, ips)
}

/// Whether a DNS SAN covers `name` (RFC 6125 §6.4.3: `*` only as the whole
/// left-most label).
pub fn dns_matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.to_ascii_lowercase(), name.to_ascii_lowercase());
    match p.strip_prefix("*.") {
        Some(suffix) => n
            .split_once('.')
            .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
        None => p == n,
    }
}

/// Warnings for names peers will verify that the certificate lacks: the
/// advertised host of each side (Via/Record-Route, where peers connect
/// back), or the listener's address when nothing is advertised.
fn names(p: &ProxySection, path: &Path, leaf: &X509Certificate<'_>, out: &mut Vec<Finding>) {
    let (dns, ips) = sans(leaf);
    let shown: Vec<String> = dns
        .iter()
        .map(|d| format!("DNS:{d}"))
        .chain(ips.iter().map(|i| format!("IP:{i}")))
        .collect();
    let sides = [
        (
            &p.internal_advertise,
            p.internal_listen,
            "proxy.internal_advertise",
            "proxy.internal_listen",
        ),
        (
            &p.external_advertise,
            p.external_listen,
            "proxy.external_advertise",
            "proxy.external_listen",
        ),
    ];
    for (adv, listen, adv_key, listen_key) in sides {
        let (host, via) = match adv {
            Some(a) => (UriHost::parse(a), adv_key),
            None if listen.ip().is_unspecified() => continue,
            None => (Some(UriHost::Ip(listen.ip())), listen_key),
        };
        let (covered, name) = match host {
            Some(UriHost::Ip(ip)) => (
                ips.iter().any(|i| i.to_canonical() == ip.to_canonical()),
                ip.to_string(),
            ),
            Some(UriHost::Name(n)) => (dns.iter().any(|d| dns_matches(d, &n)), n),
            None => continue,
        };
        if !covered {
            out.push(Finding::warning(
                "proxy.cert",
                TlsProblem::NameNotCovered {
                    path: path.to_owned(),
                    name,
                    via,
                    advertise: adv_key,
                    sans: shown.join(", "),
                },
            ));
        }
    }
}

/// A CA file: certificates that can anchor verification.
fn ca_file(key: &str, path: &Path, now: i64, out: &mut Vec<Finding>) {
    let Some(certs) = read_certs(key, path, out) else {
        return;
    };
    for (index, der) in certs.iter().enumerate() {
        let Ok((_, c)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
            continue;
        };
        let self_signed = c.subject().as_raw() == c.issuer().as_raw();
        if !c.is_ca() {
            let problem = if self_signed {
                (
                    Severity::Warning,
                    TlsProblem::SelfSignedLeafAsCa {
                        path: path.to_owned(),
                        index,
                        subject: subject(&c),
                    },
                )
            } else {
                (
                    Severity::Error,
                    TlsProblem::NotCa {
                        path: path.to_owned(),
                        index,
                        subject: subject(&c),
                    },
                )
            };
            out.push(Finding {
                severity: problem.0,
                key: key.to_owned(),
                problem: problem.1.into(),
            });
        }
        validity(key, path, index, &c, now, out);
    }
}

/// Every TLS finding for `[proxy]` at time `now`.
pub fn check(p: &ProxySection, now: SystemTime) -> Vec<Finding> {
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let mut out = Vec::new();
    let certs = read_certs("proxy.cert", &p.cert, &mut out);
    let key = read_key("proxy.key", &p.key, &mut out);
    if let Some(certs) = &certs {
        for (index, der) in certs.iter().enumerate() {
            let Ok((_, c)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
                continue;
            };
            if index == 0 {
                if c.is_ca() {
                    out.push(Finding::error(
                        "proxy.cert",
                        TlsProblem::LeafIsCa {
                            path: p.cert.clone(),
                            subject: subject(&c),
                        },
                    ));
                } else {
                    names(p, &p.cert, &c, &mut out);
                }
            }
            validity("proxy.cert", &p.cert, index, &c, now, &mut out);
        }
        if let Some(key) = key {
            let provider = rustls::crypto::ring::default_provider();
            match rustls::sign::CertifiedKey::from_der(certs.clone(), key, &provider) {
                Ok(_) => {}
                Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                    out.push(Finding::error(
                        "proxy.key",
                        TlsProblem::KeyMismatch {
                            cert: p.cert.clone(),
                            key: p.key.clone(),
                        },
                    ));
                }
                Err(e) => out.push(Finding::error(
                    "proxy.key",
                    TlsProblem::KeyUnusable {
                        path: p.key.clone(),
                        error: e.to_string(),
                    },
                )),
            }
        }
    }
    ca_file("proxy.ca_roots", &p.ca_roots, now, &mut out);
    if p.external_client_auth != ClientAuth::None {
        if let Some(ca) = &p.client_ca {
            ca_file("proxy.client_ca", ca, now, &mut out);
        }
    }
    // Last, what the transport will do at start, with its own loaders: a
    // file that passed the checks above but that rustls still refuses.
    if !out.iter().any(|f| f.severity == Severity::Error) {
        let client_ca = p.client_ca.clone().unwrap_or_else(|| p.ca_roots.clone());
        let built = crate::transport::tls::server_config(
            &p.cert,
            &p.key,
            p.external_client_auth,
            &client_ca,
        )
        .map(|_| ())
        .map_err(|e| ("server", e))
        .and_then(|()| {
            crate::transport::tls::client_config(&p.ca_roots, &p.cert, &p.key)
                .map(|_| ())
                .map_err(|e| ("client", e))
        });
        if let Err((what, e)) = built {
            out.push(Finding::error(
                "proxy",
                TlsProblem::Refused {
                    what,
                    error: e.to_string(),
                },
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_one_label_only() {
        assert!(dns_matches("*.example.com", "edge.example.com"));
        assert!(dns_matches("Edge.Example.com", "edge.example.COM"));
        assert!(!dns_matches("*.example.com", "a.b.example.com"));
        assert!(!dns_matches("*.example.com", "example.com"));
        assert!(!dns_matches("edge.example.com", "other.example.com"));
    }
}
