//! RESP2, the Redis wire protocol: build a command for `redis_call`, read the reply the host
//! hands back in buffer 9 (`get_redis_call_response`). Error replies are values (`Value::Error`),
//! not Rust errors: `Err` means the bytes are not (yet) one whole reply.

/// One command: a RESP array of bulk strings (what redis-cli and the SDKs of Higress send).
pub fn command<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.as_ref().len() + 16).sum::<usize>());
    out.push(b'*');
    out.extend_from_slice(args.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for a in args {
        let a = a.as_ref();
        out.push(b'$');
        out.extend_from_slice(a.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A reply. `Nil` is both RESP2 nulls (`$-1` and `*-1`).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Vec<u8>),
    Array(Vec<Value>),
    Nil,
}

impl Value {
    /// The text of a simple or bulk string, or an integer's decimal form.
    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Simple(s) => Some(s.clone()),
            Value::Bulk(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::Integer(n) => Some(n.to_string()),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Integer(n) => Some(*n),
            Value::Bulk(_) | Value::Simple(_) => self.as_text()?.trim().parse().ok(),
            _ => None,
        }
    }

    /// The error code of an error reply (`NOSCRIPT`, `ERR`, `WRONGPASS` ...).
    pub fn error_code(&self) -> Option<&str> {
        match self {
            Value::Error(e) => Some(e.split(' ').next().unwrap_or("")),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum DecodeError {
    /// The bytes end before the reply does.
    Incomplete,
    /// Not RESP2.
    Invalid(&'static str),
}

const MAX_DEPTH: usize = 32;

/// Decode exactly one reply that fills `bytes` (what buffer 9 holds).
pub fn decode(bytes: &[u8]) -> Result<Value, DecodeError> {
    let (v, used) = decode_prefix(bytes)?;
    if used != bytes.len() {
        return Err(DecodeError::Invalid("bytes after the reply"));
    }
    Ok(v)
}

/// Decode the reply at the start of `bytes`: (value, bytes used).
pub fn decode_prefix(bytes: &[u8]) -> Result<(Value, usize), DecodeError> {
    let mut pos = 0;
    let v = value(bytes, &mut pos, 0)?;
    Ok((v, pos))
}

fn line<'a>(b: &'a [u8], pos: &mut usize) -> Result<&'a [u8], DecodeError> {
    let rest = &b[*pos..];
    let end = rest.windows(2).position(|w| w == b"\r\n").ok_or(DecodeError::Incomplete)?;
    *pos += end + 2;
    Ok(&rest[..end])
}

fn int(text: &[u8]) -> Result<i64, DecodeError> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or(DecodeError::Invalid("bad integer"))
}

fn value(b: &[u8], pos: &mut usize, depth: usize) -> Result<Value, DecodeError> {
    if depth > MAX_DEPTH {
        return Err(DecodeError::Invalid("nested too deep"));
    }
    let kind = *b.get(*pos).ok_or(DecodeError::Incomplete)?;
    *pos += 1;
    let head = line(b, pos)?;
    match kind {
        b'+' => Ok(Value::Simple(String::from_utf8_lossy(head).into_owned())),
        b'-' => Ok(Value::Error(String::from_utf8_lossy(head).into_owned())),
        b':' => Ok(Value::Integer(int(head)?)),
        b'$' => {
            let n = int(head)?;
            if n < 0 {
                return Ok(Value::Nil);
            }
            let n = n as usize;
            let end = pos.checked_add(n).ok_or(DecodeError::Invalid("bad length"))?;
            if b.len() < end + 2 {
                return Err(DecodeError::Incomplete);
            }
            if &b[end..end + 2] != b"\r\n" {
                return Err(DecodeError::Invalid("bulk string not terminated"));
            }
            let data = b[*pos..end].to_vec();
            *pos = end + 2;
            Ok(Value::Bulk(data))
        }
        b'*' => {
            let n = int(head)?;
            if n < 0 {
                return Ok(Value::Nil);
            }
            // Each element takes at least 3 bytes: a count beyond that is not a whole reply.
            if n as usize > (b.len() - *pos) / 3 + 1 {
                return Err(DecodeError::Incomplete);
            }
            let mut items = Vec::with_capacity(n as usize);
            for _ in 0..n {
                items.push(value(b, pos, depth + 1)?);
            }
            Ok(Value::Array(items))
        }
        _ => Err(DecodeError::Invalid("unknown reply type")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_a_command_as_bulk_strings() {
        assert_eq!(command(&["SET", "k", "v1"]), b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nv1\r\n".to_vec());
        assert_eq!(command(&[b"GET".as_ref(), b"a\r\nb".as_ref()]), b"*2\r\n$3\r\nGET\r\n$4\r\na\r\nb\r\n".to_vec());
        assert_eq!(command::<&str>(&[]), b"*0\r\n".to_vec());
    }

    #[test]
    fn decodes_every_reply_type() {
        assert_eq!(decode(b"+OK\r\n"), Ok(Value::Simple("OK".into())));
        assert_eq!(decode(b"-NOSCRIPT No matching script\r\n").unwrap().error_code(), Some("NOSCRIPT"));
        assert_eq!(decode(b":-42\r\n"), Ok(Value::Integer(-42)));
        assert_eq!(decode(b"$5\r\na\r\nbc\r\n"), Ok(Value::Bulk(b"a\r\nbc".to_vec())));
        assert_eq!(decode(b"$0\r\n\r\n"), Ok(Value::Bulk(vec![])));
        assert_eq!(decode(b"$-1\r\n"), Ok(Value::Nil));
        assert_eq!(decode(b"*-1\r\n"), Ok(Value::Nil));
        assert_eq!(
            decode(b"*3\r\n:1\r\n$3\r\n2.5\r\n*1\r\n+x\r\n"),
            Ok(Value::Array(vec![Value::Integer(1), Value::Bulk(b"2.5".to_vec()), Value::Array(vec![Value::Simple("x".into())])]))
        );
        assert_eq!(decode(b"$3\r\n2.5\r\n").unwrap().as_text().as_deref(), Some("2.5"));
        assert_eq!(decode(b"$2\r\n17\r\n").unwrap().as_int(), Some(17));
    }

    #[test]
    fn incomplete_and_invalid_are_errors_never_panics() {
        for cut in [&b""[..], b"+OK", b"$5\r\nab", b"*2\r\n:1\r\n", b"$3\r\nabc"] {
            assert_eq!(decode(cut), Err(DecodeError::Incomplete), "{:?}", cut);
        }
        assert!(matches!(decode(b"?x\r\n"), Err(DecodeError::Invalid(_))));
        assert!(matches!(decode(b":1x\r\n"), Err(DecodeError::Invalid(_))));
        assert!(matches!(decode(b"$3\r\nabcd\r\n"), Err(DecodeError::Invalid(_))));
        assert!(matches!(decode(b"+OK\r\n+OK\r\n"), Err(DecodeError::Invalid(_))));
        assert_eq!(decode(b"*99999999999\r\n"), Err(DecodeError::Incomplete));
        let deep = "*1\r\n".repeat(100) + ":1\r\n";
        assert!(matches!(decode(deep.as_bytes()), Err(DecodeError::Invalid(_))));
        let mut rng = crate::fuzz::Rng(11);
        let seed = b"*3\r\n:1\r\n$3\r\nabc\r\n-ERR x\r\n";
        for _ in 0..5_000 {
            let _ = decode(&rng.mutate(seed, b"*$:+-\r\n0123456789"));
        }
    }

    #[test]
    fn roundtrip_of_a_command_through_the_decoder() {
        let q = command(&["EVALSHA", "abc", "1", "key"]);
        assert_eq!(
            decode(&q),
            Ok(Value::Array(["EVALSHA", "abc", "1", "key"].iter().map(|s| Value::Bulk(s.as_bytes().to_vec())).collect()))
        );
    }
}
