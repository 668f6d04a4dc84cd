//! bg's agent and CLI (`bgctl`).

pub mod agent;
pub mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod decisions;
pub mod dataplane;
pub mod fleet;
pub mod health;
pub mod metrics;
pub mod signals;
pub mod state;

/// Locks `m`, also after a thread panicked holding it: every decision writes the selector
/// last, after everything that can fail, so the state behind a poisoned lock is whole, and an
/// agent that stops answering over a poisoned lock would be worse than one that goes on.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
