//! The publishing side of the NATS transport: a frame sink that hands
//! envelopes to the client without waiting, and holds them while the
//! connection is down; and a driver task per publisher that welcomes
//! subscribers, sends idle heartbeats and releases the hold after a
//! reconnect (see the crate docs).

use async_nats::connection::State;
use async_nats::{Client, Subject};
use bytes::{Bytes, BytesMut};
use eventplane_core::envelope::unix_nanos;
use eventplane_core::publisher::{FrameSink, SendError, WeakPublisher};
use eventplane_core::{Channel, Identity, Publisher};
use futures::{FutureExt, StreamExt};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};

use crate::{hello_subject, NatsCounters, NatsError, NatsTransport};

/// Most held envelopes moved to the client per lock acquisition while
/// releasing the hold.
const RELEASE_BATCH: usize = 512;

/// Most confirmed envelopes forgotten per publish (see `Hold::remember`).
const FORGET_PER_SEND: usize = 4;

/// Bytes of envelope buffer allocated at a time (see `Hold::frame`).
const ARENA_BYTES: usize = 64 * 1024;

#[derive(Debug, Default)]
struct Hold {
    /// Envelopes go to `queue`, not the client: the connection is down, or
    /// it is back but subscribers have not all returned yet.
    active: bool,
    queue: VecDeque<Bytes>,
    /// Envelopes handed to the client that the server has not yet been
    /// seen to receive, with the confirmation epoch they were sent in (see
    /// [`Confirmations`](crate::Confirmations)). After a reconnect they are
    /// sent again, ahead of the hold: what died with the old connection
    /// arrives after all, and subscribers drop the duplicates.
    unconfirmed: VecDeque<(u64, Bytes)>,
    /// Where envelopes are assembled, one after another.
    arena: BytesMut,
}

impl Hold {
    /// The envelope `head` + `payload` as one buffer, cut from a shared
    /// arena. Every envelope is handed to the client and also kept in
    /// `unconfirmed`; a buffer of its own would cost two allocations per
    /// envelope (its bytes, then the shared header the first clone creates),
    /// where a slice of an arena that is already shared costs neither: one
    /// allocation per [`ARENA_BYTES`], and clones only count references.
    fn frame(&mut self, head: &[u8], payload: &[u8]) -> Bytes {
        let len = head.len() + payload.len();
        if self.arena.capacity() < len {
            // The rest of the old arena lives as long as its envelopes do.
            self.arena = BytesMut::with_capacity(ARENA_BYTES.max(len));
        }
        self.arena.extend_from_slice(head);
        self.arena.extend_from_slice(payload);
        self.arena.split().freeze()
    }

    /// Records `frame`, sent in `epoch`, and forgets what is confirmed: a
    /// few entries per call, so that freeing a confirmation's worth of
    /// envelopes (thousands every 50 ms at high rates) is spread over the
    /// publishes instead of stalling one of them.
    fn remember(&mut self, epoch: u64, frame: Bytes, confirmed: u64, capacity: usize) {
        self.unconfirmed.push_back((epoch, frame));
        for _ in 0..FORGET_PER_SEND {
            match self.unconfirmed.front() {
                Some((e, _)) if *e < confirmed => {
                    self.unconfirmed.pop_front();
                }
                _ => break,
            }
        }
        while self.unconfirmed.len() > capacity {
            self.unconfirmed.pop_front();
        }
    }
}

struct Shared {
    client: Client,
    subject: Subject,
    hold: Mutex<Hold>,
    capacity: usize,
    confirmations: Arc<crate::Confirmations>,
    counters: Arc<NatsCounters>,
    /// Wakes the driver when the sink starts holding.
    held: Notify,
}

struct NatsSink {
    shared: Arc<Shared>,
    driver: tokio::task::AbortHandle,
    /// Distinct subscribers that have said hello so far.
    subscriptions: watch::Receiver<u64>,
}

