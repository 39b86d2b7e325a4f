//! Flow tokens and registrations of the proxy core: every Contact (and the
//! Path of a REGISTER) that crosses the edge is replaced by an edge URI whose
//! user part is an opaque token; this table maps the token back to the
//! original URI and, when known, to the connection (RFC 5626 flow) the party
//! sent it on. Filled by `proxy::core` when it forwards requests/responses,
//! read when a request targets a token, emptied by expiry and by connection
//! close. Registrations (AOR → token) come from 200 OKs to REGISTER.
//!
//! Why tokens and not the original Contact: DESIGN.md §1 wants each side to
//! see only the edge's addresses on its own side, and an internal client's
//! Contact is unreachable from outside anyway; requests for it must come
//! back over the client's own connection (RFC 5626 §5.3, RFC 3327 §5).

use std::{
    collections::{hash_map::RandomState, HashMap},
    hash::{BuildHasher, Hasher},
    time::{Duration, Instant},
};

use crate::media::Side;

use super::ConnId;

/// Prefix of every token, so a token is recognisable in a Request-URI.
pub const TOKEN_PREFIX: &str = "sef";

/// How long a dialog Contact binding lives without being used; refreshed
/// on every use (a dialog's in-dialog requests keep it alive).
pub const CONTACT_LIFETIME: Duration = Duration::from_secs(2 * 3600);

/// Most bindings kept; beyond it new Contacts are refused (503), so a
/// peer cannot grow the table without bound.
pub const MAX_BINDINGS: usize = 200_000;

/// What a token stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// Side of the edge the party lives on.
    pub side: Side,
    /// The party's own URI as it sent it.
    pub original: String,
    /// The connection it sent it on, if requests can be sent back over it.
    pub flow: Option<ConnId>,
    /// When the binding is forgotten.
    pub expires: Instant,
}

/// Token ↔ binding table plus registrations; see the module docs.
#[derive(Debug)]
pub struct Bindings {
    by_token: HashMap<String, Binding>,
    /// (side, original, flow) → token, so resending the same Contact does
    /// not mint new tokens.
    by_original: HashMap<(Side, String, Option<ConnId>), String>,
    /// Registered AOR (lower-cased `user@host`) → token of the Contact.
    aors: HashMap<String, String>,
    keys: RandomState,
    counter: u64,
}

impl Default for Bindings {
    fn default() -> Self {
        Self::new()
    }
}

impl Bindings {
    /// An empty table with a fresh random key for token generation.
    pub fn new() -> Self {
        Self {
            by_token: HashMap::new(),
            by_original: HashMap::new(),
            aors: HashMap::new(),
            keys: RandomState::new(),
            counter: 0,
        }
    }

    /// Number of live bindings.
    pub fn len(&self) -> usize {
        self.by_token.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_token.is_empty()
    }

    /// The token for `original` sent from `side` over `flow`, created if
    /// needed; `None` when the table is full.
    pub fn token_for(
        &mut self,
        side: Side,
        original: &str,
        flow: Option<ConnId>,
        lifetime: Duration,
        now: Instant,
    ) -> Option<String> {
        let expires = now + lifetime;
        let key = (side, original.to_owned(), flow);
        if let Some(t) = self.by_original.get(&key) {
            if let Some(b) = self.by_token.get_mut(t) {
                b.expires = b.expires.max(expires);
                return Some(t.clone());
            }
        }
        if self.by_token.len() >= MAX_BINDINGS {
            return None;
        }
        // Unguessable enough that an outside peer cannot address another
        // client's flow by counting (SipHash with a per-process random key).
        self.counter += 1;
        let mut h = self.keys.build_hasher();
        h.write_u64(self.counter);
        let token = format!("{TOKEN_PREFIX}{:016x}{:x}", h.finish(), self.counter);
        self.by_token.insert(
            token.clone(),
            Binding {
                side,
                original: original.to_owned(),
                flow,
                expires,
            },
        );
        self.by_original.insert(key, token.clone());
        Some(token)
    }

