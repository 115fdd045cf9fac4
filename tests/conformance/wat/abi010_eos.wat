;; abi010_eos.wat — an ABI 0.1.0 filter as TinyGo `-tags abi_010` and 2020-21 C++ SDK builds
;; declare it: marker proxy_abi_version_0_1_0 but 3-argument header callbacks
;; (context_id, num_headers, end_of_stream), a WASI command (`_start`), allocator exported as
;; proxy_on_memory_allocate.
;; Request headers: adds `x-eos: <end_of_stream>` to the request; response headers: adds
;; `x-resp-eos: <end_of_stream>` to the response.
(module
  (import "env" "proxy_add_header_map_value" (func $add_hv (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_request" (func $continue_request (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 65536))
  (global $root (mut i32) (i32.const 0))
  ;;@DATA
  (func (export "proxy_abi_version_0_1_0"))
  (func (export "_start"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.and (i32.add (i32.add (global.get $heap) (local.get $n)) (i32.const 7)) (i32.const -8)))
    (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
      (then (drop (memory.grow (i32.add (i32.shr_u (i32.sub (global.get $heap) (i32.mul (memory.size) (i32.const 65536))) (i32.const 16)) (i32.const 1))))))
    (local.get $p))
  ;; "0" or "1" at address 16, for a flag
  (func $digit (param $v i32) (result i32)
    (i32.store8 (i32.const 16) (i32.add (i32.const 48) (local.get $v)))
    (i32.const 16))
  (func (export "proxy_on_context_create") (param $id i32) (param $parent i32)
    (if (i32.eqz (local.get $parent)) (then (global.set $root (local.get $id)))))
  (func (export "proxy_on_vm_start") (param $id i32) (param $n i32) (result i32)
    (if (i32.ne (local.get $id) (global.get $root)) (then unreachable))
    (i32.const 1))
  (func (export "proxy_on_configure") (param $id i32) (param $n i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param $id i32) (param $n i32) (param $eos i32) (result i32)
    (if (i32.gt_u (local.get $eos) (i32.const 1)) (then unreachable))
    (if (i32.ne (call $add_hv (i32.const 0) $S"x-eos" (call $digit (local.get $eos)) (i32.const 1)) (i32.const 0)) (then unreachable))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param $id i32) (param $n i32) (param $eos i32) (result i32)
    (if (i32.gt_u (local.get $eos) (i32.const 1)) (then unreachable))
    (if (i32.ne (call $add_hv (i32.const 2) $S"x-resp-eos" (call $digit (local.get $eos)) (i32.const 1)) (i32.const 0)) (then unreachable))
    (i32.const 0))
  (func (export "proxy_on_done") (param $id i32) (result i32) (i32.const 1))
  (func (export "proxy_on_log") (param $id i32))
  (func (export "proxy_on_delete") (param $id i32))
)
