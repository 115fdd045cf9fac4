//! headers: add / set / remove / rename request and response headers, with values
//! templated from properties (`${request.id}`, `${source.address}`, `${request.path}`,
//! `${request.header.x-foo}`, `${response.header.x-bar}` …), like Envoy's
//! `request_headers_to_add`.
//!
//! Per side the operations run in this order: remove, rename, set, add.

use std::borrow::Cow;
use std::rc::Rc;
use wasmgate_sdk::config::Cfg;
use wasmgate_sdk::traits::*;
use wasmgate_sdk::types::*;
use wasmgate_sdk::{error, property, Value};

// No on_done / on_log export: this filter keeps both at the default, and each left out is
// one guest call less per request (the host skips a callback a module does not export).
wasmgate_sdk::main! { callbacks: [request_headers, response_headers]; {
    wasmgate_sdk::set_log_level(LogLevel::Info);
    wasmgate_sdk::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { cfg: Rc::new(Config::default()) }) });
}}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Lit(String),
    ReqHeader(String),
    RespHeader(String),
    Prop(String),
}

#[derive(Debug, Clone, PartialEq, Default)]
struct Template(Vec<Part>);

impl Template {
    fn parse(src: &str, response_side: bool) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = src;
        while let Some(pos) = rest.find('$') {
            lit.push_str(&rest[..pos]);
            let after = &rest[pos + 1..];
            if let Some(stripped) = after.strip_prefix('$') {
                lit.push('$');
                rest = stripped;
            } else if let Some(inner) = after.strip_prefix('{') {
                let end = inner.find('}').ok_or_else(|| format!("unterminated ${{ in {:?}", src))?;
                let name = inner[..end].trim();
                if name.is_empty() {
                    return Err(format!("empty ${{}} in {:?}", src));
                }
                if !lit.is_empty() {
                    parts.push(Part::Lit(std::mem::take(&mut lit)));
                }
                if let Some(h) = name.strip_prefix("request.header.") {
                    parts.push(Part::ReqHeader(h.to_ascii_lowercase()));
                } else if let Some(h) = name.strip_prefix("response.header.") {
                    if !response_side {
                        return Err(format!("${{{}}} is only available on the response side", name));
                    }
                    parts.push(Part::RespHeader(h.to_ascii_lowercase()));
                } else {
                    parts.push(Part::Prop(name.to_string()));
                }
                rest = &inner[end + 1..];
            } else {
                lit.push('$');
                rest = after;
            }
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Template(parts))
    }

    /// The value of a template without `${…}` (parsing merged its text into one part): set as
    /// is, with no rendering per request. Its line breaks were refused with the configuration.
    fn literal(&self) -> Option<&str> {
        match self.0.as_slice() {
            [] => Some(""),
            [Part::Lit(s)] => Some(s),
            _ => None,
        }
    }

    /// The header value to write, `None` to skip: a templated value that renders empty is
    /// skipped unless `keep_empty`.
    fn value(&self, lookup: &dyn Fn(&Part) -> Option<String>, keep_empty: bool) -> Option<Cow<str>> {
        if let Some(v) = self.literal() {
            return Some(Cow::Borrowed(v));
        }
        let v = self.render(lookup);
        (!v.is_empty() || keep_empty).then_some(Cow::Owned(v))
    }

    fn render(&self, lookup: &dyn Fn(&Part) -> Option<String>) -> String {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Part::Lit(s) => out.push_str(s),
                other => match lookup(other) {
                    Some(v) if out.is_empty() => out = v, // e.g. a value that is one `${…}`
                    Some(v) => out.push_str(&v),
                    None => {}
                },
            }
        }
        // a templated value must not smuggle in a header line break
        if out.contains(['\r', '\n', '\0']) {
            out.retain(|c| c != '\r' && c != '\n' && c != '\0');
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
struct Side {
    remove: Vec<String>,
    rename: Vec<(String, String)>,
    set: Vec<(String, Template)>,
    add: Vec<(String, Template)>,
}

#[derive(Debug, Clone, PartialEq, Default)]
struct Config {
    request: Side,
    response: Side,
    keep_empty: bool,
    /// request headers referenced by response-side templates (captured at request time)
    captured: Vec<String>,
}

fn header_name(at: &str, name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.bytes().enumerate().all(|(i, b)| {
            (i == 0 && b == b':') || b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
        });
    if !ok {
        return Err(format!("{}: invalid header name {:?}", at, name));
    }
    Ok(name.to_ascii_lowercase())
}

/// `{name: value}` or `[{name: …, value: …}]`.
fn pairs(c: &Cfg, key: &str, value_key: &str) -> Result<Vec<(String, String, String)>, String> {
    let at = c.err(key, "").trim_end_matches(": ").to_string();
    match c.value.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Object(members)) => members
            .iter()
            .map(|(k, v)| match v {
                Value::Str(s) => Ok((format!("{}.{}", at, k), k.clone(), s.clone())),
                Value::Int(_) | Value::Float(_) | Value::Bool(_) => Ok((format!("{}.{}", at, k), k.clone(), v.to_json())),
                other => Err(format!("{}.{}: expected a string, got {}", at, k, other.type_name())),
            })
            .collect(),
        Some(Value::Array(_)) => c
            .list(key)?
            .into_iter()
            .map(|item| {
                item.only(&["name", value_key])?;
                let name = item.str("name")?.ok_or_else(|| item.err("name", "required"))?;
                let value = item.str(value_key)?.ok_or_else(|| item.err(value_key, "required"))?;
                Ok((item.at.clone(), name, value))
            })
            .collect(),
        Some(other) => Err(format!("{}: expected a mapping or a list, got {}", at, other.type_name())),
    }
}

