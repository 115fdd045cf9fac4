/* proxy_wasm.h — the Proxy-Wasm ABI 0.2.1 as wasmgate implements it, for filters written in C.
 *
 * Build with Debian's clang and wasi-libc (apt: clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32):
 *     clang-14 --target=wasm32-wasi -mexec-model=reactor -O2 -o filter.wasm filter.c
 * -mexec-model=reactor links wasi-libc's reactor start file: the module exports `_initialize`
 * (static constructors) instead of `_start`, as a Proxy-Wasm host expects.
 *
 * Host functions: every `env.proxy_*` import below (signatures from the ABI reference,
 * abi/README.md). The linker imports only the ones a filter calls. Every one returns a
 * proxy_status_t. Out-parameters `char **ret_data, size_t *ret_size` receive memory the host
 * allocated through the module's `proxy_on_memory_allocate` (malloc): free() it when done.
 *
 * Guest callbacks: define the `proxy_on_*` functions you need with PROXY_EXPORT(name); every one
 * is optional. PROXY_WASM_MODULE() defines the two exports every module needs: the ABI version
 * marker and the allocator. Put it in exactly one .c file.
 */
#ifndef WASMGATE_PROXY_WASM_H
#define WASMGATE_PROXY_WASM_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#define PROXY_IMPORT(name) __attribute__((import_module("env"), import_name(#name)))
#define PROXY_EXPORT(name) __attribute__((export_name(#name)))

/* ---------------------------------------------------------------- enums (ABI "Types") */

typedef enum {
    PROXY_OK = 0, PROXY_NOT_FOUND = 1, PROXY_BAD_ARGUMENT = 2, PROXY_SERIALIZATION_FAILURE = 3,
    PROXY_PARSE_FAILURE = 4, PROXY_INVALID_MEMORY_ACCESS = 6, PROXY_EMPTY = 7,
    PROXY_CAS_MISMATCH = 8, PROXY_INTERNAL_FAILURE = 10, PROXY_UNIMPLEMENTED = 12,
} proxy_status_t;

typedef enum { PROXY_CONTINUE = 0, PROXY_PAUSE = 1 } proxy_action_t;

typedef enum {
    PROXY_LOG_TRACE = 0, PROXY_LOG_DEBUG = 1, PROXY_LOG_INFO = 2, PROXY_LOG_WARN = 3,
    PROXY_LOG_ERROR = 4, PROXY_LOG_CRITICAL = 5,
} proxy_log_level_t;

typedef enum {
    PROXY_BUFFER_HTTP_REQUEST_BODY = 0, PROXY_BUFFER_HTTP_RESPONSE_BODY = 1,
    PROXY_BUFFER_DOWNSTREAM_DATA = 2, PROXY_BUFFER_UPSTREAM_DATA = 3,
    PROXY_BUFFER_HTTP_CALL_RESPONSE_BODY = 4, PROXY_BUFFER_GRPC_RECEIVE = 5,
    PROXY_BUFFER_VM_CONFIGURATION = 6, PROXY_BUFFER_PLUGIN_CONFIGURATION = 7,
    PROXY_BUFFER_CALL_DATA = 8,
} proxy_buffer_type_t;

typedef enum {
    PROXY_MAP_HTTP_REQUEST_HEADERS = 0, PROXY_MAP_HTTP_REQUEST_TRAILERS = 1,
    PROXY_MAP_HTTP_RESPONSE_HEADERS = 2, PROXY_MAP_HTTP_RESPONSE_TRAILERS = 3,
    PROXY_MAP_GRPC_RECEIVE_INITIAL_METADATA = 4, PROXY_MAP_GRPC_RECEIVE_TRAILING_METADATA = 5,
    PROXY_MAP_HTTP_CALL_RESPONSE_HEADERS = 6, PROXY_MAP_HTTP_CALL_RESPONSE_TRAILERS = 7,
} proxy_map_type_t;

typedef enum {
    PROXY_STREAM_HTTP_REQUEST = 0, PROXY_STREAM_HTTP_RESPONSE = 1,
    PROXY_STREAM_DOWNSTREAM = 2, PROXY_STREAM_UPSTREAM = 3,
} proxy_stream_type_t;

typedef enum { PROXY_METRIC_COUNTER = 0, PROXY_METRIC_GAUGE = 1, PROXY_METRIC_HISTOGRAM = 2 } proxy_metric_type_t;

/* grpc_status argument of proxy_send_local_response for a plain HTTP reply. */
#define PROXY_GRPC_STATUS_NONE (-1)

/* ---------------------------------------------------------------- host functions */

PROXY_IMPORT(proxy_log) proxy_status_t proxy_log(proxy_log_level_t level, const char *msg, size_t msg_size);
PROXY_IMPORT(proxy_get_log_level) proxy_status_t proxy_get_log_level(uint32_t *ret_level);
PROXY_IMPORT(proxy_get_current_time_nanoseconds) proxy_status_t proxy_get_current_time_nanoseconds(uint64_t *ret_time);
PROXY_IMPORT(proxy_set_tick_period_milliseconds) proxy_status_t proxy_set_tick_period_milliseconds(uint32_t period_ms);

PROXY_IMPORT(proxy_get_buffer_bytes) proxy_status_t proxy_get_buffer_bytes(proxy_buffer_type_t type, size_t start, size_t max_size, char **ret_data, size_t *ret_size);
PROXY_IMPORT(proxy_set_buffer_bytes) proxy_status_t proxy_set_buffer_bytes(proxy_buffer_type_t type, size_t start, size_t size, const char *data, size_t data_size);
PROXY_IMPORT(proxy_get_buffer_status) proxy_status_t proxy_get_buffer_status(proxy_buffer_type_t type, size_t *ret_length, uint32_t *ret_flags);

