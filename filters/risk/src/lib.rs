//! risk: the business-rule check. Buffers the request body until end of stream, reads a
//! JSON field (default `amount`; a dotted path reaches nested fields, `items.0.amount`
//! indexes arrays) and, above `threshold`, rejects with 403 and a JSON reason — or, with
//! `action: tag`, forwards the request with a tag header instead. A body that is not JSON
//! gets 400.
//!
//! Tag mode pauses the request headers until the body verdict, so its filter entry needs
//! `deliver_body_while_paused: true` (without it the host never delivers the body to a filter
//! that paused in headers — Envoy semantics — and the request waits for the pause timeout).

use std::rc::Rc;
use wasmgate_sdk::config::Cfg;
use wasmgate_sdk::hostcalls;
use wasmgate_sdk::traits::*;
use wasmgate_sdk::types::*;
use wasmgate_sdk::{error, json, Value};

// No on_done / on_log export: this filter keeps both at the default, and each left out is
// one guest call less per request (the host skips a callback a module does not export).
wasmgate_sdk::main! { callbacks: [request_headers, response_headers]; {
    wasmgate_sdk::set_log_level(LogLevel::Info);
    wasmgate_sdk::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { cfg: None }) });
}}

#[derive(Debug, Clone, PartialEq)]
pub enum RiskAction {
    Reject,
    Tag,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub field: String,
    pub threshold: f64,
    pub action: RiskAction,
    pub tag_header: String,
    pub tag_value: String,
    pub reason: String,
    pub methods: Vec<String>,
    pub missing_rejects: bool,
    pub max_body_bytes: usize,
}

impl Config {
    pub fn parse(bytes: &[u8]) -> Result<Config, String> {
        let v = wasmgate_sdk::config::parse(bytes)?;
        let c = Cfg::root(&v);
        c.only(&["field", "threshold", "action", "tag_header", "tag_value", "reason", "methods", "on_missing", "max_body_bytes"])?;
        let field = c.str_or("field", "amount")?;
        if field.is_empty() || field.split('.').any(|s| s.is_empty()) {
            return Err("field: expected a dotted path like amount or payment.amount".into());
        }
        let threshold = c.f64("threshold")?.ok_or("threshold: required")?;
        let action = match c.str_or("action", "reject")?.as_str() {
            "reject" => RiskAction::Reject,
            "tag" => RiskAction::Tag,
            _ => return Err("action: expected reject or tag".into()),
        };
        let methods: Vec<String> = {
            let m = c.strs("methods")?;
            if m.is_empty() {
                vec!["POST".into(), "PUT".into(), "PATCH".into()]
            } else {
                m.into_iter().map(|s| s.to_ascii_uppercase()).collect()
            }
        };
        let missing_rejects = match c.str_or("on_missing", "reject")?.as_str() {
            "reject" => true,
            "allow" => false,
            _ => return Err("on_missing: expected reject or allow".into()),
        };
        let max = c.f64("max_body_bytes")?.unwrap_or(1048576.0);
        if !(max >= 1.0 && max.fract() == 0.0) {
            return Err("max_body_bytes: expected a positive whole number".into());
        }
        let tag_header = c.str_or("tag_header", "x-risk")?.to_ascii_lowercase();
        let tag_value = c.str_or("tag_value", "high")?;
        if tag_value.contains(['\r', '\n', '\0']) || tag_header.is_empty() || tag_header.contains([' ', ':', '\r', '\n']) {
            return Err("tag_header / tag_value: invalid header".into());
        }
        Ok(Config {
            reason: c.str("reason")?.unwrap_or_else(|| format!("{} exceeds {}", field, fmt_num(threshold))),
            field,
            threshold,
            action,
            tag_header,
            tag_value,
            methods,
            missing_rejects,
            max_body_bytes: max as usize,
        })
    }
}

fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 9e15 {
        format!("{}", x as i64)
    } else {
        format!("{}", x)
    }
}

/// What the body means for this request.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Allow,
    /// above the threshold: the value seen
    Risky(f64),
    /// 400 with this message
    Bad(String),
}

