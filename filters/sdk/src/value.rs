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
}
