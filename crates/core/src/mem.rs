//! The in-process transport: publishers and subscribers of one process meet
//! on a [`MemBus`], with no sockets. Used by tests, benchmarks and embedders
//! that run every role in one process.
//!
//! Each publish encodes the envelope once and offers a shared copy to every
//! subscriber's bounded queue; a full queue drops (and counts) for that
//! subscriber alone. A new subscriber makes every live publisher of its
//! channel send a heartbeat at once, so it learns of them without waiting for
//! data (the in-process equivalent of the ZMQ transport's welcome).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::name::Channel;
use crate::publisher::{FrameSink, Identity, Publisher, SendError, WeakPublisher};
use crate::queue::{source_queue, QueueLimits, SourceCounters, SourceTx};
use crate::subscriber::RawSubscriber;

#[derive(Default)]
struct Topic {
    subscribers: RwLock<Vec<SourceTx>>,
    publishers: Mutex<Vec<WeakPublisher>>,
}

/// How often the bus's heartbeat thread looks for idle publishers.
const HEARTBEAT_TICK: Duration = Duration::from_millis(100);

/// An in-process bus. Clones share the same bus.
#[derive(Clone)]
pub struct MemBus {
    topics: Arc<Mutex<HashMap<Arc<str>, Arc<Topic>>>>,
    heartbeat_interval: Duration,
    heartbeats: Arc<std::sync::Once>,
}

impl Default for MemBus {
    fn default() -> Self {
        Self::with_heartbeat_interval(Duration::from_secs(1))
    }
}

impl std::fmt::Debug for MemBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemBus")
    }
}

struct MemSink {
    topic: Arc<Topic>,
}

impl FrameSink for MemSink {
    fn send(&mut self, head: &[u8], payload: &[u8]) -> Result<(), SendError> {
        let mut frame = bytes::BytesMut::with_capacity(head.len() + payload.len());
        frame.extend_from_slice(head);
        frame.extend_from_slice(payload);
        let frame = frame.freeze();
        let subs = self
            .topic
            .subscribers
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let mut closed = false;
        for tx in subs.iter() {
            if tx.is_closed() {
                closed = true;
                continue;
            }
            SourceCounters::bump(&tx.counters().frames);
            tx.counters()
                .bytes
                .fetch_add(frame.len() as u64, std::sync::atomic::Ordering::Relaxed);
            tx.push(vec![frame.clone()], frame.len());
        }
        drop(subs);
        if closed {
            self.topic
                .subscribers
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|tx| !tx.is_closed());
        }
        Ok(())
    }
}

impl MemBus {
    /// A new, empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new, empty bus whose idle publishers heartbeat every `interval`.
    pub fn with_heartbeat_interval(interval: Duration) -> Self {
        Self {
            topics: Arc::default(),
            heartbeat_interval: interval,
            heartbeats: Arc::new(std::sync::Once::new()),
        }
    }

    /// Starts, once per bus, the thread that makes idle publishers send
    /// heartbeats (so a subscriber that lost the end of a stream learns of it).
    /// It holds the bus weakly and ends with it.
    fn start_heartbeats(&self) {
        let topics = Arc::downgrade(&self.topics);
        let interval_ns = self.heartbeat_interval.as_nanos() as u64;
        self.heartbeats.call_once(|| {
            let spawned = std::thread::Builder::new().name("ep-mem-heartbeat".into()).spawn(move || loop {
                std::thread::sleep(HEARTBEAT_TICK);
                let Some(topics) = topics.upgrade() else { return };
                let live: Vec<Arc<Topic>> = topics.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
                drop(topics);
                let now = crate::envelope::unix_nanos();
                for topic in live {
                    let pubs: Vec<Publisher> =
                        topic.publishers.lock().unwrap_or_else(|p| p.into_inner()).iter().filter_map(WeakPublisher::upgrade).collect();
                    for p in pubs {
                        p.heartbeat_if_idle(now, interval_ns);
                    }
                }
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "in-process bus: no heartbeat thread; tail loss shows only with the next message");
            }
        });
    }

    fn topic(&self, channel: &Channel) -> Arc<Topic> {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics.entry(channel.subject_arc()).or_default().clone()
    }

