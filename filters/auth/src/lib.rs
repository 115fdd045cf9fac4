//! auth: API keys (header or query parameter), HTTP Basic (salted SHA-256), JWT HS256.
//!
//! A request passes when any configured method accepts its credential; the identity goes
//! upstream in `identity_header` (any client-supplied value of that header is removed
//! first). Otherwise: 401, one `WWW-Authenticate` challenge per configured method, and a
//! JSON body `{"error": "unauthorized", "message": …}`. Secrets are compared in constant time.
//! A credential presented more than once (two `x-api-key` or two `Authorization` headers, a
//! repeated query parameter, or both header and query) is refused with 400 before any check:
//! servers disagree on which copy wins, so none is used (RFC 6750 §3.1 `invalid_request`).

use std::borrow::Cow;
use std::rc::Rc;
use wasmgate_sdk::config::Cfg;
use wasmgate_sdk::crypto::{constant_time_eq, hex_decode, hex_nibble, hmac_sha256_verify, sha256, Sha256};
use wasmgate_sdk::sha2::Digest;
use wasmgate_sdk::traits::*;
use wasmgate_sdk::types::*;
use wasmgate_sdk::{base64, error, hostcalls, json, Value};

// No on_done / on_log export: this filter keeps both at the default, and each left out is
// one guest call less per request (the host skips a callback a module does not export).
wasmgate_sdk::main! { callbacks: [request_headers, response_headers]; {
    wasmgate_sdk::set_log_level(LogLevel::Info);
    wasmgate_sdk::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { cfg: None }) });
}}

// ---------------------------------------------------------------- configuration

#[derive(Debug, Clone)]
pub struct ApiKeys {
    header: Option<String>,
    query: Option<String>,
    /// (sha256(key), identity)
    keys: Vec<([u8; 32], String)>,
}

