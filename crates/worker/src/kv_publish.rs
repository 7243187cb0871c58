//! Publishing KV event batches within a transport's message size limit.
//!
//! A batch that encodes larger than the publisher's limit (over NATS, the
//! server's `max_payload`, 1 MiB by default) is split in halves, recursively,
//! until each part fits ([`KvEventBatch::split`] keeps the meaning: parents
//! chain across the cut). Only a part that cannot be split further (one
//! event of one block, which would need an absurd limit) is refused, with
//! the publisher's clear, counted error.

use eventplane_core::{PublishError, Publisher};
use eventplane_kv::event::KvEventBatch;

/// Publishes `batch`, split as needed to fit. Returns how many messages were
/// published.
pub fn publish_kv_batch(publisher: &Publisher, batch: KvEventBatch) -> Result<u64, PublishError> {
    match publisher.publish(&batch) {
        Ok(_) => Ok(1),
        Err(too_large @ PublishError::TooLarge { .. }) => match batch.split() {
            Some((first, second)) => {
                Ok(publish_kv_batch(publisher, first)? + publish_kv_batch(publisher, second)?)
            }
            None => Err(too_large),
        },
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventplane_core::{Event, Identity, MemBus, QueueLimits, Scope};
    use eventplane_kv::event::{KvEvent, EVENT_VERSION};
    use eventplane_kv::hash::block_hashes;

    #[tokio::test]
    async fn an_oversized_batch_arrives_in_parts_that_mean_the_same() {
        let bus = MemBus::new();
        let ch = Scope::new("n", "c").unwrap().channel("kv-events").unwrap();
        let mut sub = eventplane_core::Subscriber::<KvEventBatch>::new(
            bus.subscriber(&ch, QueueLimits::default()),
        );
        // Room for about 20 blocks per message.
        let p = bus.publisher(&ch, Identity::new(1), 1_000);
        let tokens: Vec<u32> = (0..16 * 300).collect();
        let blocks = block_hashes(&tokens, 16, None);
        let batch = KvEventBatch {
            version: EVENT_VERSION,
            worker_id: 1,
            dp_rank: 0,
            events: vec![
                KvEvent::Stored {
                    parent: None,
                    position: Some(0),
                    blocks: blocks.clone(),
                },
                KvEvent::Removed {
                    blocks: blocks[..2].iter().map(|b| b.seq).collect(),
                },
            ],
        };
        let n = publish_kv_batch(&p, batch).unwrap();
        // 300 blocks of about 20 bytes each cannot fit in fewer than 6.
        assert!(n >= 6, "{n} messages");
        let mut stored = Vec::new();
        let mut removed = Vec::new();
        let mut got = 0;
        while got < n {
            let Some(Event::Message(m)) = sub.recv().await else {
                continue;
            };
            got += 1;
            for e in m.value.events {
                match e {
                    KvEvent::Stored {
                        parent, blocks: b, ..
                    } => {
                        assert_eq!(
                            parent,
                            stored
                                .last()
                                .map(|x: &eventplane_kv::hash::BlockHash| x.seq)
                        );
                        stored.extend(b);
                    }
                    KvEvent::Removed { blocks: b } => removed.extend(b),
                    KvEvent::Cleared => panic!("no Cleared was published"),
                }
            }
        }
        assert_eq!(stored, blocks);
        assert_eq!(removed.len(), 2);
        // One block too large for the limit is the publisher's clear error.
        let tiny = bus.publisher(&ch, Identity::new(2), 100);
        let one = KvEventBatch {
            version: EVENT_VERSION,
            worker_id: 2,
            dp_rank: 0,
            events: vec![KvEvent::Stored {
                parent: None,
                position: None,
                blocks: blocks[..1].to_vec(),
            }],
        };
        assert!(matches!(
            publish_kv_batch(&tiny, one),
            Err(PublishError::TooLarge { .. })
        ));
    }
}
