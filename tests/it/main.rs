//! The one integration-test binary: each module is one area of the service.

mod store;
mod support;
