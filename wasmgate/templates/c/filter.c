/* {{name}}: a wasmgate filter in C (wasi-libc), against wasmgate's header of the ABI.
 *
 * config: plain text, the greeting (default "hello"); the gateway passes a string `config:` as is.
 * Every request gets `x-greeting: <greeting>` on its way upstream; a request with an `x-block`
 * header is refused with 403.
 */
#include <string.h>

#include "proxy_wasm.h"

PROXY_WASM_MODULE()

static char greeting[256] = "hello";
static size_t greeting_len = 5;

static void log_text(proxy_log_level_t level, const char *prefix, const char *text, size_t n) {
    char line[512];
    size_t p = strlen(prefix);
    if (n > sizeof line - p) n = sizeof line - p;
    memcpy(line, prefix, p);
    memcpy(line + p, text, n);
    proxy_log(level, line, p + n);
}

/* The root context (one per filter entry) and each request's context share these callbacks;
 * this filter keeps no per-request state. */
PROXY_EXPORT(proxy_on_context_create) void proxy_on_context_create(uint32_t context_id, uint32_t root_id) {}

PROXY_EXPORT(proxy_on_vm_start) uint32_t proxy_on_vm_start(uint32_t root_id, size_t vm_config_size) { return 1; }

PROXY_EXPORT(proxy_on_configure) uint32_t proxy_on_configure(uint32_t root_id, size_t config_size) {
    if (config_size == 0) return 1;                 /* no config: keep "hello" */
    char *data = NULL;
    size_t size = 0;
    if (proxy_get_buffer_bytes(PROXY_BUFFER_PLUGIN_CONFIGURATION, 0, config_size, &data, &size) != PROXY_OK)
        return 0;
    while (size > 0 && (data[size - 1] == '\n' || data[size - 1] == ' ')) size--;
    int ok = size > 0 && size < sizeof greeting && memchr(data, '\n', size) == NULL;
    if (ok) {
        memcpy(greeting, data, size);
        greeting_len = size;
    } else {
        proxy_log_str(PROXY_LOG_ERROR, "{{name}}: bad configuration: the greeting must be one line of at most 255 bytes");
    }
    free(data);
    return ok;                                      /* 0: the gateway refuses to load the filter */
}

PROXY_EXPORT(proxy_on_request_headers) uint32_t proxy_on_request_headers(uint32_t context_id, size_t headers, uint32_t end_of_stream) {
    char *value = NULL;
    size_t size = 0;
    if (proxy_get_header_map_value(PROXY_MAP_HTTP_REQUEST_HEADERS, "x-block", 7, &value, &size) == PROXY_OK) {
        free(value);
        /* headers serialized as the ABI wants them: one pair, content-type: text/plain */
        static const char reply_headers[] = "\x01\0\0\0" "\x0c\0\0\0" "\x0a\0\0\0" "content-type\0text/plain";
        proxy_send_local_response(403, "blocked", 7, "blocked\n", 8, reply_headers, sizeof reply_headers,
                                  PROXY_GRPC_STATUS_NONE);
        return PROXY_PAUSE;
    }
    proxy_replace_header_map_value(PROXY_MAP_HTTP_REQUEST_HEADERS, "x-greeting", 10, greeting, greeting_len);
    if (proxy_get_header_map_value(PROXY_MAP_HTTP_REQUEST_HEADERS, ":path", 5, &value, &size) == PROXY_OK) {
        log_text(PROXY_LOG_INFO, "{{name}}: greeted ", value, size);
        free(value);
    }
    return PROXY_CONTINUE;
}
