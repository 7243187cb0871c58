//! `eventplane bench`: placeholder.
use crate::args::{BenchArgs, BenchPeerArgs};
pub async fn run(_a: BenchArgs) -> anyhow::Result<()> {
    Ok(())
}
pub async fn peer(_a: BenchPeerArgs) -> anyhow::Result<()> {
    Ok(())
}