#[derive(Debug, Clone)]
pub struct BasicUser {
    username_hash: [u8; 32],
    username: String,
    salt: Vec<u8>,
    password_sha256: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Jwt {
    /// (kid, secret); kid None for the single-`secret` form
    keys: Vec<(Option<String>, Vec<u8>)>,
    issuers: Vec<String>,
    audiences: Vec<String>,
    clock_skew_s: f64,
    require_exp: bool,
    identity_claim: String,
    header: String,
    query: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    realm: String,
    identity_header: String,
    method_header: Option<String>,
    strip_credentials: bool,
    api_key: Option<ApiKeys>,
    basic: Option<Vec<BasicUser>>,
    jwt: Option<Jwt>,
}

fn lower_header(c: &Cfg, key: &str) -> Result<Option<String>, String> {
    match c.str(key)? {
        None => Ok(None),
        Some(h) if h.is_empty() || h.contains([' ', ':', '\r', '\n']) => Err(c.err(key, "invalid header name")),
        Some(h) => Ok(Some(h.to_ascii_lowercase())),
    }
}

impl Config {
    pub fn parse(bytes: &[u8]) -> Result<Config, String> {
        let v = wasmgate_sdk::config::parse(bytes)?;
        let c = Cfg::root(&v);
        c.only(&["realm", "identity_header", "method_header", "strip_credentials", "api_key", "basic", "jwt"])?;
        let mut cfg = Config {
            realm: c.str_or("realm", "wasmgate")?,
            identity_header: lower_header(&c, "identity_header")?.unwrap_or_else(|| "x-auth-identity".into()),
            method_header: lower_header(&c, "method_header")?,
            strip_credentials: c.bool_or("strip_credentials", false)?,
            api_key: None,
            basic: None,
            jwt: None,
        };
        if cfg.realm.contains(['"', '\\', '\r', '\n']) {
            return Err("realm: must not contain quotes, backslashes or line breaks".into());
        }
        if let Some(a) = c.get("api_key") {
            a.only(&["header", "query", "keys"])?;
            let header = lower_header(&a, "header")?;
            let query = a.str("query")?;
            let header = if header.is_none() && query.is_none() { Some("x-api-key".to_string()) } else { header };
            let mut keys = Vec::new();
            for k in a.list("keys")? {
                k.only(&["key", "key_sha256", "identity"])?;
                let identity = k.str("identity")?.ok_or_else(|| k.err("identity", "required"))?;
                if identity.is_empty() || identity.chars().any(|c| c.is_control()) {
                    return Err(k.err("identity", "must be a non-empty header value"));
                }
                let digest = match (k.str("key")?, k.str("key_sha256")?) {
                    (Some(key), None) if !key.is_empty() => sha256(key.as_bytes()),
                    (None, Some(hex)) => {
                        let d = hex_decode(&hex).filter(|d| d.len() == 32).ok_or_else(|| k.err("key_sha256", "expected 64 hex digits"))?;
                        let mut out = [0u8; 32];
                        out.copy_from_slice(&d);
                        out
                    }
                    _ => return Err(format!("{}: give exactly one of key (non-empty) or key_sha256", k.at)),
                };
                keys.push((digest, identity));
            }
            if keys.is_empty() {
                return Err("api_key.keys: at least one key is required".into());
            }
            cfg.api_key = Some(ApiKeys { header, query, keys });
        }
        if let Some(b) = c.get("basic") {
            b.only(&["users"])?;
            let mut users = Vec::new();
            for u in b.list("users")? {
                u.only(&["username", "salt", "password_sha256"])?;
                let username = u.str("username")?.ok_or_else(|| u.err("username", "required"))?;
                if username.contains(':') || username.is_empty() || username.chars().any(|c| c.is_control()) {
                    return Err(u.err("username", "must be non-empty and contain no ':'"));
                }
                let salt = u.str_or("salt", "")?.into_bytes();
                let hex = u.str("password_sha256")?.ok_or_else(|| u.err("password_sha256", "required"))?;
                let password_sha256 = hex_decode(&hex).filter(|d| d.len() == 32).ok_or_else(|| u.err("password_sha256", "expected 64 hex digits"))?;
                users.push(BasicUser { username_hash: sha256(username.as_bytes()), username, salt, password_sha256 });
            }
            if users.is_empty() {
                return Err("basic.users: at least one user is required".into());
            }
            cfg.basic = Some(users);
        }
        if let Some(j) = c.get("jwt") {
            j.only(&["secret", "secret_base64url", "keys", "issuer", "audience", "clock_skew_s", "require_exp", "identity_claim", "header", "query"])?;
            fn secret_of(c: &Cfg) -> Result<Option<Vec<u8>>, String> {
                let secret = match (c.str("secret")?, c.str("secret_base64url")?) {
                    (Some(s), None) => s.into_bytes(),
                    (None, Some(b)) => base64::decode_url(b.trim_end_matches('=')).ok_or_else(|| c.err("secret_base64url", "not base64url"))?,
                    (None, None) => return Ok(None),
                    _ => return Err(format!("{}: give one of secret or secret_base64url", if c.at.is_empty() { "jwt" } else { &c.at })),
                };
                if secret.len() < 16 {
                    return Err(c.err("secret", "at least 16 bytes are required for HS256"));
                }
                Ok(Some(secret))
            }
            let mut keys = Vec::new();
            if let Some(secret) = secret_of(&j)? {
                keys.push((None, secret));
            }
            for k in j.list("keys")? {
                k.only(&["kid", "secret", "secret_base64url"])?;
                let kid = k.str("kid")?.ok_or_else(|| k.err("kid", "required"))?;
                if keys.iter().any(|(x, _)| x.as_deref() == Some(kid.as_str())) {
                    return Err(k.err("kid", "duplicate"));
                }
                let secret = secret_of(&k)?.ok_or_else(|| format!("{}: give one of secret or secret_base64url", k.at))?;
                keys.push((Some(kid), secret));
            }
            if keys.is_empty() {
                return Err("jwt: give secret, secret_base64url or keys".into());
            }
            let skew = j.f64("clock_skew_s")?.unwrap_or(60.0);
            if !(0.0..=86400.0).contains(&skew) {
                return Err("jwt.clock_skew_s: must be between 0 and 86400".into());
            }
            cfg.jwt = Some(Jwt {
                keys,
                issuers: j.strs("issuer")?,
                audiences: j.strs("audience")?,
                clock_skew_s: skew,
                require_exp: j.bool_or("require_exp", true)?,
                identity_claim: j.str_or("identity_claim", "sub")?,
                header: lower_header(&j, "header")?.unwrap_or_else(|| "authorization".into()),
                query: j.str("query")?,
            });
        }
        if cfg.api_key.is_none() && cfg.basic.is_none() && cfg.jwt.is_none() {
            return Err("configure at least one of api_key, basic, jwt".into());
        }
        Ok(cfg)
    }
}

// ---------------------------------------------------------------- pure checks

pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = hex_nibble;
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            out.push(b' ');
            i += 1;
        } else if b[i] == b'%' && i + 2 < b.len() {
            match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Value of query parameter `name` in a `:path`.
pub fn query_param(path: &str, name: &str) -> Option<String> {
    let q = path.split_once('?')?.1;
    let q = q.split('#').next().unwrap_or("");
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k) == name {
            return Some(percent_decode(v));
        }
    }
    None
}

/// How many times query parameter `name` appears in a `:path`.
pub fn query_count(path: &str, name: &str) -> usize {
    let q = match path.split_once('?') {
        Some((_, q)) => q.split('#').next().unwrap_or(""),
        None => return 0,
    };
    q.split('&').filter(|pair| percent_decode(pair.split_once('=').map(|x| x.0).unwrap_or(pair)) == name).count()
}

