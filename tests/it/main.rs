//! The one integration-test binary: each module is one area of the service.

mod events;
mod harness;
mod ops;
mod scheduler;
mod smoke;
mod store;
mod support;
