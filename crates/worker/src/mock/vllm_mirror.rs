//! The mock engine speaking vLLM's own KV-event protocol (`--zmq-kv-events-port`),
//! so the relay can be tested end to end against the real format: a PUB
//! socket sending `[topic "", seq (8 bytes BE), payload]` with sequence
//! numbers from 0, and a ROUTER replay socket (on the next port) answering
//! `["", start_seq]` with every buffered `["", seq, payload]` from there and
//! then `["", -1, ""]`. Payloads are vLLM's array encoding:
//! `[ts, [event, ...]]` with `["BlockStored", block_hashes,
//! parent_block_hash, token_ids, block_size, lora_id, medium]`,
//! `["BlockRemoved", block_hashes, medium]` and `["AllBlocksCleared"]`.
//! The block hashes are our sequence hashes (opaque to the relay).
//!
//! Like vLLM, the last 10,000 batches are kept for replay, and a live send
//! never blocks the engine: if the socket thread falls behind, the batch
//! is dropped from the live stream only (the relay sees the gap and
//! replays it).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use eventplane_kv::KvEvent;
use rmpv::Value;

/// Batches kept for replay (vLLM's default buffer).
pub const REPLAY_BUFFER: usize = 10_000;

type Ring = Arc<Mutex<VecDeque<(u64, Arc<[u8]>)>>>;

/// Encodes one batch in vLLM's array form.
pub fn encode_batch(events: &[(KvEvent, Vec<u32>)], block_size: u32, ts: f64) -> Vec<u8> {
    let nil = Value::Nil;
    let event = |(e, tokens): &(KvEvent, Vec<u32>)| match e {
        KvEvent::Stored { parent, blocks, .. } => Value::Array(vec![
            Value::from("BlockStored"),
            Value::Array(blocks.iter().map(|b| Value::from(b.seq.0)).collect()),
            parent.map_or(Value::Nil, |p| Value::from(p.0)),
            Value::Array(tokens.iter().map(|&t| Value::from(t)).collect()),
            Value::from(block_size),
            nil.clone(),
            nil.clone(),
        ]),
        KvEvent::Removed { blocks } => Value::Array(vec![
            Value::from("BlockRemoved"),
            Value::Array(blocks.iter().map(|b| Value::from(b.0)).collect()),
            nil.clone(),
        ]),
        KvEvent::Cleared => Value::Array(vec![Value::from("AllBlocksCleared")]),
    };
    let batch = Value::Array(vec![
        Value::F64(ts),
        Value::Array(events.iter().map(event).collect()),
    ]);
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &batch).expect("encoding to memory cannot fail");
    out
}

/// The engine side of the mirror. Dropping it stops the socket thread.
pub struct VllmMirror {
    next_seq: u64,
    ring: Ring,
    tx: SyncSender<(u64, Arc<[u8]>)>,
    stop: Arc<AtomicBool>,
    dropped_live: Arc<AtomicU64>,
    /// The PUB socket's endpoint.
    pub events_endpoint: String,
    /// The ROUTER socket's endpoint.
    pub replay_endpoint: String,
}

impl std::fmt::Debug for VllmMirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VllmMirror")
            .field("events_endpoint", &self.events_endpoint)
            .field("replay_endpoint", &self.replay_endpoint)
            .finish()
    }
}

impl VllmMirror {
    /// Binds the PUB socket on `host:port` and the replay socket on
    /// `host:port+1` (both on free ports when `port` is 0).
    pub fn start(host: &str, port: u16) -> anyhow::Result<Self> {
        let ctx = zmq::Context::new();
        let publisher = ctx.socket(zmq::PUB)?;
        publisher.set_sndhwm(100_000)?;
        let router = ctx.socket(zmq::ROUTER)?;
        let (events, replay) = if port == 0 {
            (format!("tcp://{host}:*"), format!("tcp://{host}:*"))
        } else {
            let next = port
                .checked_add(1)
                .context("--zmq-kv-events-port leaves no port for the replay socket")?;
            (
                format!("tcp://{host}:{port}"),
                format!("tcp://{host}:{next}"),
            )
        };
        publisher
            .bind(&events)
            .with_context(|| format!("binding the vLLM-format KV event socket on {events}"))?;
        router
            .bind(&replay)
            .with_context(|| format!("binding the vLLM-format replay socket on {replay}"))?;
        let endpoint = |s: &zmq::Socket| -> anyhow::Result<String> {
            s.get_last_endpoint()?
                .map_err(|_| anyhow::anyhow!("endpoint is not UTF-8"))
        };
        let events_endpoint = endpoint(&publisher)?;
        let replay_endpoint = endpoint(&router)?;
        let ring: Ring = Arc::new(Mutex::new(VecDeque::with_capacity(REPLAY_BUFFER)));
        let (tx, rx) = sync_channel(4096);
        let stop = Arc::new(AtomicBool::new(false));
        let dropped_live = Arc::new(AtomicU64::new(0));
        let thread = SocketThread {
            publisher,
            router,
            rx,
            ring: Arc::clone(&ring),
            stop: Arc::clone(&stop),
        };
        std::thread::Builder::new()
            .name("vllm-mirror".into())
            .spawn(move || thread.run())?;
        Ok(VllmMirror {
            next_seq: 0,
            ring,
            tx,
            stop,
            dropped_live,
            events_endpoint,
            replay_endpoint,
        })
    }

