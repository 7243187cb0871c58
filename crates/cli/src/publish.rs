//! `eventplane publish`: send a JSON value (or one per stdin line) on a
//! channel, optionally many times at a given rate, optionally waiting for
//! subscribers first and staying registered afterwards.
//!
//! Prints JSON lines on stdout: `ready` (identity, once registered),
//! `subscribed` (if waiting), `published` (totals, when done).

use anyhow::{bail, Context};
use eventplane::{EventPlane, Identity};
use serde_json::json;
use std::io::BufRead;
use std::time::Duration;

use crate::args::PublishArgs;
use crate::pace::Pacer;

pub async fn run(a: PublishArgs) -> anyhow::Result<()> {
    let config = a.plane.config()?;
    let channel = a.channel.channel()?;
    let value: serde_json::Value = if a.stdin {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&a.value)
            .with_context(|| format!("--value is not valid JSON: {}", a.value))?
    };
    let plane = EventPlane::start(config).await?;
    let identity = a
        .publisher_id
        .map(Identity::new)
        .unwrap_or_else(Identity::random);
    let publisher = plane
        .publisher(&channel, identity)
        .await
        .with_context(|| format!("publishing on {channel}"))?;
    println!(
        "{}",
        json!({"type": "ready", "publisher_id": identity.publisher_id, "incarnation": identity.incarnation, "subject": channel.subject(), "pid": std::process::id()})
    );

    if a.wait_subscribers > 0 {
        let waited = tokio::time::timeout(
            Duration::from_secs(a.wait_timeout_s),
            publisher.wait_for_subscriptions(a.wait_subscribers),
        )
        .await;
        match waited {
            Ok(true) => println!(
                "{}",
                json!({"type": "subscribed", "subscribers": a.wait_subscribers})
            ),
            Ok(false) => {
                bail!("this transport cannot tell when subscribers join; drop --wait-subscribers")
            }
            Err(_) => bail!(
                "no {} subscriber(s) joined {channel} within {} s (--wait-timeout-s)",
                a.wait_subscribers,
                a.wait_timeout_s
            ),
        }
    }

    let mut sent = 0u64;
    if a.stdin {
        let lines = tokio::task::spawn_blocking(|| {
            std::io::stdin()
                .lock()
                .lines()
                .collect::<Result<Vec<_>, _>>()
        })
        .await??;
        for (i, line) in lines
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("stdin line {} is not valid JSON", i + 1))?;
            publisher.publish(&v)?;
            sent += 1;
        }
    } else {
        let payload = rmp_serde::to_vec_named(&value)?;
        let pacer = Pacer::new(a.rate);
        while sent < a.count {
            pacer.wait_for_async(sent).await;
            let due = pacer.due().min(a.count);
            while sent < due {
                publisher.publish_bytes(&payload)?;
                sent += 1;
            }
        }
    }
    // A heartbeat right away lets subscribers see any tail loss now.
    let _ = publisher.heartbeat();
    println!(
        "{}",
        json!({"type": "published", "count": sent, "last_seq": publisher.last_seq(), "stats": publisher.stats()})
    );

    if a.hold {
        crate::interrupted().await?;
    }
    // Dropping the publisher withdraws its registration; the socket's linger
    // lets queued messages leave before the process exits.
    drop(publisher);
    Ok(())
}
