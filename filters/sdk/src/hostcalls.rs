//! One safe wrapper per `env.proxy_*` host call (same names as proxy-wasm-rust-sdk
//! `src/hostcalls.rs`). Every wrapper returns a `Result`; a status the wrapper does not treat
//! as a normal outcome comes back as `Err(status)` — nothing here panics.
//!
//! The raw imports exist only on `wasm32`; on any other target (host `cargo test`) each is a
//! stub answering `Unimplemented`, so the pure parts of the SDK and the filters link and test.

use crate::types::*;
use std::ptr::{null, null_mut};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

macro_rules! imports {
    ($( fn $name:ident ( $( $arg:ident : $ty:ty ),* ) -> $ret:ty ; )*) => {
        #[cfg(target_arch = "wasm32")]
        #[link(wasm_import_module = "env")]
        extern "C" {
            $( fn $name( $( $arg : $ty ),* ) -> $ret; )*
        }
        $(
            #[cfg(not(target_arch = "wasm32"))]
            #[allow(unused_variables, clippy::missing_safety_doc)]
            unsafe fn $name( $( $arg : $ty ),* ) -> $ret { Status::Unimplemented as u32 }
        )*
    };
}

imports! {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_log_level(return_level: *mut u32) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(buffer_type: u32, start: usize, max_size: usize, return_buffer_data: *mut *mut u8, return_buffer_size: *mut usize) -> u32;
    fn proxy_set_buffer_bytes(buffer_type: u32, start: usize, size: usize, buffer_data: *const u8, buffer_size: usize) -> u32;
    fn proxy_get_header_map_pairs(map_type: u32, return_map_data: *mut *mut u8, return_map_size: *mut usize) -> u32;
    fn proxy_set_header_map_pairs(map_type: u32, map_data: *const u8, map_size: usize) -> u32;
    fn proxy_get_header_map_value(map_type: u32, key_data: *const u8, key_size: usize, return_value_data: *mut *mut u8, return_value_size: *mut usize) -> u32;
    fn proxy_replace_header_map_value(map_type: u32, key_data: *const u8, key_size: usize, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_add_header_map_value(map_type: u32, key_data: *const u8, key_size: usize, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_get_property(path_data: *const u8, path_size: usize, return_value_data: *mut *mut u8, return_value_size: *mut usize) -> u32;
    fn proxy_set_property(path_data: *const u8, path_size: usize, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_get_shared_data(key_data: *const u8, key_size: usize, return_value_data: *mut *mut u8, return_value_size: *mut usize, return_cas: *mut u32) -> u32;
    fn proxy_set_shared_data(key_data: *const u8, key_size: usize, value_data: *const u8, value_size: usize, cas: u32) -> u32;
    fn proxy_register_shared_queue(name_data: *const u8, name_size: usize, return_id: *mut u32) -> u32;
    fn proxy_resolve_shared_queue(vm_id_data: *const u8, vm_id_size: usize, name_data: *const u8, name_size: usize, return_id: *mut u32) -> u32;
    fn proxy_dequeue_shared_queue(queue_id: u32, return_value_data: *mut *mut u8, return_value_size: *mut usize) -> u32;
    fn proxy_enqueue_shared_queue(queue_id: u32, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_close_stream(stream_type: u32) -> u32;
    fn proxy_send_local_response(status_code: u32, status_code_details_data: *const u8, status_code_details_size: usize, body_data: *const u8, body_size: usize, headers_data: *const u8, headers_size: usize, grpc_status: i32) -> u32;
    fn proxy_http_call(upstream_data: *const u8, upstream_size: usize, headers_data: *const u8, headers_size: usize, body_data: *const u8, body_size: usize, trailers_data: *const u8, trailers_size: usize, timeout: u32, return_token: *mut u32) -> u32;
    fn proxy_grpc_call(upstream_data: *const u8, upstream_size: usize, service_name_data: *const u8, service_name_size: usize, method_name_data: *const u8, method_name_size: usize, initial_metadata_data: *const u8, initial_metadata_size: usize, message_data: *const u8, message_size: usize, timeout: u32, return_callout_id: *mut u32) -> u32;
    fn proxy_grpc_stream(upstream_data: *const u8, upstream_size: usize, service_name_data: *const u8, service_name_size: usize, method_name_data: *const u8, method_name_size: usize, initial_metadata_data: *const u8, initial_metadata_size: usize, return_stream_id: *mut u32) -> u32;
    fn proxy_grpc_send(token: u32, message_ptr: *const u8, message_len: usize, end_stream: u32) -> u32;
    fn proxy_grpc_cancel(token_id: u32) -> u32;
    fn proxy_grpc_close(token_id: u32) -> u32;
    fn proxy_get_status(return_code: *mut u32, return_message_data: *mut *mut u8, return_message_size: *mut usize) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_call_foreign_function(function_name_data: *const u8, function_name_size: usize, arguments_data: *const u8, arguments_size: usize, results_data: *mut *mut u8, results_size: *mut usize) -> u32;
    fn proxy_done() -> u32;
    fn proxy_define_metric(metric_type: u32, name_data: *const u8, name_size: usize, return_id: *mut u32) -> u32;
    fn proxy_get_metric(metric_id: u32, return_value: *mut u64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_redis_init(upstream_data: *const u8, upstream_size: usize, username_data: *const u8, username_size: usize, password_data: *const u8, password_size: usize, timeout: u32) -> u32;
    fn proxy_redis_call(upstream_data: *const u8, upstream_size: usize, query_data: *const u8, query_size: usize, return_token: *mut u32) -> u32;
}

fn st(v: u32) -> Status {
    Status::from_u32(v)
}

fn ok(v: u32) -> Result<(), Status> {
    match st(v) {
        Status::Ok => Ok(()),
        s => Err(s),
    }
}

/// Take ownership of a host-allocated buffer (allocated through `proxy_on_memory_allocate`).
unsafe fn take(ptr: *mut u8, size: usize) -> Option<Bytes> {
    if ptr.is_null() || size == 0 {
        return None;
    }
    Some(Vec::from_raw_parts(ptr, size, size))
}

fn ptr_of(value: Option<&[u8]>) -> (*const u8, usize) {
    match value {
        Some(v) if !v.is_empty() => (v.as_ptr(), v.len()),
        _ => (null(), 0),
    }
}

pub fn log(level: LogLevel, message: &str) -> Result<(), Status> {
    unsafe { ok(proxy_log(level as u32, message.as_ptr(), message.len())) }
}

pub fn get_log_level() -> Result<LogLevel, Status> {
    let mut level = 0u32;
    unsafe { ok(proxy_get_log_level(&mut level))? };
    Ok(LogLevel::from_u32(level))
}

/// Wall-clock nanoseconds since the Unix epoch, from `proxy_get_current_time_nanoseconds`.
pub fn get_current_time_nanos() -> Result<u64, Status> {
    let mut t = 0u64;
    unsafe { ok(proxy_get_current_time_nanoseconds(&mut t))? };
    Ok(t)
}

pub fn get_current_time() -> Result<SystemTime, Status> {
    Ok(UNIX_EPOCH + Duration::from_nanos(get_current_time_nanos()?))
}

pub fn set_tick_period(period: Duration) -> Result<(), Status> {
    unsafe { ok(proxy_set_tick_period_milliseconds(period.as_millis() as u32)) }
}

/// `Ok(None)` when the buffer is absent in this callback (`NotFound`) or empty.
pub fn get_buffer(buffer_type: BufferType, start: usize, max_size: usize) -> Result<Option<Bytes>, Status> {
    let mut ptr: *mut u8 = null_mut();
    let mut size: usize = 0;
    unsafe {
        match st(proxy_get_buffer_bytes(buffer_type as u32, start, max_size, &mut ptr, &mut size)) {
            Status::Ok => Ok(take(ptr, size)),
            Status::NotFound => Ok(None),
            s => Err(s),
        }
    }
}

pub fn set_buffer(buffer_type: BufferType, start: usize, size: usize, value: &[u8]) -> Result<(), Status> {
    unsafe { ok(proxy_set_buffer_bytes(buffer_type as u32, start, size, value.as_ptr(), value.len())) }
}

pub fn get_map(map_type: MapType) -> Result<Vec<(String, String)>, Status> {
    Ok(get_map_bytes(map_type)?
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
        .collect())
}

pub fn get_map_bytes(map_type: MapType) -> Result<Vec<(String, Bytes)>, Status> {
    deserialize_map(&get_map_serialized(map_type)?).ok_or(Status::ParseFailure)
}

/// The map as the host serialized it (§4.1; empty for an empty map): read it with
/// `map_pairs` to look at every pair without copying one.
pub fn get_map_serialized(map_type: MapType) -> Result<Bytes, Status> {
    let mut ptr: *mut u8 = null_mut();
    let mut size: usize = 0;
    unsafe {
        ok(proxy_get_header_map_pairs(map_type as u32, &mut ptr, &mut size))?;
        Ok(take(ptr, size).unwrap_or_default())
    }
}

pub fn set_map(map_type: MapType, map: &[(&str, &str)]) -> Result<(), Status> {
    let data = serialize_map(map);
    unsafe { ok(proxy_set_header_map_pairs(map_type as u32, data.as_ptr(), data.len())) }
}

/// `Ok(None)` for a missing key; `Ok(Some(""))` for a present, empty value.
pub fn get_map_value(map_type: MapType, key: &str) -> Result<Option<String>, Status> {
    Ok(get_map_value_bytes(map_type, key)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
}

pub fn get_map_value_bytes(map_type: MapType, key: &str) -> Result<Option<Bytes>, Status> {
    let mut ptr: *mut u8 = null_mut();
    let mut size: usize = 0;
    unsafe {
        match st(proxy_get_header_map_value(map_type as u32, key.as_ptr(), key.len(), &mut ptr, &mut size)) {
            Status::Ok => Ok(Some(take(ptr, size).unwrap_or_default())),
            Status::NotFound => Ok(None),
            s => Err(s),
        }
    }
}

/// Replace every value of `key` (`Some`) or remove the key (`None`).
pub fn set_map_value(map_type: MapType, key: &str, value: Option<&str>) -> Result<(), Status> {
    unsafe {
        match value {
            Some(v) => ok(proxy_replace_header_map_value(map_type as u32, key.as_ptr(), key.len(), v.as_ptr(), v.len())),
            None => ok(proxy_remove_header_map_value(map_type as u32, key.as_ptr(), key.len())),
        }
    }
}

pub fn add_map_value(map_type: MapType, key: &str, value: &str) -> Result<(), Status> {
    unsafe { ok(proxy_add_header_map_value(map_type as u32, key.as_ptr(), key.len(), value.as_ptr(), value.len())) }
}

pub fn remove_map_value(map_type: MapType, key: &str) -> Result<(), Status> {
    set_map_value(map_type, key, None)
}

/// Property value in Envoy encoding (strings raw, ints 8-byte LE …); `Ok(None)` if unknown.
pub fn get_property(path: &[&str]) -> Result<Option<Bytes>, Status> {
    let data = serialize_property_path(path);
    let mut ptr: *mut u8 = null_mut();
    let mut size: usize = 0;
    unsafe {
        match st(proxy_get_property(data.as_ptr(), data.len(), &mut ptr, &mut size)) {
            Status::Ok => Ok(take(ptr, size)),
            Status::NotFound => Ok(None),
            s => Err(s),
        }
    }
}

pub fn set_property(path: &[&str], value: Option<&[u8]>) -> Result<(), Status> {
    let data = serialize_property_path(path);
    let (vp, vl) = ptr_of(value);
    unsafe { ok(proxy_set_property(data.as_ptr(), data.len(), vp, vl)) }
}

/// `(value, cas)`; both `None` when the key does not exist.
pub fn get_shared_data(key: &str) -> Result<(Option<Bytes>, Option<u32>), Status> {
    let mut ptr: *mut u8 = null_mut();
    let mut size: usize = 0;
    let mut cas: u32 = 0;
    unsafe {
        match st(proxy_get_shared_data(key.as_ptr(), key.len(), &mut ptr, &mut size, &mut cas)) {
            Status::Ok => Ok((take(ptr, size), if cas == 0 { None } else { Some(cas) })),
            Status::NotFound => Ok((None, None)),
            s => Err(s),
        }
    }
}

/// `Err(Status::CasMismatch)` when `cas` is stale: read again and retry.
pub fn set_shared_data(key: &str, value: Option<&[u8]>, cas: Option<u32>) -> Result<(), Status> {
    let (vp, vl) = ptr_of(value);
    unsafe { ok(proxy_set_shared_data(key.as_ptr(), key.len(), vp, vl, cas.unwrap_or(0))) }
}

pub fn register_shared_queue(name: &str) -> Result<u32, Status> {
    let mut id = 0u32;
    unsafe { ok(proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id))? };
    Ok(id)
}

pub fn resolve_shared_queue(vm_id: &str, name: &str) -> Result<Option<u32>, Status> {
    let mut id = 0u32;
    unsafe {
        match st(proxy_resolve_shared_queue(vm_id.as_ptr(), vm_id.len(), name.as_ptr(), name.len(), &mut id)) {
            Status::Ok => Ok(Some(id)),
            Status::NotFound => Ok(None),
            s => Err(s),
        }
    }
}

/// `Ok(None)` when the queue is empty.
pub fn dequeue_shared_queue(queue_id: u32) -> Result<Option<Bytes>, Status> {
    let mut ptr: *mut u8 = null_mut();
    let mut size: usize = 0;
    unsafe {
        match st(proxy_dequeue_shared_queue(queue_id, &mut ptr, &mut size)) {
            Status::Ok => Ok(Some(take(ptr, size).unwrap_or_default())),
            Status::Empty => Ok(None),
            s => Err(s),
        }
    }
}

pub fn enqueue_shared_queue(queue_id: u32, value: Option<&[u8]>) -> Result<(), Status> {
    let (vp, vl) = ptr_of(value);
    unsafe { ok(proxy_enqueue_shared_queue(queue_id, vp, vl)) }
}

pub fn resume_http_request() -> Result<(), Status> {
    unsafe { ok(proxy_continue_stream(StreamType::HttpRequest as u32)) }
}

pub fn resume_http_response() -> Result<(), Status> {
    unsafe { ok(proxy_continue_stream(StreamType::HttpResponse as u32)) }
}

pub fn reset_http_request() -> Result<(), Status> {
    unsafe { ok(proxy_close_stream(StreamType::HttpRequest as u32)) }
}

pub fn reset_http_response() -> Result<(), Status> {
    unsafe { ok(proxy_close_stream(StreamType::HttpResponse as u32)) }
}

/// Answer the request locally (`proxy_send_local_response`); the request is not forwarded.
pub fn send_http_response(status_code: u32, headers: &[(&str, &str)], body: Option<&[u8]>) -> Result<(), Status> {
    let h = serialize_map(headers);
    let (bp, bl) = ptr_of(body);
    unsafe { ok(proxy_send_local_response(status_code, null(), 0, bp, bl, h.as_ptr(), h.len(), -1)) }
}

pub fn send_grpc_response(status: GrpcStatusCode, message: Option<&str>, metadata: &[(&str, &str)]) -> Result<(), Status> {
    let h = serialize_map(metadata);
    let (mp, ml) = ptr_of(message.map(|m| m.as_bytes()));
    unsafe { ok(proxy_send_local_response(200, null(), 0, mp, ml, h.as_ptr(), h.len(), status as i32)) }
}

pub fn dispatch_http_call(upstream: &str, headers: &[(&str, &str)], body: Option<&[u8]>, trailers: &[(&str, &str)], timeout: Duration) -> Result<u32, Status> {
    let h = serialize_map(headers);
    let t = serialize_map(trailers);
    let (bp, bl) = ptr_of(body);
    let mut token = 0u32;
    unsafe {
        ok(proxy_http_call(upstream.as_ptr(), upstream.len(), h.as_ptr(), h.len(), bp, bl, t.as_ptr(), t.len(), timeout.as_millis() as u32, &mut token))?;
    }
    crate::callouts::register(token);
    Ok(token)
}

/// Higress's `proxy_redis_init`: how calls to `cluster` authenticate, which database they use
/// (`"name?db=1"`) and their timeout (zero: the cluster's own). Nothing connects yet.
pub fn redis_init(cluster: &str, username: &str, password: &str, timeout: Duration) -> Result<(), Status> {
    unsafe {
        ok(proxy_redis_init(cluster.as_ptr(), cluster.len(), username.as_ptr(), username.len(), password.as_ptr(), password.len(), timeout.as_millis() as u32))
    }
}

/// Higress's `proxy_redis_call`: send one RESP-encoded command (`resp::command`); the reply
/// arrives in `on_redis_call_response` of this context. Returns the token.
pub fn redis_call(cluster: &str, query: &[u8]) -> Result<u32, Status> {
    let mut token = 0u32;
    unsafe {
        ok(proxy_redis_call(cluster.as_ptr(), cluster.len(), query.as_ptr(), query.len(), &mut token))?;
    }
    crate::callouts::register(token);
    Ok(token)
}

pub fn dispatch_grpc_call(upstream: &str, service: &str, method: &str, initial_metadata: &[(&str, &[u8])], message: Option<&[u8]>, timeout: Duration) -> Result<u32, Status> {
    let md = serialize_map_bytes(initial_metadata);
    let (mp, ml) = ptr_of(message);
    let mut token = 0u32;
    unsafe {
        ok(proxy_grpc_call(upstream.as_ptr(), upstream.len(), service.as_ptr(), service.len(), method.as_ptr(), method.len(), md.as_ptr(), md.len(), mp, ml, timeout.as_millis() as u32, &mut token))?;
    }
    Ok(token)
}

pub fn open_grpc_stream(upstream: &str, service: &str, method: &str, initial_metadata: &[(&str, &[u8])]) -> Result<u32, Status> {
    let md = serialize_map_bytes(initial_metadata);
    let mut token = 0u32;
    unsafe {
        ok(proxy_grpc_stream(upstream.as_ptr(), upstream.len(), service.as_ptr(), service.len(), method.as_ptr(), method.len(), md.as_ptr(), md.len(), &mut token))?;
    }
    Ok(token)
}

pub fn send_grpc_stream_message(token: u32, message: Option<&[u8]>, end_stream: bool) -> Result<(), Status> {
    let (mp, ml) = ptr_of(message);
    unsafe { ok(proxy_grpc_send(token, mp, ml, end_stream as u32)) }
}

pub fn cancel_grpc_call(token: u32) -> Result<(), Status> {
    unsafe { ok(proxy_grpc_cancel(token)) }
}

pub fn close_grpc_stream(token: u32) -> Result<(), Status> {
    unsafe { ok(proxy_grpc_close(token)) }
}

/// `(code, message)` of the last callout (`proxy_get_status`).
pub fn get_grpc_status() -> Result<(u32, Option<String>), Status> {
    let mut code = 0u32;
    let mut ptr: *mut u8 = null_mut();
    let mut size: usize = 0;
    unsafe {
        ok(proxy_get_status(&mut code, &mut ptr, &mut size))?;
        Ok((code, take(ptr, size).map(|b| String::from_utf8_lossy(&b).into_owned())))
    }
}

pub fn set_effective_context(context_id: u32) -> Result<(), Status> {
    unsafe { ok(proxy_set_effective_context(context_id)) }
}

pub fn call_foreign_function(name: &str, arguments: Option<&[u8]>) -> Result<Option<Bytes>, Status> {
    let (ap, al) = ptr_of(arguments);
    let mut ptr: *mut u8 = null_mut();
    let mut size: usize = 0;
    unsafe {
        ok(proxy_call_foreign_function(name.as_ptr(), name.len(), ap, al, &mut ptr, &mut size))?;
        Ok(take(ptr, size))
    }
}

pub fn done() -> Result<(), Status> {
    unsafe { ok(proxy_done()) }
}

pub fn define_metric(metric_type: MetricType, name: &str) -> Result<u32, Status> {
    let mut id = 0u32;
    unsafe { ok(proxy_define_metric(metric_type as u32, name.as_ptr(), name.len(), &mut id))? };
    Ok(id)
}

pub fn get_metric(metric_id: u32) -> Result<u64, Status> {
    let mut v = 0u64;
    unsafe { ok(proxy_get_metric(metric_id, &mut v))? };
    Ok(v)
}

pub fn record_metric(metric_id: u32, value: u64) -> Result<(), Status> {
    unsafe { ok(proxy_record_metric(metric_id, value)) }
}

pub fn increment_metric(metric_id: u32, offset: i64) -> Result<(), Status> {
    unsafe { ok(proxy_increment_metric(metric_id, offset)) }
}

// ---- serialization (spec "Serialization"; §4.1 / §4.2) ----

/// `u32 N | N × (u32 klen, u32 vlen) | N × (key \0 value \0)`, little-endian.
pub fn serialize_map(map: &[(&str, &str)]) -> Bytes {
    let pairs: Vec<(&str, &[u8])> = map.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
    serialize_map_bytes(&pairs)
}

pub fn serialize_map_bytes(map: &[(&str, &[u8])]) -> Bytes {
    let mut size = 4;
    for (k, v) in map {
        size += 8 + k.len() + v.len() + 2;
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(map.len() as u32).to_le_bytes());
    for (k, v) in map {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in map {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Inverse of `serialize_map_bytes`; `None` for a malformed buffer (never panics).
pub fn deserialize_map(bytes: &[u8]) -> Option<Vec<(String, Bytes)>> {
    Some(map_pairs(bytes)?.into_iter().map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.to_vec())).collect())
}

/// The (name, value) pairs of a serialized map, borrowed from it; `None` when malformed.
pub fn map_pairs(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    if bytes.is_empty() || bytes == [0] {
        return Some(Vec::new());
    }
    let rd = |at: usize| -> Option<usize> {
        let s = bytes.get(at..at + 4)?;
        Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
    };
    let n = rd(0)?;
    if n > bytes.len() / 8 {
        return None;
    }
    let mut pos = 4 + n * 8;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let kl = rd(4 + i * 8)?;
        let vl = rd(8 + i * 8)?;
        let k = bytes.get(pos..pos.checked_add(kl)?)?;
        pos += kl;
        if bytes.get(pos) != Some(&0) {
            return None;
        }
        pos += 1;
        let v = bytes.get(pos..pos.checked_add(vl)?)?;
        pos += vl;
        if bytes.get(pos) != Some(&0) {
            return None;
        }
        pos += 1;
        out.push((k, v));
    }
    Some(out)
}

/// Segments joined by NUL, no trailing NUL.
pub fn serialize_property_path(path: &[&str]) -> Bytes {
    path.join("\0").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_roundtrip_matches_spec_layout() {
        let m = serialize_map(&[(":method", "GET"), (":path", "/bytes/1")]);
        let mut want = vec![2, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 5, 0, 0, 0, 8, 0, 0, 0];
        want.extend_from_slice(b":method\0GET\0:path\0/bytes/1\0");
        assert_eq!(m, want);
        let back = deserialize_map(&m).unwrap();
        assert_eq!(back, vec![(":method".to_string(), b"GET".to_vec()), (":path".to_string(), b"/bytes/1".to_vec())]);
    }

    #[test]
    fn map_edge_cases() {
        assert_eq!(deserialize_map(&[]).unwrap(), vec![]);
        assert_eq!(deserialize_map(&[0]).unwrap(), vec![]);
        assert_eq!(deserialize_map(&[0, 0, 0, 0]).unwrap(), vec![]);
        // count larger than the buffer, missing terminators, truncated
        assert!(deserialize_map(&[9, 0, 0, 0]).is_none());
        let mut m = serialize_map(&[("a", "b")]);
        let n = m.len();
        m[n - 1] = b'x';
        assert!(deserialize_map(&m).is_none());
        let m = serialize_map(&[("a", "b")]);
        assert!(deserialize_map(&m[..m.len() - 2]).is_none());
    }

    #[test]
    fn property_path() {
        assert_eq!(serialize_property_path(&["request", "path"]), b"request\0path".to_vec());
    }
}