impl Drop for NatsSink {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl FrameSink for NatsSink {
    fn send(&mut self, head: &[u8], payload: &[u8]) -> Result<(), SendError> {
        let s = &*self.shared;
        let len = head.len() + payload.len();
        let server_max = s.client.max_payload();
        if len > server_max {
            s.counters.too_large.fetch_add(1, Ordering::Relaxed);
            return Err(SendError::Transport(format!(
                "an envelope of {len} bytes exceeds the NATS server's max_payload of {server_max} bytes on {}",
                s.subject
            )));
        }
        let mut hold = s.hold.lock().unwrap_or_else(|p| p.into_inner());
        let frame = hold.frame(head, payload);
        if !hold.active && s.client.connection_state() != State::Connected {
            hold.active = true;
            s.held.notify_one();
        }
        if hold.active {
            if hold.queue.len() >= s.capacity {
                // It has a sequence number: subscribers will report the gap.
                s.counters.hold_dropped.fetch_add(1, Ordering::Relaxed);
            } else {
                hold.queue.push_back(frame);
            }
            return Ok(());
        }
        // The client's `publish` only waits when its queue is full; poll it
        // once, outside tokio's cooperative budget so a busy task does not
        // turn a free slot into a refusal. When it is full the envelope joins
        // the hold instead (the driver feeds the hold to the client as it
        // drains, awaiting room): a burst is absorbed by both queues before
        // anything is dropped, and the caller never waits.
        let epoch = s.confirmations.epoch();
        let publish = s.client.publish(s.subject.clone(), frame.clone());
        match tokio::task::unconstrained(publish).now_or_never() {
            Some(Ok(())) => {
                hold.remember(epoch, frame, s.confirmations.confirmed(), s.capacity);
                Ok(())
            }
            Some(Err(e)) => Err(SendError::Transport(e.to_string())),
            None => {
                // Not sent: the refused future dropped it.
                hold.active = true;
                hold.queue.push_back(frame);
                s.held.notify_one();
                Ok(())
            }
        }
    }

