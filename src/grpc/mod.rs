//! Transport: the tonic server, its handlers, request validation, the mapping
//! of errors to statuses, and the health and reflection services.

mod admin;
mod bulk;
pub mod metered;
mod page_token;
mod reconcile;
mod service;
pub mod status;
mod validate;
mod watch;

pub use service::{UsageApi, MAX_PAGE_SIZE};

pub mod gate;
pub mod policy;
pub mod tls;
