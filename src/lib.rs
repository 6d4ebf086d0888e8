//! tokenwarden: an OAuth 2.0 connection service. See ARCHITECTURE.md for the map.
pub mod catalog;
pub mod secret;
pub mod store;
