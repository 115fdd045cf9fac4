//! `backend: redis`: the token buckets live in a Redis server shared by every gateway, so a
//! fleet enforces one limit. Per request, one Lua script run (EVALSHA, EVAL when Redis does not
//! know the script yet) refills and takes from every applicable bucket atomically, all or
//! nothing (token_bucket.lua). The request waits (Pause) for the answer.
//!
//! When Redis does not answer (down, slow past the cluster's `timeout_ms`) or answers with an
//! error, `on_redis_error` decides: `allow` (the default) admits, `deny` answers 503, `local`
//! uses this gateway's own buckets (the `backend: local` logic). Every such request counts in
//! the metric `ratelimit.<namespace>.redis_errors`, and a warning is logged at most once a
//! second with the number of errors since the last one.

use std::cell::Cell;
use std::time::Duration;

use wasmgate_sdk::config::Cfg;
use wasmgate_sdk::hostcalls;
use wasmgate_sdk::resp::{self, Value};
use wasmgate_sdk::traits::*;
use wasmgate_sdk::types::*;
use wasmgate_sdk::warn;

use super::{bucket_key, report, Bucket, Limit, Stream};

pub const SCRIPT: &str = include_str!("token_bucket.lua");
const ERROR_LOG_INTERVAL_NS: u64 = 1_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OnError {
    Allow,
    Deny,
    Local,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub cluster: String,
    pub on_error: OnError,
    pub key_prefix: String,
    /// SHA-1 of SCRIPT, hex: Redis's name for it (EVALSHA).
    pub script_sha: String,
    pub errors_metric: Cell<Option<u32>>,
    last_log_ns: Cell<u64>,
    unlogged: Cell<u64>,
}

/// The `backend` keys of the filter configuration: None for `backend: local` (the default).
pub fn parse(c: &Cfg) -> Result<Option<RedisConfig>, String> {
    let backend = c.str_or("backend", "local")?;
    let redis_keys = ["redis_cluster", "on_redis_error", "redis_key_prefix"];
    match backend.as_str() {
        "local" => {
            if let Some(k) = redis_keys.iter().find(|k| c.get(k).is_some()) {
                return Err(c.err(k, "only with backend: redis"));
            }
            Ok(None)
        }
        "redis" => {
            let cluster = c.str("redis_cluster")?.filter(|s| !s.is_empty());
            let cluster = cluster.ok_or_else(|| c.err("redis_cluster", "required with backend: redis (the name of a `type: redis` cluster)"))?;
            let on_error = match c.str_or("on_redis_error", "allow")?.as_str() {
                "allow" => OnError::Allow,
                "deny" => OnError::Deny,
                "local" => OnError::Local,
                _ => return Err(c.err("on_redis_error", "expected allow, deny or local")),
            };
            Ok(Some(RedisConfig {
                cluster,
                on_error,
                key_prefix: c.str_or("redis_key_prefix", "wasmgate:")?,
                script_sha: wasmgate_sdk::crypto::hex_encode(&wasmgate_sdk::crypto::sha1(SCRIPT.as_bytes())),
                errors_metric: Cell::new(None),
                last_log_ns: Cell::new(0),
                unlogged: Cell::new(0),
            }))
        }
        _ => Err(c.err("backend", "expected local or redis")),
    }
}

/// Root context, on_configure: the cluster must be a Redis cluster of this gateway.
pub fn configure(r: &RedisConfig, namespace: &str) -> Result<(), String> {
    match hostcalls::redis_init(&r.cluster, "", "", Duration::ZERO) {
        Ok(()) => {}
        Err(Status::BadArgument) => {
            return Err(format!("redis_cluster {:?} is not a `type: redis` cluster of this gateway", r.cluster))
        }
        Err(s) => return Err(format!("redis_cluster {:?}: proxy_redis_init failed: {:?}", r.cluster, s)),
    }
    let name = format!("ratelimit.{}.redis_errors", namespace);
    r.errors_metric.set(hostcalls::define_metric(MetricType::Counter, &name).ok());
    Ok(())
}

/// One request's script run in flight: the limits it covers (indexes into `Config.limits`)
/// and their bucket keys, kept to resend the run as EVAL after NOSCRIPT.
pub struct Pending {
    pub limits: Vec<usize>,
    pub keys: Vec<String>,
    pub eval_sent: bool,
}

/// EVALSHA sha n key... rate burst ... (or EVAL script ...).
pub fn query(r: &RedisConfig, limits: &[&Limit], keys: &[String], eval: bool) -> Vec<u8> {
    let n = keys.len().to_string();
    let mut args: Vec<String> = Vec::with_capacity(3 + 3 * keys.len());
    if eval {
        args.push("EVAL".into());
        args.push(SCRIPT.into());
    } else {
        args.push("EVALSHA".into());
        args.push(r.script_sha.clone());
    }
    args.push(n);
    args.extend(keys.iter().cloned());
    for l in limits {
        args.push(format!("{}", l.per_second));
        args.push(format!("{}", l.burst));
    }
    resp::command(&args)
}

