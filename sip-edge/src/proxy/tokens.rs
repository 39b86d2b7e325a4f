//! Self-contained flow tokens (issue #11): the user part the edge writes in
//! the Contacts (and Paths) it rewrites carries, sealed, what it stands
//! for, so a process that did not mint it (the other HA node after a
//! failover, or this agent after a `kill -9` restart) can still route the
//! in-dialog requests that come back with it.
//!
//! Design. Two ways were open: replicate the token table through the HA
//! store, or make the token carry its own data. The second is taken: it
//! needs no store on the signalling path (a lost write or a replication lag
//! cannot lose a dialog), it also covers a restart without any store, and
//! it keeps the table what it was: a per-process index of live flows.
//!
//! - **Contents** (plaintext): a version byte, the minting instance (8
//!   random bytes per process), the side of the edge the party lives on,
//!   and the party's own URI as it sent it (its Contact, or `flow:N` for a
//!   Path token, which names a connection and nothing else).
//! - **Sealing**: ChaCha20-Poly1305 (`ring`, already in the tree through
//!   rustls) with a fresh random 96-bit nonce per token and a fixed
//!   associated-data label; the token is `sef` + lower-case hex of nonce ‖
//!   ciphertext ‖ tag (hex: a SIP user part is compared case-sensitively,
//!   but hex decodes whatever case an intermediary leaves). The original
//!   URI is encrypted, not only authenticated: DESIGN.md §1 wants neither
//!   side to learn the other side's addresses.
//! - **Key**: with `[proxy] token_key_file` (else `[ha] token_key_file`),
//!   derived (HKDF-SHA256) from the secret in that file, which every node
//!   of the pair and every run of the agent shares; without either, a
//!   random key per process, so tokens are only good in the process that
//!   minted them, as before (in-dialog requests after a restart: 481).
//! - **Resolution**: the token table is asked first (it knows the live
//!   connection a Contact came over, and failed registrations). A token the
//!   table does not know is opened with the key: a forged or altered token
//!   fails the tag and is refused as unknown (481 in a dialog, 404
//!   outside). A token minted by *this* process that the table no longer
//!   holds was forgotten on purpose (its flow closed, it expired): it keeps
//!   the old answers. Only a token of another instance is *foreign* and
//!   routed from its contents (`proxy::core::routing`): Path tokens (a
//!   flow, which lives only in the process holding the connection) get 430
//!   Flow Failed (RFC 5626 §5.3); any other is sent to the party's own
//!   Contact on its side, through the same `routable_host` check as every
//!   Route and Contact (no loopback, unspecified, multicast or broadcast
//!   address), over TLS. A remote user's registration Contact is also
//!   tried that way; behind a NAT it is usually unreachable and the
//!   request fails as an unreachable next hop (503) until the client
//!   registers again over a new flow (RFC 5626 §4.4).
//! - **Security**: an outsider cannot make the edge go anywhere a token
//!   did not already name: only a holder of the key can mint one, and a
//!   token only names an address a party gave the edge as its own. An
//!   outside party's foreign token used from outside is refused (403): the
//!   edge never relays outside to outside. Tokens carry no expiry: an old
//!   token still only routes to that party.

use ring::{
    aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN},
    hkdf,
};

use crate::{
    config::{invalid, ConfigError},
    media::Side,
};

use super::bindings::TOKEN_PREFIX;

/// Associated data of every token (binds the format version).
const AAD: &[u8] = b"sip-edge flow token v1";
/// HKDF info for the key derived from a configured secret.
const KDF_INFO: &[u8] = b"sip-edge flow token key v1";
/// First plaintext byte.
const VERSION: u8 = 1;
/// Shortest secret accepted in `token_key_file` (256 bits).
pub const MIN_SECRET_LEN: usize = 32;
/// Longest token accepted for opening (a Contact URI is far shorter;
/// bounds the work an outsider can ask for).
const MAX_TOKEN_LEN: usize = 4096;

/// The key tokens are sealed with, and this process's instance id.
pub struct TokenKey {
    key: LessSafeKey,
    instance: [u8; 8],
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey").finish_non_exhaustive()
    }
}

/// The random nonce a token was sealed with (its first bytes).
pub type TokenNonce = [u8; NONCE_LEN];

