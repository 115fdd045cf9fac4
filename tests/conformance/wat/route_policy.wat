;; route_policy.wat — a 0.2.1 filter that gates on route metadata and rewrites request headers,
;; as published filters do with the Rust/Go SDKs (get_property with a NUL-joined path, then
;; get/replace/add_header_map_value):
;;  - route_metadata.filter_metadata.policy.require-header names a header the request must
;;    carry: without it, a 403 local reply "policy: header required";
;;  - x-set-authority / x-set-path request headers are copied into :authority / :path (canary by
;;    host, path versioning) — the gateway must then re-route;
;;  - the request gets x-md-tag (route_metadata.filter_metadata.policy.tag), x-md-zone
;;    (cluster_metadata.filter_metadata.lb.zone), x-node-id (node.id), x-node-region
;;    (node.metadata.region), each only when the property is found;
;;  - a request with x-clear-route-cache calls proxy_clear_route_cache (ABI 0.1.0's host function);
;;  - the response gets x-resp-route (route_name) and x-resp-tag (the route's policy.tag) as
;;    the filter sees them after the request headers.
(module
  (import "env" "proxy_get_property" (func $get_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_clear_route_cache" (func $clear_route_cache (result i32)))
  (import "env" "proxy_send_local_response"
    (func $send_local_response (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 32768))
  ;;@DATA
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.and (i32.add (i32.add (global.get $heap) (local.get $n)) (i32.const 7)) (i32.const -8)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))

  ;; property (path) → header (name) of map $map, when the property is found
  (func $prop_to_header (param $map i32) (param $path i32) (param $path_len i32) (param $name i32) (param $name_len i32)
    (if (i32.eqz (call $get_property (local.get $path) (local.get $path_len) (i32.const 512) (i32.const 516)))
      (then (drop (call $add_header (local.get $map) (local.get $name) (local.get $name_len)
                        (i32.load (i32.const 512)) (i32.load (i32.const 516)))))))

  ;; request header $src → replaces request header $dst, when $src is present
  (func $copy_header (param $src i32) (param $src_len i32) (param $dst i32) (param $dst_len i32)
    (if (i32.eqz (call $get_header (i32.const 0) (local.get $src) (local.get $src_len) (i32.const 512) (i32.const 516)))
      (then (drop (call $replace_header (i32.const 0) (local.get $dst) (local.get $dst_len)
                        (i32.load (i32.const 512)) (i32.load (i32.const 516)))))))

  (func (export "proxy_on_request_headers") (param $id i32) (param $n i32) (param $eos i32) (result i32)
    (global.set $heap (i32.const 32768))     ;; return buffers live for one callback
    (if (i32.eqz (call $get_property $S"route_metadata\00filter_metadata\00policy\00require-header"
                   (i32.const 512) (i32.const 516)))
      (then
        (if (call $get_header (i32.const 0) (i32.load (i32.const 512)) (i32.load (i32.const 516))
                  (i32.const 520) (i32.const 524))
          (then
            (drop (call $send_local_response (i32.const 403) $S"policy_denied" $S"policy: header required"
                        $M"" (i32.const -1)))
            (return (i32.const 1))))))
    (call $prop_to_header (i32.const 0) $S"route_metadata\00filter_metadata\00policy\00tag" $S"x-md-tag")
    (call $prop_to_header (i32.const 0) $S"cluster_metadata\00filter_metadata\00lb\00zone" $S"x-md-zone")
    (call $prop_to_header (i32.const 0) $S"node\00id" $S"x-node-id")
    (call $prop_to_header (i32.const 0) $S"node\00metadata\00region" $S"x-node-region")
    (call $copy_header $S"x-set-authority" $S":authority")
    (call $copy_header $S"x-set-path" $S":path")
    (if (i32.eqz (call $get_header (i32.const 0) $S"x-clear-route-cache" (i32.const 512) (i32.const 516)))
      (then (drop (call $clear_route_cache))))
    (i32.const 0))

  (func (export "proxy_on_response_headers") (param $id i32) (param $n i32) (param $eos i32) (result i32)
    (global.set $heap (i32.const 32768))
    (call $prop_to_header (i32.const 2) $S"route_name" $S"x-resp-route")
    (call $prop_to_header (i32.const 2) $S"route_metadata\00filter_metadata\00policy\00tag" $S"x-resp-tag")
    (i32.const 0))
)