fn parse_side(c: &Cfg, response_side: bool) -> Result<Side, String> {
    c.only(&["add", "set", "remove", "rename"])?;
    let mut side = Side::default();
    for name in c.strs("remove")? {
        side.remove.push(header_name(&c.err("remove", "").trim_end_matches(": ").to_string(), &name)?);
    }
    for (at, from, to) in pairs(c, "rename", "to")? {
        side.rename.push((header_name(&at, &from)?, header_name(&at, &to)?));
    }
    for (key, list) in [("set", &mut side.set), ("add", &mut side.add)] {
        for (at, name, value) in pairs(c, key, "value")? {
            if value.contains(['\r', '\n', '\0']) {
                return Err(format!("{}: header value contains a line break or NUL", at));
            }
            let t = Template::parse(&value, response_side).map_err(|e| format!("{}: {}", at, e))?;
            list.push((header_name(&at, &name)?, t));
        }
    }
    Ok(side)
}

impl Config {
    fn parse(bytes: &[u8]) -> Result<Config, String> {
        let v = wasmgate_sdk::config::parse(bytes)?;
        let c = Cfg::root(&v);
        c.only(&["request", "response", "keep_empty"])?;
        let mut cfg = Config {
            request: match c.get("request") {
                Some(r) => parse_side(&r, false)?,
                None => Side::default(),
            },
            response: match c.get("response") {
                Some(r) => parse_side(&r, true)?,
                None => Side::default(),
            },
            keep_empty: c.bool_or("keep_empty", false)?,
            captured: Vec::new(),
        };
        for (_, t) in cfg.response.set.iter().chain(cfg.response.add.iter()) {
            for p in &t.0 {
                if let Part::ReqHeader(h) = p {
                    if !cfg.captured.contains(h) {
                        cfg.captured.push(h.clone());
                    }
                }
            }
        }
        Ok(cfg)
    }
}

struct Root {
    cfg: Rc<Config>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match Config::parse(&bytes) {
            Ok(c) => {
                self.cfg = Rc::new(c);
                true
            }
            Err(e) => {
                error!("headers: bad configuration: {}", e);
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream { cfg: self.cfg.clone(), captured: Vec::new() }))
    }
}

struct Stream {
    cfg: Rc<Config>,
    captured: Vec<(String, Option<String>)>,
}

impl Stream {
    fn prop(&self, name: &str) -> Option<String> {
        let path: Vec<&str> = name.split('.').collect();
        self.get_property(path).map(|b| property::to_text(name, &b))
    }

