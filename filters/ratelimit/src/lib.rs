//! ratelimit: token buckets (rate per period, burst) keyed by client address, a request
//! header, the identity header the auth filter set, or one global bucket. Several limits per
//! route; a request is admitted only if every applicable bucket has a token, and then takes
//! one from each. Bucket state lives in shared data and is updated with a CAS retry loop
//! (get → compute → set with cas → retry on CasMismatch), so every request of the gateway
//! counts once whichever worker or instance serves it.
//!
//! Over the limit → 429 with `Retry-After` and a JSON body. Every response (admitted or not)
//! carries `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` for the most
//! constrained applicable limit.
//!
//! A bucket is written with an expiry (wasmgate's `set_shared_data_ttl`) equal to the time it
//! takes to be full again: from then on it carries no information, so the store may reclaim it,
//! and under memory pressure it drops the buckets closest to full first. When the store still
//! has no room for a new bucket, `on_store_full` decides (allow / deny), counted in a metric.
//!
//! `backend: redis` keeps the buckets in a Redis server instead, shared by every gateway of a
//! fleet (redis_backend.rs).

mod redis_backend;

use std::cell::Cell;
use std::rc::Rc;
use wasmgate_sdk::config::Cfg;
use wasmgate_sdk::hostcalls;
use wasmgate_sdk::traits::*;
use wasmgate_sdk::types::*;
use wasmgate_sdk::{error, ext, json, warn};

// No on_done / on_log export: this filter keeps both at the default, and each left out is
// one guest call less per request (the host skips a callback a module does not export).
wasmgate_sdk::main! { callbacks: [request_headers, response_headers]; {
    wasmgate_sdk::set_log_level(LogLevel::Info);
    wasmgate_sdk::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { shared: None }) });
}}

