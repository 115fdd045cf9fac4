//! Reading a filter's configuration.
//!
//! The gateway hands a filter's `config:` mapping over as JSON (default) or msgpack
//! (`encoding: msgpack`); a YAML string arrives as is. `parse` tells them apart by the first
//! byte: a msgpack map/array header (0x80–0x9f, 0xdc–0xdf) means msgpack, anything else is
//! read as JSON. Empty configuration reads as an empty object.

use crate::value::Value;

pub fn parse(bytes: &[u8]) -> Result<Value, String> {
    let first = bytes.iter().copied().find(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'));
    match first {
        None => Ok(Value::Object(Vec::new())),
        Some(0x80..=0x9f | 0xdc..=0xdf) => parse_msgpack(bytes),
        Some(_) => parse_json(bytes),
    }
}

pub fn parse_json(bytes: &[u8]) -> Result<Value, String> {
    crate::json::parse(bytes).map_err(|e| format!("configuration is not valid JSON: {}", e))
}

pub fn parse_msgpack(bytes: &[u8]) -> Result<Value, String> {
    crate::msgpack::parse(bytes).map_err(|e| format!("configuration is not valid msgpack: {}", e))
}

/// Typed accessors that produce readable configuration errors (`"jwt.clock_skew_s: expected
/// a number, got string"`). `at` is the path used in messages.
pub struct Cfg<'a> {
    pub value: &'a Value,
    pub at: String,
}

impl<'a> Cfg<'a> {
    pub fn root(value: &'a Value) -> Cfg<'a> {
        Cfg { value, at: String::new() }
    }

    fn child_path(&self, key: &str) -> String {
        if self.at.is_empty() {
            key.to_string()
        } else {
            format!("{}.{}", self.at, key)
        }
    }

    pub fn err(&self, key: &str, msg: &str) -> String {
        format!("{}: {}", self.child_path(key), msg)
    }

    /// Reject keys not in `known` (catches typos in the YAML).
    pub fn only(&self, known: &[&str]) -> Result<(), String> {
        match self.value {
            Value::Object(members) => {
                for (k, _) in members {
                    if !known.contains(&k.as_str()) {
                        return Err(format!("{}: unknown key (known: {})", self.child_path(k), known.join(", ")));
                    }
                }
                Ok(())
            }
            other => Err(format!("{}: expected a mapping, got {}", if self.at.is_empty() { "config" } else { &self.at }, other.type_name())),
        }
    }

    pub fn get(&self, key: &str) -> Option<Cfg<'a>> {
        match self.value.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(Cfg { value: v, at: self.child_path(key) }),
        }
    }

    pub fn str(&self, key: &str) -> Result<Option<String>, String> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.err(key, &format!("expected a string, got {}", v.type_name()))),
        }
    }

    pub fn str_or(&self, key: &str, default: &str) -> Result<String, String> {
        Ok(self.str(key)?.unwrap_or_else(|| default.to_string()))
    }

    pub fn f64(&self, key: &str) -> Result<Option<f64>, String> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(key, &format!("expected a number, got {}", v.type_name()))),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(key, &format!("expected true or false, got {}", v.type_name()))),
        }
    }

    /// A string or a list of strings.
    pub fn strs(&self, key: &str) -> Result<Vec<String>, String> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Str(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().map(|s| s.to_string()).ok_or_else(|| self.err(key, "expected a list of strings")))
                .collect(),
            Some(v) => Err(self.err(key, &format!("expected a string or a list of strings, got {}", v.type_name()))),
        }
    }

    pub fn list(&self, key: &str) -> Result<Vec<Cfg<'a>>, String> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => Ok(items
                .iter()
                .enumerate()
                .map(|(i, v)| Cfg { value: v, at: format!("{}[{}]", self.child_path(key), i) })
                .collect()),
            Some(v) => Err(self.err(key, &format!("expected a list, got {}", v.type_name()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_encoding() {
        assert_eq!(parse(b"").unwrap(), Value::Object(vec![]));
        assert_eq!(parse(b"  \n").unwrap(), Value::Object(vec![]));
        assert_eq!(parse(b" {\"a\": 1}").unwrap().get("a"), Some(&Value::Int(1)));
        assert_eq!(parse(&[0x81, 0xa1, b'a', 0x01]).unwrap().get("a"), Some(&Value::Int(1)));
        assert_eq!(parse(&[0x91, 0x01]).unwrap(), Value::Array(vec![Value::Int(1)]));
        assert!(parse(b"{oops").unwrap_err().contains("JSON"));
        assert!(parse(&[0x81, 0xa1]).unwrap_err().contains("msgpack"));
    }

    #[test]
    fn cfg_accessors() {
        let v = parse(br#"{"a": "x", "n": 2, "b": true, "l": ["p", "q"], "s": "one", "o": {"k": 1}}"#).unwrap();
        let c = Cfg::root(&v);
        assert_eq!(c.str("a").unwrap().as_deref(), Some("x"));
        assert_eq!(c.str("zz").unwrap(), None);
        assert!(c.str("n").unwrap_err().contains("n: expected a string"));
        assert_eq!(c.f64("n").unwrap(), Some(2.0));
        assert!(c.bool_or("b", false).unwrap());
        assert_eq!(c.strs("l").unwrap(), vec!["p", "q"]);
        assert_eq!(c.strs("s").unwrap(), vec!["one"]);
        let o = c.get("o").unwrap();
        assert!(o.only(&["x"]).unwrap_err().contains("o.k: unknown key"));
        assert!(c.only(&["a", "n", "b", "l", "s", "o"]).is_ok());
    }
}
