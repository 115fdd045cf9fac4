;; slow_configure.wat — proxy_on_configure computes for as many milliseconds (wall clock) as its
;; plugin configuration says (decimal, e.g. "1000"), like a Go runtime's start-up or a filter
;; compiling a big rule set; a request carrying `x-act` traps (a bug reached on demand), so the
;; instance is rebuilt — and that slow start runs again. Other requests pass, tagged
;; `x-slow: on` for the upstream. Used by tests/ops/test_rebuild_stall.py and bench's
;; `rebuild_stall` scenario.
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 65536))
  (data (i32.const 1024) "x-act")
  (data (i32.const 1040) "x-slow")
  (data (i32.const 1056) "on")
  (data (i32.const 1072) "configured")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.and (i32.add (i32.add (local.get $p) (local.get $size)) (i32.const 7))
                               (i32.const -8)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))

  ;; the plugin configuration as a decimal number of milliseconds (0 when absent)
  (func $configured_ms (param $size i32) (result i64)
    (local $p i32) (local $end i32) (local $ms i64)
    (if (i32.eqz (local.get $size)) (then (return (i64.const 0))))
    (if (call $get_buffer (i32.const 7) (i32.const 0) (local.get $size) (i32.const 2048) (i32.const 2052))
      (then (return (i64.const 0))))
    (local.set $p (i32.load (i32.const 2048)))
    (local.set $end (i32.add (local.get $p) (i32.load (i32.const 2052))))
    (block $done (loop $digits
      (br_if $done (i32.ge_u (local.get $p) (local.get $end)))
      (br_if $done (i32.gt_u (i32.sub (i32.load8_u (local.get $p)) (i32.const 48)) (i32.const 9)))
      (local.set $ms (i64.add (i64.mul (local.get $ms) (i64.const 10))
                              (i64.extend_i32_u (i32.sub (i32.load8_u (local.get $p)) (i32.const 48)))))
      (local.set $p (i32.add (local.get $p) (i32.const 1)))
      (br $digits)))
    (local.get $ms))

  (func $now_ns (result i64)
    (drop (call $now (i32.const 2056)))
    (i64.load (i32.const 2056)))

  ;; compute for `ms` milliseconds: pure wasm spins, with a clock read every ~100k iterations
  (func $burn (param $ms i64)
    (local $until i64) (local $i i32)
    (local.set $until (i64.add (call $now_ns) (i64.mul (local.get $ms) (i64.const 1000000))))
    (block $done (loop $outer
      (br_if $done (i64.ge_u (call $now_ns) (local.get $until)))
      (local.set $i (i32.const 100000))
      (loop $spin
        (local.set $i (i32.sub (local.get $i) (i32.const 1)))
        (br_if $spin (local.get $i)))
      (br $outer))))

  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
    (call $burn (call $configured_ms (local.get $size)))
    (drop (call $log (i32.const 2) (i32.const 1072) (i32.const 10)))
    (i32.const 1))

  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eqz (call $get_header (i32.const 0) (i32.const 1024) (i32.const 5) (i32.const 2064) (i32.const 2068)))
      (then unreachable))
    (drop (call $add_header (i32.const 0) (i32.const 1040) (i32.const 6) (i32.const 1056) (i32.const 2)))
    (i32.const 0))
)