#[derive(Debug, PartialEq)]
pub enum Answer {
    /// Admitted or not, and each bucket's tokens after this request.
    Buckets(bool, Vec<f64>),
    NoScript,
    Failed(String),
}

/// Read the script's reply (buffer 9).
pub fn answer(reply: &[u8], n: usize) -> Answer {
    match resp::decode(reply) {
        Ok(Value::Array(items)) if items.len() == n + 1 => {
            let admitted = items[0].as_int();
            let tokens: Option<Vec<f64>> = items[1..]
                .iter()
                .map(|v| v.as_text().and_then(|s| s.parse::<f64>().ok()).filter(|t| t.is_finite()))
                .collect();
            match (admitted, tokens) {
                (Some(a), Some(t)) => Answer::Buckets(a == 1, t),
                _ => Answer::Failed("unexpected script reply".into()),
            }
        }
        Ok(v @ Value::Error(_)) if v.error_code() == Some("NOSCRIPT") => Answer::NoScript,
        Ok(Value::Error(e)) => Answer::Failed(e),
        Ok(_) => Answer::Failed("unexpected script reply".into()),
        Err(e) => Answer::Failed(format!("unreadable reply: {:?}", e)),
    }
}

impl Stream {
    /// on_http_request_headers with `backend: redis`.
    pub(crate) fn redis_request_headers(&mut self) -> Action {
        let shared = self.shared.clone();
        let (config, ns) = (&shared.config, &shared.namespace);
        let r = config.redis.as_ref().expect("redis backend");
        let mut limits = Vec::new();
        let mut keys = Vec::new();
        for (i, limit) in config.limits.iter().enumerate() {
            let kv = match self.key_value(&limit.key) {
                Some(v) => v,
                None if limit.missing_shared => "-".to_string(),
                None => continue,
            };
            limits.push(i);
            keys.push(format!("{}{}", r.key_prefix, bucket_key(ns, &limit.name, &kv)));
        }
        if keys.is_empty() {
            return Action::Continue;
        }
        self.redis = Some(Pending { limits, keys, eval_sent: false });
        self.dispatch_script(false)
    }

    /// Send (or resend) the script run; Pause while it is out, else what on_redis_error says.
    fn dispatch_script(&mut self, eval: bool) -> Action {
        let shared = self.shared.clone();
        let r = shared.config.redis.as_ref().expect("redis backend");
        let pending = self.redis.as_mut().expect("script run pending");
        pending.eval_sent = eval;
        let limits: Vec<&Limit> = pending.limits.iter().map(|&i| &shared.config.limits[i]).collect();
        let q = query(r, &limits, &pending.keys, eval);
        match self.dispatch_redis_call(&r.cluster, &q) {
            Ok(_token) => Action::Pause,
            Err(s) => self.redis_failed(&format!("dispatch refused: {:?}", s)),
        }
    }

    /// on_redis_call_response: decide, then resume or answer.
    pub(crate) fn redis_answered(&mut self, status: u32, size: usize) {
        let action = if status != 0 {
            self.redis_failed("no reply (timeout, refused or dropped connection)")
        } else {
            let reply = self.get_redis_call_response(0, size).unwrap_or_default();
            let n = self.redis.as_ref().map(|p| p.keys.len()).unwrap_or(0);
            match answer(&reply, n) {
                Answer::Buckets(admitted, tokens) => self.decide(admitted, &tokens),
                Answer::NoScript if !self.redis.as_ref().map(|p| p.eval_sent).unwrap_or(true) => {
                    self.dispatch_script(true)
                }
                Answer::NoScript => self.redis_failed("NOSCRIPT after EVAL"),
                Answer::Failed(e) => self.redis_failed(&e),
            }
        };
        if action == Action::Continue {
            self.redis = None;
            self.resume_http_request();
        }
    }

    fn decide(&mut self, admitted: bool, tokens: &[f64]) -> Action {
        let shared = self.shared.clone();
        let pending = self.redis.take().expect("script run pending");
        let mut best: Option<super::Report> = None;
        for (&i, &t) in pending.limits.iter().zip(tokens) {
            let limit = &shared.config.limits[i];
            let r = report(limit, &Bucket { tokens: t, last_ns: 0 });
            if !admitted && t < 1.0 {
                // The first limit (in config order) without a token answers, as with `local`
                // (nothing was taken: the script is all or nothing).
                let now = self.get_current_time_nanos();
                return self.reject(limit, &[], Some(r), now);
            }
            if best.map(|x| r.remaining < x.remaining).unwrap_or(true) {
                best = Some(r);
            }
        }
        self.report = best;
        Action::Continue
    }