/// The request headers as the host serialized them (names lower-case), borrowed, not copied.
pub type Headers<'a> = [(&'a [u8], &'a [u8])];

/// Why the request's credentials are ambiguous, if they are: a header or query parameter the
/// configuration reads is present more than once, or one credential is in both its header and
/// its query parameter.
pub fn ambiguous_credentials(cfg: &Config, headers: &Headers, path: &str) -> Option<String> {
    let count = |name: &str| headers.iter().filter(|(k, _)| *k == name.as_bytes()).count();
    // (header, query parameter, what it carries, does a header value carry it)
    let mut slots: Vec<(Option<&str>, Option<&str>, &str, Box<dyn Fn(&str) -> bool>)> = Vec::new();
    if let Some(a) = &cfg.api_key {
        slots.push((a.header.as_deref(), a.query.as_deref(), "API key", Box::new(|_| true)));
    }
    if let Some(j) = &cfg.jwt {
        // In `Authorization` only a Bearer value is a token (Basic may share the header).
        let bearer_only = j.header == "authorization";
        slots.push((Some(j.header.as_str()), j.query.as_deref(), "token",
                    Box::new(move |v| !bearer_only || split_scheme(v).0 == "bearer")));
    }
    if cfg.basic.is_some() {
        slots.push((Some("authorization"), None, "credentials", Box::new(|_| true)));
    }
    for (header, query, what, carries) in &slots {
        if let Some(h) = header {
            if count(h) > 1 {
                return Some(format!("more than one {} header", h));
            }
        }
        if let Some(q) = query {
            let n = query_count(path, q);
            if n > 1 {
                return Some(format!("more than one {} query parameter", q));
            }
            let in_header = header.map_or(false, |h| {
                headers.iter().any(|(k, v)| *k == h.as_bytes() && carries(&String::from_utf8_lossy(v)))
            });
            if n == 1 && in_header {
                return Some(format!("{} in both the {} header and the {} query parameter", what, header.unwrap(), q));
            }
        }
    }
    None
}

/// First value of header `name` (lower-case).
fn header<'a>(headers: &Headers<'a>, name: &str) -> Option<Cow<'a, str>> {
    headers.iter().find(|(k, _)| *k == name.as_bytes()).map(|(_, v)| String::from_utf8_lossy(v))
}

/// `:path` without every `name=…` query parameter.
pub fn strip_query_param(path: &str, name: &str) -> String {
    let (base, q) = match path.split_once('?') {
        Some(x) => x,
        None => return path.to_string(),
    };
    let kept: Vec<&str> = q
        .split('&')
        .filter(|pair| {
            let k = pair.split_once('=').map(|x| x.0).unwrap_or(pair);
            percent_decode(k) != name
        })
        .collect();
    let kept: Vec<&str> = kept.into_iter().filter(|p| !p.is_empty()).collect();
    if kept.is_empty() {
        base.to_string()
    } else {
        format!("{}?{}", base, kept.join("&"))
    }
}

pub fn check_api_key(keys: &ApiKeys, presented: &str) -> Result<String, String> {
    let digest = sha256(presented.as_bytes());
    let mut found: Option<&String> = None;
    for (k, identity) in &keys.keys {
        // no early exit: every key is compared
        if constant_time_eq(k, &digest) && found.is_none() {
            found = Some(identity);
        }
    }
    found.cloned().ok_or_else(|| "invalid API key".to_string())
}

pub fn check_basic(users: &[BasicUser], b64: &str) -> Result<String, String> {
    let raw = base64::decode_std(b64.trim()).ok_or("malformed Basic credentials")?;
    let raw = String::from_utf8(raw).map_err(|_| "malformed Basic credentials")?;
    let (user, pass) = raw.split_once(':').ok_or("malformed Basic credentials")?;
    let user_hash = sha256(user.as_bytes());
    let mut found: Option<&String> = None;
    for u in users {
        let mut h = Sha256::new();
        h.update(&u.salt);
        h.update(pass.as_bytes());
        let pw = h.finalize();
        let name_ok = constant_time_eq(&u.username_hash, &user_hash);
        let pw_ok = constant_time_eq(&u.password_sha256, &pw);
        if name_ok & pw_ok && found.is_none() {
            found = Some(&u.username);
        }
    }
    found.cloned().ok_or_else(|| "invalid username or password".to_string())
}

