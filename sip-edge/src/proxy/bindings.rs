//! Flow tokens and registrations of the proxy core: every Contact (and the
//! Path of a REGISTER) that crosses the edge is replaced by an edge URI whose
//! user part is an opaque token; this table maps the token back to the
//! original URI and, when known, to the connection (RFC 5626 flow) the party
//! sent it on. Filled by `proxy::core` when it forwards requests/responses,
//! read when a request targets a token, emptied by expiry and by connection
//! close. Registrations (AOR → token, with the registering client's side,
//! source and flow) come from 200 OKs to REGISTER, from either side: inside
//! clients registering with an outside registrar, and remote users outside
//! registering with the inside registrar (`[access]`).
//!
//! Why tokens and not the original Contact: DESIGN.md §1 wants each side to
//! see only the edge's addresses on its own side, and a client's Contact
//! behind NAT is unreachable anyway; requests for it must come back over the
//! client's own connection (RFC 5626 §5.3, RFC 3327 §5).
//!
//! Failed flows: when a registered client's connection closes, its
//! registration tokens (Contact and Path) are kept, marked failed, until the
//! registration would have expired, so a request for them is answered 430
//! Flow Failed (RFC 5626 §5.3) and the registrar can try the client's other
//! flows, rather than a 404 that says the binding never existed. Other
//! tokens (dialog Contacts) are forgotten at once, as before.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use hashbrown::HashTable;

use crate::media::Side;

use super::{
    tokens::{nonce_of, Sealed, TokenKey, TokenNonce},
    ConnId, Proto,
};

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
    /// The party's own URI as it sent it (shared with the reverse index:
    /// every call holds two bindings, issue #12).
    pub original: Arc<str>,
    /// The connection it sent it on, if requests can be sent back over it.
    pub flow: Option<ConnId>,
    /// When the binding is forgotten.
    pub expires: Instant,
    /// The flow closed while the binding was a registration's (or its
    /// Path's): requests for it get 430 Flow Failed (RFC 5626 §5.3).
    pub failed: bool,
}

/// The registering client's flow as the core saw it (for listings and for
/// recognising a remote user's connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowInfo {
    /// Side the client is on.
    pub side: Side,
    /// Its signalling source (the connection's peer address).
    pub source: SocketAddr,
    /// Transport of the flow.
    pub proto: Proto,
}

/// One registration learnt through the edge (RFC 3261 §10.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// Lower-cased `user@host` of the To URI.
    pub aor: String,
    /// The token of the Contact the registrar holds.
    pub token: String,
    /// The client's flow.
    pub flow: FlowInfo,
    /// The connection it registered on.
    pub conn: Option<ConnId>,
    /// The client's own Contact URI.
    pub contact: String,
    /// When the registrar's grant runs out.
    pub expires: Instant,
    /// The flow closed (requests for the binding get 430).
    pub failed: bool,
}

/// A binding as `Bindings::by_token` keeps it: the [`Binding`] with the
/// nonce of its token, the flow's presence folded into a flag so the
/// nonce and the three flags share one word of padding (issue #12).
#[derive(Debug)]
struct Slot {
    nonce: TokenNonce,
    side: Side,
    failed: bool,
    has_flow: bool,
    /// The connection when `has_flow`.
    flow: ConnId,
    original: Arc<str>,
    expires: Instant,
}

impl Slot {
    fn flow(&self) -> Option<ConnId> {
        self.has_flow.then_some(self.flow)
    }

    /// The binding it stands for (the original shared, not copied).
    fn binding(&self) -> Binding {
        Binding {
            side: self.side,
            original: self.original.clone(),
            flow: self.flow(),
            expires: self.expires,
            failed: self.failed,
        }
    }
}

/// The slot minted under nonce `n`.
fn find<'a>(t: &'a HashTable<Slot>, h: &RandomState, n: &TokenNonce) -> Option<&'a Slot> {
    t.find(h.hash_one(n), |s| s.nonce == *n)
}

/// [`find`], to change.
fn find_mut<'a>(
    t: &'a mut HashTable<Slot>,
    h: &RandomState,
    n: &TokenNonce,
) -> Option<&'a mut Slot> {
    t.find_mut(h.hash_one(n), |s| s.nonce == *n)
}

/// The hash `by_original` files a binding under.
fn original_hash(h: &RandomState, side: Side, original: &str, flow: Option<ConnId>) -> u64 {
    h.hash_one((side, original, flow))
}