/* Header maps. A serialized map (pairs/set_pairs, send_local_response, http_call) is: u32 N,
 * N x (u32 key_len, u32 value_len), then N x (key, NUL, value, NUL); integers little-endian. */
PROXY_IMPORT(proxy_get_header_map_pairs) proxy_status_t proxy_get_header_map_pairs(proxy_map_type_t type, char **ret_data, size_t *ret_size);
PROXY_IMPORT(proxy_set_header_map_pairs) proxy_status_t proxy_set_header_map_pairs(proxy_map_type_t type, const char *data, size_t size);
/* PROXY_NOT_FOUND when the header is absent. */
PROXY_IMPORT(proxy_get_header_map_value) proxy_status_t proxy_get_header_map_value(proxy_map_type_t type, const char *key, size_t key_size, char **ret_value, size_t *ret_value_size);
PROXY_IMPORT(proxy_add_header_map_value) proxy_status_t proxy_add_header_map_value(proxy_map_type_t type, const char *key, size_t key_size, const char *value, size_t value_size);
PROXY_IMPORT(proxy_replace_header_map_value) proxy_status_t proxy_replace_header_map_value(proxy_map_type_t type, const char *key, size_t key_size, const char *value, size_t value_size);
PROXY_IMPORT(proxy_remove_header_map_value) proxy_status_t proxy_remove_header_map_value(proxy_map_type_t type, const char *key, size_t key_size);
PROXY_IMPORT(proxy_get_header_map_size) proxy_status_t proxy_get_header_map_size(proxy_map_type_t type, size_t *ret_size);

/* Property paths are segments joined by NUL ("request\0path"). */
PROXY_IMPORT(proxy_get_property) proxy_status_t proxy_get_property(const char *path, size_t path_size, char **ret_value, size_t *ret_value_size);
PROXY_IMPORT(proxy_set_property) proxy_status_t proxy_set_property(const char *path, size_t path_size, const char *value, size_t value_size);

PROXY_IMPORT(proxy_continue_stream) proxy_status_t proxy_continue_stream(proxy_stream_type_t type);
PROXY_IMPORT(proxy_close_stream) proxy_status_t proxy_close_stream(proxy_stream_type_t type);
/* Answer the client locally; return PROXY_PAUSE from the callback that calls it. */
PROXY_IMPORT(proxy_send_local_response) proxy_status_t proxy_send_local_response(uint32_t status_code, const char *details, size_t details_size, const char *body, size_t body_size, const char *headers, size_t headers_size, int32_t grpc_status);

PROXY_IMPORT(proxy_http_call) proxy_status_t proxy_http_call(const char *upstream, size_t upstream_size, const char *headers, size_t headers_size, const char *body, size_t body_size, const char *trailers, size_t trailers_size, uint32_t timeout_ms, uint32_t *ret_token);
PROXY_IMPORT(proxy_get_status) proxy_status_t proxy_get_status(uint32_t *ret_code, char **ret_message, size_t *ret_message_size);
PROXY_IMPORT(proxy_set_effective_context) proxy_status_t proxy_set_effective_context(uint32_t context_id);
PROXY_IMPORT(proxy_done) proxy_status_t proxy_done(void);

PROXY_IMPORT(proxy_set_shared_data) proxy_status_t proxy_set_shared_data(const char *key, size_t key_size, const char *value, size_t value_size, uint32_t cas);
PROXY_IMPORT(proxy_get_shared_data) proxy_status_t proxy_get_shared_data(const char *key, size_t key_size, char **ret_value, size_t *ret_value_size, uint32_t *ret_cas);
PROXY_IMPORT(proxy_register_shared_queue) proxy_status_t proxy_register_shared_queue(const char *name, size_t name_size, uint32_t *ret_queue_id);
PROXY_IMPORT(proxy_resolve_shared_queue) proxy_status_t proxy_resolve_shared_queue(const char *vm_id, size_t vm_id_size, const char *name, size_t name_size, uint32_t *ret_queue_id);
PROXY_IMPORT(proxy_enqueue_shared_queue) proxy_status_t proxy_enqueue_shared_queue(uint32_t queue_id, const char *value, size_t value_size);
PROXY_IMPORT(proxy_dequeue_shared_queue) proxy_status_t proxy_dequeue_shared_queue(uint32_t queue_id, char **ret_value, size_t *ret_value_size);

PROXY_IMPORT(proxy_define_metric) proxy_status_t proxy_define_metric(proxy_metric_type_t type, const char *name, size_t name_size, uint32_t *ret_metric_id);
PROXY_IMPORT(proxy_increment_metric) proxy_status_t proxy_increment_metric(uint32_t metric_id, int64_t offset);
PROXY_IMPORT(proxy_record_metric) proxy_status_t proxy_record_metric(uint32_t metric_id, uint64_t value);
PROXY_IMPORT(proxy_get_metric) proxy_status_t proxy_get_metric(uint32_t metric_id, uint64_t *ret_value);

PROXY_IMPORT(proxy_call_foreign_function) proxy_status_t proxy_call_foreign_function(const char *name, size_t name_size, const char *args, size_t args_size, char **ret_data, size_t *ret_size);

/* ---------------------------------------------------------------- required exports */

#define PROXY_WASM_MODULE()                                                              \
    PROXY_EXPORT(proxy_abi_version_0_2_1) void proxy_abi_version_0_2_1(void) {}         \
    PROXY_EXPORT(proxy_on_memory_allocate) void *proxy_on_memory_allocate(size_t size) { \
        return malloc(size);                                                             \
    }

/* Log a NUL-terminated message. */
static inline void proxy_log_str(proxy_log_level_t level, const char *msg) {
    size_t n = 0;
    while (msg[n]) n++;
    proxy_log(level, msg, n);
}

#endif
