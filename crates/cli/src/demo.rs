//! `eventplane demo`: placeholder until the demo issue lands.
use crate::args::DemoArgs;
pub async fn run(_a: DemoArgs) -> anyhow::Result<()> {
    Ok(())
}