fn decode_json_part(part: &str, what: &str) -> Result<Value, String> {
    let raw = base64::decode_url(part).ok_or_else(|| format!("malformed token ({} is not base64url)", what))?;
    let v = json::parse(&raw).map_err(|_| format!("malformed token ({} is not JSON)", what))?;
    if v.as_object().is_none() {
        return Err(format!("malformed token ({} is not a JSON object)", what));
    }
    Ok(v)
}

/// Verify an HS256 JWT at `now_s` (seconds since the epoch); the identity claim on success.
pub fn check_jwt(cfg: &Jwt, token: &str, now_s: f64) -> Result<String, String> {
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err("malformed token".into());
    }
    let header = decode_json_part(parts[0], "header")?;
    match header.get("alg").and_then(|a| a.as_str()) {
        Some("HS256") => {}
        Some(a) if a.eq_ignore_ascii_case("none") => return Err("alg none is not allowed".into()),
        Some(a) => return Err(format!("unsupported alg {}", json::quote(a))),
        None => return Err("token header has no alg".into()),
    }
    if header.get("crit").is_some() {
        return Err("unsupported crit header".into());
    }
    let sig = base64::decode_url(parts[2]).ok_or("malformed token (signature is not base64url)")?;
    let signing_input_len = parts[0].len() + 1 + parts[1].len();
    let signing_input = &token.as_bytes()[..signing_input_len];
    // With a `kid` in the header only the key of that id is tried; without one, every key
    // (key rotation: old and new secrets accepted side by side).
    let kid = match header.get("kid") {
        None => None,
        Some(Value::Str(k)) => Some(k.as_str()),
        Some(_) => return Err("kid is not a string".into()),
    };
    let mut candidates = cfg.keys.iter().filter(|(k, _)| kid.is_none() || k.as_deref() == kid).peekable();
    if candidates.peek().is_none() {
        return Err("unknown kid".into());
    }
    let mut valid = false;
    for (_, secret) in candidates {
        valid |= hmac_sha256_verify(secret, signing_input, &sig);
    }
    if !valid {
        return Err("invalid signature".into());
    }
    let claims = decode_json_part(parts[1], "payload")?;
    match claims.get("exp") {
        Some(e) => {
            let exp = e.as_f64().ok_or("exp is not a number")?;
            if now_s > exp + cfg.clock_skew_s {
                return Err("token expired".into());
            }
        }
        None if cfg.require_exp => return Err("token has no exp".into()),
        None => {}
    }
    if let Some(n) = claims.get("nbf") {
        let nbf = n.as_f64().ok_or("nbf is not a number")?;
        if now_s + cfg.clock_skew_s < nbf {
            return Err("token not yet valid".into());
        }
    }
    if !cfg.issuers.is_empty() {
        let iss = claims.get("iss").and_then(|i| i.as_str());
        if !iss.map(|i| cfg.issuers.iter().any(|x| x == i)).unwrap_or(false) {
            return Err("issuer not allowed".into());
        }
    }
    if !cfg.audiences.is_empty() {
        let auds: Vec<&str> = match claims.get("aud") {
            Some(Value::Str(s)) => vec![s.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str()).collect(),
            _ => Vec::new(),
        };
        if !auds.iter().any(|a| cfg.audiences.iter().any(|x| x == a)) {
            return Err("audience not allowed".into());
        }
    }
    match claims.get(&cfg.identity_claim) {
        Some(Value::Str(s)) if s.chars().any(|c| c.is_control()) => {
            Err(format!("{} claim is not a valid header value", cfg.identity_claim))
        }
        Some(Value::Str(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::Int(i)) => Ok(i.to_string()),
        _ => Err(format!("token has no {} claim", cfg.identity_claim)),
    }
}

/// `(scheme, rest)` of an Authorization-style value; scheme lower-cased.
fn split_scheme(v: &str) -> (String, &str) {
    let v = v.trim();
    match v.split_once(' ') {
        Some((s, rest)) => (s.to_ascii_lowercase(), rest.trim()),
        None => (v.to_ascii_lowercase(), ""),
    }
}

// ---------------------------------------------------------------- contexts

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
                error!("auth: bad configuration: {}", e);
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let cfg = self.cfg.clone().expect("auth: stream before configuration");
        Some(Box::new(Stream { cfg }))
    }
}

struct Stream {
    cfg: Rc<Config>,
}

enum Strip {
    Header(String),
    Query(String),
}