    fn apply(&self, side: &Side, map: MapType) {
        let get = |name: &str| wasmgate_sdk::hostcalls::get_map_value(map, name).ok().flatten();
        for name in &side.remove {
            let _ = wasmgate_sdk::hostcalls::remove_map_value(map, name);
        }
        if !side.rename.is_empty() {
            let all = wasmgate_sdk::hostcalls::get_map(map).unwrap_or_default();
            for (from, to) in &side.rename {
                let values: Vec<&String> = all.iter().filter(|(k, _)| k.eq_ignore_ascii_case(from)).map(|(_, v)| v).collect();
                if values.is_empty() {
                    continue;
                }
                let _ = wasmgate_sdk::hostcalls::remove_map_value(map, from);
                let _ = wasmgate_sdk::hostcalls::set_map_value(map, to, Some(values[0]));
                for v in &values[1..] {
                    let _ = wasmgate_sdk::hostcalls::add_map_value(map, to, v);
                }
            }
        }
        let lookup = |p: &Part| -> Option<String> {
            match p {
                Part::Lit(s) => Some(s.clone()),
                Part::ReqHeader(h) => {
                    if map == MapType::HttpRequestHeaders {
                        wasmgate_sdk::hostcalls::get_map_value(MapType::HttpRequestHeaders, h).ok().flatten()
                    } else {
                        self.captured.iter().find(|(k, _)| k == h).and_then(|(_, v)| v.clone())
                    }
                }
                Part::RespHeader(h) => get(h),
                Part::Prop(name) => self.prop(name),
            }
        };
        for (name, t) in &side.set {
            if let Some(v) = t.value(&lookup, self.cfg.keep_empty) {
                let _ = wasmgate_sdk::hostcalls::set_map_value(map, name, Some(&v));
            }
        }
        for (name, t) in &side.add {
            if let Some(v) = t.value(&lookup, self.cfg.keep_empty) {
                let _ = wasmgate_sdk::hostcalls::add_map_value(map, name, &v);
            }
        }
    }
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let cfg = self.cfg.clone();
        for h in &cfg.captured {
            let v = self.get_http_request_header(h);
            self.captured.push((h.clone(), v));
        }
        self.apply(&cfg.request, MapType::HttpRequestHeaders);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let cfg = self.cfg.clone();
        self.apply(&cfg.response, MapType::HttpResponseHeaders);
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        let t = Template::parse("id=${request.id} $$5 ${ request.header.X-Foo }$x", false).unwrap();
        assert_eq!(
            t.0,
            vec![
                Part::Lit("id=".into()),
                Part::Prop("request.id".into()),
                Part::Lit(" $5 ".into()),
                Part::ReqHeader("x-foo".into()),
                Part::Lit("$x".into()),
            ]
        );
        assert!(Template::parse("${request.id", false).is_err());
        assert!(Template::parse("${}", false).is_err());
        assert!(Template::parse("${response.header.x}", false).is_err());
        assert!(Template::parse("${response.header.x}", true).is_ok());
        let r = t.render(&|p| match p {
            Part::Prop(_) => Some("abc".into()),
            Part::ReqHeader(_) => Some("v\r\nx".into()),
            _ => None,
        });
        assert_eq!(r, "id=abc $5 vx$x");
    }

    #[test]
    fn config_forms_and_errors() {
        let c = Config::parse(br#"{"request": {"add": [{"name": "X-A", "value": "1"}], "set": {"x-b": "${request.path}"},
            "remove": "x-c", "rename": {"x-d": "x-e"}}, "response": {"set": {"x-id": "${request.header.x-foo}"}}}"#).unwrap();
        assert_eq!(c.request.add[0].0, "x-a");
        assert_eq!(c.request.remove, vec!["x-c"]);
        assert_eq!(c.request.rename, vec![("x-d".to_string(), "x-e".to_string())]);
        assert_eq!(c.captured, vec!["x-foo"]);
        assert!(Config::parse(br#"{"request": {"ad": {}}}"#).unwrap_err().contains("request.ad: unknown key"));
        assert!(Config::parse(br#"{"request": {"set": {"bad name": "x"}}}"#).unwrap_err().contains("invalid header name"));
        assert!(Config::parse(br#"{"request": {"set": {"x": "a\r\nb: c"}}}"#).is_err());
        assert!(Config::parse(br#"{"request": {"set": [{"name": "x"}]}}"#).unwrap_err().contains("value: required"));
        assert!(Config::parse(b"[1]").is_err());
    }

    #[test]
    fn templates_never_panic() {
        let mut rng = wasmgate_sdk::fuzz::Rng(7);
        let seed = "a ${request.id} $$ ${request.header.x-é} b${response.header.y}";
        for _ in 0..20_000 {
            let t = String::from_utf8_lossy(&rng.mutate(seed.as_bytes(), b"${}.$\xc3\xa9")).into_owned();
            if let Ok(t) = Template::parse(&t, true) {
                let out = t.render(&|_| Some("v\r\n".into()));
                assert!(!out.contains(['\r', '\n']));
            }
        }
    }
}
