//! Background work that runs beside the gRPC server.

pub mod backfill;
pub mod health;
pub mod holds;
pub mod reconcile;
pub mod unauthenticated;