const MAX_CAS_RETRIES: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub enum Key {
    Global,
    Client,
    Header(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limit {
    pub name: String,
    pub key: Key,
    /// tokens added per second
    pub per_second: f64,
    pub burst: f64,
    /// when the key is absent: false = the limit does not apply, true = one shared bucket
    pub missing_shared: bool,
    /// no room in the store for this request's bucket: true = deny (429), false = admit
    pub deny_when_full: bool,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub limits: Vec<Limit>,
    pub namespace: Option<String>,
    pub headers: bool,
    /// `backend: redis` (None: `backend: local`, buckets in this gateway's shared data).
    pub redis: Option<redis_backend::RedisConfig>,
}

impl Config {
    pub fn parse(bytes: &[u8]) -> Result<Config, String> {
        let v = wasmgate_sdk::config::parse(bytes)?;
        let c = Cfg::root(&v);
        c.only(&["limits", "identity_header", "namespace", "headers", "backend", "redis_cluster",
                 "on_redis_error", "redis_key_prefix"])?;
        let identity_header = c.str_or("identity_header", "x-auth-identity")?.to_ascii_lowercase();
        let mut limits: Vec<Limit> = Vec::new();
        for (i, l) in c.list("limits")?.into_iter().enumerate() {
            l.only(&["name", "key", "rate", "period_s", "burst", "on_missing", "on_store_full"])?;
            let name = l.str("name")?.unwrap_or_else(|| format!("limit{}", i));
            if name.is_empty() || name.contains(['\r', '\n', '\0']) {
                return Err(l.err("name", "must be a non-empty single-line string"));
            }
            if limits.iter().any(|x| x.name == name) {
                return Err(l.err("name", &format!("duplicate limit name {:?}", name)));
            }
            let key_src = l.str_or("key", "client")?;
            let key = match key_src.as_str() {
                "global" => Key::Global,
                "client" | "source.address" => Key::Client,
                "identity" => Key::Header(identity_header.clone()),
                other => match other.strip_prefix("header:") {
                    Some(h) if !h.is_empty() => Key::Header(h.to_ascii_lowercase()),
                    _ => return Err(l.err("key", "expected global, client, identity or header:<name>")),
                },
            };
            let rate = l.f64("rate")?.ok_or_else(|| l.err("rate", "required (tokens per period)"))?;
            let period = l.f64("period_s")?.unwrap_or(1.0);
            if !(rate > 0.0 && rate.is_finite()) {
                return Err(l.err("rate", "must be a positive number"));
            }
            if !(period > 0.0 && period.is_finite()) {
                return Err(l.err("period_s", "must be a positive number"));
            }
            let burst = l.f64("burst")?.unwrap_or_else(|| rate.ceil().max(1.0));
            if !(burst >= 1.0 && burst.is_finite() && burst.fract() == 0.0) {
                return Err(l.err("burst", "must be a whole number >= 1"));
            }
            let missing_shared = match l.str_or("on_missing", "skip")?.as_str() {
                "skip" => false,
                "shared" => true,
                _ => return Err(l.err("on_missing", "expected skip or shared")),
            };
            // A header's value is whatever the client sends: admitting when the store is full
            // would let fresh values switch the limit off. An address or the global bucket is
            // not the client's free choice, and denying would refuse every new client.
            let header_keyed = matches!(key, Key::Header(_));
            let deny_when_full = match l.str_or("on_store_full", if header_keyed { "deny" } else { "allow" })?.as_str() {
                "allow" => false,
                "deny" => true,
                _ => return Err(l.err("on_store_full", "expected allow or deny")),
            };
            limits.push(Limit { name, key, per_second: rate / period, burst, missing_shared, deny_when_full });
        }
        if limits.is_empty() {
            return Err("limits: at least one limit is required".into());
        }
        Ok(Config {
            limits,
            namespace: c.str("namespace")?,
            headers: c.bool_or("headers", true)?,
            redis: redis_backend::parse(&c)?,
        })
    }
}

/// Bucket state as stored in shared data: tokens (f64 LE) then last update (u64 ns LE).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub tokens: f64,
    pub last_ns: u64,
}

impl Bucket {
    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.tokens.to_le_bytes());
        out[8..].copy_from_slice(&self.last_ns.to_le_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Option<Bucket> {
        if b.len() != 16 {
            return None;
        }
        let mut t = [0u8; 8];
        let mut n = [0u8; 8];
        t.copy_from_slice(&b[..8]);
        n.copy_from_slice(&b[8..]);
        let tokens = f64::from_le_bytes(t);
        if !tokens.is_finite() {
            return None;
        }
        Some(Bucket { tokens, last_ns: u64::from_le_bytes(n) })
    }

    /// Nanoseconds from `now_ns` until the bucket is full again — after that it carries no
    /// information (an absent bucket is created full), so that is its expiry. 0: full now.
    pub fn ttl_ns(&self, limit: &Limit, now_ns: u64) -> u64 {
        if self.tokens >= limit.burst {
            return 0;
        }
        let refill = ((limit.burst - self.tokens) / limit.per_second * 1e9).ceil() as u64; // saturates
        refill.saturating_add(self.last_ns.saturating_sub(now_ns))
    }

    /// The bucket refilled up to `now_ns` (never above `burst`; clocks going back add nothing).
    pub fn refilled(&self, limit: &Limit, now_ns: u64) -> Bucket {
        let elapsed = now_ns.saturating_sub(self.last_ns) as f64 / 1e9;
        Bucket {
            tokens: (self.tokens + elapsed * limit.per_second).min(limit.burst),
            last_ns: self.last_ns.max(now_ns),
        }
    }
}

/// What one bucket looks like after this request, for the response headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    pub limit: f64,
    pub remaining: u64,
    /// seconds until the bucket is full again
    pub reset_s: u64,
    /// seconds until one token is available (0 if one is)
    pub retry_after_s: u64,
}

pub fn report(limit: &Limit, b: &Bucket) -> Report {
    let to_full = ((limit.burst - b.tokens).max(0.0) / limit.per_second).ceil();
    let to_one = ((1.0 - b.tokens).max(0.0) / limit.per_second).ceil();
    Report {
        limit: limit.burst,
        remaining: b.tokens.max(0.0).floor() as u64,
        reset_s: to_full as u64,
        retry_after_s: if b.tokens >= 1.0 { 0 } else { (to_one as u64).max(1) },
    }
}

enum Take {
    Taken(Bucket),
    Empty(Bucket),
}

/// A cas no store hands out for a stored entry (ours skip it; Envoy's counter would have to land
/// on exactly this value for this key). §5.4: `set` with a non-zero cas creates an absent key and
/// fails with CasMismatch when the stored cas differs — so sending it for a key we found absent is
/// an atomic create-if-absent: two workers creating the same bucket cannot both win.
const CREATE_IF_ABSENT: u32 = 0xFFFF_FFFF;

