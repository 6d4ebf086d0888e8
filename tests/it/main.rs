//! The one integration-test binary: each module is one area of the service.

mod cli;
mod dashboard;
mod harness;
mod quirks;
mod smoke;
mod store;
mod support;
