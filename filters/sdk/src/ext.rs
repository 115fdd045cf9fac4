//! wasmgate's host extensions, reached through `proxy_call_foreign_function` (the ABI's door
//! for host-specific calls). Another host (Envoy, …) answers `NotFound`: fall back to the
//! plain ABI call.

use crate::hostcalls;
use crate::types::Status;

/// Name of the foreign function behind [`set_shared_data_ttl`].
pub const SET_SHARED_DATA_TTL: &str = "wasmgate.set_shared_data_ttl";

/// `set_shared_data` whose entry expires `ttl_ns` nanoseconds from now: afterwards it reads as
/// absent (any cas creates it anew), and before that the host may drop it — earliest deadline
/// first — when a write needs room. Use it for entries that carry no information once their
/// deadline has passed (a token bucket that is full again). `ttl_ns == 0` deletes the key (if
/// the cas matches). Same statuses as `set_shared_data` (`CasMismatch`, `InternalFailure` when
/// there is no room); `Err(NotFound)`: this host has no such extension.
pub fn set_shared_data_ttl(key: &str, value: Option<&[u8]>, cas: Option<u32>, ttl_ns: u64) -> Result<(), Status> {
    let args = set_ttl_args(key.as_bytes(), value.unwrap_or(&[]), cas.unwrap_or(0), ttl_ns);
    status_of(hostcalls::call_foreign_function(SET_SHARED_DATA_TTL, Some(&args))?)
}

/// The arguments: `cas u32 | ttl_ns u64 | key_size u32 | key | value`, little-endian.
pub fn set_ttl_args(key: &[u8], value: &[u8], cas: u32, ttl_ns: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + key.len() + value.len());
    out.extend_from_slice(&cas.to_le_bytes());
    out.extend_from_slice(&ttl_ns.to_le_bytes());
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    out
}

/// The write's status, carried in the result (u32 LE) so that no SDK panics on it.
pub fn status_of(result: Option<Vec<u8>>) -> Result<(), Status> {
    match result.as_deref() {
        Some([a, b, c, d]) => match Status::from_u32(u32::from_le_bytes([*a, *b, *c, *d])) {
            Status::Ok => Ok(()),
            s => Err(s),
        },
        _ => Err(Status::SerializationFailure),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_layout() {
        let a = set_ttl_args(b"key", b"val", 0xFFFF_FFFF, 1_000);
        assert_eq!(&a[..4], &[0xFF; 4]);
        assert_eq!(&a[4..12], &1_000u64.to_le_bytes());
        assert_eq!(&a[12..16], &3u32.to_le_bytes());
        assert_eq!(&a[16..], b"keyval");
    }

    #[test]
    fn statuses() {
        assert_eq!(status_of(Some(vec![0, 0, 0, 0])), Ok(()));
        assert_eq!(status_of(Some(vec![8, 0, 0, 0])), Err(Status::CasMismatch));
        assert_eq!(status_of(Some(vec![10, 0, 0, 0])), Err(Status::InternalFailure));
        assert_eq!(status_of(None), Err(Status::SerializationFailure));
        assert_eq!(status_of(Some(vec![0])), Err(Status::SerializationFailure));
    }
}
