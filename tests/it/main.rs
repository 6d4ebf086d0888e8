//! The one integration-test binary: each module is one area of the service.

mod cli;
mod crash;
mod dashboard;
mod elements;
mod harness;
mod instances;
mod isolation;
mod keys;
mod proxy;
mod quirks;
mod refresh;
mod replicas;
mod secrets;
mod smoke;
mod store;
mod support;
