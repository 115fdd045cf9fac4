//! Routes every `proxy_on_*` export to the right context object by context id
//! (the role of proxy-wasm-rust-sdk `src/dispatcher.rs`).
//!
//! A context is lent out of its table slot for the duration of its callback and put back
//! afterwards, so a callback may call any SDK function (including ones that consult the
//! dispatcher, like `dispatch_http_call`) without a `RefCell` double borrow. The slot stays in
//! the table meanwhile, so lending and returning are a lookup each, with no rebalancing; every
//! export does one table lookup to find its context (a callback runs 18 times per request
//! through a three-filter chain, so this is the SDK's per-callback cost).

use crate::callouts;
use crate::hostcalls;
use crate::traits::*;
use crate::types::*;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

pub type NewRootContext = fn(context_id: u32) -> Box<dyn RootContext>;
pub type NewHttpContext = fn(context_id: u32, root_context_id: u32) -> Box<dyn HttpContext>;

/// context id → its context; `None` while the context is lent out to its own callback.
type Table<T> = RefCell<BTreeMap<u32, Option<Box<T>>>>;

struct Dispatcher {
    new_root: Cell<Option<NewRootContext>>,
    new_http: Cell<Option<NewHttpContext>>,
    roots: Table<dyn RootContext>,
    https: Table<dyn HttpContext>,
}

thread_local! {
    static DISPATCHER: Dispatcher = Dispatcher {
        new_root: Cell::new(None),
        new_http: Cell::new(None),
        roots: RefCell::new(BTreeMap::new()),
        https: RefCell::new(BTreeMap::new()),
    };
}

pub fn set_root_context(callback: NewRootContext) {
    DISPATCHER.with(|d| d.new_root.set(Some(callback)));
}

pub fn set_http_context(callback: NewHttpContext) {
    DISPATCHER.with(|d| d.new_http.set(Some(callback)));
}

/// Which table holds a context id (absent: neither, or the context is in its own callback).
enum Kind {
    Root,
    Http,
}

/// Take context `id` out of its slot (making it the active context) and run `f` on it, then
/// put it back — unless it was deleted meanwhile. `None`: no such context, or it is busy.
fn lend<T: ?Sized, R>(table: &Table<T>, id: u32, f: impl FnOnce(&mut T) -> R) -> Option<R> {
    let mut ctx = table.borrow_mut().get_mut(&id)?.take()?;
    callouts::set_active(id);
    let r = f(ctx.as_mut());
    if let Some(slot) = table.borrow_mut().get_mut(&id) {
        *slot = Some(ctx);
    }
    Some(r)
}

