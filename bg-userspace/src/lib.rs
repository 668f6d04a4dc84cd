//! bg's agent and CLI (`bgctl`).

pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod health;
pub mod metrics;
pub mod state;