/// The nonce at the start of `token`, read without opening it (`None` if
/// it does not start like a token). Says nothing about the token being
/// genuine: the token table compares the whole token with the one it
/// minted under that nonce.
pub fn nonce_of(token: &str) -> Option<TokenNonce> {
    let hex = token.strip_prefix(TOKEN_PREFIX)?.get(..2 * NONCE_LEN)?;
    let mut n = [0u8; NONCE_LEN];
    for (b, pair) in n.iter_mut().zip(hex.as_bytes().chunks(2)) {
        *b = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(n)
}

/// What a token opened with the key says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    /// Minted by this process (same instance id).
    pub ours: bool,
    /// Side of the edge the party lives on.
    pub side: Side,
    /// The party's URI as it sent it (`flow:N` for a Path token).
    pub original: String,
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if getrandom::getrandom(&mut b).is_err() {
        // No OS randomness (not seen on Linux ≥ 3.17): mix the clock and
        // the address of a stack slot so two processes still differ; the
        // per-process key below then is not secret, which is why this
        // path is logged.
        tracing::error!("getrandom failed; flow token randomness degraded");
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let seed = t ^ (&b as *const _ as usize as u128);
        for (i, x) in b.iter_mut().enumerate() {
            *x = (seed >> ((i % 16) * 8)) as u8;
        }
    }
    b
}

/// The key derived from the secret in `path` (config field `field`):
/// surrounding whitespace ignored, at least [`MIN_SECRET_LEN`] bytes.
pub fn key_from_file(field: &str, path: &std::path::Path) -> Result<TokenKey, ConfigError> {
    let raw = std::fs::read(path)
        .map_err(|e| invalid(field, format!("cannot read {}: {e}", path.display())))?;
    TokenKey::from_secret(raw.trim_ascii()).ok_or_else(|| {
        invalid(
            field,
            format!(
                "{} holds fewer than {MIN_SECRET_LEN} bytes of secret (write e.g. `openssl rand -hex 32` into it)",
                path.display()
            ),
        )
    })
}

impl TokenKey {
    /// A random key known to this process only.
    pub fn random() -> Self {
        let k: [u8; 32] = random();
        Self::with_key(&k)
    }

