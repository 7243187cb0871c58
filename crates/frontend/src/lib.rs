//! The frontend: an OpenAI-compatible HTTP server in front of the workers.
//! It finds workers through discovery, routes each request (by cached
//! prefix against load, in turn, or at random), proxies it to the chosen
//! worker and streams the answer back.
//!
//! - [`router`]: the routing state and decision (no sockets).
//! - [`http`]: the API and the proxy.
//! - [`tokenizer`]: prompts to token ids (Hugging Face or built in).
//! - [`run`]: the tasks feeding the router from discovery and the event
//!   plane, and starting it all.

pub mod http;
pub mod router;
pub mod run;
pub mod tokenizer;

pub use router::{Mode, Router, RouterSettings};
pub use run::{start, FleetChange, FrontendSettings, RunningFrontend};
