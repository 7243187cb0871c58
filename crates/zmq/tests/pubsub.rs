//! The ZMQ transport in one process, over in-process discovery: joining
//! without sleeping, delivery without gaps, following publishers as they come
//! and go, and surviving garbage from a foreign peer.

use eventplane_core::{Event, Identity, Notice, PublisherChange, RawSubscriber, Scope};
use eventplane_discovery::{Discovery, MemDiscovery};
use eventplane_zmq::{discovery_prefix, publish_on, subscribe_to, Advertisement, ZmqOptions};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

async fn next(sub: &mut RawSubscriber) -> Event<eventplane_core::RawMessage> {
    tokio::time::timeout(WAIT, sub.recv())
        .await
        .expect("event within 10 s")
        .expect("subscriber open")
}

/// Skips events until `pred` matches one.
async fn until(
    sub: &mut RawSubscriber,
    mut pred: impl FnMut(&Event<eventplane_core::RawMessage>) -> bool,
) {
    loop {
        if pred(&next(sub).await) {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_delivers_and_follows_discovery() {
    let ctx = zmq::Context::new();
    let discovery: Arc<dyn Discovery> = Arc::new(MemDiscovery::new());
    let opts = ZmqOptions::default();
    let ch = Scope::new("ns", "comp").unwrap().channel("events").unwrap();

    let mut sub = subscribe_to(&ctx, &discovery, &ch, &opts).await.unwrap();
    let p = publish_on(&ctx, &*discovery, &ch, Identity::new(11), &opts)
        .await
        .unwrap();
    until(&mut sub, |e| {
        matches!(
            e,
            Event::Discovery(PublisherChange::Added {
                publisher_id: Some(11),
                ..
            })
        )
    })
    .await;
    // The welcome heartbeat tells the subscriber it is connected: no sleep.
    until(&mut sub, |e| {
        matches!(
            e,
            Event::Notice(Notice::Joined {
                publisher_id: 11,
                seq: 0,
                ..
            })
        )
    })
    .await;
    assert!(p.wait_for_subscriptions(1).await);

    let n = 20_000u64;
    for i in 0..n {
        p.publish_bytes(&i.to_le_bytes()).unwrap();
    }
    let mut expect = 1;
    while expect <= n {
        match next(&mut sub).await {
            Event::Message(m) => {
                assert_eq!(m.meta.seq, expect);
                assert_eq!(m.payload[..], (expect - 1).to_le_bytes());
                expect += 1;
            }
            Event::Notice(n) => panic!("unexpected notice {n:?}"),
            Event::Discovery(_) => {}
        }
    }
    assert_eq!(sub.stats().sequence.lost, 0);

    // A restart of the same publisher id: a new incarnation, recognised.
    drop(p);
    until(&mut sub, |e| {
        matches!(
            e,
            Event::Discovery(PublisherChange::Removed {
                publisher_id: Some(11),
                ..
            })
        )
    })
    .await;
    let p2 = publish_on(&ctx, &*discovery, &ch, Identity::new(11), &opts)
        .await
        .unwrap();
    until(&mut sub, |e| matches!(e, Event::Notice(Notice::Restarted { publisher_id: 11, last_seq, .. }) if *last_seq == n)).await;
    p2.publish_bytes(b"after restart").unwrap();
    until(
        &mut sub,
        |e| matches!(e, Event::Message(m) if m.meta.seq == 1 && &m.payload[..] == b"after restart"),
    )
    .await;
    assert_eq!(sub.stats().sequence.restarts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_a_foreign_peer_is_counted_and_good_traffic_continues() {
    let ctx = zmq::Context::new();
    let discovery: Arc<dyn Discovery> = Arc::new(MemDiscovery::new());
    let opts = ZmqOptions {
        max_message_bytes: 4096,
        ..ZmqOptions::default()
    };
    let ch = Scope::new("ns", "comp").unwrap().channel("events").unwrap();
    let mut sub = subscribe_to(&ctx, &discovery, &ch, &opts).await.unwrap();

    // A raw PUB socket, registered like a publisher, that sends junk.
    let rogue = ctx.socket(zmq::XPUB).unwrap();
    rogue.bind("tcp://127.0.0.1:*").unwrap();
    let endpoint = rogue.get_last_endpoint().unwrap().unwrap();
    let ad = Advertisement {
        endpoint,
        publisher_id: 666,
        incarnation: 1,
        subject: ch.subject().into(),
        pid: 0,
    };
    let _reg = discovery
        .register(
            &format!("{}rogue", discovery_prefix(&ch)),
            serde_json::to_value(&ad).unwrap(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let good = publish_on(&ctx, &*discovery, &ch, Identity::new(1), &opts)
        .await
        .unwrap();
    until(&mut sub, |e| {
        matches!(
            e,
            Event::Notice(Notice::Joined {
                publisher_id: 1,
                ..
            })
        )
    })
    .await;
    // Wait for the rogue's subscription too, so its junk is not dropped unsent.
    let sub_msg = rogue.recv_bytes(0).unwrap();
    assert_eq!(sub_msg[0], 1);

    let prefix = eventplane_zmq::frame_prefix(&ch);
    let framed = |envelope: &[u8]| [&prefix[..], envelope].concat();
    // A well-formed envelope from the rogue's publisher id.
    let valid = {
        let mut buf = Vec::new();
        let header = eventplane_core::Header {
            kind: eventplane_core::Kind::Data,
            publisher_id: 666,
            incarnation: 1,
            seq: 1,
            timestamp_ns: 0,
        };
        eventplane_core::envelope::encode(&header, b"x", &mut buf);
        buf
    };
    rogue
        .send_multipart([&prefix[..], b"two frames".as_slice()], 0)
        .unwrap(); // multipart
    rogue.send(framed(b"not msgpack"), 0).unwrap();
    rogue.send(framed(&valid[..valid.len() - 3]), 0).unwrap(); // truncated
    rogue.send(framed(&[0x97, 7]), 0).unwrap(); // unknown version
    rogue.send(framed(&[0u8; 10_000]), 0).unwrap(); // oversized
    rogue
        .send([ch.subject().as_bytes(), b"-more\0x"].concat(), 0)
        .unwrap(); // another subject's prefix: bad framing
    rogue.send(&prefix[..prefix.len() - 1], 0).unwrap(); // prefix without its NUL: bad framing
    rogue.send(framed(&valid), 0).unwrap(); // well formed: delivered

    good.publish_bytes(b"still fine").unwrap();
    let mut got_rogue_valid = false;
    let mut got_good = false;
    while !(got_rogue_valid && got_good) {
        if let Event::Message(m) = next(&mut sub).await {
            got_rogue_valid |= m.meta.publisher_id == 666;
            got_good |= &m.payload[..] == b"still fine";
        }
    }
    let st = sub.stats();
    // The multipart message and the two frames without our prefix.
    assert_eq!(st.bad_framing, 3, "{st:?}");
    assert_eq!(st.oversized, 1, "{st:?}");
    assert_eq!(st.decode_errors.values().sum::<u64>(), 3, "{st:?}");
    assert_eq!(st.malformed(), 7);
}

/// A subscriber on a thread of its own, blocked in `recv_blocking` before any
/// publisher exists: discovery's news wakes it (no periodic polling), it
/// connects, receives everything in order, times out when nothing comes, and
/// afterwards the same subscriber still works with async `recv`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_receiver_on_its_own_thread_joins_and_receives() {
    let ctx = zmq::Context::new();
    let discovery: Arc<dyn Discovery> = Arc::new(MemDiscovery::new());
    let opts = ZmqOptions::default();
    let ch = Scope::new("ns", "comp")
        .unwrap()
        .channel("blocking")
        .unwrap();
    let sub = subscribe_to(&ctx, &discovery, &ch, &opts).await.unwrap();
    let n = 5_000u64;

    let (joined_tx, joined_rx) = tokio::sync::oneshot::channel();
    let receiver = std::thread::spawn(move || {
        let mut sub = sub;
        let mut joined_tx = Some(joined_tx);
        let mut expect = 1u64;
        while expect <= n {
            match sub.recv_blocking(WAIT).expect("an event within 10 s") {
                Some(Event::Notice(Notice::Joined {
                    publisher_id: 12, ..
                })) => {
                    let _ = joined_tx.take().map(|tx| tx.send(()));
                }
                Some(Event::Message(m)) => {
                    assert_eq!(m.meta.seq, expect);
                    assert_eq!(m.payload[..], (expect - 1).to_le_bytes());
                    expect += 1;
                }
                Some(Event::Notice(other)) => panic!("unexpected notice {other:?}"),
                Some(Event::Discovery(_)) => {}
                None => panic!("subscriber closed"),
            }
        }
        let quiet = Duration::from_millis(50);
        assert_eq!(
            sub.recv_blocking(quiet),
            Err(eventplane_core::TimedOut),
            "nothing more was published"
        );
        sub
    });

    // Published only once the subscriber, blocked on its thread, has joined.
    let p = publish_on(&ctx, &*discovery, &ch, Identity::new(12), &opts)
        .await
        .unwrap();
    tokio::time::timeout(WAIT, joined_rx)
        .await
        .expect("the blocked receiver joins the new publisher")
        .unwrap();
    for i in 0..n {
        p.publish_bytes(&i.to_le_bytes()).unwrap();
    }
    let mut sub = tokio::task::spawn_blocking(move || receiver.join().unwrap())
        .await
        .unwrap();
    assert_eq!(sub.stats().sequence.lost, 0);
    // The wake-ups that discovery sent through the socket are not traffic.
    assert_eq!(sub.stats().bad_framing, 0);

    // Back to async receiving: the socket's reactor registration returns.
    p.publish_bytes(b"after").unwrap();
    until(
        &mut sub,
        |e| matches!(e, Event::Message(m) if &m.payload[..] == b"after"),
    )
    .await;
}

/// A blocking receiver kept busy by one publisher still follows discovery:
/// a second publisher that appears mid-stream is connected to (the command
/// queue is looked at again when its wake-up arrives through the socket,
/// not for every message), and both streams arrive in order with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_blocking_receiver_joins_a_publisher_that_appears_mid_stream() {
    let ctx = zmq::Context::new();
    let discovery: Arc<dyn Discovery> = Arc::new(MemDiscovery::new());
    let opts = ZmqOptions::default();
    let ch = Scope::new("ns", "comp").unwrap().channel("busy").unwrap();
    let sub = subscribe_to(&ctx, &discovery, &ch, &opts).await.unwrap();
    let n = 2_000u64;

    let (joined_tx, mut joined_rx) = tokio::sync::mpsc::unbounded_channel();
    // Says when the first publisher's stream has reached the receiver, so
    // that the second publisher appears while the receiver is busy.
    let (streaming_tx, mut streaming_rx) = tokio::sync::mpsc::unbounded_channel();
    let receiver = std::thread::spawn(move || {
        let mut sub = sub;
        // Next expected sequence number per publisher (ids 1 and 2).
        let mut expect = [1u64, 1u64];
        while expect[1] <= n {
            match sub.recv_blocking(WAIT).expect("an event within 10 s") {
                Some(Event::Notice(Notice::Joined { publisher_id, .. })) => {
                    let _ = joined_tx.send(publisher_id);
                }
                Some(Event::Message(m)) => {
                    let k = (m.meta.publisher_id - 1) as usize;
                    assert_eq!(m.meta.seq, expect[k], "publisher {}", k + 1);
                    if m.meta.publisher_id == 1 && m.meta.seq == 1 {
                        let _ = streaming_tx.send(());
                    }
                    expect[k] += 1;
                }
                Some(Event::Notice(other)) => panic!("unexpected notice {other:?}"),
                Some(Event::Discovery(_)) => {}
                None => panic!("subscriber closed"),
            }
        }
        (sub, expect)
    });

    let first = publish_on(&ctx, &*discovery, &ch, Identity::new(1), &opts)
        .await
        .unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, joined_rx.recv()).await.unwrap(),
        Some(1)
    );
    // The first publisher streams until the receiver reports the second.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let streaming = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                first.publish_bytes(&sent.to_le_bytes()).unwrap();
                sent += 1;
                if sent.is_multiple_of(64) {
                    // Stay below the high-water marks: nothing may be lost.
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            (first, sent)
        }
    });
    tokio::time::timeout(WAIT, streaming_rx.recv())
        .await
        .expect("the first publisher's stream reaches the receiver");
    let second = publish_on(&ctx, &*discovery, &ch, Identity::new(2), &opts)
        .await
        .unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, joined_rx.recv()).await.unwrap(),
        Some(2)
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (_first, sent) = streaming.join().unwrap();
    assert!(sent > 0);
    for i in 0..n {
        second.publish_bytes(&i.to_le_bytes()).unwrap();
    }
    let (sub, expect) = tokio::task::spawn_blocking(move || receiver.join().unwrap())
        .await
        .unwrap();
    assert_eq!(expect[1], n + 1);
    assert_eq!(sub.stats().sequence.lost, 0);
}
