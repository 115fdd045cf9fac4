//! A msgpack reader into `Value` (the config arrives as msgpack with `encoding: msgpack`).
//!
//! Map keys must be strings or integers (integers become their decimal text); `ext` types
//! and the never-used 0xc1 are errors. Declared lengths are checked against the remaining
//! input before anything is allocated, and nesting is limited to `MAX_DEPTH`.

use crate::value::Value;

pub const MAX_DEPTH: usize = 128;

/// Where and why the input was refused.
pub use crate::value::ParseError as Error;

pub fn parse(input: &[u8]) -> Result<Value, Error> {
    let mut r = Reader { s: input, i: 0 };
    let v = r.value(0)?;
    if r.i != input.len() {
        return Err(r.err("trailing bytes"));
    }
    Ok(v)
}

struct Reader<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, message: &'static str) -> Error {
        Error { offset: self.i, message }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.s.len() - self.i < n {
            return Err(self.err("unexpected end of input"));
        }
        let out = &self.s[self.i..self.i + n];
        self.i += n;
        Ok(out)
    }

    fn uint(&mut self, n: usize) -> Result<u64, Error> {
        let b = self.take(n)?;
        Ok(b.iter().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    fn len_check(&self, n: usize) -> Result<usize, Error> {
        // every element takes at least one byte
        if n > self.s.len() - self.i {
            return Err(self.err("length exceeds input"));
        }
        Ok(n)
    }

    fn str_of(&mut self, n: usize) -> Result<Value, Error> {
        let b = self.take(n)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(Value::Str(s.to_string())),
            Err(_) => Err(self.err("invalid UTF-8 in str")),
        }
    }

    fn array(&mut self, n: usize, depth: usize) -> Result<Value, Error> {
        let n = self.len_check(n)?;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(self.value(depth + 1)?);
        }
        Ok(Value::Array(items))
    }

    fn map(&mut self, n: usize, depth: usize) -> Result<Value, Error> {
        let n = self.len_check(n)?;
        let mut members = Vec::with_capacity(n);
        for _ in 0..n {
            let at = self.i;
            let k = match self.value(depth + 1)? {
                Value::Str(s) => s,
                Value::Int(i) => i.to_string(),
                _ => return Err(Error { offset: at, message: "map key must be a string or an integer" }),
            };
            let v = self.value(depth + 1)?;
            members.push((k, v));
        }
        Ok(Value::Object(members))
    }

    fn value(&mut self, depth: usize) -> Result<Value, Error> {
        if depth >= MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        let b = self.take(1)?[0];
        match b {
            0x00..=0x7f => Ok(Value::Int(b as i64)),
            0x80..=0x8f => self.map((b & 0x0f) as usize, depth),
            0x90..=0x9f => self.array((b & 0x0f) as usize, depth),
            0xa0..=0xbf => self.str_of((b & 0x1f) as usize),
            0xc0 => Ok(Value::Null),
            0xc2 => Ok(Value::Bool(false)),
            0xc3 => Ok(Value::Bool(true)),
            0xc4 | 0xc5 | 0xc6 => {
                let n = self.uint(1 << (b - 0xc4))? as usize;
                Ok(Value::Bin(self.take(n)?.to_vec()))
            }
            0xca => Ok(Value::Float(f32::from_bits(self.uint(4)? as u32) as f64)),
            0xcb => Ok(Value::Float(f64::from_bits(self.uint(8)?))),
            0xcc..=0xcf => {
                let v = self.uint(1 << (b - 0xcc))?;
                Ok(if v <= i64::MAX as u64 { Value::Int(v as i64) } else { Value::Float(v as f64) })
            }
            0xd0 => Ok(Value::Int(self.uint(1)? as u8 as i8 as i64)),
            0xd1 => Ok(Value::Int(self.uint(2)? as u16 as i16 as i64)),
            0xd2 => Ok(Value::Int(self.uint(4)? as u32 as i32 as i64)),
            0xd3 => Ok(Value::Int(self.uint(8)? as i64)),
            0xd9 | 0xda | 0xdb => {
                let n = self.uint(1 << (b - 0xd9))? as usize;
                self.str_of(n)
            }
            0xdc => {
                let n = self.uint(2)? as usize;
                self.array(n, depth)
            }
            0xdd => {
                let n = self.uint(4)? as usize;
                self.array(n, depth)
            }
            0xde => {
                let n = self.uint(2)? as usize;
                self.map(n, depth)
            }
            0xdf => {
                let n = self.uint(4)? as usize;
                self.map(n, depth)
            }
            0xe0..=0xff => Ok(Value::Int(b as i8 as i64)),
            0xc1 => Err(Error { offset: self.i - 1, message: "reserved byte 0xc1" }),
            _ => Err(Error { offset: self.i - 1, message: "ext types are not supported" }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars() {
        assert_eq!(parse(&[0xc0]).unwrap(), Value::Null);
        assert_eq!(parse(&[0xc3]).unwrap(), Value::Bool(true));
        assert_eq!(parse(&[0x7f]).unwrap(), Value::Int(127));
        assert_eq!(parse(&[0xff]).unwrap(), Value::Int(-1));
        assert_eq!(parse(&[0xe0]).unwrap(), Value::Int(-32));
        assert_eq!(parse(&[0xcc, 0xff]).unwrap(), Value::Int(255));
        assert_eq!(parse(&[0xcd, 0x27, 0x10]).unwrap(), Value::Int(10000));
        assert_eq!(parse(&[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).unwrap(), Value::Float(u64::MAX as f64));
        assert_eq!(parse(&[0xd0, 0x80]).unwrap(), Value::Int(-128));
        assert_eq!(parse(&[0xd1, 0xff, 0xfe]).unwrap(), Value::Int(-2));
        assert_eq!(parse(&[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0]).unwrap(), Value::Int(i64::MIN));
        assert_eq!(parse(&[0xca, 0x3f, 0xc0, 0, 0]).unwrap(), Value::Float(1.5));
        assert_eq!(parse(&[0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0]).unwrap(), Value::Float(1.5));
        assert_eq!(parse(&[0xa3, b'a', b'b', b'c']).unwrap(), Value::Str("abc".into()));
        assert_eq!(parse(&[0xd9, 2, b'h', b'i']).unwrap(), Value::Str("hi".into()));
        assert_eq!(parse(&[0xc4, 2, 0, 1]).unwrap(), Value::Bin(vec![0, 1]));
    }

    #[test]
    fn containers() {
        // {"a": [1, {"b": 2}], 7: "x"}
        let bytes = [0x82, 0xa1, b'a', 0x92, 0x01, 0x81, 0xa1, b'b', 0x02, 0x07, 0xa1, b'x'];
        let v = parse(&bytes).unwrap();
        assert_eq!(v.path("a.1.b"), Some(&Value::Int(2)));
        assert_eq!(v.get("7"), Some(&Value::Str("x".into())));
        assert_eq!(parse(&[0xde, 0, 0]).unwrap(), Value::Object(vec![]));
        assert_eq!(parse(&[0xdc, 0, 1, 0xc0]).unwrap(), Value::Array(vec![Value::Null]));
    }

    #[test]
    fn rejects() {
        let cases: [&[u8]; 11] = [
            &[],
            &[0xc1],
            &[0xd4, 0, 0],               // fixext
            &[0xa3, b'a'],               // truncated str
            &[0x92, 0x01],               // truncated array
            &[0xdd, 0xff, 0xff, 0xff, 0xff], // huge array length
            &[0xdf, 0xff, 0xff, 0xff, 0xff], // huge map length
            &[0x81, 0xc0, 0x01],         // nil key
            &[0xa1, 0xff],               // bad UTF-8
            &[0x01, 0x02],               // trailing bytes
            &[0xc6, 0xff, 0xff, 0xff, 0xff], // huge bin
        ];
        for c in cases.iter() {
            assert!(parse(c).is_err(), "accepted {:?}", c);
        }
        let deep = vec![0x91u8; 10_000];
        assert!(parse(&deep).is_err());
    }
}
