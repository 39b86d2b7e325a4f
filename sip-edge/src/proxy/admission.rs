//! Request admission at the edge (issue #14 item 8; issue #15, registration
//! security), sans-IO: the proxy core asks [`Admission::check`] about every
//! new request (retransmissions of a known transaction, ACK and CANCEL are
//! absorbed or matched before and never charged) and reports each final
//! response to a REGISTER through [`Admission::on_register_result`]; the
//! clock is the `Instant` the caller passes, so tests drive it without
//! sleeping. What Kamailio's pike + htable (and fail2ban on a registrar's
//! log) do, in one place:
//!
//! - **Rates.** A token bucket per source address for new requests, and
//!   stricter ones for new INVITEs (no To tag) and REGISTERs, plus a
//!   global bucket per side (an outside flood from many addresses never
//!   spends the inside's budget, issue #8): a request passes only when
//!   every bucket that applies holds a token. The excess is answered 503 with a Retry-After of the
//!   time until a token is back (RFC 3261 §21.5.4), before the proxy keeps
//!   any state for it, so a flood never reaches the next hop (a registrar,
//!   a carrier) unthrottled. A small hand-written bucket rather than
//!   `governor`: the checks span several buckets that must all pass before
//!   any is charged, and the sans-IO clock must be the caller's `Instant`.
//! - **Registration failures.** A 403, or a 401/407 to a REGISTER that
//!   already carried credentials (a challenge to one without them is the
//!   normal first step, RFC 3261 §22.2), counts as a failure of its source
//!   and of its AOR. `register_failures_per_source` failures within the
//!   window block the source: every request from it gets 403 for
//!   `block_secs`. `register_failures_per_aor` failures of one AOR, from
//!   whatever sources, block REGISTERs for that AOR (password guessing
//!   spread over many addresses); a source that keeps trying a blocked AOR
//!   counts a failure per try, so it ends up blocked itself. A success
//!   clears its source's failures, not its AOR's (the guesser's successes
//!   are what we fear).
//! - **Sources.** An IPv4 source is its address; an IPv6 source is its
//!   `ipv6_source_prefix` (/64 by default, [`source_key`]): one host holds
//!   a whole /64 and could otherwise take a fresh bucket per address.
//! - **Logging.** Each refusal says whether to log it: the first per source
//!   and rule, then at most one line per [`LOG_EVERY`] carrying how many it
//!   stands for, so a flood is never a log flood. Blocks always log.
//! - **Memory.** At most `max_tracked_sources` sources and as many AORs.
//!   [`Admission::expire`] drops entries with full buckets and nothing
//!   pending; when the table is still full, new sources share one overflow
//!   entry (they are throttled together rather than not at all).

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::{config::Limits, media::Side};

/// At most one log line per source and rule per this long.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Milli-tokens per token: buckets count in thousandths so that rates of
/// a few per second refill smoothly at millisecond resolution.
const MILLI: u64 = 1000;

/// Size and refill of one bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketSpec {
    /// Tokens added per second.
    pub rate: u32,
    /// Most tokens held (what a quiet source may send at once).
    pub burst: u32,
}

/// Everything admission needs from `[limits]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdmissionSettings {
    /// Off: every request is admitted (unit tests of the core, and the
    /// default of `Proxy::new`).
    pub enabled: bool,
    /// New requests per source.
    pub request: BucketSpec,
    /// New INVITEs per source.
    pub invite: BucketSpec,
    /// REGISTERs per source.
    pub register: BucketSpec,
    /// All new requests of one side together (each side has its own).
    pub global: BucketSpec,
    /// IPv6 sources are keyed by this prefix length (1..=128).
    pub v6_prefix: u8,
    /// Sources (and AORs) tracked at once.
    pub max_sources: usize,
    /// Registration failures of a source within `window` that block it.
    pub failures_per_source: u32,
    /// Registration failures of an AOR within `window` that block it.
    pub failures_per_aor: u32,
    /// The failure window.
    pub window: Duration,
    /// How long a block lasts.
    pub block: Duration,
}

