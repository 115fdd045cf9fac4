//! base64url (RFC 4648 §5, no padding — as JWTs use) and standard base64 (for HTTP Basic).

const STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn encode(data: &[u8], table: &[u8; 64], pad: bool) -> String {
    let mut out = String::with_capacity((data.len() + 2) / 3 * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = ((b[0] as u32) << 16) | ((b[1] as u32) << 8) | b[2] as u32;
        let chars = chunk.len() + 1;
        for i in 0..4 {
            if i < chars {
                out.push(table[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

fn decode(input: &[u8], table: &[u8; 64], padding_allowed: bool) -> Option<Vec<u8>> {
    let mut body = input;
    if padding_allowed {
        if input.len() % 4 == 0 {
            let mut n = 0;
            while n < 2 && body.last() == Some(&b'=') {
                body = &body[..body.len() - 1];
                n += 1;
            }
        }
    }
    if body.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for &c in body {
        let v = table.iter().position(|&t| t == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // Canonical form only: the leftover bits must be zero.
    if acc != 0 {
        return None;
    }
    Some(out)
}

/// base64url without padding.
pub fn encode_url(data: &[u8]) -> String {
    encode(data, URL, false)
}

/// base64url, strictly unpadded and canonical (`None` on any other character).
pub fn decode_url(input: &str) -> Option<Vec<u8>> {
    decode(input.as_bytes(), URL, false)
}

/// Standard base64 with padding.
pub fn encode_std(data: &[u8]) -> String {
    encode(data, STD, true)
}

/// Standard base64; padding optional.
pub fn decode_std(input: &str) -> Option<Vec<u8>> {
    decode(input.as_bytes(), STD, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4648_vectors() {
        let v = [("", "", ""), ("f", "Zg==", "Zg"), ("fo", "Zm8=", "Zm8"), ("foo", "Zm9v", "Zm9v"),
                 ("foob", "Zm9vYg==", "Zm9vYg"), ("fooba", "Zm9vYmE=", "Zm9vYmE"), ("foobar", "Zm9vYmFy", "Zm9vYmFy")];
        for (plain, std, url) in v {
            assert_eq!(encode_std(plain.as_bytes()), std);
            assert_eq!(encode_url(plain.as_bytes()), url);
            assert_eq!(decode_std(std).unwrap(), plain.as_bytes());
            assert_eq!(decode_std(url).unwrap(), plain.as_bytes());
            assert_eq!(decode_url(url).unwrap(), plain.as_bytes());
        }
    }

    #[test]
    fn url_alphabet_and_rejects() {
        assert_eq!(encode_url(&[0xfb, 0xff]), "-_8");
        assert_eq!(decode_url("-_8").unwrap(), vec![0xfb, 0xff]);
        assert!(decode_url("+/8").is_none());
        assert!(decode_url("Zg==").is_none());
        assert!(decode_url("Z").is_none());
        assert!(decode_url("Zh").is_none()); // non-zero trailing bits
        assert!(decode_url("Zm9v YmFy").is_none());
        assert!(decode_std("Zm9v=").is_none());
    }
}