    /// The key derived from a shared secret (`[ha] token_key_file`);
    /// `None` if the secret is shorter than [`MIN_SECRET_LEN`].
    pub fn from_secret(secret: &[u8]) -> Option<Self> {
        if secret.len() < MIN_SECRET_LEN {
            return None;
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(secret);
        let okm = prk.expand(&[KDF_INFO], &CHACHA20_POLY1305).ok()?;
        let key = UnboundKey::from(okm);
        Some(Self {
            key: LessSafeKey::new(key),
            instance: random(),
        })
    }

    fn with_key(k: &[u8; 32]) -> Self {
        let key = UnboundKey::new(&CHACHA20_POLY1305, k)
            .unwrap_or_else(|_| unreachable!("a 32-byte ChaCha20-Poly1305 key"));
        Self {
            key: LessSafeKey::new(key),
            instance: random(),
        }
    }

    /// A new token for `original` on `side`.
    pub fn seal(&self, side: Side, original: &str) -> String {
        self.mint(side, original).1
    }

    /// [`TokenKey::seal`], with the nonce it drew.
    pub fn mint(&self, side: Side, original: &str) -> (TokenNonce, String) {
        let nonce: TokenNonce = random();
        (nonce, self.seal_with(nonce, side, original))
    }

    /// The token [`TokenKey::mint`] gave for `original` on `side` with
    /// `nonce`, sealed again: the same plaintext under the same key and
    /// nonce gives the same bytes, so the token table keeps a token's
    /// nonce instead of its text (issue #12: bytes per call). Only ever
    /// called with a nonce `mint` drew for this very plaintext (a nonce
    /// used for two different plaintexts would break the cipher).
    pub(super) fn seal_with(&self, nonce: TokenNonce, side: Side, original: &str) -> String {
        let mut buf = Vec::with_capacity(10 + original.len() + 16);
        buf.push(VERSION);
        buf.extend_from_slice(&self.instance);
        buf.push(match side {
            Side::Internal => 0,
            Side::External => 1,
        });
        buf.extend_from_slice(original.as_bytes());
        // Cannot fail for a buffer this size (ring refuses only > 2^38 B).
        let _ = self.key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(AAD),
            &mut buf,
        );
        let mut t = String::with_capacity(TOKEN_PREFIX.len() + 2 * (NONCE_LEN + buf.len()));
        t.push_str(TOKEN_PREFIX);
        // Hex without a temporary string per byte: the table seals a
        // token again for every lookup (`Bindings::slot`).
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for b in nonce.iter().chain(buf.iter()) {
            t.push(char::from(HEX[usize::from(b >> 4)]));
            t.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        t
    }

    /// Opens a token; `None` if it is not one sealed with this key
    /// (malformed, forged, altered, or from a node with another key).
    pub fn open(&self, token: &str) -> Option<Sealed> {
        let hex = token.strip_prefix(TOKEN_PREFIX)?;
        if hex.len() > MAX_TOKEN_LEN || hex.len() % 2 != 0 {
            return None;
        }
        let mut raw = Vec::with_capacity(hex.len() / 2);
        for pair in hex.as_bytes().chunks(2) {
            let s = std::str::from_utf8(pair).ok()?;
            raw.push(u8::from_str_radix(s, 16).ok()?);
        }
        if raw.len() < NONCE_LEN + 10 + 16 {
            return None;
        }
        let (nonce, sealed) = raw.split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let plain = self.key.open_in_place(nonce, Aad::from(AAD), sealed).ok()?;
        if plain.first() != Some(&VERSION) {
            return None;
        }
        let side = match plain[9] {
            0 => Side::Internal,
            1 => Side::External,
            _ => return None,
        };
        let original = std::str::from_utf8(&plain[10..]).ok()?.to_owned();
        Some(Sealed {
            ours: plain[1..9] == self.instance,
            side,
            original,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-shared";

    #[test]
    fn a_token_opens_with_the_same_secret_in_another_process_only() {
        let a = TokenKey::from_secret(SECRET).unwrap();
        let b = TokenKey::from_secret(SECRET).unwrap();
        let t = a.seal(Side::External, "sips:bob@198.51.100.2:5061");
        assert!(t.starts_with(TOKEN_PREFIX));
        assert!(t.bytes().all(|c| c.is_ascii_alphanumeric()), "{t}");
        assert!(!t.contains("198.51"), "the original is encrypted");
        let mine = a.open(&t).unwrap();
        assert!(mine.ours);
        let theirs = b.open(&t).unwrap();
        assert_eq!(
            theirs,
            Sealed {
                ours: false,
                side: Side::External,
                original: "sips:bob@198.51.100.2:5061".into()
            }
        );
        // Case changed by an intermediary: still the same token.
        assert_eq!(
            b.open(&t.to_ascii_uppercase().replacen("SEF", "sef", 1)),
            Some(theirs)
        );
        // Two seals of the same URI differ (fresh nonce).
        assert_ne!(t, a.seal(Side::External, "sips:bob@198.51.100.2:5061"));
    }

    #[test]
    fn forged_altered_or_foreign_key_tokens_are_refused() {
        let a = TokenKey::from_secret(SECRET).unwrap();
        let other = TokenKey::from_secret(b"another secret of at least 32 bytes!!").unwrap();
        let t = a.seal(Side::Internal, "sip:alice@10.77.0.2:5061");
        assert!(other.open(&t).is_none(), "a node with another key");
        assert!(TokenKey::random().open(&t).is_none());
        // Every single flipped hex digit is caught by the tag.
        let hex = &t[TOKEN_PREFIX.len()..];
        for i in 0..hex.len() {
            let mut h = hex.as_bytes().to_vec();
            h[i] = if h[i] == b'0' { b'1' } else { b'0' };
            let forged = format!("{TOKEN_PREFIX}{}", String::from_utf8(h).unwrap());
            assert!(a.open(&forged).is_none(), "digit {i} altered");
        }
        for bad in [
            "sef",
            "sefzz",
            "sef0123456789abcdef1",
            "sef00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
            &t[..t.len() - 2],
            "sip:x",
        ] {
            assert!(a.open(bad).is_none(), "{bad}");
        }
        assert!(TokenKey::from_secret(b"short").is_none());
    }

    #[test]
    fn the_key_file_is_read_trimmed_and_a_short_or_missing_one_refused() {
        let dir = std::env::temp_dir().join(format!("sip-edge-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.key");
        std::fs::write(&good, [SECRET, b"\n"].concat()).unwrap();
        let from_file = key_from_file("proxy.token_key_file", &good).unwrap();
        let t = TokenKey::from_secret(SECRET)
            .unwrap()
            .seal(Side::Internal, "sip:a@h");
        assert!(from_file.open(&t).is_some(), "trailing newline ignored");
        let short = dir.join("short.key");
        std::fs::write(&short, "tooshort\n").unwrap();
        let e = key_from_file("ha.token_key_file", &short)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ha.token_key_file") && e.contains("32"), "{e}");
        let e = key_from_file("proxy.token_key_file", &dir.join("absent"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
