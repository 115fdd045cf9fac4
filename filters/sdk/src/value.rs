//! A parsed configuration / JSON / msgpack value, with nested-path lookup.

/// A refusal by the JSON or msgpack reader: the byte offset and what was wrong there.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    pub offset: usize,
    pub message: &'static str,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at byte {}", self.message, self.offset)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// Integers that fit in i64 (JSON integers without fraction/exponent; msgpack ints).
    Int(i64),
    Float(f64),
    Str(String),
    /// msgpack `bin` (JSON has no binary type).
    Bin(Vec<u8>),
    Array(Vec<Value>),
    /// Keys in document order; lookups take the last duplicate (as JavaScript does).
    Object(Vec<(String, Value)>),
}

impl Value {
    /// Member of an object (`None` for other types or a missing key).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(members) => members.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Nested lookup by a dotted path: `"payment.amount"`, `"items.0.price"` (a numeric
    /// segment indexes an array). An empty path is the value itself.
    pub fn path(&self, dotted: &str) -> Option<&Value> {
        if dotted.is_empty() {
            return Some(self);
        }
        let mut cur = self;
        for seg in dotted.split('.') {
            cur = match cur {
                Value::Object(_) => cur.get(seg)?,
                Value::Array(items) => items.get(seg.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(cur)
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// Integers, and floats with an integral value inside the i64 range.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Float(f) if f.fract() == 0.0 && *f >= -9.2e18 && *f <= 9.2e18 => Some(*f as i64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_object(&self) -> Option<&[(String, Value)]> {
        match self {
            Value::Object(o) => Some(o),
            _ => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Int(_) | Value::Float(_) => "number",
            Value::Str(_) => "string",
            Value::Bin(_) => "binary",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }

    /// Serialize as compact JSON (`Bin` becomes a base64url string, non-finite floats `null`).
    pub fn to_json(&self) -> String {
        let mut out = String::new();
        write_json(self, &mut out);
        out
    }
}

fn write_json(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int(i) => out.push_str(&i.to_string()),
        Value::Float(f) => {
            if f.is_finite() {
                out.push_str(&format!("{:?}", f))
            } else {
                out.push_str("null")
            }
        }
        Value::Str(s) => out.push_str(&crate::json::quote(s)),
        Value::Bin(b) => out.push_str(&crate::json::quote(&crate::base64::encode_url(b))),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(item, out);
            }
            out.push(']');
        }
        Value::Object(members) => {
            out.push('{');
            for (i, (k, item)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&crate::json::quote(k));
                out.push(':');
                write_json(item, out);
            }
            out.push('}');
        }
    }
}
