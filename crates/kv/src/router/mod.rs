//! The routing logic, sans-IO: [`active`] (the load a router has booked on
//! each worker) and [`select`] (the cost function and the choice). The
//! frontend feeds them what it learns (KV-event matches, load reports,
//! bookings) and asks for a worker.

pub mod active;
pub mod select;

pub use active::{ActiveLoad, ActiveSequences, RequestKey};
pub use select::{choose, cost, Candidate, Choice, Weights};
