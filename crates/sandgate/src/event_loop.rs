//! Which event loop the current thread runs: 0 for the main runtime, 1.. for the extra
//! workers (`crate::workers` sets it). Per-loop state (the fast lane's idle upstream
//! connections, the finish counters) is indexed by it, so loops never write each other's.

use std::cell::Cell;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The event loop running the current thread.
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// Records that the current thread runs event loop `i`.
pub fn set_current(i: usize) {
    INDEX.with(|c| c.set(i));
}
