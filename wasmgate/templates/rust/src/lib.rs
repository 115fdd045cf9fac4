//! {{name}}: a wasmgate filter (Proxy-Wasm ABI 0.2.1, Rust SDK).
//!
//! config: `{"greeting": "hello"}` (default "hello"). Every request gets `x-greeting: <greeting>`
//! on its way upstream; a request with an `x-block` header is refused with 403.

use std::rc::Rc;
use wasmgate_sdk::config::Cfg;
use wasmgate_sdk::traits::*;
use wasmgate_sdk::types::*;
use wasmgate_sdk::{error, info};

wasmgate_sdk::main! {{
    wasmgate_sdk::set_log_level(LogLevel::Info);
    wasmgate_sdk::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { greeting: Rc::new(String::new()) })
    });
}}

/// The root context: one per filter entry; reads the configuration.
struct Root {
    greeting: Rc<String>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let parsed = wasmgate_sdk::config::parse(&bytes).and_then(|v| {
            let c = Cfg::root(&v);
            c.only(&["greeting"])?; // a typo in the config refuses the load, naming the key
            c.str_or("greeting", "hello")
        });
        match parsed {
            Ok(g) => {
                self.greeting = Rc::new(g);
                true
            }
            Err(e) => {
                error!("{{name}}: bad configuration: {}", e);
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream { greeting: self.greeting.clone() }))
    }
}

/// The HTTP context: one per request.
struct Stream {
    greeting: Rc<String>,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.get_http_request_header("x-block").is_some() {
            self.send_http_response(403, vec![("content-type", "text/plain")], Some(b"blocked\n"));
            return Action::Pause;
        }
        self.set_http_request_header("x-greeting", Some(&self.greeting));
        info!("{{name}}: greeted {}", self.get_http_request_header(":path").unwrap_or_default());
        Action::Continue
    }

    // Body callbacks run only when built with `--features body` (see Cargo.toml).
    #[cfg(feature = "body")]
    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if end_of_stream {
            info!("{{name}}: request body of {} bytes", body_size);
        }
        Action::Continue
    }
}