thread_local! {
    /// false once the host answered NotFound for wasmgate's set_shared_data_ttl (another host).
    static HOST_HAS_TTL: Cell<bool> = Cell::new(true);
}

/// Store a bucket with the expiry it has (or, on a host without the extension, for ever).
fn write_bucket(key: &str, b: &Bucket, limit: &Limit, now_ns: u64, cas: Option<u32>) -> Result<(), Status> {
    if HOST_HAS_TTL.with(|h| h.get()) {
        match ext::set_shared_data_ttl(key, Some(&b.encode()), cas, b.ttl_ns(limit, now_ns)) {
            Err(Status::NotFound) => HOST_HAS_TTL.with(|h| h.set(false)),
            r => return r,
        }
    }
    hostcalls::set_shared_data(key, Some(&b.encode()), cas)
}

/// One CAS-guarded attempt loop on one bucket: take a token if there is one.
fn take_token(key: &str, limit: &Limit, now_ns: u64) -> Result<Take, Status> {
    for _ in 0..MAX_CAS_RETRIES {
        let (value, cas) = hostcalls::get_shared_data(key)?;
        let current = value
            .as_deref()
            .and_then(Bucket::decode)
            .unwrap_or(Bucket { tokens: limit.burst, last_ns: now_ns });
        let b = current.refilled(limit, now_ns);
        if b.tokens < 1.0 {
            return Ok(Take::Empty(b));
        }
        let next = Bucket { tokens: b.tokens - 1.0, last_ns: b.last_ns };
        let cas = cas.or(Some(CREATE_IF_ABSENT));
        match write_bucket(key, &next, limit, now_ns, cas) {
            Ok(()) => return Ok(Take::Taken(next)),
            Err(Status::CasMismatch) => continue,
            Err(s) => return Err(s),
        }
    }
    Err(Status::CasMismatch)
}

/// Give a token back (the request was denied by a later limit). A bucket full again is deleted.
fn refund(key: &str, limit: &Limit, now_ns: u64) {
    for _ in 0..MAX_CAS_RETRIES {
        let (value, cas) = match hostcalls::get_shared_data(key) {
            Ok(x) => x,
            Err(_) => return,
        };
        let mut b = match value.as_deref().and_then(Bucket::decode) {
            Some(b) => b,
            None => return,
        };
        b.tokens = (b.tokens + 1.0).min(limit.burst);
        match write_bucket(key, &b, limit, now_ns, cas) {
            Err(Status::CasMismatch) => continue,
            _ => return,
        }
    }
}

/// Shared-data key of one bucket. The value is length-prefixed (no value can collide with
/// another limit's key) and replaced by its SHA-256 when longer than 64 bytes, so a client
/// sending huge header values cannot make huge keys.
pub fn bucket_key(namespace: &str, limit: &str, value: &str) -> String {
    let hashed;
    let len = Decimal::new(value.len() as u64);
    let (tag, value) = if value.len() > 64 {
        hashed = wasmgate_sdk::crypto::hex_encode(&wasmgate_sdk::crypto::sha256(value.as_bytes()));
        ("h", hashed.as_str())
    } else {
        (len.as_str(), value)
    };
    // Built by hand, not with format!: this runs for every limit of every request.
    let mut key = String::with_capacity(13 + namespace.len() + limit.len() + tag.len() + value.len());
    for part in ["ratelimit:", namespace, ":", limit, ":", tag, ":", value] {
        key.push_str(part);
    }
    key
}

/// A `u64` in decimal, on the stack: response headers and bucket keys without `core::fmt`
/// and without an allocation per number (every request writes three of them).
pub struct Decimal {
    digits: [u8; 20],
    start: usize,
}

impl Decimal {
    pub fn new(mut n: u64) -> Decimal {
        let mut d = Decimal { digits: [b'0'; 20], start: 20 };
        loop {
            d.start -= 1;
            d.digits[d.start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                return d;
            }
        }
    }

    pub fn as_str(&self) -> &str {
        // only ASCII digits were written
        std::str::from_utf8(&self.digits[self.start..]).unwrap_or("0")
    }
}

/// Client IP from `source.address` ("ip:port" or "[v6]:port").
pub fn client_ip(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((ip, port)) if !ip.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => ip,
        _ => addr,
    }
}