/// Token ↔ binding table plus registrations; see the module docs.
#[derive(Debug)]
pub struct Bindings {
    /// Keyed by the nonce each token was minted with: the token itself
    /// (over a hundred bytes, two per call) is that nonce and the
    /// binding's side and original sealed again (`TokenKey::seal_with`),
    /// so it is not kept (issue #12: bytes per call). A token names a
    /// binding only if it is exactly the one minted (`Bindings::slot`).
    /// A table of [`Slot`]s hashed by their nonce rather than a map from
    /// nonce to `Binding`: the nonce fills the padding a `Binding` has,
    /// so a bucket (empty ones included) is 56 bytes instead of 72.
    by_token: HashTable<Slot>,
    /// (side, original, flow) → token nonce, so resending the same
    /// Contact does not mint new tokens. Holds only the nonce, hashed by
    /// the (side, original, flow) of its slot in `by_token`: a map keyed
    /// by that triple kept a second 56-byte bucket per binding (issue
    /// #12: two bindings per call).
    by_original: HashTable<TokenNonce>,
    /// Hashes both tables (randomly seeded, as a `HashMap`'s).
    hasher: RandomState,
    /// Registered AOR (lower-cased `user@host`) → token of the Contact.
    aors: HashMap<String, String>,
    /// Contact token → registration (every registered Contact).
    regs: HashMap<String, Registration>,
    /// Connection → Path tokens minted for REGISTERs sent over it, so a
    /// closed flow marks them failed too.
    paths: HashMap<ConnId, Vec<String>>,
    /// Connection → Contact tokens of its live registrations: which
    /// connections are remote users' flows, without a scan per request.
    flows: HashMap<ConnId, Vec<String>>,
    /// Seals new tokens and opens ones the table does not hold
    /// (`proxy::tokens`).
    key: TokenKey,
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
            by_token: HashTable::new(),
            by_original: HashTable::new(),
            hasher: RandomState::new(),
            aors: HashMap::new(),
            regs: HashMap::new(),
            paths: HashMap::new(),
            flows: HashMap::new(),
            key: TokenKey::random(),
        }
    }

    /// Seals tokens with `key` from now on (`[ha] token_key_file`: shared
    /// by the nodes and runs that must resolve each other's tokens). Set
    /// before the first token is minted: the table's tokens are sealed
    /// again with the key when asked for, so those minted before under
    /// another key are forgotten here rather than left unresolvable.
    pub fn set_key(&mut self, key: TokenKey) {
        self.key = key;
        self.retain(|_| false);
    }

    /// The table's key of `token`: the nonce it starts with, if the table
    /// minted a token under that nonce and `token` is exactly that token
    /// (as the table held the text before: an altered one, even in the
    /// case of its hex, is not it).
    fn slot(&self, token: &str) -> Option<TokenNonce> {
        let n = nonce_of(token)?;
        let b = find(&self.by_token, &self.hasher, &n)?;
        (self.key.seal_with(n, b.side, &b.original) == token).then_some(n)
    }

    /// What a token the table does not hold says, if it was sealed with
    /// our key by *another* process (the other node, an earlier run). A
    /// token of this process that the table forgot (closed flow, expiry)
    /// gives `None`, as does a forged or altered one.
    pub fn foreign(&self, token: &str) -> Option<Sealed> {
        if self.slot(token).is_some() {
            return None;
        }
        self.key.open(token).filter(|s| !s.ours)
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
        let (by_token, hasher) = (&self.by_token, &self.hasher);
        let oh = original_hash(hasher, side, original, flow);
        let known = self.by_original.find(oh, |n| {
            find(by_token, hasher, n)
                .is_some_and(|s| s.side == side && *s.original == *original && s.flow() == flow)
        });
        if let Some(n) = known.copied() {
            if let Some(b) = find_mut(&mut self.by_token, &self.hasher, &n) {
                b.expires = b.expires.max(expires);
                return Some(self.key.seal_with(n, side, &b.original));
            }
        }
        if self.by_token.len() >= MAX_BINDINGS {
            return None;
        }
        // Sealed (`proxy::tokens`): unguessable, so an outside peer cannot
        // address another client's flow, and readable by the nodes that
        // share the key.
        let (mut nonce, mut token) = self.key.mint(side, original);
        // 96 random bits: a repeat is not expected, but would let one
        // binding take another's place.
        while find(&self.by_token, &self.hasher, &nonce).is_some() {
            (nonce, token) = self.key.mint(side, original);
        }
        let hasher = &self.hasher;
        self.by_token.insert_unique(
            hasher.hash_one(nonce),
            Slot {
                nonce,
                side,
                failed: false,
                has_flow: flow.is_some(),
                flow: flow.unwrap_or_default(),
                original: Arc::from(original),
                expires,
            },
            |s| hasher.hash_one(s.nonce),
        );
        // Every nonce of `by_original` has its slot in `by_token` (the
        // slot goes in first, and `retain` prunes both together).
        let by_token = &self.by_token;
        self.by_original.insert_unique(oh, nonce, |n| {
            find(by_token, hasher, n)
                .map_or(0, |s| original_hash(hasher, s.side, &s.original, s.flow()))
        });
        Some(token)
    }

    /// The table's copy of `original` if it holds a binding of it from
    /// `side` over `flow` (so a record that keeps the same URI can share
    /// the allocation); nothing is refreshed.
    pub fn original(&self, side: Side, original: &str, flow: Option<ConnId>) -> Option<Arc<str>> {
        let (by_token, hasher) = (&self.by_token, &self.hasher);
        let n = self
            .by_original
            .find(original_hash(hasher, side, original, flow), |n| {
                find(by_token, hasher, n)
                    .is_some_and(|s| s.side == side && *s.original == *original && s.flow() == flow)
            })?;
        find(by_token, hasher, n).map(|s| s.original.clone())
    }

    /// The binding of a token, refreshing its lifetime.
    pub fn lookup(&mut self, token: &str, now: Instant) -> Option<Binding> {
        let n = self.slot(token)?;
        let b = find_mut(&mut self.by_token, &self.hasher, &n)?;
        if !b.failed {
            b.expires = b.expires.max(now + CONTACT_LIFETIME);
        }
        Some(b.binding())
    }

    /// Records (or, with `expires == 0`, removes) a registration of `aor`
    /// to the Contact whose token is `token` (from a 200 OK to REGISTER);
    /// `flow` is the registering client's connection as the core knows it.
    pub fn register(
        &mut self,
        aor: &str,
        token: &str,
        expires: Duration,
        flow: FlowInfo,
        now: Instant,
    ) {
        let aor = aor.to_ascii_lowercase();
        if expires.is_zero() {
            if self.aors.get(&aor).map(String::as_str) == Some(token) {
                self.aors.remove(&aor);
            }
            self.regs.remove(token);
            self.reindex();
            return;
        }
        if let Some(b) = self
            .slot(token)
            .and_then(|n| find_mut(&mut self.by_token, &self.hasher, &n))
        {
            b.expires = now + expires;
            if let Some(c) = b.flow() {
                let list = self.flows.entry(c).or_default();
                if !list.iter().any(|t| t == token) {
                    list.push(token.to_owned());
                }
            }
            self.aors.insert(aor.clone(), token.to_owned());
            self.regs.insert(
                token.to_owned(),
                Registration {
                    aor,
                    token: token.to_owned(),
                    flow,
                    conn: b.flow(),
                    contact: b.original.to_string(),
                    expires: now + expires,
                    failed: false,
                },
            );
        }
    }

    /// Keeps the binding of `token` until at least `until` (a Path token
    /// while the registrations it carries last).
    pub fn extend(&mut self, token: &str, until: Instant) {
        if let Some(b) = self
            .slot(token)
            .and_then(|n| find_mut(&mut self.by_token, &self.hasher, &n))
        {
            b.expires = b.expires.max(until);
        }
    }

    /// Remembers a Path token minted for a REGISTER sent over `conn`, so the
    /// token fails with the flow instead of vanishing.
    pub fn path_minted(&mut self, conn: ConnId, token: &str) {
        let list = self.paths.entry(conn).or_default();
        if !list.iter().any(|t| t == token) {
            list.push(token.to_owned());
        }
    }

    /// The binding registered for `aor` (`user@host`) by a client on
    /// `side`, if any and alive.
    pub fn registered(&mut self, aor: &str, side: Side, now: Instant) -> Option<(String, Binding)> {
        let token = self.aors.get(&aor.to_ascii_lowercase())?.clone();
        let b = find(&self.by_token, &self.hasher, &self.slot(&token)?)?.binding();
        (b.expires > now && !b.failed && b.side == side).then_some((token, b))
    }

    /// Whether `conn` carries a live registration of a client on `side`
    /// (an outside remote user's flow, for `side == External`).
    pub fn has_live_registration(&self, conn: ConnId, side: Side, now: Instant) -> bool {
        self.flows.get(&conn).is_some_and(|tokens| {
            tokens.iter().filter_map(|t| self.regs.get(t)).any(|r| {
                r.conn == Some(conn) && r.flow.side == side && !r.failed && r.expires > now
            })
        })
    }

    /// Live registrations of clients on `side`.
    pub fn registrations_on(&self, side: Side, now: Instant) -> usize {
        self.regs
            .values()
            .filter(|r| r.flow.side == side && !r.failed && r.expires > now)
            .count()
    }

    /// Every registration held, failed ones included, sorted by AOR.
    pub fn registrations(&self) -> Vec<Registration> {
        let mut v: Vec<Registration> = self.regs.values().cloned().collect();
        v.sort_by(|a, b| (&a.aor, &a.token).cmp(&(&b.aor, &b.token)));
        v
    }

    /// A connection closed: bindings bound to it are forgotten, except a
    /// registration's Contact and Path tokens, which stay until their
    /// expiry marked failed (RFC 5626 §5.3: requests for them get 430).
    pub fn conn_closed(&mut self, conn: ConnId) {
        let mut keep: Vec<String> = self.paths.remove(&conn).unwrap_or_default();
        for t in self.flows.remove(&conn).unwrap_or_default() {
            if let Some(r) = self.regs.get_mut(&t) {
                r.failed = true;
                keep.push(t);
            }
        }
        for t in &keep {
            if let Some(b) = self
                .slot(t)
                .and_then(|n| find_mut(&mut self.by_token, &self.hasher, &n))
            {
                b.failed = true;
            }
        }
        self.retain(|b| b.flow() != Some(conn) || b.failed);
    }

    /// Drops expired bindings and registrations (a registration's Contact
    /// token may outlive its grant while a dialog still uses it).
    pub fn expire(&mut self, now: Instant) {
        self.regs.retain(|_, r| r.expires > now);
        let regs = &self.regs;
        self.aors.retain(|_, t| regs.contains_key(t));
        self.retain(|b| b.expires > now);
    }

    fn retain(&mut self, keep: impl Fn(&Slot) -> bool) {
        self.by_token.retain(|b| keep(b));
        let (live, hasher) = (&self.by_token, &self.hasher);
        // A failed token is never handed out again: the client's next
        // REGISTER (on a new flow) gets a new one.
        self.by_original
            .retain(|n| find(live, hasher, n).is_some_and(|b| !b.failed));
        // Tokens kept below were all minted by the table (checked when
        // they were recorded): their nonce names their binding.
        let held = |t: &str| nonce_of(t).is_some_and(|n| find(live, hasher, &n).is_some());
        self.aors.retain(|_, t| held(t));
        self.regs.retain(|t, _| held(t));
        self.paths.retain(|_, ts| {
            ts.retain(|t| held(t));
            !ts.is_empty()
        });
        self.reindex();
    }

    /// Rebuilds the flow → live registrations index (after removals).
    fn reindex(&mut self) {
        let regs = &self.regs;
        self.flows.retain(|_, ts| {
            ts.retain(|t| regs.get(t).is_some_and(|r| !r.failed));
            !ts.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> FlowInfo {
        FlowInfo {
            side: Side::Internal,
            source: "10.0.0.2:5061".parse().unwrap(),
            proto: Proto::Tls,
        }
    }

    /// The table keeps a token's nonce, not its text: a token still
    /// names its binding only when it is exactly the token minted. One
    /// with the same nonce and anything else changed (another hex digit,
    /// hex case, a truncation, an appended byte) names nothing, and a
    /// resent Contact gets the very token it got before.
    #[test]
    fn only_the_exact_minted_token_names_its_binding() {
        let now = Instant::now();
        let mut b = Bindings::new();
        let t = b
            .token_for(
                Side::Internal,
                "sip:a@10.0.0.2",
                Some(1),
                CONTACT_LIFETIME,
                now,
            )
            .unwrap();
        let other = b
            .token_for(
                Side::Internal,
                "sip:b@10.0.0.3",
                Some(1),
                CONTACT_LIFETIME,
                now,
            )
            .unwrap();
        assert_eq!(
            b.token_for(
                Side::Internal,
                "sip:a@10.0.0.2",
                Some(1),
                CONTACT_LIFETIME,
                now
            ),
            Some(t.clone())
        );
        assert_eq!(
            b.lookup(&t, now).unwrap().original.as_ref(),
            "sip:a@10.0.0.2"
        );
        assert_eq!(
            b.lookup(&other, now).unwrap().original.as_ref(),
            "sip:b@10.0.0.3"
        );
        let last = t.len() - 1;
        let flipped = if t.ends_with('0') { "1" } else { "0" };
        let nonce_end = TOKEN_PREFIX.len() + 24;
        let altered = [
            format!("{}{flipped}", &t[..last]),
            format!("{}{}", &t[..nonce_end], &other[nonce_end..]),
            t.to_ascii_uppercase().replacen("SEF", TOKEN_PREFIX, 1),
            t[..last - 1].to_owned(),
            format!("{t}00"),
        ];
        for a in &altered {
            assert_ne!(a, &t);
            assert!(b.lookup(a, now).is_none(), "{a}");
            assert!(b.foreign(a).is_none(), "{a}: ours or forged, never foreign");
        }
        assert!(b.foreign(&t).is_none());
        assert_eq!(b.len(), 2);
    }

    /// `original` hands out the table's own copy of a bound URI (what a
    /// dialog's BYE target shares), only for the same side and flow,
    /// and refreshes nothing.
    #[test]
    fn original_shares_the_bound_uri_for_its_side_and_flow_only() {
        let now = Instant::now();
        let mut b = Bindings::new();
        let t = b
            .token_for(
                Side::Internal,
                "sip:a@10.0.0.2",
                Some(1),
                Duration::from_secs(5),
                now,
            )
            .unwrap();
        let held = b.lookup(&t, now).unwrap().original;
        let shared = b
            .original(Side::Internal, "sip:a@10.0.0.2", Some(1))
            .unwrap();
        assert!(Arc::ptr_eq(&held, &shared));
        assert!(b
            .original(Side::External, "sip:a@10.0.0.2", Some(1))
            .is_none());
        assert!(b
            .original(Side::Internal, "sip:a@10.0.0.2", Some(2))
            .is_none());
        assert!(b.original(Side::Internal, "sip:a@10.0.0.2", None).is_none());
        assert!(b
            .original(Side::Internal, "sip:b@10.0.0.2", Some(1))
            .is_none());
        // The lookup above refreshed the binding for CONTACT_LIFETIME;
        // expiring past that forgets it (`original` kept it no longer).
        b.expire(now + CONTACT_LIFETIME + Duration::from_secs(1));
        assert!(b
            .original(Side::Internal, "sip:a@10.0.0.2", Some(1))
            .is_none());
    }

    #[test]
    fn a_dialog_contact_is_forgotten_with_its_flow_not_failed() {
        let now = Instant::now();
        let mut b = Bindings::new();
        let t = b
            .token_for(Side::External, "sip:x@h", Some(4), CONTACT_LIFETIME, now)
            .unwrap();
        let p = b
            .token_for(Side::External, "flow:4", Some(4), CONTACT_LIFETIME, now)
            .unwrap();
        b.path_minted(4, &p);
        b.conn_closed(4);
        assert!(b.lookup(&t, now).is_none());
        assert!(b.lookup(&p, now).is_some_and(|x| x.failed));
    }

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
        b.register("A@Example.com", &t1, Duration::from_secs(60), flow(), now);
        assert_eq!(
            b.registered("a@example.com", Side::Internal, now)
                .map(|(t, _)| t),
            Some(t1.clone())
        );
        assert!(b.has_live_registration(1, Side::Internal, now));
        b.conn_closed(1);
        // RFC 5626 §5.3: the registration's token stays, failed (430).
        assert!(b.lookup(&t1, now).is_some_and(|x| x.failed));
        assert!(b.registered("a@example.com", Side::Internal, now).is_none());
        assert!(!b.has_live_registration(1, Side::Internal, now));
        assert!(b.registrations()[0].failed);
        assert!(b.lookup(&t3, now).is_some());
        // Gone once the registration would have expired.
        b.expire(now + Duration::from_secs(61));
        assert!(b.lookup(&t1, now).is_none());
        assert!(b.registrations().is_empty());
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
        b.register("p@x", &t, Duration::from_secs(5), flow(), now);
        b.register("p@x", &t, Duration::ZERO, flow(), now);
        assert!(b.registered("p@x", Side::External, now).is_none());
        assert!(b.registrations().is_empty());
        b.expire(now + Duration::from_secs(11));
        assert!(b.is_empty());
    }
}