    /// Redis gave no usable answer: count, log (at most once a second), then `on_redis_error`.
    fn redis_failed(&mut self, why: &str) -> Action {
        let shared = self.shared.clone();
        let r = shared.config.redis.as_ref().expect("redis backend");
        self.redis = None;
        if let Some(id) = r.errors_metric.get() {
            let _ = hostcalls::increment_metric(id, 1);
        }
        let now = self.get_current_time_nanos();
        if now.saturating_sub(r.last_log_ns.get()) >= ERROR_LOG_INTERVAL_NS {
            let more = r.unlogged.replace(0);
            warn!(
                "ratelimit: redis cluster {:?}: {}; on_redis_error: {:?} ({} more errors since the last message)",
                r.cluster, why, r.on_error, more
            );
            r.last_log_ns.set(now);
        } else {
            r.unlogged.set(r.unlogged.get() + 1);
        }
        match r.on_error {
            OnError::Allow => Action::Continue,
            OnError::Deny => {
                self.send_http_response(
                    503,
                    vec![("content-type", "application/json"), ("retry-after", "1")],
                    Some(b"{\"error\":\"rate_limiter_unavailable\"}"),
                );
                Action::Pause
            }
            OnError::Local => self.local_request_headers(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Key};

    #[test]
    fn parse_backend_keys() {
        let c = Config::parse(br#"{"limits": [{"rate": 1}], "backend": "redis", "redis_cluster": "rl"}"#).unwrap();
        let r = c.redis.unwrap();
        assert_eq!((r.cluster.as_str(), r.on_error, r.key_prefix.as_str()), ("rl", OnError::Allow, "wasmgate:"));
        assert_eq!(r.script_sha.len(), 40);
        let c = Config::parse(br#"{"limits": [{"rate": 1}], "backend": "redis", "redis_cluster": "rl", "on_redis_error": "local", "redis_key_prefix": "p:"}"#).unwrap();
        assert_eq!(c.redis.unwrap().on_error, OnError::Local);
        assert!(Config::parse(br#"{"limits": [{"rate": 1}]}"#).unwrap().redis.is_none());
        let e = |j: &[u8]| Config::parse(j).unwrap_err();
        assert!(e(br#"{"limits": [{"rate": 1}], "backend": "redis"}"#).contains("redis_cluster"));
        assert!(e(br#"{"limits": [{"rate": 1}], "backend": "memcached"}"#).contains("backend"));
        assert!(e(br#"{"limits": [{"rate": 1}], "backend": "redis", "redis_cluster": "r", "on_redis_error": "retry"}"#).contains("on_redis_error"));
        assert!(e(br#"{"limits": [{"rate": 1}], "redis_cluster": "r"}"#).contains("only with backend: redis"));
    }

    #[test]
    fn query_is_one_evalsha_with_keys_then_rate_and_burst() {
        let c = Config::parse(br#"{"limits": [{"rate": 1}], "backend": "redis", "redis_cluster": "rl"}"#).unwrap();
        let r = c.redis.unwrap();
        let l1 = Limit { name: "a".into(), key: Key::Global, per_second: 0.5, burst: 10.0, missing_shared: false, deny_when_full: false };
        let l2 = Limit { name: "b".into(), key: Key::Client, per_second: 100.0, burst: 3.0, missing_shared: false, deny_when_full: false };
        let keys = vec!["k1".to_string(), "k2".to_string()];
        let q = query(&r, &[&l1, &l2], &keys, false);
        assert_eq!(q, resp::command(&["EVALSHA", r.script_sha.as_str(), "2", "k1", "k2", "0.5", "10", "100", "3"]));
        let q = query(&r, &[&l1], &keys[..1], true);
        assert_eq!(q, resp::command(&["EVAL", SCRIPT, "1", "k1", "0.5", "10"]));
    }

    #[test]
    fn answers() {
        assert_eq!(answer(b"*3\r\n:1\r\n$3\r\n9.5\r\n$1\r\n0\r\n", 2), Answer::Buckets(true, vec![9.5, 0.0]));
        assert_eq!(answer(b"*2\r\n:0\r\n$19\r\n0.29999999999999999\r\n", 1), Answer::Buckets(false, vec![0.3]));
        assert_eq!(answer(b"-NOSCRIPT No matching script. Please use EVAL.\r\n", 1), Answer::NoScript);
        assert_eq!(answer(b"-OOM out of memory\r\n", 1), Answer::Failed("OOM out of memory".into()));
        assert!(matches!(answer(b"*2\r\n:1\r\n", 1), Answer::Failed(_)));
        assert!(matches!(answer(b"*2\r\n:1\r\n$3\r\nnan\r\n", 1), Answer::Failed(_)));
        assert!(matches!(answer(b"+OK\r\n", 1), Answer::Failed(_)));
        assert!(matches!(answer(b"*3\r\n:1\r\n$1\r\n1\r\n", 2), Answer::Failed(_)));
    }
}
