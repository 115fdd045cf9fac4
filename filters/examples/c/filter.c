/* wasmgate example filter in C, against proxy_wasm.h (Debian clang + wasi-libc).
 * The same job as the Rust and AssemblyScript examples (filters/README.md, "Languages"):
 *   config (plain text, one directive per line):
 *     add-header NAME VALUE     set request header NAME to VALUE before it goes upstream
 *     require-header NAME       answer 403 to a request without header NAME
 * Header names are matched as the host stores them: lowercase.
 *
 * The gateway gives each filter entry its own module instance and one root context, so the
 * rules live in globals. */
#include <stdio.h>
#include <string.h>

#include "proxy_wasm.h"

PROXY_WASM_MODULE()

#define MAX_RULES 16

struct text { const char *p; size_t n; };
struct rules {
    char *config;                        /* owns the bytes every text below points into */
    struct text add_name[MAX_RULES], add_value[MAX_RULES], require[MAX_RULES];
    size_t n_add, n_require;
};
static struct rules rules;

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\r'; }

static struct text trim(const char *p, size_t n) {
    while (n && is_space(*p)) p++, n--;
    while (n && is_space(p[n - 1])) n--;
    return (struct text){p, n};
}

/* Split `t` at its first space: head before it, the trimmed rest after it. */
static struct text split(struct text t, struct text *rest) {
    size_t i = 0;
    while (i < t.n && !is_space(t.p[i])) i++;
    *rest = trim(t.p + i, t.n - i);
    return (struct text){t.p, i};
}

static int is(struct text t, const char *word) { return t.n == strlen(word) && !memcmp(t.p, word, t.n); }

/* NULL when the line is understood, the reason otherwise. */
static const char *parse_line(struct rules *r, struct text line) {
    struct text rest, directive = split(line, &rest);
    if (is(directive, "add-header")) {
        struct text value, name = split(rest, &value);
        if (!name.n || !value.n) return "add-header needs NAME VALUE";
        if (r->n_add == MAX_RULES) return "too many add-header lines (16 at most)";
        r->add_name[r->n_add] = name;
        r->add_value[r->n_add++] = value;
        return NULL;
    }
    if (is(directive, "require-header")) {
        struct text extra, name = split(rest, &extra);
        if (!name.n || extra.n) return "require-header needs one NAME";
        if (r->n_require == MAX_RULES) return "too many require-header lines (16 at most)";
        r->require[r->n_require++] = name;
        return NULL;
    }
    return "unknown directive (add-header, require-header)";
}

static void log_error(const char *fmt, unsigned line, const char *why) {
    char msg[160];
    int n = snprintf(msg, sizeof msg, fmt, line, why);
    proxy_log(PROXY_LOG_ERROR, msg, n < (int)sizeof msg ? (size_t)n : sizeof msg - 1);
}

PROXY_EXPORT(proxy_on_context_create) void proxy_on_context_create(uint32_t context_id, uint32_t parent_id) {}

PROXY_EXPORT(proxy_on_vm_start) uint32_t proxy_on_vm_start(uint32_t root_id, size_t vm_config_size) { return 1; }

PROXY_EXPORT(proxy_on_configure) uint32_t proxy_on_configure(uint32_t root_id, size_t config_size) {
    struct rules next = {0};
    size_t size = 0;
    if (config_size && proxy_get_buffer_bytes(PROXY_BUFFER_PLUGIN_CONFIGURATION, 0, config_size, &next.config, &size) != PROXY_OK) {
        proxy_log_str(PROXY_LOG_ERROR, "example (c): cannot read the plugin configuration");
        return 0;
    }
    const char *p = next.config, *end = next.config + size;
    for (unsigned line_no = 1; p < end; line_no++) {
        const char *nl = memchr(p, '\n', end - p);
        struct text line = trim(p, (nl ? nl : end) - p);
        p = nl ? nl + 1 : end;
        if (!line.n || line.p[0] == '#') continue;
        const char *err = parse_line(&next, line);
        if (err) {
            log_error("example (c): bad configuration, line %u: %s", line_no, err);
            free(next.config);
            return 0;                    /* the gateway refuses to load the filter */
        }
    }
    free(rules.config);
    rules = next;
    return 1;
}

/* {content-type: text/plain}, serialized as the ABI's header map. */
static const char PLAIN_TEXT[] = "\1\0\0\0" "\14\0\0\0" "\12\0\0\0" "content-type\0text/plain";

PROXY_EXPORT(proxy_on_request_headers) proxy_action_t proxy_on_request_headers(uint32_t context_id, uint32_t headers, uint32_t end_of_stream) {
    for (size_t i = 0; i < rules.n_require; i++) {
        char *value = NULL;
        size_t size = 0;
        if (proxy_get_header_map_value(PROXY_MAP_HTTP_REQUEST_HEADERS, rules.require[i].p, rules.require[i].n, &value, &size) == PROXY_OK) {
            free(value);
            continue;
        }
        char body[128];
        int n = snprintf(body, sizeof body, "missing header %.*s\n", (int)rules.require[i].n, rules.require[i].p);
        proxy_send_local_response(403, "missing_header", 14, body, n < (int)sizeof body ? (size_t)n : sizeof body - 1,
                                  PLAIN_TEXT, sizeof PLAIN_TEXT, PROXY_GRPC_STATUS_NONE);
        return PROXY_PAUSE;
    }
    for (size_t i = 0; i < rules.n_add; i++)
        proxy_replace_header_map_value(PROXY_MAP_HTTP_REQUEST_HEADERS, rules.add_name[i].p, rules.add_name[i].n,
                                       rules.add_value[i].p, rules.add_value[i].n);
    return PROXY_CONTINUE;
}
