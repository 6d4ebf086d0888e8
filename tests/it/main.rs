//! The one integration-test binary: each module is one area of the service.

mod crash;
mod harness;
mod proxy;
mod refresh;
mod replicas;
mod smoke;
mod store;
mod support;
