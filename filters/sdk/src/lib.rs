//! wasmgate-sdk: write Proxy-Wasm (ABI 0.2.1) HTTP filters in Rust, offline.
//!
//! Same shape as the official `proxy-wasm` crate: `traits` (Context / RootContext /
//! HttpContext), `hostcalls` (one safe wrapper per host call), `dispatcher` (routes the
//! `proxy_on_*` exports by context id), `types`, `allocator`, `logger`. On top: configuration
//! readers (`config`, `json`, `msgpack`, `value`), `crypto` (SHA-256, HMAC-SHA256,
//! constant-time compare, on RustCrypto's crates), `base64` (on the `base64` crate), `property` (Envoy value decoding), `ext` (wasmgate's host
//! extensions, e.g. shared data that expires) and `resp` (the Redis protocol, for Higress's Redis
//! call ABI: `hostcalls::redis_init` / `redis_call`, and with the `redis` feature the `Context`
//! methods and the `proxy_on_redis_call_response` export).
//!
//! ```ignore
//! use wasmgate_sdk::traits::*;
//! use wasmgate_sdk::types::*;
//! wasmgate_sdk::main! {{
//!     wasmgate_sdk::set_log_level(LogLevel::Info);
//!     wasmgate_sdk::set_root_context(|_| -> Box<dyn RootContext> { Box::new(MyRoot::default()) });
//! }}
//! ```

pub mod allocator;
pub mod base64;
pub mod config;
pub mod crypto;
pub mod dispatcher;
pub mod ext;
#[doc(hidden)]
pub mod fuzz;
pub mod hostcalls;
pub mod json;
pub mod logger;
pub mod msgpack;
pub mod property;
pub mod resp;
pub mod traits;
pub mod types;
pub mod value;

// The packaged crates the SDK is built on, for filters that need more than the helpers in
// `crypto` / `base64` (no dependency of their own, so no Cargo.lock change).
pub use ::base64 as base64_crate;
pub use hmac;
pub use sha1;
pub use sha2;
pub use subtle;

pub use dispatcher::{set_http_context, set_root_context};
pub use logger::set_log_level;
pub use value::Value;

/// Marker export: tells the host this module speaks Proxy-Wasm ABI 0.2.1.
#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// Defines the WASI reactor entry `_initialize`: runs static constructors, installs the
/// panic hook, then your block (where you register the root context factory).
#[macro_export]
macro_rules! main {
    ($code:block) => {
        #[cfg(target_os = "wasi")]
        extern "C" {
            fn __wasm_call_ctors();
        }

        #[no_mangle]
        pub extern "C" fn _initialize() {
            #[cfg(target_os = "wasi")]
            unsafe {
                __wasm_call_ctors();
            }
            $crate::logger::install_panic_hook();
            $code;
        }
    };
}