/// Does any object on the way to `dotted` hold the next segment's key more than once?
pub fn has_duplicate_along(doc: &Value, dotted: &str) -> bool {
    let mut cur = doc;
    for seg in dotted.split('.') {
        match cur {
            Value::Object(members) => {
                if members.iter().filter(|(k, _)| k == seg).count() > 1 {
                    return true;
                }
                match cur.get(seg) {
                    Some(v) => cur = v,
                    None => return false,
                }
            }
            Value::Array(items) => match seg.parse::<usize>().ok().and_then(|i| items.get(i)) {
                Some(v) => cur = v,
                None => return false,
            },
            _ => return false,
        }
    }
    false
}

pub fn judge(cfg: &Config, body: &[u8]) -> Verdict {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Verdict::Bad("request body is empty".into());
    }
    let doc = match json::parse(body) {
        Ok(v) => v,
        Err(_) => return Verdict::Bad("request body is not JSON".into()),
    };
    // Parsers disagree on duplicate keys (first wins vs last wins): a body naming the field
    // twice could show this filter one amount and the upstream another. Refuse it.
    if has_duplicate_along(&doc, &cfg.field) {
        return Verdict::Bad(format!("field {} appears more than once", cfg.field));
    }
    let value = match doc.path(&cfg.field) {
        None | Some(Value::Null) => {
            return if cfg.missing_rejects { Verdict::Bad(format!("field {} is missing", cfg.field)) } else { Verdict::Allow };
        }
        Some(v) => v,
    };
    let n = match value {
        Value::Int(_) | Value::Float(_) => value.as_f64(),
        // decimal strings ("12000.50") count as numbers, as payment APIs often send them
        Value::Str(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite() && !s.trim().is_empty()),
        _ => None,
    };
    match n {
        None => Verdict::Bad(format!("field {} is not a number", cfg.field)),
        Some(x) if x > cfg.threshold => Verdict::Risky(x),
        Some(_) => Verdict::Allow,
    }
}

struct Root {
    cfg: Option<Rc<Config>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match Config::parse(&bytes) {
            Ok(c) => {
                self.cfg = Some(Rc::new(c));
                true
            }
            Err(e) => {
                error!("risk: bad configuration: {}", e);
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let cfg = self.cfg.clone().expect("risk: stream before configuration");
        Some(Box::new(Stream { cfg, active: false, done: false }))
    }
}

struct Stream {
    cfg: Rc<Config>,
    active: bool,
    done: bool,
}

impl Stream {
    fn reply(&mut self, status: u32, body: String) -> Action {
        self.done = true;
        self.send_http_response(status, vec![("content-type", "application/json")], Some(body.as_bytes()));
        Action::Pause
    }

    fn bad(&mut self, message: &str) -> Action {
        self.reply(400, format!("{{\"error\":\"bad_request\",\"message\":{}}}", json::quote(message)))
    }