    /// The binding of a token, refreshing its lifetime.
    pub fn lookup(&mut self, token: &str, now: Instant) -> Option<Binding> {
        let b = self.by_token.get_mut(token)?;
        b.expires = b.expires.max(now + CONTACT_LIFETIME);
        Some(b.clone())
    }

    /// Records (or, with `expires == 0`, removes) a registration of `aor`
    /// to the Contact whose token is `token` (from a 200 OK to REGISTER).
    pub fn register(&mut self, aor: &str, token: &str, expires: Duration, now: Instant) {
        let aor = aor.to_ascii_lowercase();
        if expires.is_zero() {
            if self.aors.get(&aor).map(String::as_str) == Some(token) {
                self.aors.remove(&aor);
            }
            return;
        }
        if let Some(b) = self.by_token.get_mut(token) {
            b.expires = now + expires;
            self.aors.insert(aor, token.to_owned());
        }
    }

    /// The binding registered for `aor` (`user@host`), if any and alive.
    pub fn registered(&mut self, aor: &str, now: Instant) -> Option<(String, Binding)> {
        let token = self.aors.get(&aor.to_ascii_lowercase())?.clone();
        let b = self.by_token.get(&token)?.clone();
        (b.expires > now).then_some((token, b))
    }

    /// Forgets bindings bound to a closed connection (their flow is gone;
    /// RFC 5626 §5.3: the request then fails with 430, we answer 480).
    pub fn conn_closed(&mut self, conn: ConnId) {
        self.retain(|b| b.flow != Some(conn));
    }

    /// Drops expired bindings.
    pub fn expire(&mut self, now: Instant) {
        self.retain(|b| b.expires > now);
    }

    fn retain(&mut self, keep: impl Fn(&Binding) -> bool) {
        self.by_token.retain(|_, b| keep(b));
        let live = &self.by_token;
        self.by_original.retain(|_, t| live.contains_key(t));
        self.aors.retain(|_, t| live.contains_key(t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_contact_same_flow_reuses_token_and_close_forgets() {
        let now = Instant::now();
        let mut b = Bindings::new();
        let t1 = b
            .token_for(
                Side::Internal,
                "sip:a@10.0.0.2",
                Some(1),
                CONTACT_LIFETIME,
                now,
            )
            .unwrap();
        let t2 = b
            .token_for(
                Side::Internal,
                "sip:a@10.0.0.2",
                Some(1),
                CONTACT_LIFETIME,
                now,
            )
            .unwrap();
        let t3 = b
            .token_for(
                Side::Internal,
                "sip:a@10.0.0.2",
                Some(2),
                CONTACT_LIFETIME,
                now,
            )
            .unwrap();
        assert_eq!(t1, t2);
        assert_ne!(t1, t3);
        assert!(t1.starts_with(TOKEN_PREFIX));
        b.register("A@Example.com", &t1, Duration::from_secs(60), now);
        assert_eq!(
            b.registered("a@example.com", now).map(|(t, _)| t),
            Some(t1.clone())
        );
        b.conn_closed(1);
        assert!(b.lookup(&t1, now).is_none());
        assert!(b.registered("a@example.com", now).is_none());
        assert!(b.lookup(&t3, now).is_some());
    }

    #[test]
    fn expiry_and_unregister() {
        let now = Instant::now();
        let mut b = Bindings::new();
        let t = b
            .token_for(
                Side::External,
                "sip:p@198.51.100.2",
                None,
                Duration::from_secs(10),
                now,
            )
            .unwrap();
        b.register("p@x", &t, Duration::from_secs(5), now);
        b.register("p@x", &t, Duration::ZERO, now);
        assert!(b.registered("p@x", now).is_none());
        b.expire(now + Duration::from_secs(11));
        assert!(b.is_empty());
    }
}
