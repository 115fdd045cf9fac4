//! Decoding property values (Envoy encoding: strings raw, ints/timestamps 8-byte LE,
//! bools one byte).

/// Properties Envoy returns as 8-byte little-endian integers.
pub const INT_PROPERTIES: &[&str] = &[
    "source.port", "destination.port", "upstream.port", "connection.id",
    "request.time", "request.duration", "request.size", "request.total_size", "request.headers_bytes",
    "response.code", "response.size", "response.total_size", "response.headers_bytes",
    "response.grpc_status", "response.flags", "response.backend_latency",
    "upstream.request_attempt_count", "upstream.num_endpoints",
];

/// Properties Envoy returns as a single 0/1 byte.
pub const BOOL_PROPERTIES: &[&str] = &["connection.mtls"];

pub fn as_i64(bytes: &[u8]) -> Option<i64> {
    if bytes.len() != 8 {
        return None;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(bytes);
    Some(i64::from_le_bytes(b))
}

/// Render a property value as text, knowing its dotted name: known ints/bools are decoded;
/// anything else is taken as a UTF-8 string (lossily).
pub fn to_text(name: &str, bytes: &[u8]) -> String {
    if INT_PROPERTIES.contains(&name) {
        if let Some(i) = as_i64(bytes) {
            return i.to_string();
        }
    }
    if BOOL_PROPERTIES.contains(&name) && bytes.len() == 1 {
        return if bytes[0] != 0 { "true".into() } else { "false".into() };
    }
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_envoy_values() {
        assert_eq!(to_text("response.code", &200i64.to_le_bytes()), "200");
        assert_eq!(to_text("source.port", &54321i64.to_le_bytes()), "54321");
        assert_eq!(to_text("source.address", b"10.1.2.3:54321"), "10.1.2.3:54321");
        assert_eq!(to_text("connection.mtls", &[1]), "true");
        assert_eq!(to_text("request.path", b"12345678"), "12345678");
        assert_eq!(as_i64(&[1, 2]), None);
    }
}