impl AdmissionSettings {
    /// Admission as `[limits]` configures it.
    pub fn from_limits(l: &Limits) -> AdmissionSettings {
        AdmissionSettings {
            enabled: true,
            request: BucketSpec {
                rate: l.request_rate,
                burst: l.request_burst,
            },
            invite: BucketSpec {
                rate: l.invite_rate,
                burst: l.invite_burst,
            },
            register: BucketSpec {
                rate: l.register_rate,
                burst: l.register_burst,
            },
            global: BucketSpec {
                rate: l.global_request_rate,
                burst: l.global_request_burst,
            },
            v6_prefix: l.ipv6_source_prefix,
            max_sources: usize::try_from(l.max_tracked_sources).unwrap_or(usize::MAX),
            failures_per_source: l.register_failures_per_source,
            failures_per_aor: l.register_failures_per_aor,
            window: Duration::from_secs(l.register_failure_window_secs),
            block: Duration::from_secs(l.block_secs),
        }
    }

    /// Everything admitted, nothing counted.
    pub fn unlimited() -> AdmissionSettings {
        AdmissionSettings {
            enabled: false,
            ..AdmissionSettings::from_limits(&Limits::default())
        }
    }
}

/// A token bucket in milli-tokens.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bucket {
    milli: u64,
    at: Instant,
}

impl Bucket {
    pub(crate) fn full(spec: BucketSpec, now: Instant) -> Bucket {
        Bucket {
            milli: u64::from(spec.burst) * MILLI,
            at: now,
        }
    }

    pub(crate) fn refill(&mut self, spec: BucketSpec, now: Instant) {
        let us = now.saturating_duration_since(self.at).as_micros();
        // rate tokens per second = rate milli-tokens per millisecond.
        let add = us.saturating_mul(u128::from(spec.rate)) / 1000;
        let cap = u64::from(spec.burst) * MILLI;
        self.milli = u64::try_from(u128::from(self.milli).saturating_add(add))
            .unwrap_or(u64::MAX)
            .min(cap);
        self.at = now;
    }

    pub(crate) fn ready(&self) -> bool {
        self.milli >= MILLI
    }

    pub(crate) fn take(&mut self) {
        self.milli = self.milli.saturating_sub(MILLI);
    }

    pub(crate) fn is_full(&self, spec: BucketSpec) -> bool {
        self.milli >= u64::from(spec.burst) * MILLI
    }

    /// How long until one token is back.
    fn wait(&self, spec: BucketSpec) -> Duration {
        let missing = MILLI.saturating_sub(self.milli);
        // missing milli-tokens at `rate` per millisecond.
        Duration::from_millis(missing.div_ceil(u64::from(spec.rate.max(1))))
    }
}

/// Which rule refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    /// The source's request bucket is empty.
    SourceRequests,
    /// The source's INVITE bucket is empty.
    SourceInvites,
    /// The source's REGISTER bucket is empty.
    SourceRegisters,
    /// The global bucket of the request's side is empty.
    Global,
    /// The source is blocked after registration failures.
    BlockedSource,
    /// The AOR is blocked after registration failures.
    BlockedAor,
}

impl Rule {
    /// The config key behind the rule (what the security log names).
    pub fn key(self) -> &'static str {
        match self {
            Rule::SourceRequests => "limits.request_rate",
            Rule::SourceInvites => "limits.invite_rate",
            Rule::SourceRegisters => "limits.register_rate",
            Rule::Global => "limits.global_request_rate",
            Rule::BlockedSource => "limits.register_failures_per_source",
            Rule::BlockedAor => "limits.register_failures_per_aor",
        }
    }

    fn ix(self) -> usize {
        match self {
            Rule::SourceRequests => 0,
            Rule::SourceInvites => 1,
            Rule::SourceRegisters => 2,
            Rule::Global => 3,
            Rule::BlockedSource => 4,
            Rule::BlockedAor => 5,
        }
    }
}

/// A new request as admission sees it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The signalling source (the connection's peer address).
    pub source: IpAddr,
    /// The side it came from (whose global bucket it spends).
    pub side: Side,
    /// The method, as in the Request-Line.
    pub method: &'a str,
    /// No To tag: a dialog-creating or out-of-dialog request.
    pub initial: bool,
    /// For REGISTER: the AOR (To URI, `user@host`, lower-cased).
    pub aor: Option<&'a str>,
}