impl Stream {
    fn authenticate(&self, headers: &Headers) -> Result<(String, &'static str, Vec<Strip>), (String, bool)> {
        let cfg = &self.cfg;
        let path = header(headers, ":path").unwrap_or_default();
        let mut first_error: Option<String> = None;
        let mut bearer_error = false;
        let note = |e: String, first: &mut Option<String>| {
            if first.is_none() {
                *first = Some(e);
            }
        };
        if let Some(a) = &cfg.api_key {
            let mut presented: Option<(String, Strip)> = None;
            if let Some(h) = &a.header {
                if let Some(v) = header(headers, h) {
                    presented = Some((v.trim().to_string(), Strip::Header(h.clone())));
                }
            }
            if presented.is_none() {
                if let Some(q) = &a.query {
                    if let Some(v) = query_param(&path, q) {
                        presented = Some((v, Strip::Query(q.clone())));
                    }
                }
            }
            if let Some((key, strip)) = presented {
                match check_api_key(a, &key) {
                    Ok(id) => return Ok((id, "api_key", vec![strip])),
                    Err(e) => note(e, &mut first_error),
                }
            }
        }
        if let Some(j) = &cfg.jwt {
            let mut presented: Option<(String, Strip)> = None;
            if let Some(v) = header(headers, &j.header) {
                let (scheme, rest) = split_scheme(&v);
                if j.header == "authorization" {
                    if scheme == "bearer" {
                        presented = Some((rest.to_string(), Strip::Header(j.header.clone())));
                    }
                } else if scheme == "bearer" && !rest.is_empty() {
                    presented = Some((rest.to_string(), Strip::Header(j.header.clone())));
                } else {
                    presented = Some((v.trim().to_string(), Strip::Header(j.header.clone())));
                }
            }
            if presented.is_none() {
                if let Some(q) = &j.query {
                    if let Some(v) = query_param(&path, q) {
                        presented = Some((v, Strip::Query(q.clone())));
                    }
                }
            }
            if let Some((token, strip)) = presented {
                let now_s = self.get_current_time_nanos() as f64 / 1e9;
                match check_jwt(j, &token, now_s) {
                    Ok(id) => return Ok((id, "jwt", vec![strip])),
                    Err(e) => {
                        bearer_error = true;
                        note(e, &mut first_error)
                    }
                }
            }
        }
        if let Some(users) = &cfg.basic {
            if let Some(v) = header(headers, "authorization") {
                let (scheme, rest) = split_scheme(&v);
                if scheme == "basic" {
                    match check_basic(users, rest) {
                        Ok(id) => return Ok((id, "basic", vec![Strip::Header("authorization".into())])),
                        Err(e) => note(e, &mut first_error),
                    }
                }
            }
        }
        Err((first_error.unwrap_or_else(|| "missing credentials".into()), bearer_error))
    }

