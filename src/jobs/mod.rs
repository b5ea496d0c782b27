//! Background work that runs beside the gRPC server.

pub mod health;
pub mod holds;
pub mod unauthenticated;