fn with_root<R>(id: u32, f: impl FnOnce(&mut (dyn RootContext + 'static)) -> R) -> R {
    DISPATCHER
        .with(|d| lend(&d.roots, id, f))
        .unwrap_or_else(|| panic!("invalid root context_id {}", id))
}

fn with_http<R>(id: u32, f: impl FnOnce(&mut (dyn HttpContext + 'static)) -> R) -> R {
    DISPATCHER
        .with(|d| lend(&d.https, id, f))
        .unwrap_or_else(|| panic!("invalid http context_id {}", id))
}

/// A callback any context has (`Context`'s): to the http context of that id, else the root.
fn with_any<R>(id: u32, on_http: impl FnOnce(&mut (dyn HttpContext + 'static)) -> R, on_root: impl FnOnce(&mut (dyn RootContext + 'static)) -> R) -> R {
    match DISPATCHER.with(|d| lend(&d.https, id, on_http)) {
        Some(r) => r,
        None => with_root(id, on_root),
    }
}

/// Where context `id` is, if it exists and is not in its own callback.
fn kind(id: u32) -> Option<Kind> {
    DISPATCHER.with(|d| {
        if matches!(d.https.borrow().get(&id), Some(Some(_))) {
            Some(Kind::Http)
        } else if matches!(d.roots.borrow().get(&id), Some(Some(_))) {
            Some(Kind::Root)
        } else {
            None
        }
    })
}

#[cfg(test)]
fn is_http(id: u32) -> bool {
    matches!(kind(id), Some(Kind::Http))
}

fn create_context(context_id: u32, parent_id: u32) {
    let exists = DISPATCHER.with(|d| d.https.borrow().contains_key(&context_id) || d.roots.borrow().contains_key(&context_id));
    if exists {
        panic!("duplicate context_id {}", context_id);
    }
    if parent_id == 0 {
        let ctx: Box<dyn RootContext> = match DISPATCHER.with(|d| d.new_root.get()) {
            Some(f) => f(context_id),
            None => Box::new(DefaultRoot),
        };
        DISPATCHER.with(|d| d.roots.borrow_mut().insert(context_id, Some(ctx)));
        return;
    }
    let ctx = if let Some(f) = DISPATCHER.with(|d| d.new_http.get()) {
        Some(f(context_id, parent_id))
    } else {
        with_root(parent_id, |root| match root.get_type() {
            Some(ContextType::HttpContext) => root.create_http_context(context_id),
            _ => None,
        })
    };
    let ctx = ctx.unwrap_or_else(|| panic!("root context {} created no http context", parent_id));
    DISPATCHER.with(|d| d.https.borrow_mut().insert(context_id, Some(ctx)));
}

struct DefaultRoot;
impl Context for DefaultRoot {}
impl RootContext for DefaultRoot {}

// ---- exports ----

#[no_mangle]
pub extern "C" fn proxy_on_context_create(context_id: u32, parent_context_id: u32) {
    create_context(context_id, parent_context_id)
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(context_id: u32, vm_configuration_size: usize) -> bool {
    with_root(context_id, |r| r.on_vm_start(vm_configuration_size))
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(context_id: u32, plugin_configuration_size: usize) -> bool {
    with_root(context_id, |r| r.on_configure(plugin_configuration_size))
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(context_id: u32) {
    with_root(context_id, |r| r.on_tick())
}

#[no_mangle]
pub extern "C" fn proxy_on_queue_ready(context_id: u32, queue_id: u32) {
    with_root(context_id, |r| r.on_queue_ready(queue_id))
}

/// Exported by `main!` when listed in its `callbacks:` (all of them by default).
#[doc(hidden)]
pub fn proxy_on_request_headers(context_id: u32, num_headers: usize, end_of_stream: bool) -> Action {
    with_http(context_id, |c| c.on_http_request_headers(num_headers, end_of_stream))
}

#[cfg(feature = "request-body")]
#[no_mangle]
pub extern "C" fn proxy_on_request_body(context_id: u32, body_size: usize, end_of_stream: bool) -> Action {
    with_http(context_id, |c| c.on_http_request_body(body_size, end_of_stream))
}

#[cfg(feature = "trailers")]
#[no_mangle]
pub extern "C" fn proxy_on_request_trailers(context_id: u32, num_trailers: usize) -> Action {
    with_http(context_id, |c| c.on_http_request_trailers(num_trailers))
}

/// Exported by `main!` when listed in its `callbacks:` (all of them by default).
#[doc(hidden)]
pub fn proxy_on_response_headers(context_id: u32, num_headers: usize, end_of_stream: bool) -> Action {
    with_http(context_id, |c| c.on_http_response_headers(num_headers, end_of_stream))
}

#[cfg(feature = "response-body")]
#[no_mangle]
pub extern "C" fn proxy_on_response_body(context_id: u32, body_size: usize, end_of_stream: bool) -> Action {
    with_http(context_id, |c| c.on_http_response_body(body_size, end_of_stream))
}

#[cfg(feature = "trailers")]
#[no_mangle]
pub extern "C" fn proxy_on_response_trailers(context_id: u32, num_trailers: usize) -> Action {
    with_http(context_id, |c| c.on_http_response_trailers(num_trailers))
}

/// The first argument is the root context id (the host registers callouts on the root);
/// the SDK routes the answer to the context that dispatched the call and makes it effective.
#[no_mangle]
pub extern "C" fn proxy_on_http_call_response(_root_id: u32, token: u32, num_headers: usize, body_size: usize, num_trailers: usize) {
    let target = callouts::take(token).unwrap_or_else(|| panic!("invalid token_id {}", token));
    match kind(target) {
        Some(Kind::Http) => {
            let _ = hostcalls::set_effective_context(target);
            with_http(target, |c| c.on_http_call_response(token, num_headers, body_size, num_trailers))
        }
        Some(Kind::Root) => {
            let _ = hostcalls::set_effective_context(target);
            with_root(target, |c| c.on_http_call_response(token, num_headers, body_size, num_trailers))
        }
        None => {}
    }
    // else: the dispatching stream is gone; drop the answer (as the Go SDK does).
}

/// Higress's Redis answer, also to the root context id: routed like an HTTP call's answer. One
/// whose context is gone (the request ended first) is dropped, as Higress's Go SDK does.
#[cfg(feature = "redis")]
#[no_mangle]
pub extern "C" fn proxy_on_redis_call_response(_root_id: u32, token: u32, status: u32, response_size: usize) {
    let target = match callouts::take(token) {
        Some(t) => t,
        None => return,
    };
    match kind(target) {
        Some(Kind::Http) => {
            let _ = hostcalls::set_effective_context(target);
            with_http(target, |c| c.on_redis_call_response(token, status, response_size))
        }
        Some(Kind::Root) => {
            let _ = hostcalls::set_effective_context(target);
            with_root(target, |c| c.on_redis_call_response(token, status, response_size))
        }
        None => {}
    }
}

/// Exported by `main!` when listed in its `callbacks:` (all of them by default).
#[doc(hidden)]
pub fn proxy_on_done(context_id: u32) -> bool {
    with_any(context_id, |c| c.on_done(), |c| c.on_done())
}

/// Exported by `main!` when listed in its `callbacks:` (all of them by default).
#[doc(hidden)]
pub fn proxy_on_log(context_id: u32) {
    with_any(context_id, |c| c.on_log(), |c| c.on_log())
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    DISPATCHER.with(|d| {
        if d.https.borrow_mut().remove(&context_id).is_none() {
            d.roots.borrow_mut().remove(&context_id);
        }
    });
    callouts::forget(context_id);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    thread_local! {
        static EVENTS: RefCell<Vec<String>> = RefCell::new(Vec::new());
    }

    fn ev(s: String) {
        EVENTS.with(|e| e.borrow_mut().push(s));
    }

    fn events() -> Vec<String> {
        EVENTS.with(|e| e.borrow_mut().drain(..).collect())
    }

    struct Root {
        id: u32,
        seen: Rc<RefCell<u32>>,
    }
    impl Context for Root {}
    impl RootContext for Root {
        fn on_vm_start(&mut self, size: usize) -> bool {
            ev(format!("vm_start {} {}", self.id, size));
            true
        }
        fn on_configure(&mut self, size: usize) -> bool {
            ev(format!("configure {} {}", self.id, size));
            size != 7
        }
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
        fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
            *self.seen.borrow_mut() += 1;
            Some(Box::new(Http { id, root: self.id }))
        }
    }

    struct Http {
        id: u32,
        root: u32,
    }
    impl Context for Http {
        fn on_done(&mut self) -> bool {
            ev(format!("done {}", self.id));
            true
        }
    }
    impl HttpContext for Http {
        fn on_http_request_headers(&mut self, n: usize, eos: bool) -> Action {
            ev(format!("req_headers {} root={} n={} eos={}", self.id, self.root, n, eos));
            // re-entering the dispatcher from a callback must not panic
            assert!(is_http(self.id) == false);
            Action::Pause
        }
        fn on_http_response_body(&mut self, size: usize, eos: bool) -> Action {
            ev(format!("resp_body {} {} {}", self.id, size, eos));
            Action::Continue
        }
        fn on_log(&mut self) {
            ev(format!("log {}", self.id));
        }
    }

    #[test]
    fn routes_callbacks_by_context_id() {
        set_root_context(|id| -> Box<dyn RootContext> { Box::new(Root { id, seen: Rc::new(RefCell::new(0)) }) });
        proxy_on_context_create(1, 0);
        assert!(proxy_on_vm_start(1, 0));
        assert!(proxy_on_configure(1, 15));
        assert!(!proxy_on_configure(1, 7));
        proxy_on_context_create(2, 1);
        proxy_on_context_create(3, 1);
        assert_eq!(proxy_on_request_headers(3, 4, true), Action::Pause);
        assert_eq!(proxy_on_request_headers(2, 5, false), Action::Pause);
        assert_eq!(proxy_on_request_body(2, 10, true), Action::Continue); // default
        assert_eq!(proxy_on_response_body(2, 3, true), Action::Continue);
        assert!(proxy_on_done(2));
        proxy_on_log(2);
        proxy_on_delete(2);
        assert!(!is_http(2));
        assert!(is_http(3));
        assert_eq!(
            events(),
            vec![
                "vm_start 1 0",
                "configure 1 15",
                "configure 1 7",
                "req_headers 3 root=1 n=4 eos=true",
                "req_headers 2 root=1 n=5 eos=false",
                "resp_body 2 3 true",
                "done 2",
                "log 2",
            ]
        );
    }

    #[test]
    fn done_and_log_reach_root_contexts_and_deleted_contexts_stay_deleted() {
        struct R;
        impl Context for R {
            fn on_done(&mut self) -> bool {
                ev("root done".into());
                false
            }
        }
        impl RootContext for R {
            fn on_log(&mut self) {
                ev("root log".into());
            }
        }
        struct Gone(u32);
        impl Context for Gone {}
        impl HttpContext for Gone {
            fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
                proxy_on_delete(self.0); // a host may delete a context from inside its callback
                Action::Continue
            }
        }
        set_root_context(|_| -> Box<dyn RootContext> { Box::new(R) });
        set_http_context(|id, _| -> Box<dyn HttpContext> { Box::new(Gone(id)) });
        proxy_on_context_create(1, 0);
        assert!(!proxy_on_done(1));
        proxy_on_log(1);
        proxy_on_context_create(2, 1);
        assert_eq!(proxy_on_request_headers(2, 0, true), Action::Continue);
        assert!(!is_http(2)); // not put back after its callback
        proxy_on_context_create(2, 1); // the id is free again
        assert!(is_http(2));
        assert_eq!(events(), vec!["root done", "root log"]);
    }

    #[test]
    #[should_panic(expected = "invalid http context_id 9")]
    fn unknown_context_panics() {
        proxy_on_request_headers(9, 1, true);
    }

    #[test]
    #[should_panic(expected = "duplicate context_id 1")]
    fn duplicate_context_panics() {
        proxy_on_context_create(1, 0);
        proxy_on_context_create(1, 0);
    }

    #[cfg(feature = "redis")]
    #[test]
    fn redis_answers_route_by_token_and_drop_when_the_context_is_gone() {
        struct R(u32);
        impl Context for R {
            fn on_redis_call_response(&mut self, token: u32, status: u32, size: usize) {
                ev(format!("redis {} {} {} {}", self.0, token, status, size));
            }
        }
        impl HttpContext for R {}
        set_http_context(|id, _| -> Box<dyn HttpContext> { Box::new(R(id)) });
        proxy_on_context_create(1, 0);
        proxy_on_context_create(2, 1);
        proxy_on_context_create(3, 1);
        callouts::set_active(2);
        callouts::register(7);
        callouts::set_active(3);
        callouts::register(11);
        proxy_on_delete(3);
        proxy_on_redis_call_response(1, 7, 0, 5);
        proxy_on_redis_call_response(1, 11, 1, 0); // stream 3 is gone: dropped, no panic
        proxy_on_redis_call_response(1, 99, 0, 0); // unknown token: dropped
        assert_eq!(events(), vec!["redis 2 7 0 5"]);
    }

    #[test]
    fn http_context_factory_overrides_root() {
        set_http_context(|id, root| -> Box<dyn HttpContext> { Box::new(Http { id, root: root + 100 }) });
        proxy_on_context_create(1, 0);
        proxy_on_context_create(5, 1);
        proxy_on_request_headers(5, 0, true);
        assert_eq!(events(), vec!["req_headers 5 root=101 n=0 eos=true"]);
    }
}