    /// 401 (`bearer_error` "invalid_token" when a token was refused) or 400 for ambiguous
    /// credentials (`bearer_error` "invalid_request"), with the challenges either way.
    fn reject(&self, status: u32, message: &str, bearer_error: Option<&str>) {
        let cfg = &self.cfg;
        let mut challenges: Vec<String> = Vec::new();
        if let Some(a) = &cfg.api_key {
            let mut c = format!("ApiKey realm=\"{}\"", cfg.realm);
            if let Some(h) = &a.header {
                c.push_str(&format!(", header=\"{}\"", h));
            }
            if let Some(q) = &a.query {
                c.push_str(&format!(", query=\"{}\"", q.replace(['"', '\\'], "")));
            }
            challenges.push(c);
        }
        if cfg.jwt.is_some() {
            let mut c = format!("Bearer realm=\"{}\"", cfg.realm);
            if let Some(code) = bearer_error {
                c.push_str(&format!(", error=\"{}\", error_description=\"{}\"", code, message.replace(['"', '\\'], "'")));
            }
            challenges.push(c);
        }
        if cfg.basic.is_some() {
            challenges.push(format!("Basic realm=\"{}\", charset=\"UTF-8\"", cfg.realm));
        }
        let error = if status == 400 { "bad_request" } else { "unauthorized" };
        let body = format!("{{\"error\":\"{}\",\"message\":{}}}", error, json::quote(message));
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json"), ("cache-control", "no-store")];
        for c in &challenges {
            headers.push(("www-authenticate", c));
        }
        self.send_http_response(status, headers, Some(body.as_bytes()));
    }
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let cfg = self.cfg.clone();
        // One read of the whole map (duplicates can only be seen there), parsed in place.
        let raw = hostcalls::get_map_serialized(MapType::HttpRequestHeaders).unwrap();
        let parsed = hostcalls::map_pairs(&raw);
        let readable = parsed.is_some();
        let mut headers = parsed.unwrap_or_default();
        // Never trust an identity the client sent itself: remove it before anything reads the
        // headers. Only when it was sent (a host call less for every other request).
        for name in std::iter::once(&cfg.identity_header).chain(cfg.method_header.iter()) {
            if !readable || headers.iter().any(|(k, _)| *k == name.as_bytes()) {
                self.set_http_request_header(name, None);
                headers.retain(|(k, _)| *k != name.as_bytes());
            }
        }
        let path = header(&headers, ":path").unwrap_or_default();
        if let Some(message) = ambiguous_credentials(&cfg, &headers, &path) {
            self.reject(400, &message, Some("invalid_request"));
            return Action::Pause;
        }
        match self.authenticate(&headers) {
            Ok((identity, method, strip)) => {
                if cfg.strip_credentials {
                    for s in strip {
                        match s {
                            Strip::Header(h) => self.set_http_request_header(&h, None),
                            Strip::Query(q) => {
                                let new_path = strip_query_param(&path, &q);
                                if new_path != path {
                                    self.set_http_request_header(":path", Some(&new_path));
                                }
                            }
                        }
                    }
                }
                self.set_http_request_header(&cfg.identity_header, Some(&identity));
                if let Some(m) = &cfg.method_header {
                    self.set_http_request_header(m, Some(method));
                }
                Action::Continue
            }
            Err((message, bearer_error)) => {
                self.reject(401, &message, bearer_error.then_some("invalid_token"));
                Action::Pause
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn jwt_cfg(extra: &str) -> Jwt {
        let src = format!(r#"{{"jwt": {{"secret": "{}" {}}}}}"#, SECRET, extra);
        Config::parse(src.as_bytes()).unwrap().jwt.unwrap()
    }

    fn mint(header: &str, claims: &str, secret: &[u8]) -> String {
        let input = format!("{}.{}", base64::encode_url(header.as_bytes()), base64::encode_url(claims.as_bytes()));
        let sig = wasmgate_sdk::crypto::hmac_sha256(secret, input.as_bytes());
        format!("{}.{}", input, base64::encode_url(&sig))
    }

    #[test]
    fn jwt_paths() {
        let c = jwt_cfg(r#", "issuer": "me", "audience": ["api", "web"], "clock_skew_s": 10"#);
        let h = r#"{"alg":"HS256","typ":"JWT"}"#;
        let ok = mint(h, r#"{"sub":"alice","exp":1000,"nbf":500,"iss":"me","aud":"web"}"#, SECRET.as_bytes());
        assert_eq!(check_jwt(&c, &ok, 900.0).unwrap(), "alice");
        assert_eq!(check_jwt(&c, &ok, 1009.0).unwrap(), "alice"); // within skew
        assert_eq!(check_jwt(&c, &ok, 1011.0).unwrap_err(), "token expired");
        assert_eq!(check_jwt(&c, &ok, 489.0).unwrap_err(), "token not yet valid");
        assert_eq!(check_jwt(&c, &ok, 491.0).unwrap(), "alice");
        let bad_sig = mint(h, r#"{"sub":"alice","exp":1000,"iss":"me","aud":"web"}"#, b"another-secret-another-secret!!");
        assert_eq!(check_jwt(&c, &bad_sig, 900.0).unwrap_err(), "invalid signature");
        let none = format!("{}.{}.", base64::encode_url(br#"{"alg":"none"}"#), base64::encode_url(br#"{"sub":"a","exp":1000}"#));
        assert_eq!(check_jwt(&c, &none, 900.0).unwrap_err(), "alg none is not allowed");
        let rs = mint(r#"{"alg":"RS256"}"#, r#"{"sub":"a","exp":1000}"#, SECRET.as_bytes());
        assert!(check_jwt(&c, &rs, 900.0).unwrap_err().contains("unsupported alg"));
        let iss = mint(h, r#"{"sub":"a","exp":1000,"iss":"you","aud":"api"}"#, SECRET.as_bytes());
        assert_eq!(check_jwt(&c, &iss, 900.0).unwrap_err(), "issuer not allowed");
        let aud = mint(h, r#"{"sub":"a","exp":1000,"iss":"me","aud":["x","y"]}"#, SECRET.as_bytes());
        assert_eq!(check_jwt(&c, &aud, 900.0).unwrap_err(), "audience not allowed");
        let aud_list = mint(h, r#"{"sub":"a","exp":1000,"iss":"me","aud":["x","api"]}"#, SECRET.as_bytes());
        assert_eq!(check_jwt(&c, &aud_list, 900.0).unwrap(), "a");
        let noexp = mint(h, r#"{"sub":"a","iss":"me","aud":"api"}"#, SECRET.as_bytes());
        assert_eq!(check_jwt(&c, &noexp, 900.0).unwrap_err(), "token has no exp");
        assert_eq!(check_jwt(&c, "a.b", 0.0).unwrap_err(), "malformed token");
        assert!(check_jwt(&c, "a.b.c", 0.0).unwrap_err().starts_with("malformed token"));
        let crlf = mint(h, r#"{"sub":"a\r\nx-admin: 1","exp":1000,"iss":"me","aud":"api"}"#, SECRET.as_bytes());
        assert_eq!(check_jwt(&c, &crlf, 900.0).unwrap_err(), "sub claim is not a valid header value");
        let nosub = mint(h, r#"{"exp":1000,"iss":"me","aud":"api"}"#, SECRET.as_bytes());
        assert_eq!(check_jwt(&c, &nosub, 900.0).unwrap_err(), "token has no sub claim");
        // tampered payload with the original signature
        let parts: Vec<&str> = ok.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], base64::encode_url(br#"{"sub":"root","exp":1000,"iss":"me","aud":"web"}"#), parts[2]);
        assert_eq!(check_jwt(&c, &forged, 900.0).unwrap_err(), "invalid signature");
    }

    #[test]
    fn jwt_key_rotation() {
        let src = br#"{"jwt": {"keys": [{"kid": "old", "secret": "old-secret-0123456789"}, {"kid": "new", "secret_base64url": "bmV3LXNlY3JldC0wMTIzNDU2Nzg5"}]}}"#;
        let c = Config::parse(src).unwrap().jwt.unwrap();
        let claims = r#"{"sub":"a","exp":1000}"#;
        assert_eq!(check_jwt(&c, &mint(r#"{"alg":"HS256","kid":"old"}"#, claims, b"old-secret-0123456789"), 0.0).unwrap(), "a");
        assert_eq!(check_jwt(&c, &mint(r#"{"alg":"HS256","kid":"new"}"#, claims, b"new-secret-0123456789"), 0.0).unwrap(), "a");
        assert_eq!(check_jwt(&c, &mint(r#"{"alg":"HS256"}"#, claims, b"new-secret-0123456789"), 0.0).unwrap(), "a");
        assert_eq!(check_jwt(&c, &mint(r#"{"alg":"HS256","kid":"old"}"#, claims, b"new-secret-0123456789"), 0.0).unwrap_err(), "invalid signature");
        assert_eq!(check_jwt(&c, &mint(r#"{"alg":"HS256","kid":"x"}"#, claims, b"new-secret-0123456789"), 0.0).unwrap_err(), "unknown kid");
        assert_eq!(check_jwt(&c, &mint(r#"{"alg":"HS256","kid":7}"#, claims, b"new-secret-0123456789"), 0.0).unwrap_err(), "kid is not a string");
    }

    #[test]
    fn basic_and_keys() {
        let pw = wasmgate_sdk::crypto::hex_encode(&sha256(b"s1hunter2"));
        let src = format!(r#"{{"basic": {{"users": [{{"username": "carol", "salt": "s1", "password_sha256": "{}"}}]}},
            "api_key": {{"keys": [{{"key": "k-123", "identity": "svc"}}]}}}}"#, pw);
        let c = Config::parse(src.as_bytes()).unwrap();
        let users = c.basic.unwrap();
        assert_eq!(check_basic(&users, &base64::encode_std(b"carol:hunter2")).unwrap(), "carol");
        assert!(check_basic(&users, &base64::encode_std(b"carol:hunter3")).is_err());
        assert!(check_basic(&users, &base64::encode_std(b"dave:hunter2")).is_err());
        assert!(check_basic(&users, "!!!").is_err());
        assert!(check_basic(&users, &base64::encode_std(b"nocolon")).is_err());
        let keys = c.api_key.unwrap();
        assert_eq!(keys.header.as_deref(), Some("x-api-key"));
        assert_eq!(check_api_key(&keys, "k-123").unwrap(), "svc");
        assert!(check_api_key(&keys, "k-124").is_err());
    }

    #[test]
    fn query_helpers() {
        assert_eq!(query_param("/a?x=1&api_key=k%2D1&y", "api_key").as_deref(), Some("k-1"));
        assert_eq!(query_param("/a?x=1", "api_key"), None);
        assert_eq!(strip_query_param("/a?x=1&api_key=k&y=2", "api_key"), "/a?x=1&y=2");
        assert_eq!(strip_query_param("/a?api_key=k", "api_key"), "/a");
        assert_eq!(percent_decode("a%20b+c%zz%4"), "a b c%zz%4");
    }

    #[test]
    fn ambiguous_credentials_are_found() {
        let src = format!(r#"{{"api_key": {{"query": "api_key", "header": "x-api-key", "keys": [{{"key": "k", "identity": "i"}}]}},
            "jwt": {{"secret": "{}", "query": "access_token"}}, "basic": {{"users": [{{"username": "u", "password_sha256": "{}"}}]}}}}"#,
            SECRET, wasmgate_sdk::crypto::hex_encode(&sha256(b"p")));
        let c = Config::parse(src.as_bytes()).unwrap();
        fn h<'a>(pairs: &[(&'a str, &'a str)]) -> Vec<(&'a [u8], &'a [u8])> {
            pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())).collect()
        }
        let amb = |pairs: &[(&str, &str)], path: &str| ambiguous_credentials(&c, &h(pairs), path);
        assert_eq!(amb(&[("x-api-key", "a")], "/x?api_key=b&y=1").as_deref(),
                   Some("API key in both the x-api-key header and the api_key query parameter"));
        assert_eq!(amb(&[("x-api-key", "a"), ("x-other", "1"), ("x-api-key", "a")], "/").as_deref(),
                   Some("more than one x-api-key header"));
        assert_eq!(amb(&[], "/?api_key=a&api%5Fkey=b").as_deref(), Some("more than one api_key query parameter"));
        assert_eq!(amb(&[("authorization", "Bearer a"), ("authorization", "Basic b")], "/").as_deref(),
                   Some("more than one authorization header"));
        assert_eq!(amb(&[("authorization", "bearer t")], "/?access_token=t").as_deref(),
                   Some("token in both the authorization header and the access_token query parameter"));
        // A Basic Authorization value is not a token: with a token in the query it is not ambiguous.
        assert_eq!(amb(&[("authorization", "Basic dTpw")], "/?access_token=t"), None);
        assert_eq!(amb(&[("x-api-key", "a"), ("authorization", "Bearer t")], "/?x=api_key"), None);
        assert_eq!(amb(&[], "/plain"), None);
        // Only what the configuration reads counts: two x-api-key headers mean nothing to JWT-only.
        let jwt_only = jwt_cfg("");
        let c2 = Config { api_key: None, basic: None, jwt: Some(jwt_only), ..c.clone() };
        assert_eq!(ambiguous_credentials(&c2, &h(&[("x-api-key", "a"), ("x-api-key", "b")]), "/"), None);
        assert_eq!(query_count("/a?k=1&k=2&kk=3#k=4", "k"), 2);
        assert_eq!(query_count("/a", "k"), 0);
    }

    #[test]
    fn config_errors() {
        assert!(Config::parse(b"{}").unwrap_err().contains("at least one"));
        assert!(Config::parse(br#"{"jwt": {"secret": "short"}}"#).unwrap_err().contains("16 bytes"));
        assert!(Config::parse(br#"{"jwt": {}}"#).unwrap_err().contains("give secret"));
        assert!(Config::parse(br#"{"jwt": {"keys": [{"kid": "a", "secret": "0123456789abcdef"}, {"kid": "a", "secret": "0123456789abcdef"}]}}"#).unwrap_err().contains("duplicate"));
        assert!(Config::parse(br#"{"jwt": {"keys": [{"secret": "0123456789abcdef"}]}}"#).unwrap_err().contains("kid: required"));
        assert!(Config::parse(br#"{"api_key": {"keys": []}}"#).is_err());
        assert!(Config::parse(br#"{"api_key": {"keys": [{"key": "a"}]}}"#).unwrap_err().contains("identity"));
        assert!(Config::parse(br#"{"basic": {"users": [{"username": "a", "password_sha256": "zz"}]}}"#).is_err());
        assert!(Config::parse(br#"{"jwtt": {}}"#).unwrap_err().contains("unknown key"));
    }

    #[test]
    fn request_data_never_panics() {
        let mut rng = wasmgate_sdk::fuzz::Rng(42);
        let c = jwt_cfg(r#", "issuer": "me", "audience": "api""#);
        let tok = mint(r#"{"alg":"HS256"}"#, r#"{"sub":"a","exp":1000,"iss":"me","aud":"api","nbf":1}"#, SECRET.as_bytes());
        let pw = wasmgate_sdk::crypto::hex_encode(&sha256(b"sp"));
        let src = format!(r#"{{"basic": {{"users": [{{"username": "u", "salt": "s", "password_sha256": "{}"}}]}}}}"#, pw);
        let users = Config::parse(src.as_bytes()).unwrap().basic.unwrap();
        let basic = base64::encode_std("u:p".as_bytes());
        let path = "/a/b?x=%41&api_key=k%2x&&=&y";
        for _ in 0..20_000 {
            let t = String::from_utf8_lossy(&rng.mutate(tok.as_bytes(), b".-_=%{}\"")).into_owned();
            let _ = check_jwt(&c, &t, 900.0);
            let b = String::from_utf8_lossy(&rng.mutate(basic.as_bytes(), b":=+/\xc3")).into_owned();
            let _ = check_basic(&users, &b);
            let p = String::from_utf8_lossy(&rng.mutate(path.as_bytes(), b"%?&=#\xc3\xa9+")).into_owned();
            let _ = query_param(&p, "api_key");
            let _ = strip_query_param(&p, "api_key");
            let _ = split_scheme(&p);
        }
    }
}