/// What every stream of one filter entry shares.
struct Shared {
    config: Config,
    namespace: String,
    /// counters of store-full decisions: (allowed, denied); None if the host refused them
    store_full: Option<(u32, u32)>,
}

/// `ratelimit.<namespace>.store_full_<decision>` (Prometheus: `wasmcustom_ratelimit_<ns>_…`).
pub fn store_full_metric(namespace: &str, decision: &str) -> String {
    format!("ratelimit.{}.store_full_{}", namespace, decision)
}

struct Root {
    shared: Option<Rc<Shared>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match Config::parse(&bytes) {
            Ok(config) => {
                let namespace = config.namespace.clone().unwrap_or_else(|| {
                    self.get_property(vec!["plugin_name"])
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| "ratelimit".into())
                });
                let define = |d: &str| hostcalls::define_metric(MetricType::Counter, &store_full_metric(&namespace, d));
                let store_full = match (define("allowed"), define("denied")) {
                    (Ok(a), Ok(d)) => Some((a, d)),
                    (a, d) => {
                        warn!("ratelimit: store-full counters not defined ({:?}, {:?})", a.err(), d.err());
                        None
                    }
                };
                if let Some(r) = &config.redis {
                    if let Err(e) = redis_backend::configure(r, &namespace) {
                        error!("ratelimit: bad configuration: {}", e);
                        return false;
                    }
                }
                self.shared = Some(Rc::new(Shared { config, namespace, store_full }));
                true
            }
            Err(e) => {
                error!("ratelimit: bad configuration: {}", e);
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone().expect("ratelimit: stream before configuration");
        Some(Box::new(Stream { shared, report: None, redis: None }))
    }
}

thread_local! {
    /// Store-full decisions of this instance: the first is logged, all are counted.
    static STORE_FULL_SEEN: Cell<u64> = Cell::new(0);
}

struct Stream {
    shared: Rc<Shared>,
    report: Option<Report>,
    /// `backend: redis`: the script run this request waits for.
    redis: Option<redis_backend::Pending>,
}

impl Stream {
    fn key_value(&self, key: &Key) -> Option<String> {
        match key {
            Key::Global => Some(String::new()),
            Key::Client => self
                .get_property(vec!["source", "address"])
                .map(|b| client_ip(&String::from_utf8_lossy(&b)).to_string())
                .filter(|s| !s.is_empty()),
            Key::Header(h) => self.get_http_request_header(h).filter(|s| !s.is_empty()),
        }
    }