/// A refusal: what to answer and whether to log it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// 503 (rates) or 403 (blocks).
    pub code: u16,
    /// Retry-After seconds (RFC 3261 §20.33): when a token is back, or when
    /// the block ends.
    pub retry_after: u32,
    /// The rule.
    pub rule: Rule,
    /// `Some(n)`: log this refusal, standing for `n` earlier unlogged ones.
    pub log: Option<u64>,
}

/// The verdict on one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through (its tokens are taken).
    Admit,
    /// Refuse it.
    Refuse(Refusal),
}

/// A block that just started, to log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    /// The source address, or `None` for an AOR block.
    pub source: Option<IpAddr>,
    /// The AOR, for an AOR block.
    pub aor: Option<String>,
    /// Failures counted in the window.
    pub failures: u32,
    /// How long.
    pub for_: Duration,
}

/// Counters (tests, logs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    /// Requests admitted.
    pub admitted: u64,
    /// Requests refused, by rule (`Rule` order).
    pub refused: [u64; 6],
    /// Blocks started.
    pub blocks: u64,
}

impl AdmissionStats {
    /// Refusals under `rule`.
    pub fn refused_by(&self, rule: Rule) -> u64 {
        self.refused.get(rule.ix()).copied().unwrap_or(0)
    }
}

#[derive(Clone, Debug)]
struct LogGate {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogGate {
    fn new() -> LogGate {
        LogGate {
            last: None,
            suppressed: 0,
        }
    }

    fn pass(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < LOG_EVERY)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[derive(Clone, Debug)]
struct Source {
    request: Bucket,
    invite: Bucket,
    register: Bucket,
    failures: VecDeque<Instant>,
    blocked_until: Option<Instant>,
    log: LogGate,
}

#[derive(Clone, Debug, Default)]
struct Aor {
    failures: VecDeque<Instant>,
    blocked_until: Option<Instant>,
}

/// Admission state; see the module docs.
#[derive(Debug)]
pub struct Admission {
    s: AdmissionSettings,
    /// Per side (`side_ix`).
    global: [Bucket; 2],
    global_log: [LogGate; 2],
    sources: HashMap<IpAddr, Source>,
    /// Shared by new sources while `sources` is full.
    overflow: Option<Source>,
    aors: HashMap<String, Aor>,
    stats: AdmissionStats,
    /// When [`Admission::tick`] expires entries next.
    next_expire: Instant,
}

/// How often [`Admission::tick`] walks the tables.
const EXPIRE_EVERY: Duration = Duration::from_secs(10);

/// Records a failure at `now` in a window list capped at `limit` entries
/// (older than `window` dropped); returns the count in the window.
fn note_failure(list: &mut VecDeque<Instant>, now: Instant, window: Duration, limit: u32) -> u32 {
    while list
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= window)
    {
        list.pop_front();
    }
    list.push_back(now);
    while list.len() > usize::try_from(limit).unwrap_or(usize::MAX) {
        list.pop_front();
    }
    u32::try_from(list.len()).unwrap_or(u32::MAX)
}

/// The key a source is tracked under: an IPv4 address (v4-mapped IPv6
/// included) as it is, an IPv6 address cut to its first `v6_prefix` bits.
/// Per-address keys let one host with a /64 (the usual end-site
/// assignment, RFC 6177) rotate through 2^64 addresses, each with full
/// buckets; the connection limits (`transport::limits`) key the same way.
pub fn source_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(a) => {
            let bits = u32::from(v6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
        v4 => v4,
    }
}

fn side_ix(side: Side) -> usize {
    match side {
        Side::Internal => 0,
        Side::External => 1,
    }
}

fn secs_ceil(d: Duration) -> u32 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    u32::try_from(s.max(1)).unwrap_or(u32::MAX)
}

impl Admission {
    /// Admission per `s`, nothing tracked yet.
    pub fn new(s: AdmissionSettings) -> Admission {
        let now = Instant::now();
        Admission {
            global: [Bucket::full(s.global, now); 2],
            global_log: [LogGate::new(), LogGate::new()],
            sources: HashMap::new(),
            overflow: None,
            aors: HashMap::new(),
            stats: AdmissionStats::default(),
            next_expire: now + EXPIRE_EVERY,
            s,
        }
    }