    fn subscriptions(&self) -> Option<watch::Receiver<u64>> {
        Some(self.subscriptions.clone())
    }
}

/// Creates a publisher on `channel` and starts its driver.
pub(crate) async fn publish_on(
    transport: &NatsTransport,
    channel: &Channel,
    identity: Identity,
) -> Result<Publisher, NatsError> {
    let client = transport.client().clone();
    let hello_subject = hello_subject(channel);
    let hellos =
        client
            .subscribe(hello_subject.clone())
            .await
            .map_err(|e| NatsError::Subscribe {
                subject: hello_subject.clone(),
                reason: e.to_string(),
            })?;
    let shared = Arc::new(Shared {
        client: client.clone(),
        subject: Subject::from(channel.subject()),
        hold: Mutex::new(Hold::default()),
        capacity: transport.options().buffer_messages.max(1),
        confirmations: transport.confirmations().clone(),
        counters: transport.counters().clone(),
        held: Notify::new(),
    });
    let (driver_tx, driver_rx) = tokio::sync::oneshot::channel::<WeakPublisher>();
    let (count_tx, subscriptions) = watch::channel(0u64);
    let driver = tokio::spawn(drive(
        shared.clone(),
        transport.clone(),
        hellos,
        driver_rx,
        count_tx,
        hello_subject,
    ));
    let sink = NatsSink {
        shared,
        driver: driver.abort_handle(),
        subscriptions,
    };
    let publisher = Publisher::new(
        channel.clone(),
        identity,
        transport.max_message_bytes(),
        Box::new(sink),
    );
    let _ = driver_tx.send(publisher.downgrade());
    Ok(publisher)
}

/// The driver of one publisher: welcomes, heartbeats, and the hold.
async fn drive(
    shared: Arc<Shared>,
    transport: NatsTransport,
    mut hellos: async_nats::Subscriber,
    publisher: tokio::sync::oneshot::Receiver<WeakPublisher>,
    subscriptions: watch::Sender<u64>,
    hello_subject: String,
) {
    let Ok(publisher) = publisher.await else {
        return;
    };
    // Subscribers that were there before us learn of us from this.
    roll_call(&shared.client, &hello_subject).await;
    let interval = transport.options().heartbeat_interval;
    let settle = transport.options().settle;
    let mut link = transport.link();
    // Only changes from now on are reconnections.
    link.borrow_and_update();
    let mut tick = tokio::time::interval(interval.min(Duration::from_millis(250)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Subscribers that said hello and have not said goodbye.
    let mut known: HashSet<u64> = HashSet::new();
    // Of those, the ones heard from since the last reconnect.
    let mut returned: HashSet<u64> = HashSet::new();
    // While set, the hold is released at this deadline or when every known
    // subscriber has returned, whichever comes first.
    let mut settling: Option<tokio::time::Instant> = None;
    loop {
        let deadline = settling;
        tokio::select! {
            hello = hellos.next() => {
                let Some(hello) = hello else { return };
                let Some(p) = publisher.upgrade() else { return };
                match parse_hello(&hello.payload) {
                    Some(Hello::Hello(id)) => {
                        if known.insert(id) {
                            subscriptions.send_modify(|n| *n += 1);
                        }
                        returned.insert(id);
                        if settling.is_none() {
                            // Welcome: it learns our last sequence number.
                            let _ = p.heartbeat();
                        }
                    }
                    Some(Hello::Bye(id)) => {
                        known.remove(&id);
                        returned.remove(&id);
                    }
                    // Another publisher's roll call.
                    Some(Hello::Roll) => {}
                    None => {}
                }
            }
            changed = link.changed() => {
                if changed.is_err() { return; }
                let connected = *link.borrow_and_update();
                shared.hold.lock().unwrap_or_else(|p| p.into_inner()).active = true;
                if connected {
                    resend_unconfirmed(&shared);
                    returned.clear();
                    settling = Some(tokio::time::Instant::now() + settle);
                    // Subscribers that reconnected before us said hello to no
                    // one: ask again.
                    roll_call(&shared.client, &hello_subject).await;
                } else {
                    settling = None;
                }
            }
            () = shared.held.notified() => {
                // The client's queue was full (released below, if connected
                // and not settling), or holding began before the driver
                // heard of a disconnection (it will hear of the reconnection
                // through `link`).
            }
            () = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => {
                // Whoever has not returned by now is gone: stop waiting for it
                // at the next reconnect.
                known.retain(|id| returned.contains(id));
                settling = None;
            }
            _ = tick.tick() => {
                let Some(p) = publisher.upgrade() else { return };
                if settling.is_none() {
                    p.heartbeat_if_idle(unix_nanos(), interval.as_nanos() as u64);
                }
            }
        }
        if settling.is_some() && known.iter().all(|id| returned.contains(id)) {
            settling = None;
        }
        let connected = shared.client.connection_state() == State::Connected;
        if settling.is_none()
            && connected
            && shared.hold.lock().unwrap_or_else(|p| p.into_inner()).active
        {
            release(&shared).await;
            if let Some(p) = publisher.upgrade() {
                let _ = p.heartbeat();
            }
        }
    }
}

/// Asks the channel's subscribers to say hello. Our hello subscription was
/// sent before this on the same connection, so the answers reach us.
async fn roll_call(client: &Client, hello_subject: &str) {
    let _ = client
        .publish(hello_subject.to_owned(), encode_hello(Hello::Roll))
        .await;
}

/// Puts what the old connection may have lost ahead of the hold queue.
fn resend_unconfirmed(shared: &Shared) {
    let mut hold = shared.hold.lock().unwrap_or_else(|p| p.into_inner());
    let again: Vec<Bytes> = hold.unconfirmed.drain(..).map(|(_, f)| f).collect();
    if again.is_empty() {
        return;
    }
    shared
        .counters
        .resent
        .fetch_add(again.len() as u64, Ordering::Relaxed);
    for frame in again.into_iter().rev() {
        hold.queue.push_front(frame);
    }
}

/// Moves held envelopes to the client in order, then stops holding. New
/// envelopes keep joining the queue until it is empty, so order is kept.
async fn release(shared: &Shared) {
    let mut released = 0usize;
    loop {
        let batch: Vec<Bytes> = {
            let mut hold = shared.hold.lock().unwrap_or_else(|p| p.into_inner());
            if hold.queue.is_empty() {
                hold.active = false;
                break;
            }
            let n = hold.queue.len().min(RELEASE_BATCH);
            hold.queue.drain(..n).collect()
        };
        for frame in batch {
            released += 1;
            let epoch = shared.confirmations.epoch();
            if shared
                .client
                .publish(shared.subject.clone(), frame.clone())
                .await
                .is_err()
            {
                return;
            }
            shared
                .hold
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remember(
                    epoch,
                    frame,
                    shared.confirmations.confirmed(),
                    shared.capacity,
                );
        }
    }
    if released > 0 {
        tracing::debug!(subject = %shared.subject, released, "released what was held");
    }
}

/// An announcement on a channel's hello subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hello {
    /// A publisher asks every subscriber to say hello (at its start and
    /// after it reconnects).
    Roll,
    /// A subscriber subscribed (or resubscribed after a reconnect), or
    /// answers a roll call.
    Hello(u64),
    /// A subscriber is going away.
    Bye(u64),
}

/// Encodes an announcement: `roll`, `hello <id>` or `bye <id>`, ASCII, so
/// any client can send one.
pub fn encode_hello(h: Hello) -> Bytes {
    match h {
        Hello::Roll => "roll".to_owned(),
        Hello::Hello(id) => format!("hello {id}"),
        Hello::Bye(id) => format!("bye {id}"),
    }
    .into()
}

/// Parses an announcement; `None` for anything else (ignored).
pub fn parse_hello(payload: &[u8]) -> Option<Hello> {
    let text = std::str::from_utf8(payload).ok()?;
    if text.trim() == "roll" {
        return Some(Hello::Roll);
    }
    let (word, id) = text.split_once(' ')?;
    let id = id.trim().parse().ok()?;
    match word {
        "hello" => Some(Hello::Hello(id)),
        "bye" => Some(Hello::Bye(id)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellos_round_trip_and_garbage_is_ignored() {
        for h in [Hello::Roll, Hello::Hello(7), Hello::Bye(u64::MAX)] {
            assert_eq!(parse_hello(&encode_hello(h)), Some(h));
        }
        assert_eq!(parse_hello(b"hello"), None);
        assert_eq!(parse_hello(b"hello x"), None);
        assert_eq!(parse_hello(&[0xff, 0x20, 0x31]), None);
    }
}
