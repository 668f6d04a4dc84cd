//! Shared test and demo machinery: a packet builder for BPF_PROG_TEST_RUN fixtures, network
//! namespaces with a guard that deletes them, and the blue/green topology the namespace tests and
//! `cargo xtask demo` run on.

pub mod bpf;
pub mod fleet;
pub mod http;
pub mod live;
pub mod netns;
pub mod packet;
pub mod paths;
pub mod prom;
pub mod run;
pub mod tls;
pub mod topology;
pub mod wire;