    /// Expires entries every [`EXPIRE_EVERY`] (call it on every tick).
    pub fn tick(&mut self, now: Instant) {
        if now >= self.next_expire {
            self.next_expire = now + EXPIRE_EVERY;
            self.expire(now);
        }
    }

    /// Everything admitted.
    pub fn unlimited() -> Admission {
        Admission::new(AdmissionSettings::unlimited())
    }

    /// New limits (a reload, `crate::service`): buckets keep their tokens
    /// (capped at the new burst at their next refill), blocks in progress
    /// keep their end, and failures counted stay counted.
    pub fn set_settings(&mut self, s: AdmissionSettings) {
        self.s = s;
    }

    /// Counters.
    pub fn stats(&self) -> AdmissionStats {
        self.stats
    }

    /// (sources, AORs) tracked.
    pub fn tracked(&self) -> (usize, usize) {
        (self.sources.len(), self.aors.len())
    }

    fn new_source(&self, now: Instant) -> Source {
        Source {
            request: Bucket::full(self.s.request, now),
            invite: Bucket::full(self.s.invite, now),
            register: Bucket::full(self.s.register, now),
            failures: VecDeque::new(),
            blocked_until: None,
            log: LogGate::new(),
        }
    }

    /// The state of `ip`, created if there is room (else the overflow).
    fn source_mut(&mut self, ip: IpAddr, now: Instant) -> &mut Source {
        if !self.sources.contains_key(&ip) && self.sources.len() >= self.s.max_sources {
            self.expire(now);
        }
        if self.sources.contains_key(&ip) || self.sources.len() < self.s.max_sources {
            let fresh = self.new_source(now);
            return self.sources.entry(ip).or_insert(fresh);
        }
        let fresh = self.new_source(now);
        self.overflow.get_or_insert(fresh)
    }

    /// The verdict on a new request at `now`; an admitted one is charged.
    pub fn check(&mut self, req: &Request<'_>, now: Instant) -> Verdict {
        if !self.s.enabled {
            return Verdict::Admit;
        }
        let ip = source_key(req.source, self.s.v6_prefix);
        let (window, per_source, block) = (self.s.window, self.s.failures_per_source, self.s.block);
        let aor_blocked = match (req.method.eq_ignore_ascii_case("REGISTER"), req.aor) {
            (true, Some(a)) => self
                .aors
                .get(a)
                .and_then(|x| x.blocked_until)
                .filter(|t| *t > now),
            _ => None,
        };
        let specs = (
            self.s.request,
            self.s.invite,
            self.s.register,
            self.s.global,
        );
        let src = self.source_mut(ip, now);
        if let Some(until) = src.blocked_until.filter(|t| *t > now) {
            let log = src.log.pass(now);
            return self.refuse(403, until - now, Rule::BlockedSource, log);
        }
        if let Some(until) = aor_blocked {
            // Trying a blocked AOR is a failure of its own (module docs).
            let n = note_failure(&mut src.failures, now, window, per_source);
            if n >= per_source {
                src.blocked_until = Some(now + block);
            }
            let log = src.log.pass(now);
            return self.refuse(403, until - now, Rule::BlockedAor, log);
        }
        let (request, invite, register, global) = specs;
        src.request.refill(request, now);
        src.invite.refill(invite, now);
        src.register.refill(register, now);
        let is_invite = req.initial && req.method.eq_ignore_ascii_case("INVITE");
        let is_register = req.method.eq_ignore_ascii_case("REGISTER");
        let mut empty: Option<(Rule, Duration)> = None;
        let mut note = |rule: Rule, b: &Bucket, spec: BucketSpec| {
            if !b.ready() {
                let w = b.wait(spec);
                if empty.is_none_or(|(_, e)| w > e) {
                    empty = Some((rule, w));
                }
            }
        };
        note(Rule::SourceRequests, &src.request, request);
        if is_invite {
            note(Rule::SourceInvites, &src.invite, invite);
        }
        if is_register {
            note(Rule::SourceRegisters, &src.register, register);
        }
        if let Some((rule, wait)) = empty {
            let log = src.log.pass(now);
            return self.refuse(503, wait, rule, log);
        }
        let side = side_ix(req.side);
        self.global[side].refill(global, now);
        if !self.global[side].ready() {
            let wait = self.global[side].wait(global);
            let log = self.global_log[side].pass(now);
            return self.refuse(503, wait, Rule::Global, log);
        }
        self.global[side].take();
        let src = self.source_mut(ip, now);
        src.request.take();
        if is_invite {
            src.invite.take();
        }
        if is_register {
            src.register.take();
        }
        self.stats.admitted += 1;
        Verdict::Admit
    }

