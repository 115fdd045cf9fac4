//! base64url (RFC 4648 §5, no padding — as JWTs use) and standard base64 (for HTTP Basic), on
//! the `base64` crate (re-exported from the crate root). These wrappers pin the strictness the
//! auth filter relies on: canonical input only (non-zero leftover bits are rejected), no
//! whitespace, and no `=` at all in base64url.

use ::base64::{decode_config, encode_config, STANDARD, URL_SAFE_NO_PAD};

/// base64url without padding.
pub fn encode_url(data: &[u8]) -> String {
    encode_config(data, URL_SAFE_NO_PAD)
}

/// base64url, strictly unpadded and canonical (`None` on any other character).
pub fn decode_url(input: &str) -> Option<Vec<u8>> {
    // The crate's decoder takes padding whatever the config says; a JWT part never has any.
    if input.contains('=') {
        return None;
    }
    decode_config(input, URL_SAFE_NO_PAD).ok()
}

/// Standard base64 with padding.
pub fn encode_std(data: &[u8]) -> String {
    encode_config(data, STANDARD)
}

/// Standard base64; padding optional.
pub fn decode_std(input: &str) -> Option<Vec<u8>> {
    decode_config(input, STANDARD).ok()
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