    /// Numbers and sends one batch (kept for replay even if the live send
    /// has to be dropped).
    pub fn publish(&mut self, payload: Vec<u8>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let payload: Arc<[u8]> = payload.into();
        if let Ok(mut ring) = self.ring.lock() {
            if ring.len() == REPLAY_BUFFER {
                ring.pop_front();
            }
            ring.push_back((seq, Arc::clone(&payload)));
        }
        if let Err(TrySendError::Full(_)) = self.tx.try_send((seq, payload)) {
            self.dropped_live.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Batches dropped from the live stream (still replayable).
    pub fn dropped_live(&self) -> u64 {
        self.dropped_live.load(Ordering::Relaxed)
    }
}

impl Drop for VllmMirror {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct SocketThread {
    publisher: zmq::Socket,
    router: zmq::Socket,
    rx: Receiver<(u64, Arc<[u8]>)>,
    ring: Ring,
    stop: Arc<AtomicBool>,
}

impl SocketThread {
    fn run(self) {
        while !self.stop.load(Ordering::Relaxed) {
            while let Ok(frames) = self.router.recv_multipart(zmq::DONTWAIT) {
                self.replay(&frames);
            }
            match self.rx.recv_timeout(Duration::from_millis(5)) {
                Ok((seq, payload)) => {
                    let _ = self.publisher.send_multipart(
                        [&b""[..], &seq.to_be_bytes()[..], &payload[..]],
                        zmq::DONTWAIT,
                    );
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
    }

    /// `[identity, "", start]` → every kept batch from `start`, then -1.
    fn replay(&self, frames: &[Vec<u8>]) {
        let [identity, _empty, start] = frames else {
            return;
        };
        let Ok(start) = <[u8; 8]>::try_from(start.as_slice()) else {
            return;
        };
        let start = u64::from_be_bytes(start);
        let kept: Vec<(u64, Arc<[u8]>)> = match self.ring.lock() {
            Ok(ring) => ring.iter().filter(|(s, _)| *s >= start).cloned().collect(),
            Err(_) => Vec::new(),
        };
        for (seq, payload) in kept {
            let _ = self.router.send_multipart(
                [
                    &identity[..],
                    &b""[..],
                    &seq.to_be_bytes()[..],
                    &payload[..],
                ],
                0,
            );
        }
        let _ = self.router.send_multipart(
            [
                &identity[..],
                &b""[..],
                &(-1i64).to_be_bytes()[..],
                &b""[..],
            ],
            0,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::{decode_batch, EngineEvent, EngineHash};
    use eventplane_kv::{BlockHash, LocalHash, SeqHash};

    #[test]
    fn encodes_what_the_relay_decodes() {
        let events = vec![
            (
                KvEvent::Stored {
                    parent: Some(SeqHash(5)),
                    position: Some(1),
                    blocks: vec![BlockHash {
                        local: LocalHash(1),
                        seq: SeqHash(u64::MAX),
                    }],
                },
                vec![1, 2],
            ),
            (
                KvEvent::Removed {
                    blocks: vec![SeqHash(5)],
                },
                vec![],
            ),
            (KvEvent::Cleared, vec![]),
        ];
        let b = decode_batch(&encode_batch(&events, 2, 1.0)).unwrap();
        assert_eq!(
            b.events,
            vec![
                EngineEvent::BlockStored {
                    block_hashes: vec![EngineHash(u64::MAX)],
                    parent: Some(EngineHash(5)),
                    token_ids: vec![1, 2],
                    block_size: 2,
                    lora_id: None,
                    lora_name: None,
                    medium: None,
                },
                EngineEvent::BlockRemoved {
                    block_hashes: vec![EngineHash(5)],
                    medium: None
                },
                EngineEvent::AllBlocksCleared,
            ]
        );
    }
}