    /// A publisher on `channel`.
    pub fn publisher(
        &self,
        channel: &Channel,
        identity: Identity,
        max_message_bytes: usize,
    ) -> Publisher {
        self.start_heartbeats();
        let topic = self.topic(channel);
        let publisher = Publisher::new(
            channel.clone(),
            identity,
            max_message_bytes,
            Box::new(MemSink {
                topic: topic.clone(),
            }),
        );
        let mut pubs = topic.publishers.lock().unwrap_or_else(|p| p.into_inner());
        pubs.retain(|w| w.upgrade().is_some());
        pubs.push(publisher.downgrade());
        drop(pubs);
        // Announce the newcomer to the subscribers already there, as the ZMQ
        // transport's welcome heartbeat does.
        if !topic
            .subscribers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            let _ = publisher.heartbeat();
        }
        publisher
    }

    /// A subscriber on `channel`. Every live publisher of the channel sends it
    /// a heartbeat right away.
    pub fn subscriber(&self, channel: &Channel, limits: QueueLimits) -> RawSubscriber {
        let topic = self.topic(channel);
        let (tx, source) = source_queue(limits);
        topic
            .subscribers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        let live: Vec<Publisher> = topic
            .publishers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(WeakPublisher::upgrade)
            .collect();
        for p in live {
            // A heartbeat with no payload cannot be too large; the mem sink
            // cannot fail.
            let _ = p.heartbeat();
        }
        RawSubscriber::new(channel.clone(), Box::new(source), Box::new(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::name::Scope;
    use crate::sequence::Notice;
    use crate::subscriber::{Event, Subscriber};

    #[tokio::test]
    async fn publish_and_receive_typed() {
        let bus = MemBus::new();
        let ch = Scope::new("n", "c").unwrap().channel("t").unwrap();
        let p = bus.publisher(&ch, Identity::new(1), 1 << 20);
        let mut s: Subscriber<Vec<u32>> =
            Subscriber::new(bus.subscriber(&ch, QueueLimits::default()));
        // Joined through the welcome heartbeat, before any data.
        assert!(matches!(
            s.recv().await,
            Some(Event::Notice(Notice::Joined {
                publisher_id: 1,
                seq: 0,
                ..
            }))
        ));
        p.publish(&vec![1u32, 2, 3]).unwrap();
        p.publish(&"not a vec").unwrap();
        p.publish(&vec![4u32]).unwrap();
        match s.recv().await {
            Some(Event::Message(m)) => {
                assert_eq!(m.value, vec![1, 2, 3]);
                assert_eq!(m.meta.seq, 1);
            }
            other => panic!("{other:?}"),
        }
        match s.recv().await {
            Some(Event::Message(m)) => assert_eq!(m.meta.seq, 3),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.stats().payload_errors, 1);
        assert_eq!(s.stats().sequence.lost, 0);
    }

    /// The default blocking wait (a waker that unparks the thread): a
    /// subscriber on a thread of its own is woken by a publish from another.
    #[test]
    fn a_blocking_receive_is_woken_by_a_publish() {
        let bus = MemBus::new();
        let ch = Scope::new("n", "c").unwrap().channel("t").unwrap();
        let mut s: Subscriber<u32> = Subscriber::new(bus.subscriber(&ch, QueueLimits::default()));
        let short = std::time::Duration::from_millis(20);
        assert_eq!(s.recv_blocking(short), Err(crate::TimedOut));
        let p = bus.publisher(&ch, Identity::new(1), 1 << 20);
        let receiver = std::thread::spawn(move || {
            let mut got = Vec::new();
            while got.len() < 3 {
                match s.recv_blocking(std::time::Duration::from_secs(10)) {
                    Ok(Some(Event::Message(m))) => got.push(m.value),
                    Ok(Some(_)) => {}
                    other => panic!("{other:?}"),
                }
            }
            got
        });
        for v in [7u32, 8, 9] {
            p.publish(&v).unwrap();
        }
        assert_eq!(receiver.join().unwrap(), vec![7, 8, 9]);
    }

    #[tokio::test]
    async fn slow_subscriber_loses_counted_messages_only() {
        let bus = MemBus::new();
        let ch = Scope::new("n", "c").unwrap().channel("t").unwrap();
        let p = bus.publisher(&ch, Identity::new(1), 1 << 20);
        let mut slow = bus.subscriber(
            &ch,
            QueueLimits {
                max_bytes: 1 << 20,
                max_batches: 10,
            },
        );
        let mut fast = bus.subscriber(&ch, QueueLimits::default());
        for _ in 0..100 {
            p.publish_bytes(b"x").unwrap();
        }
        p.heartbeat().unwrap();
        let mut got = 0;
        while let Some(ev) = slow.try_recv() {
            if let Event::Message(_) = ev {
                got += 1;
            }
        }
        let st = slow.stats();
        assert_eq!(
            st.queue_dropped + got,
            101,
            "every message offered is delivered or counted"
        );
        // The tail loss shows as soon as a heartbeat gets through.
        p.heartbeat().unwrap();
        while slow.try_recv().is_some() {}
        assert_eq!(slow.stats().sequence.lost, 100 - got);
        let mut fast_got = 0;
        while let Some(ev) = fast.try_recv() {
            if let Event::Message(_) = ev {
                fast_got += 1;
            }
        }
        assert_eq!(fast_got, 100);
    }

    #[tokio::test]
    async fn idle_heartbeats_reveal_tail_loss() {
        let bus = MemBus::with_heartbeat_interval(Duration::from_millis(50));
        let ch = Scope::new("n", "c").unwrap().channel("t").unwrap();
        let p = bus.publisher(&ch, Identity::new(1), 1 << 20);
        let mut sub = bus.subscriber(
            &ch,
            QueueLimits {
                max_bytes: 1 << 20,
                max_batches: 4,
            },
        );
        for _ in 0..20 {
            p.publish_bytes(b"x").unwrap();
        }
        // No explicit heartbeat: the bus's idle heartbeat must reveal the loss.
        let mut delivered = 0;
        while sub.stats().sequence.lost + delivered < 20 {
            match tokio::time::timeout(Duration::from_secs(10), sub.recv()).await {
                Ok(Some(Event::Message(_))) => delivered += 1,
                Ok(Some(_)) => {}
                other => panic!("no heartbeat revealed the loss: {other:?}"),
            }
        }
        assert_eq!(sub.stats().sequence.lost, sub.stats().queue_dropped);
        assert!(delivered < 20);
    }
}