    fn refuse(&mut self, code: u16, wait: Duration, rule: Rule, log: Option<u64>) -> Verdict {
        if let Some(n) = self.stats.refused.get_mut(rule.ix()) {
            *n += 1;
        }
        Verdict::Refuse(Refusal {
            code,
            retry_after: secs_ceil(wait),
            rule,
            log,
        })
    }

    /// The final response `code` to a REGISTER from `source` for `aor`;
    /// `credentials`: the REGISTER carried Authorization or
    /// Proxy-Authorization. Returns the blocks this starts (to log).
    pub fn on_register_result(
        &mut self,
        source: IpAddr,
        aor: &str,
        credentials: bool,
        code: u16,
        now: Instant,
    ) -> Vec<Blocked> {
        if !self.s.enabled {
            return Vec::new();
        }
        let ip = source_key(source, self.s.v6_prefix);
        let failed = code == 403 || (credentials && matches!(code, 401 | 407));
        let (window, block) = (self.s.window, self.s.block);
        let (per_source, per_aor) = (self.s.failures_per_source, self.s.failures_per_aor);
        let mut blocks = Vec::new();
        if (200..300).contains(&code) {
            if let Some(s) = self.sources.get_mut(&ip) {
                s.failures.clear();
            }
            return blocks;
        }
        if !failed {
            return blocks;
        }
        let src = self.source_mut(ip, now);
        let n = note_failure(&mut src.failures, now, window, per_source);
        if n >= per_source && src.blocked_until.is_none_or(|t| t <= now) {
            src.blocked_until = Some(now + block);
            blocks.push(Blocked {
                source: Some(ip),
                aor: None,
                failures: n,
                for_: block,
            });
        }
        let aor = aor.to_ascii_lowercase();
        if !self.aors.contains_key(&aor) && self.aors.len() >= self.s.max_sources {
            self.expire(now);
        }
        if self.aors.contains_key(&aor) || self.aors.len() < self.s.max_sources {
            let a = self.aors.entry(aor.clone()).or_default();
            let n = note_failure(&mut a.failures, now, window, per_aor);
            if n >= per_aor && a.blocked_until.is_none_or(|t| t <= now) {
                a.blocked_until = Some(now + block);
                blocks.push(Blocked {
                    source: None,
                    aor: Some(aor),
                    failures: n,
                    for_: block,
                });
            }
        }
        self.stats.blocks += blocks.len() as u64;
        blocks
    }

