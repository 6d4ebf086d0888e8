//! The one integration-test binary: each module is one area of the service.

mod elements;
mod harness;
mod instances;
mod isolation;
mod keys;
mod secrets;
mod smoke;
mod store;
mod support;
