;; bigmem.wat — a well-formed 0.2.1 filter whose initial memory (512 pages = 32 MiB) exceeds a
;; 16 MiB memory limit: loading must fail cleanly, naming the filter.
(module
  (memory (export "memory") 512)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
)
