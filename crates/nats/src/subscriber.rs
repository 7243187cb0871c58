//! The subscribing side of the NATS transport: the client's subscription read
//! directly when the application asks for the next message (no hop through
//! another queue), and a small task that says hello to the channel's
//! publishers when the subscription is confirmed and after every reconnect.
//!
//! The subscription is bounded by the client
//! ([`NatsOptions::subscription_messages`](crate::NatsOptions)): past it the
//! client drops for this subscription alone, and sequence tracking reports the
//! loss as a gap.

use async_nats::Client;
use bytes::Bytes;
use eventplane_core::queue::{FrameSource, SourceCounters, SourceItem};
use eventplane_core::subscriber::LogOnce;
use eventplane_core::{Channel, RawSubscriber};
use futures::{FutureExt, Stream};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::publisher::{encode_hello, parse_hello, Hello};
use crate::{hello_subject, NatsError, NatsTransport};

/// Most messages handed to the subscriber in one batch.
const BATCH_MESSAGES: usize = 1024;

struct NatsSource {
    sub: async_nats::Subscriber,
    max_bytes: usize,
    counters: Arc<SourceCounters>,
    log: LogOnce,
    channel: Channel,
}

impl NatsSource {
    /// Takes what is ready, up to a batch; registers the waker otherwise. A
    /// lone message is handed over as a [`SourceItem::Frame`]: at moderate
    /// rates most polls find one message, and a batch would cost it a `Vec`
    /// allocation of its own.
    fn poll_item(&mut self, cx: Option<&mut Context<'_>>) -> Poll<Option<SourceItem>> {
        let noop = std::task::Waker::noop();
        let mut noop_cx = Context::from_waker(noop);
        let cx = match cx {
            Some(cx) => cx,
            None => &mut noop_cx,
        };
        let mut first: Option<Bytes> = None;
        let mut batch: Vec<Bytes> = Vec::new();
        for _ in 0..BATCH_MESSAGES {
            match Pin::new(&mut self.sub).poll_next(cx) {
                Poll::Ready(Some(msg)) => {
                    let Some(payload) = self.accept(msg.payload) else {
                        continue;
                    };
                    match first.take() {
                        None if batch.is_empty() => first = Some(payload),
                        earlier => {
                            batch.extend(earlier);
                            batch.push(payload);
                        }
                    }
                }
                Poll::Ready(None) if first.is_none() && batch.is_empty() => {
                    return Poll::Ready(None)
                }
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        match first {
            Some(frame) => Poll::Ready(Some(SourceItem::Frame(frame))),
            None if batch.is_empty() => Poll::Pending,
            None => Poll::Ready(Some(SourceItem::Batch(batch))),
        }
    }

    /// Counts a received payload; `None` if it is too large (counted, logged
    /// once).
    fn accept(&mut self, payload: Bytes) -> Option<Bytes> {
        let len = payload.len();
        self.counters.count_frame_single_writer(len);
        if len > self.max_bytes {
            SourceCounters::bump(&self.counters.oversized);
            if self.log.first("oversized") {
                tracing::warn!(channel = %self.channel, len, limit = self.max_bytes, "dropped an oversized message (counted; later ones are only counted)");
            }
            return None;
        }
        Some(payload)
    }
}

impl FrameSource for NatsSource {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<SourceItem>> {
        self.poll_item(Some(cx))
    }

    fn try_next(&mut self) -> Option<SourceItem> {
        match self.poll_item(None) {
            Poll::Ready(item) => item,
            Poll::Pending => None,
        }
    }

    fn counters(&self) -> &SourceCounters {
        &self.counters
    }
}

/// Says goodbye and stops the hello task when the subscriber is dropped.
struct Guard {
    hello: tokio::task::JoinHandle<()>,
    client: Client,
    subject: String,
    id: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.hello.abort();
        // Best effort: publishers that miss it stop waiting for us after one
        // settle period.
        let bye = self
            .client
            .publish(self.subject.clone(), encode_hello(Hello::Bye(self.id)));
        let _ = tokio::task::unconstrained(bye).now_or_never();
    }
}

/// Subscribes to `channel`, then says hello (after the subscription, on the
/// same connection, so publishers that answer already deliver to us).
pub(crate) async fn subscribe_to(
    transport: &NatsTransport,
    channel: &Channel,
) -> Result<RawSubscriber, NatsError> {
    let client = transport.client().clone();
    let sub = client
        .subscribe(channel.subject().to_owned())
        .await
        .map_err(|e| NatsError::Subscribe {
            subject: channel.subject().to_owned(),
            reason: e.to_string(),
        })?;
    let subject = hello_subject(channel);
    // Publishers' roll calls come on the hello subject.
    let mut rolls = client
        .subscribe(subject.clone())
        .await
        .map_err(|e| NatsError::Subscribe {
            subject: subject.clone(),
            reason: e.to_string(),
        })?;
    // The server handles a connection's messages in order: the hello, sent
    // after the subscriptions on the same connection, reaches publishers only
    // once they are in place, so their welcome cannot miss us. (The flush
    // only hands our subscriptions to the socket before this returns.)
    client.flush().await.map_err(|e| NatsError::Subscribe {
        subject: channel.subject().to_owned(),
        reason: e.to_string(),
    })?;
    let id: u64 = rand::random();
    let mut link = transport.link();
    link.borrow_and_update();
    let hello = tokio::spawn({
        let client = client.clone();
        let subject = subject.clone();
        async move {
            let hello = || client.publish(subject.clone(), encode_hello(Hello::Hello(id)));
            let _ = hello().await;
            loop {
                tokio::select! {
                    // Again after every reconnect: the client resubscribes on
                    // the new connection before it sends anything we queue.
                    changed = link.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        if *link.borrow_and_update() {
                            let _ = hello().await;
                        }
                    }
                    // And whenever a publisher calls the roll.
                    msg = futures::StreamExt::next(&mut rolls) => {
                        let Some(msg) = msg else { return };
                        if parse_hello(&msg.payload) == Some(Hello::Roll) {
                            let _ = hello().await;
                        }
                    }
                }
            }
        }
    });
    let source = NatsSource {
        sub,
        max_bytes: transport.options().max_message_bytes,
        counters: Arc::new(SourceCounters::default()),
        log: LogOnce::default(),
        channel: channel.clone(),
    };
    Ok(RawSubscriber::new(
        channel.clone(),
        Box::new(source),
        Box::new(Guard {
            hello,
            client,
            subject,
            id,
        }),
    ))
}