    fn headers_of(r: &Report) -> [(&'static str, Decimal); 3] {
        [
            ("ratelimit-limit", Decimal::new(r.limit as u64)),
            ("ratelimit-remaining", Decimal::new(r.remaining)),
            ("ratelimit-reset", Decimal::new(r.reset_s)),
        ]
    }

    /// No room in the store for this limit's bucket: count it, and say whether to deny.
    fn store_full(&self, limit: &Limit, key: &str) -> bool {
        let deny = limit.deny_when_full;
        if let Some((allowed, denied)) = self.shared.store_full {
            let _ = hostcalls::increment_metric(if deny { denied } else { allowed }, 1);
        }
        let seen = STORE_FULL_SEEN.with(|n| {
            n.set(n.get() + 1);
            n.get()
        });
        if seen == 1 {
            warn!(
                "ratelimit: shared data full (shared_data.max_bytes), no bucket for {}: request {} \
                 (on_store_full: {}); further ones are counted in {}",
                key,
                if deny { "denied" } else { "admitted" },
                if deny { "deny" } else { "allow" },
                store_full_metric(&self.shared.namespace, if deny { "denied" } else { "allowed" })
            );
        }
        deny
    }

    /// Answer 429 (after giving back the tokens this request took from earlier limits).
    fn reject(&mut self, limit: &Limit, taken: &[(String, &Limit)], report: Option<Report>, now: u64) -> Action {
        for (k, l) in taken {
            refund(k, l, now);
        }
        let retry_after = report.map(|r| r.retry_after_s).unwrap_or(1);
        let body = format!(
            "{{\"error\":\"rate_limited\",\"limit\":{},{}\"retry_after_s\":{}}}",
            json::quote(&limit.name),
            if report.is_none() { "\"reason\":\"store_full\"," } else { "" },
            retry_after
        );
        let retry = retry_after.to_string();
        let rl = report.map(|r| Self::headers_of(&r));
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json"), ("retry-after", &retry)];
        if let (true, Some(hs)) = (self.shared.config.headers, rl.as_ref()) {
            for (k, v) in hs.iter() {
                headers.push((k, v.as_str()));
            }
        }
        self.report = report;
        self.send_http_response(429, headers, Some(body.as_bytes()));
        Action::Pause
    }
}

impl Stream {
    /// `backend: local` (and `on_redis_error: local`): buckets in this gateway's shared data.
    fn local_request_headers(&mut self) -> Action {
        let shared = self.shared.clone();
        let now = self.get_current_time_nanos();
        let mut taken: Vec<(String, &Limit)> = Vec::new();
        let mut best: Option<Report> = None;
        for limit in &shared.config.limits {
            let kv = match self.key_value(&limit.key) {
                Some(v) => v,
                None if limit.missing_shared => "-".to_string(),
                None => continue,
            };
            let key = bucket_key(&shared.namespace, &limit.name, &kv);
            match take_token(&key, limit, now) {
                Ok(Take::Taken(b)) => {
                    let r = report(limit, &b);
                    if best.map(|x| r.remaining < x.remaining).unwrap_or(true) {
                        best = Some(r);
                    }
                    taken.push((key, limit));
                }
                Ok(Take::Empty(b)) => return self.reject(limit, &taken, Some(report(limit, &b)), now),
                Err(Status::InternalFailure) => {
                    // no room for the bucket, even after the store dropped what it could
                    if self.store_full(limit, &key) {
                        return self.reject(limit, &taken, None, now);
                    }
                }
                Err(s) => {
                    // the store failed otherwise (e.g. contention beyond the retries): admit, loudly
                    warn!("ratelimit: shared data error {:?} on {}; request admitted", s, key);
                }
            }
        }
        self.report = best;
        Action::Continue
    }
}

impl Context for Stream {
    fn on_redis_call_response(&mut self, _token: u32, status: u32, size: usize) {
        self.redis_answered(status, size);
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.shared.config.redis.is_some() {
            self.redis_request_headers()
        } else {
            self.local_request_headers()
        }
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.shared.config.headers {
            if let Some(r) = self.report {
                for (k, v) in Self::headers_of(&r).iter() {
                    self.set_http_response_header(k, Some(v.as_str()));
                }
            }
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_config() {
        let c = Config::parse(br#"{"limits": [{"name": "k", "key": "identity", "rate": 5, "period_s": 60, "burst": 3},
                                            {"name": "g", "key": "global", "rate": 100}]}"#).unwrap();
        assert_eq!(c.limits[0].key, Key::Header("x-auth-identity".into()));
        assert!((c.limits[0].per_second - 5.0 / 60.0).abs() < 1e-12);
        assert_eq!(c.limits[1].burst, 100.0);
        assert!(Config::parse(br#"{"limits": []}"#).is_err());
        assert!(Config::parse(br#"{"limits": [{"rate": 0}]}"#).unwrap_err().contains("positive"));
        assert!(Config::parse(br#"{"limits": [{"rate": 1, "burst": 0.5}]}"#).is_err());
        assert!(Config::parse(br#"{"limits": [{"rate": 1, "key": "cookie"}]}"#).unwrap_err().contains("key"));
        assert!(Config::parse(br#"{"limits": [{"name": "a", "rate": 1}, {"name": "a", "rate": 1}]}"#).unwrap_err().contains("duplicate"));
    }

    #[test]
    fn on_store_full_defaults_by_key_kind() {
        let c = Config::parse(br#"{"limits": [{"name": "h", "key": "header:x-user", "rate": 1},
                                            {"name": "i", "key": "identity", "rate": 1},
                                            {"name": "c", "key": "client", "rate": 1},
                                            {"name": "g", "key": "global", "rate": 1},
                                            {"name": "h2", "key": "header:x-user", "rate": 1, "on_store_full": "allow"},
                                            {"name": "c2", "rate": 1, "on_store_full": "deny"}]}"#).unwrap();
        let deny: Vec<bool> = c.limits.iter().map(|l| l.deny_when_full).collect();
        assert_eq!(deny, vec![true, true, false, false, false, true]);
        let e = Config::parse(br#"{"limits": [{"rate": 1, "on_store_full": "drop"}]}"#).unwrap_err();
        assert!(e.contains("on_store_full") && e.contains("allow or deny"), "{}", e);
        assert_eq!(store_full_metric("rl", "denied"), "ratelimit.rl.store_full_denied");
    }

    #[test]
    fn bucket_expires_when_full_again() {
        let l = Limit { name: "x".into(), key: Key::Global, per_second: 2.0, burst: 4.0, missing_shared: false, deny_when_full: true };
        let now = 10_000_000_000;
        assert_eq!(Bucket { tokens: 3.0, last_ns: now }.ttl_ns(&l, now), 500_000_000);
        assert_eq!(Bucket { tokens: 0.0, last_ns: now }.ttl_ns(&l, now), 2_000_000_000);
        assert_eq!(Bucket { tokens: 4.0, last_ns: now }.ttl_ns(&l, now), 0); // full: delete
        // a clock that went back: refill starts at last_ns, so the expiry is that much later
        assert_eq!(Bucket { tokens: 3.0, last_ns: now + 7 }.ttl_ns(&l, now), 500_000_007);
        // never early: the bucket refilled at its deadline is full
        let b = Bucket { tokens: 0.3, last_ns: now };
        assert_eq!(b.refilled(&l, now + b.ttl_ns(&l, now)).tokens, 4.0);
        let slow = Limit { per_second: 1e-30, ..l.clone() };
        assert_eq!(Bucket { tokens: 0.0, last_ns: now }.ttl_ns(&slow, now), u64::MAX); // saturates
    }

    #[test]
    fn bucket_math() {
        let l = Limit { name: "x".into(), key: Key::Global, per_second: 2.0, burst: 4.0, missing_shared: false, deny_when_full: false };
        let b = Bucket { tokens: 0.0, last_ns: 1_000_000_000 };
        assert_eq!(b.refilled(&l, 1_500_000_000).tokens, 1.0);
        assert_eq!(b.refilled(&l, 10_000_000_000).tokens, 4.0);
        assert_eq!(b.refilled(&l, 0).tokens, 0.0); // clock went back
        assert_eq!(Bucket::decode(&b.encode()), Some(b));
        assert_eq!(Bucket::decode(&[1, 2, 3]), None);
        let r = report(&l, &Bucket { tokens: 0.5, last_ns: 0 });
        assert_eq!((r.remaining, r.reset_s, r.retry_after_s), (0, 2, 1));
        let r = report(&l, &Bucket { tokens: 3.0, last_ns: 0 });
        assert_eq!((r.remaining, r.reset_s, r.retry_after_s), (3, 1, 0));
    }

    #[test]
    fn bucket_keys() {
        assert_eq!(bucket_key("ns", "g", ""), "ratelimit:ns:g:0:");
        assert_eq!(bucket_key("ns", "k", "alice"), "ratelimit:ns:k:5:alice");
        let long = "x".repeat(1000);
        let k = bucket_key("ns", "k", &long);
        assert!(k.len() < 100 && k.starts_with("ratelimit:ns:k:h:"));
        assert_ne!(k, bucket_key("ns", "k", &"x".repeat(1001)));
    }

    #[test]
    fn decimals_match_display() {
        let mut n = 0u64;
        for _ in 0..200 {
            assert_eq!(Decimal::new(n).as_str(), n.to_string());
            n = n.wrapping_mul(3).wrapping_add(7);
        }
        for n in [0, 9, 10, 99, 100, u64::MAX - 1, u64::MAX] {
            assert_eq!(Decimal::new(n).as_str(), n.to_string());
        }
    }

    #[test]
    fn client_ips() {
        assert_eq!(client_ip("10.1.2.3:5555"), "10.1.2.3");
        assert_eq!(client_ip("[::1]:5555"), "::1");
        assert_eq!(client_ip("10.1.2.3"), "10.1.2.3");
        assert_eq!(client_ip("::1"), "::1");
    }

    #[test]
    fn addresses_never_panic() {
        let mut rng = wasmgate_sdk::fuzz::Rng(5);
        for seed in ["10.1.2.3:5555", "[::1]:80", "[fe80::1%eth0]:1"] {
            for _ in 0..5_000 {
                let a = String::from_utf8_lossy(&rng.mutate(seed.as_bytes(), b"[]:.%\xc3")).into_owned();
                let ip = client_ip(&a);
                assert!(a.contains(ip));
            }
        }
    }
}
