//! tokenwarden: an OAuth 2.0 connection service for integration platforms.
//!
//! The map (ARCHITECTURE.md has the long form): `catalog` knows the providers; `crypto` and
//! `secret` keep secrets sealed and unprintable; `store` holds all SQL (SQLite or PostgreSQL);
//! `oauth` speaks to providers' authorization servers; `instances` turns token responses into
//! stored instances and shows them; `refresh` is the one refresh path (single flight, leases,
//! failure classes); `proxy` forwards calls with the token injected; `events` and `audit` record
//! what happened; `background` runs the scheduler, crash recovery and webhook delivery; `http` is
//! the axum router; `startup`, `cli`, `telemetry`, `openapi` and `demo` are the edges.

/// `println!` for a command's output: a reader that stops (`instances list | head`) ends the
/// command quietly, where `println!` panicked with a backtrace (see [`cli::write_out`]).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))
    };
}

pub mod app;
pub mod audit;
pub mod background;
pub mod catalog;
pub mod cli;
pub mod crypto;
pub mod demo;
pub mod egress;
pub mod events;
pub mod http;
pub mod instances;
pub mod oauth;
pub mod openapi;
pub mod orgs;
pub mod proxy;
pub mod refresh;
pub mod remote;
pub mod secret;
pub mod startup;
pub mod store;
pub mod telemetry;
