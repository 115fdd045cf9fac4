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
mod callouts;
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
///
/// `main! {{ … }}` exports every HTTP callback. `main! { callbacks: [request_headers, …]; { … } }`
/// exports only the listed ones of `request_headers`, `response_headers`, `done`, `log`: a host
/// does not call a callback the module does not export (Proxy-Wasm hosts check each export), so
/// every one left out is one guest call less per request. Leave out only callbacks your contexts
/// keep at the trait's default (`Continue`, `true`, nothing): an override of a callback left out
/// is never called. (Body and trailer callbacks are chosen with the SDK's features instead.)
#[macro_export]
macro_rules! main {
    (callbacks: [$($callback:ident),* $(,)?]; $code:block) => {
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

        $( $crate::__export_callback!($callback); )*
    };
    ($code:block) => {
        $crate::main!(callbacks: [request_headers, response_headers, done, log]; $code);
    };
}

/// One optional HTTP callback export of `main!` (an unknown name does not compile).
#[doc(hidden)]
#[macro_export]
macro_rules! __export_callback {
    (request_headers) => {
        #[no_mangle]
        pub extern "C" fn proxy_on_request_headers(context_id: u32, num_headers: usize, end_of_stream: bool) -> $crate::types::Action {
            $crate::dispatcher::proxy_on_request_headers(context_id, num_headers, end_of_stream)
        }
    };
    (response_headers) => {
        #[no_mangle]
        pub extern "C" fn proxy_on_response_headers(context_id: u32, num_headers: usize, end_of_stream: bool) -> $crate::types::Action {
            $crate::dispatcher::proxy_on_response_headers(context_id, num_headers, end_of_stream)
        }
    };
    (done) => {
        #[no_mangle]
        pub extern "C" fn proxy_on_done(context_id: u32) -> bool {
            $crate::dispatcher::proxy_on_done(context_id)
        }
    };
    (log) => {
        #[no_mangle]
        pub extern "C" fn proxy_on_log(context_id: u32) {
            $crate::dispatcher::proxy_on_log(context_id)
        }
    };
}
