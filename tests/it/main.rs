//! The one integration-test binary: each module is one area of the service.

mod cli;
mod copy;
mod crash;
mod dashboard;
mod elements;
mod events;
mod fuzz_regressions;
mod hardening;
mod harness;
mod imports;
mod instances;
mod isolation;
mod keys;
mod openapi;
mod ops;
mod proxy;
mod quirks;
mod refresh;
mod replicas;
mod scheduler;
mod secrets;
mod smoke;
mod store;
mod support;