    fn decide(&mut self, body: &[u8]) -> Action {
        self.done = true;
        let cfg = self.cfg.clone();
        match judge(&cfg, body) {
            Verdict::Allow => Action::Continue,
            Verdict::Bad(m) => self.bad(&m),
            Verdict::Risky(x) => match cfg.action {
                RiskAction::Reject => self.reply(
                    403,
                    format!(
                        "{{\"error\":\"forbidden\",\"reason\":{},\"field\":{},\"value\":{},\"threshold\":{}}}",
                        json::quote(&cfg.reason),
                        json::quote(&cfg.field),
                        fmt_num(x),
                        fmt_num(cfg.threshold)
                    ),
                ),
                RiskAction::Tag => {
                    if let Err(s) = hostcalls::set_map_value(MapType::HttpRequestHeaders, &cfg.tag_header, Some(&cfg.tag_value)) {
                        error!("risk: could not tag the request ({:?}): request headers are no longer writable", s);
                    }
                    Action::Continue
                }
            },
        }
    }
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        let method = self.get_http_request_header(":method").unwrap_or_default().to_ascii_uppercase();
        self.active = self.cfg.methods.iter().any(|m| *m == method);
        if !self.active {
            return Action::Continue;
        }
        // a client must not be able to pre-set the tag
        if self.cfg.action == RiskAction::Tag {
            self.set_http_request_header(&self.cfg.tag_header.clone(), None);
        }
        if end_of_stream {
            return self.decide(b"");
        }
        if let Some(len) = self.get_http_request_header("content-length").and_then(|v| v.trim().parse::<usize>().ok()) {
            if len > self.cfg.max_body_bytes {
                return self.reply(413, "{\"error\":\"payload_too_large\",\"message\":\"request body too large for the risk check\"}".into());
            }
        }
        if self.cfg.action == RiskAction::Tag {
            // The tag is a request header, so the headers must wait for the body verdict.
            // This needs the host to deliver the body while headers are paused
            // (`deliver_body_while_paused: true`; Envoy: allow_on_headers_stop_iteration).
            return Action::Pause;
        }
        // Reject mode: Continue, so a host with Envoy semantics still delivers the body;
        // the body itself is held (Pause in on_http_request_body) until the verdict.
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.active || self.done {
            return Action::Continue;
        }
        if body_size > self.cfg.max_body_bytes {
            return self.reply(413, "{\"error\":\"payload_too_large\",\"message\":\"request body too large for the risk check\"}".into());
        }
        if !end_of_stream {
            return Action::Pause; // buffer until the whole body is here
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        self.decide(&body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(src: &str) -> Config {
        Config::parse(src.as_bytes()).unwrap()
    }

    #[test]
    fn verdicts() {
        let c = cfg(r#"{"threshold": 10000}"#);
        assert_eq!(judge(&c, br#"{"amount": 10000}"#), Verdict::Allow);
        assert_eq!(judge(&c, br#"{"amount": 10000.01}"#), Verdict::Risky(10000.01));
        assert_eq!(judge(&c, br#"{"amount": "20000"}"#), Verdict::Risky(20000.0));
        assert!(matches!(judge(&c, b"amount=5"), Verdict::Bad(_)));
        assert!(matches!(judge(&c, b""), Verdict::Bad(_)));
        assert!(matches!(judge(&c, br#"{"amount": true}"#), Verdict::Bad(_)));
        assert!(matches!(judge(&c, br#"{"amount": "x"}"#), Verdict::Bad(_)));
        assert!(matches!(judge(&c, br#"{"other": 1}"#), Verdict::Bad(_)));
        assert_eq!(judge(&c, br#"{"amount": 1, "amount": 20000}"#), Verdict::Bad("field amount appears more than once".into()));
        assert_eq!(judge(&c, br#"{"amount": 1, "other": 1, "other": 2}"#), Verdict::Allow);
        let c = cfg(r#"{"threshold": 5, "field": "payment.items.1.amount", "on_missing": "allow"}"#);
        assert!(matches!(judge(&c, br#"{"payment": {"items": []}, "payment": {"items": [{}, {"amount": 9}]}}"#), Verdict::Bad(_)));
        assert!(matches!(judge(&c, br#"{"payment": {"items": [{}, {"amount": 1, "amount": 9}]}}"#), Verdict::Bad(_)));
        assert_eq!(judge(&c, br#"{"payment": {"items": [{"amount": 1}, {"amount": 6}]}}"#), Verdict::Risky(6.0));
        assert_eq!(judge(&c, br#"{"payment": {}}"#), Verdict::Allow);
    }

    #[test]
    fn config() {
        let c = cfg(r#"{"threshold": 10000}"#);
        assert_eq!(c.reason, "amount exceeds 10000");
        assert_eq!(c.methods, vec!["POST", "PUT", "PATCH"]);
        assert!(Config::parse(b"{}").unwrap_err().contains("threshold"));
        assert!(Config::parse(br#"{"threshold": 1, "action": "drop"}"#).is_err());
        assert!(Config::parse(br#"{"threshold": 1, "field": "a..b"}"#).is_err());
        assert!(Config::parse(br#"{"threshold": 1, "colour": 1}"#).is_err());
    }

    #[test]
    fn bodies_never_panic() {
        let mut rng = wasmgate_sdk::fuzz::Rng(99);
        let c = cfg(r#"{"threshold": 10, "field": "p.items.1.amount"}"#);
        let seed = br#"{"p": {"items": [{"amount": 1}, {"amount": "12.5"}]}, "x": [1e3, -0.5, null, true]}"#;
        for _ in 0..20_000 {
            let _ = judge(&c, &rng.mutate(seed, b"{}[]\":,.0123456789e-"));
        }
    }
}
