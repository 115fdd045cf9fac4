//! Which context dispatched each pending callout (an HTTP call, a Redis call): `hostcalls` records a
//! token when the host hands it out, `dispatcher` routes the answer by it and forgets the
//! tokens of a deleted context.
//!
//! proxy-wasm-rust-sdk keeps this table in its dispatcher, so there hostcalls and the
//! dispatcher import each other; here it is a module of its own beneath both.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

thread_local! {
    /// The context whose callback runs now: the one a callout dispatched now belongs to.
    static ACTIVE: Cell<u32> = Cell::new(0);
    /// callout token → context id that dispatched it
    static PENDING: RefCell<BTreeMap<u32, u32>> = RefCell::new(BTreeMap::new());
}

/// The dispatcher is about to run a callback of context `id`.
pub(crate) fn set_active(id: u32) {
    ACTIVE.with(|a| a.set(id));
}

/// The host gave out `token` for a call the active context dispatched.
pub(crate) fn register(token: u32) {
    let id = ACTIVE.with(|a| a.get());
    PENDING.with(|p| p.borrow_mut().insert(token, id));
}

/// The context that dispatched `token` (once: the answer is routed once).
pub(crate) fn take(token: u32) -> Option<u32> {
    PENDING.with(|p| p.borrow_mut().remove(&token))
}

/// Context `id` is gone: an answer to one of its calls has nowhere to go.
pub(crate) fn forget(id: u32) {
    PENDING.with(|p| {
        let mut pending = p.borrow_mut();
        if !pending.is_empty() {
            pending.retain(|_, v| *v != id);
        }
    });
}
