//! The indexes a KV-aware router asks "which worker already holds this
//! prompt's prefix?": [`PrefixIndex`], fed by the workers' KV events, and
//! [`ApproxIndex`], which predicts the same from the router's own decisions
//! when there are no events. Both answer with [`Matches`].

mod approx;
mod prefix;
mod table;

pub use approx::{ApproxConfig, ApproxIndex, DEFAULT_MAX_BLOCKS, DEFAULT_TTL};
pub use prefix::{IndexReader, IndexStats, Matches, PrefixIndex};
