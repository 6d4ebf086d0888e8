//! The one integration-test binary: each module is one area of the service.

mod cli;
mod crash;
mod dashboard;
mod harness;
mod proxy;
mod quirks;
mod refresh;
mod replicas;
mod smoke;
mod store;
mod support;
