//! Logging through `proxy_log`, with a level filter kept in the guest, and the panic hook.

use crate::hostcalls;
use crate::types::LogLevel;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

static LEVEL: AtomicU32 = AtomicU32::new(LogLevel::Info as u32);
static HOOK: Once = Once::new();

/// Messages below `level` are dropped in the guest (no host call). Also installs the panic hook.
pub fn set_log_level(level: LogLevel) {
    LEVEL.store(level as u32, Ordering::Relaxed);
    install_panic_hook();
}

pub fn enabled(level: LogLevel) -> bool {
    level as u32 >= LEVEL.load(Ordering::Relaxed)
}

pub fn log(level: LogLevel, message: &str) {
    if enabled(level) {
        let _ = hostcalls::log(level, message);
    }
}

/// A panic is logged at Critical through `proxy_log` (instead of WASI stderr), then the
/// instance traps (`panic = "abort"`). Safe to call more than once.
pub fn install_panic_hook() {
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let _ = hostcalls::log(LogLevel::Critical, &format!("panicked: {}", info));
        }));
    });
}

#[macro_export]
macro_rules! log_at {
    ($level:expr, $($arg:tt)+) => {
        if $crate::logger::enabled($level) {
            $crate::logger::log($level, &format!($($arg)+))
        }
    };
}

#[macro_export]
macro_rules! trace { ($($arg:tt)+) => { $crate::log_at!($crate::types::LogLevel::Trace, $($arg)+) }; }
#[macro_export]
macro_rules! debug { ($($arg:tt)+) => { $crate::log_at!($crate::types::LogLevel::Debug, $($arg)+) }; }
#[macro_export]
macro_rules! info { ($($arg:tt)+) => { $crate::log_at!($crate::types::LogLevel::Info, $($arg)+) }; }
#[macro_export]
macro_rules! warn { ($($arg:tt)+) => { $crate::log_at!($crate::types::LogLevel::Warn, $($arg)+) }; }
#[macro_export]
macro_rules! error { ($($arg:tt)+) => { $crate::log_at!($crate::types::LogLevel::Error, $($arg)+) }; }
#[macro_export]
macro_rules! critical { ($($arg:tt)+) => { $crate::log_at!($crate::types::LogLevel::Critical, $($arg)+) }; }
