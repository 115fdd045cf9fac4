//! SDK example: external authorization through `dispatch_http_call`.
//!
//! config: `{"cluster": "authz", "path": "/check", "timeout_ms": 1000}`. For every request the
//! filter pauses, sends `GET <path>` with the client's `authorization` header to `cluster`,
//! and when the answer arrives (`on_http_call_response`) either resumes the request with
//! `x-authz: <answer body>` (answer 200) or replies 403 with the answer's status.

use std::rc::Rc;
use std::time::Duration;
use wasmgate_sdk::config::Cfg;
use wasmgate_sdk::traits::*;
use wasmgate_sdk::types::*;
use wasmgate_sdk::{error, info};

wasmgate_sdk::main! {{
    wasmgate_sdk::set_log_level(LogLevel::Info);
    wasmgate_sdk::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { cfg: None }) });
}}

struct Config {
    cluster: String,
    path: String,
    timeout: Duration,
}

struct Root {
    cfg: Option<Rc<Config>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let parsed = wasmgate_sdk::config::parse(&bytes).and_then(|v| {
            let c = Cfg::root(&v);
            c.only(&["cluster", "path", "timeout_ms"])?;
            Ok(Config {
                cluster: c.str("cluster")?.ok_or("cluster: required")?,
                path: c.str_or("path", "/check")?,
                timeout: Duration::from_millis(c.f64("timeout_ms")?.unwrap_or(1000.0) as u64),
            })
        });
        match parsed {
            Ok(c) => {
                self.cfg = Some(Rc::new(c));
                true
            }
            Err(e) => {
                error!("callout: bad configuration: {}", e);
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream { cfg: self.cfg.clone()?, token: None }))
    }
}

struct Stream {
    cfg: Rc<Config>,
    token: Option<u32>,
}

impl Context for Stream {
    fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        assert_eq!(Some(token), self.token, "answer for another call");
        if num_headers == 0 {
            self.send_http_response(503, vec![("content-type", "text/plain")], Some(b"authorization service unavailable\n"));
            return;
        }
        let status = self.get_http_call_response_header(":status").unwrap_or_default();
        let body = self.get_http_call_response_body(0, body_size).unwrap_or_default();
        info!("callout: authz answered {} ({} bytes)", status, body.len());
        if status == "200" {
            self.set_http_request_header("x-authz", Some(&String::from_utf8_lossy(&body)));
            self.resume_http_request();
        } else {
            let msg = format!("denied by authz ({})\n", status);
            self.send_http_response(403, vec![("content-type", "text/plain")], Some(msg.as_bytes()));
        }
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let auth = self.get_http_request_header("authorization").unwrap_or_default();
        let authority = self.get_http_request_header(":authority").unwrap_or_default();
        let cfg = self.cfg.clone();
        match self.dispatch_http_call(
            &cfg.cluster,
            vec![(":method", "GET"), (":path", &cfg.path), (":authority", &authority), ("authorization", &auth)],
            None,
            vec![],
            cfg.timeout,
        ) {
            Ok(token) => {
                self.token = Some(token);
                Action::Pause
            }
            Err(s) => {
                error!("callout: dispatch failed: {:?}", s);
                self.send_http_response(503, vec![], Some(b"callout failed\n"));
                Action::Pause
            }
        }
    }
}
