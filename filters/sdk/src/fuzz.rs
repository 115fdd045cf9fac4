//! Deterministic robustness tests: the readers must reject, never panic, on arbitrary or
//! mutated input (a panic in a filter is a trap; with `failure_policy: fail_open` it would
//! even skip the filter). Shared helpers are public for the filter crates' own fuzz tests.

/// xorshift64*: tiny deterministic PRNG for tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545F4914F6CDD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// `seed` with a few random byte edits (replace / insert / delete / duplicate a slice).
    pub fn mutate(&mut self, seed: &[u8], alphabet: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..1 + self.below(4) {
            let pos = self.below(v.len() + 1);
            let byte = if self.below(2) == 0 && !alphabet.is_empty() { alphabet[self.below(alphabet.len())] } else { self.next() as u8 };
            match self.below(4) {
                0 if pos < v.len() => v[pos] = byte,
                1 => v.insert(pos, byte),
                2 if pos < v.len() => {
                    v.remove(pos);
                }
                _ => {
                    let end = (pos + self.below(8)).min(v.len());
                    let piece: Vec<u8> = v[pos.min(end)..end].to_vec();
                    let at = self.below(v.len() + 1);
                    for (i, b) in piece.into_iter().enumerate() {
                        v.insert(at + i, b);
                    }
                }
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{base64, hostcalls, json, msgpack};

    const JSON_SEEDS: &[&str] = &[
        r#"{"amount": 12.5, "payment": {"items": [{"amount": 1}, {"amount": "2"}]}, "s": "\u00e9\ud83d\ude00\n"}"#,
        r#"[1, -0, 1e10, 1E-3, true, false, null, "", {}, []]"#,
        r#"{"a":{"b":{"c":{"d":[[[[]]]]}}}}"#,
    ];

    #[test]
    fn json_never_panics() {
        let mut rng = Rng(0x9E3779B97F4A7C15);
        let alphabet = b"{}[]\":,\\u0123456789.eE+-tfn \x00\xff";
        for seed in JSON_SEEDS {
            let v = json::parse(seed.as_bytes()).unwrap();
            assert_eq!(json::parse(v.to_json().as_bytes()).unwrap(), v);
            for _ in 0..20_000 {
                let input = rng.mutate(seed.as_bytes(), alphabet);
                if let Ok(v) = json::parse(&input) {
                    // whatever parses must re-serialize to something that parses to the same
                    assert_eq!(json::parse(v.to_json().as_bytes()).unwrap(), v);
                }
            }
        }
        for _ in 0..5_000 {
            let len = rng.below(64);
            let input: Vec<u8> = (0..len).map(|_| alphabet[rng.below(alphabet.len())]).collect();
            let _ = json::parse(&input);
        }
    }

    #[test]
    fn msgpack_never_panics() {
        let mut rng = Rng(0xD1B54A32D192ED03);
        let seed = [
            0x84, 0xa1, b'a', 0x92, 0x01, 0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0, 0xa1, b'b', 0xde, 0x00, 0x01, 0xd9, 0x01,
            b'k', 0xc4, 0x02, 1, 2, 0x05, 0xdc, 0x00, 0x02, 0xc0, 0xc3, 0xa1, b'n', 0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert!(msgpack::parse(&seed).is_ok());
        for _ in 0..50_000 {
            let _ = msgpack::parse(&rng.mutate(&seed, &[0xdd, 0xdf, 0xc6, 0xdb, 0xff, 0x00]));
        }
    }

    #[test]
    fn base64_and_maps_never_panic() {
        let mut rng = Rng(0x0123456789ABCDEF);
        let b = base64::encode_url(b"some bytes to encode, ok?");
        let m = hostcalls::serialize_map(&[(":path", "/a"), ("x-k", "v")]);
        for _ in 0..20_000 {
            let s = rng.mutate(b.as_bytes(), b"-_+/=A\xc3\xa9");
            let s = String::from_utf8_lossy(&s).into_owned();
            if let Some(d) = base64::decode_url(&s) {
                assert_eq!(base64::encode_url(&d), s);
            }
            let _ = base64::decode_std(&s);
            let _ = hostcalls::deserialize_map(&rng.mutate(&m, &[0, 0xff, 1]));
        }
    }
}
