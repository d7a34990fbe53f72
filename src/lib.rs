//! Portico: an API gateway. See ARCHITECTURE.md for the map of this crate.
// `unsafe` is denied everywhere except `server::sys` (inherited file
// descriptors for the binary upgrade), which allows it for its few calls.
#![deny(unsafe_code)]

pub mod access_log;
pub mod action;
pub mod admin;
pub mod aggregate;
pub mod auth;
pub mod body;
pub mod clock;
pub mod config;
pub mod error;
pub mod metrics;
pub mod net;
pub mod normalize;
pub mod outcome;
pub mod policy;
pub mod proxy;
pub mod rand;
pub mod ratelimit;
pub mod router;
pub mod server;
pub mod shed;
pub mod snapshot;
pub mod strict;
pub mod tls;
pub mod trace;
pub mod upstream;

/// Loads and compiles a config file: what `portico validate` runs.
pub fn load(path: &std::path::Path) -> Result<snapshot::Snapshot, config::ConfigErrors> {
    let loaded = config::load_file(path)?;
    snapshot::compile(&loaded, None)
}
