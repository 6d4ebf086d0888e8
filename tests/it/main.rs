//! The one integration-test binary: each module is one area of the service.

mod harness;
mod refresh;
mod smoke;
mod store;
mod support;