    /// Forgets sources and AORs with nothing to remember: full buckets, no
    /// failure in the window, no block in force. Call it now and then (the
    /// proxy's tick); `check` calls it when the table is full.
    pub fn expire(&mut self, now: Instant) {
        let s = &self.s;
        let live = |failures: &VecDeque<Instant>, until: Option<Instant>| {
            until.is_some_and(|t| t > now)
                || failures
                    .back()
                    .is_some_and(|t| now.saturating_duration_since(*t) < s.window)
        };
        self.sources.retain(|_, src| {
            src.request.refill(s.request, now);
            src.invite.refill(s.invite, now);
            src.register.refill(s.register, now);
            let full = src.request.is_full(s.request)
                && src.invite.is_full(s.invite)
                && src.register.is_full(s.register);
            !full || live(&src.failures, src.blocked_until)
        });
        self.aors.retain(|_, a| live(&a.failures, a.blocked_until));
        if let Some(o) = &mut self.overflow {
            o.request.refill(s.request, now);
            if o.request.is_full(s.request) && !live(&o.failures, o.blocked_until) {
                self.overflow = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AdmissionSettings {
        AdmissionSettings {
            enabled: true,
            request: BucketSpec {
                rate: 10,
                burst: 20,
            },
            invite: BucketSpec { rate: 2, burst: 5 },
            register: BucketSpec { rate: 1, burst: 3 },
            global: BucketSpec {
                rate: 1000,
                burst: 1000,
            },
            v6_prefix: 64,
            max_sources: 4,
            failures_per_source: 3,
            failures_per_aor: 5,
            window: Duration::from_secs(60),
            block: Duration::from_secs(600),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn req<'a>(source: &str, method: &'a str, aor: Option<&'a str>) -> Request<'a> {
        let source = ip(source);
        Request {
            source,
            side: if source.to_string().starts_with("10.") {
                Side::Internal
            } else {
                Side::External
            },
            method,
            initial: true,
            aor,
        }
    }

    fn admitted(a: &mut Admission, r: &Request<'_>, now: Instant, n: usize) -> usize {
        (0..n).filter(|_| a.check(r, now) == Verdict::Admit).count()
    }

    /// Issue #14 item 8: 20,000 INVITEs in 10 s from one inside host were
    /// all accepted. Now: the burst, then the rate, the rest 503 with a
    /// Retry-After when a token is back.
    #[test]
    fn an_invite_flood_gets_its_burst_then_its_rate_and_503_with_retry_after() {
        let t0 = Instant::now();
        let mut a = Admission::new(settings());
        let flood = req("10.77.0.2", "INVITE", None);
        assert_eq!(admitted(&mut a, &flood, t0, 100), 5, "the INVITE burst");
        match a.check(&flood, t0) {
            Verdict::Refuse(r) => {
                assert_eq!(
                    (r.code, r.rule, r.retry_after),
                    (503, Rule::SourceInvites, 1)
                );
                assert_eq!(
                    r.log, None,
                    "the flood's first refusal was logged, the rest are counted"
                );
            }
            Verdict::Admit => panic!("admitted past the burst"),
        }
        // 10 s at 2 per second.
        let mut ok = 0;
        for ms in (0..10_000).step_by(10) {
            ok += admitted(&mut a, &flood, t0 + Duration::from_millis(ms), 1);
        }
        assert!((19..=21).contains(&ok), "{ok} admitted in 10 s at 2/s");
        assert_eq!(
            a.stats().refused_by(Rule::SourceInvites),
            95 + 1 + 1000 - ok as u64
        );
        // Another host, and in-dialog requests of the flooding one, pass.
        let other = req("10.77.0.3", "INVITE", None);
        assert_eq!(a.check(&other, t0), Verdict::Admit);
        let in_dialog = Request {
            initial: false,
            ..flood
        };
        assert_eq!(
            a.check(&in_dialog, t0 + Duration::from_secs(10)),
            Verdict::Admit
        );
    }

    #[test]
    fn the_log_gate_lets_one_line_per_source_and_rule_through_every_ten_seconds() {
        let t0 = Instant::now();
        let mut a = Admission::new(settings());
        let r = req("198.51.100.66", "OPTIONS", None);
        assert_eq!(admitted(&mut a, &r, t0, 20), 20);
        let logs: Vec<Option<u64>> = (0..5)
            .filter_map(|_| match a.check(&r, t0) {
                Verdict::Refuse(x) => Some(x.log),
                Verdict::Admit => None,
            })
            .collect();
        assert_eq!(logs, vec![Some(0), None, None, None, None]);
        let later = t0 + Duration::from_secs(11);
        // Drain what 11 s refilled, then the next refusal logs the 4 it
        // stood for.
        let _ = admitted(&mut a, &r, later, 20);
        let next = (0..5).find_map(|_| match a.check(&r, later) {
            Verdict::Refuse(x) => x.log,
            Verdict::Admit => None,
        });
        assert_eq!(next, Some(4));
    }

    #[test]
    fn the_global_cap_applies_across_sources() {
        let t0 = Instant::now();
        let mut s = settings();
        s.global = BucketSpec { rate: 1, burst: 10 };
        s.max_sources = 100;
        let mut a = Admission::new(s);
        let mut ok = 0;
        for n in 0..50u8 {
            let r = Request {
                source: IpAddr::from([198, 51, 100, n]),
                side: Side::External,
                method: "OPTIONS",
                initial: true,
                aor: None,
            };
            ok += admitted(&mut a, &r, t0, 1);
        }
        assert_eq!(ok, 10);
        assert_eq!(a.stats().refused_by(Rule::Global), 40);
    }

    /// Issue #8: 50 outside sources flooding together drained the one
    /// global bucket, and the inside's calls got 503 with them. Each side
    /// has its own global budget now.
    #[test]
    fn an_outside_flood_never_spends_the_insides_global_budget() {
        let t0 = Instant::now();
        let mut s = settings();
        s.global = BucketSpec { rate: 1, burst: 10 };
        s.max_sources = 100;
        let mut a = Admission::new(s);
        for n in 0..50u8 {
            let r = req(&format!("198.51.100.{n}"), "OPTIONS", None);
            let _ = admitted(&mut a, &r, t0, 5);
        }
        assert_eq!(a.stats().admitted, 10, "the outside's global burst");
        let inside = req("10.77.0.2", "INVITE", None);
        assert_eq!(a.check(&inside, t0), Verdict::Admit);
        let outside = req("198.51.100.200", "INVITE", None);
        assert!(matches!(
            a.check(&outside, t0),
            Verdict::Refuse(Refusal {
                rule: Rule::Global,
                ..
            })
        ));
    }

    /// Issue #8: a source keyed by its full IPv6 address could rotate
    /// through its /64 and get a full bucket per address. IPv6 sources are
    /// keyed by their /64 (`limits.ipv6_source_prefix`).
    #[test]
    fn ipv6_sources_are_keyed_by_their_64() {
        let t0 = Instant::now();
        let mut a = Admission::new(settings());
        let mut ok = 0;
        for n in 0..100u16 {
            let r = Request {
                source: IpAddr::from([0x2001, 0xdb8, 0xff, 0, 0x1, 0x2, 0x3, n]),
                side: Side::External,
                method: "INVITE",
                initial: true,
                aor: None,
            };
            ok += admitted(&mut a, &r, t0, 1);
        }
        assert_eq!(ok, 5, "one INVITE burst for the whole /64");
        assert_eq!(a.tracked().0, 1);
        let other = req("2001:db8:fe::1", "INVITE", None);
        assert_eq!(a.check(&other, t0), Verdict::Admit, "another /64");
        assert_eq!(
            source_key(ip("2001:db8:ff:0:1:2:3:4"), 64),
            ip("2001:db8:ff::")
        );
        assert_eq!(source_key(ip("2001:db8:ff::1"), 128), ip("2001:db8:ff::1"));
        assert_eq!(source_key(ip("2001:db8:ff::1"), 48), ip("2001:db8:ff::"));
        assert_eq!(
            source_key(ip("::ffff:198.51.100.7"), 64),
            ip("198.51.100.7"),
            "a v4-mapped address is its IPv4 address"
        );
    }

    /// Issue #15: brute force against the registrar. Challenges to
    /// REGISTERs without credentials are normal and never count.
    #[test]
    fn registration_failures_block_the_source_with_403_for_the_block_time() {
        let t0 = Instant::now();
        let mut a = Admission::new(settings());
        let src = ip("198.51.100.66");
        for _ in 0..10 {
            assert!(a
                .on_register_result(src, "alice@x", false, 401, t0)
                .is_empty());
        }
        let r = req("198.51.100.66", "REGISTER", Some("alice@x"));
        assert_eq!(a.check(&r, t0), Verdict::Admit);
        assert!(a
            .on_register_result(src, "alice@x", true, 401, t0)
            .is_empty());
        assert!(a.on_register_result(src, "bob@x", true, 403, t0).is_empty());
        let blocks = a.on_register_result(src, "carol@x", true, 407, t0);
        assert_eq!(
            blocks,
            vec![Blocked {
                source: Some(src),
                aor: None,
                failures: 3,
                for_: Duration::from_secs(600)
            }]
        );
        let t1 = t0 + Duration::from_secs(5);
        for r in [
            req("198.51.100.66", "REGISTER", Some("dave@x")),
            req("198.51.100.66", "INVITE", None),
        ] {
            match a.check(&r, t1) {
                Verdict::Refuse(x) => {
                    assert_eq!(
                        (x.code, x.rule, x.retry_after),
                        (403, Rule::BlockedSource, 595)
                    )
                }
                Verdict::Admit => panic!("a blocked source got through"),
            }
        }
        assert_eq!(
            a.check(&req("198.51.100.2", "REGISTER", Some("dave@x")), t1),
            Verdict::Admit,
            "other sources are not blocked"
        );
        let t2 = t0 + Duration::from_secs(601);
        assert_eq!(
            a.check(&req("198.51.100.66", "REGISTER", Some("dave@x")), t2),
            Verdict::Admit,
            "the block ends"
        );
    }

    #[test]
    fn failures_spread_over_sources_block_the_aor_and_then_the_sources_trying_it() {
        let t0 = Instant::now();
        let mut s = settings();
        s.max_sources = 100;
        let mut a = Admission::new(s);
        let mut blocks = Vec::new();
        for n in 0..5u8 {
            blocks.extend(a.on_register_result(
                IpAddr::from([198, 51, 100, 100 + n]),
                "Alice@X",
                true,
                401,
                t0,
            ));
        }
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].aor.as_deref(), Some("alice@x"));
        let guesser = req("198.51.100.7", "REGISTER", Some("alice@x"));
        for _ in 0..2 {
            assert!(matches!(
                a.check(&guesser, t0),
                Verdict::Refuse(Refusal {
                    code: 403,
                    rule: Rule::BlockedAor,
                    ..
                })
            ));
        }
        assert!(matches!(
            a.check(&guesser, t0),
            Verdict::Refuse(Refusal {
                rule: Rule::BlockedAor,
                ..
            })
        ));
        // Its third try at a blocked AOR blocked the source itself.
        assert!(matches!(
            a.check(&req("198.51.100.7", "OPTIONS", None), t0),
            Verdict::Refuse(Refusal {
                rule: Rule::BlockedSource,
                ..
            })
        ));
        // Other AORs register normally from elsewhere.
        assert_eq!(
            a.check(&req("198.51.100.8", "REGISTER", Some("bob@x")), t0),
            Verdict::Admit
        );
    }

    #[test]
    fn a_success_clears_the_sources_failures() {
        let t0 = Instant::now();
        let mut a = Admission::new(settings());
        let src = ip("10.77.0.9");
        for _ in 0..2 {
            a.on_register_result(src, "a@x", true, 401, t0);
        }
        a.on_register_result(src, "a@x", true, 200, t0);
        for _ in 0..2 {
            assert!(a.on_register_result(src, "a@x", true, 401, t0).is_empty());
        }
        // Failures older than the window are forgotten too.
        let later = t0 + Duration::from_secs(61);
        assert!(a
            .on_register_result(src, "a@x", true, 401, later)
            .is_empty());
    }

    #[test]
    fn memory_is_bounded_and_idle_entries_expire() {
        let t0 = Instant::now();
        let mut a = Admission::new(settings());
        for n in 0..200u8 {
            let r = Request {
                source: IpAddr::from([203, 0, 113, n]),
                side: Side::External,
                method: "OPTIONS",
                initial: true,
                aor: None,
            };
            let _ = a.check(&r, t0);
        }
        assert_eq!(a.tracked().0, 4, "max_sources");
        // The overflow sources share one bucket: 20 requests between them.
        let mut ok = 0;
        for n in 0..100u8 {
            let r = Request {
                source: IpAddr::from([192, 0, 2, n]),
                side: Side::External,
                method: "OPTIONS",
                initial: true,
                aor: None,
            };
            ok += admitted(&mut a, &r, t0, 1);
        }
        assert!(ok <= 20, "{ok}");
        a.expire(t0 + Duration::from_secs(60));
        assert_eq!(a.tracked(), (0, 0), "refilled and quiet: forgotten");
        let r = req("192.0.2.1", "OPTIONS", None);
        assert_eq!(a.check(&r, t0 + Duration::from_secs(60)), Verdict::Admit);
    }

    #[test]
    fn unlimited_admits_everything() {
        let t0 = Instant::now();
        let mut a = Admission::unlimited();
        let r = req("10.77.0.2", "INVITE", None);
        assert_eq!(admitted(&mut a, &r, t0, 10_000), 10_000);
        assert!(a
            .on_register_result(ip("10.77.0.2"), "a@x", true, 403, t0)
            .is_empty());
        assert_eq!(a.tracked(), (0, 0));
    }
}
