//! The state-based watcher shared by the backends: snapshot, diff, emit.

use std::collections::BTreeMap;
use std::future::Future;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::{Entry, WatchEvent};

/// What wakes a watcher to take a new snapshot.
#[async_trait::async_trait]
pub(crate) trait Trigger: Send + 'static {
    /// Resolves when the entries may have changed; `false` to stop watching.
    async fn changed(&mut self) -> bool;
}

/// A stream of changes under a prefix. Dropping it stops the watcher.
#[derive(Debug)]
pub struct Watch {
    rx: mpsc::Receiver<WatchEvent>,
    task: JoinHandle<()>,
}

impl Watch {
    /// The next change; `None` if the backend's watcher stopped.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        self.rx.recv().await
    }

    /// Starts a watcher: `snapshot` lists the live entries under the prefix;
    /// `changed` resolves when they may have changed (a file-system event, a
    /// timer). Events are sent on a bounded channel and awaited, so a slow
    /// consumer delays the watcher (changes coalesce) instead of losing events.
    pub(crate) fn spawn<S, SF, T>(mut snapshot: S, mut trigger: T) -> Watch
    where
        S: FnMut() -> SF + Send + 'static,
        SF: Future<Output = Option<Vec<Entry>>> + Send,
        T: Trigger,
    {
        let (tx, rx) = mpsc::channel(256);
        let task = tokio::spawn(async move {
            let mut known: BTreeMap<String, serde_json::Value> = BTreeMap::new();
            loop {
                if let Some(entries) = snapshot().await {
                    let now: BTreeMap<String, serde_json::Value> =
                        entries.into_iter().map(|e| (e.key, e.value)).collect();
                    for (key, value) in &known {
                        if now.get(key) != Some(value)
                            && tx
                                .send(WatchEvent::Removed { key: key.clone() })
                                .await
                                .is_err()
                        {
                            return;
                        }
                    }
                    for (key, value) in &now {
                        if known.get(key) != Some(value)
                            && tx
                                .send(WatchEvent::Added(Entry {
                                    key: key.clone(),
                                    value: value.clone(),
                                }))
                                .await
                                .is_err()
                        {
                            return;
                        }
                    }
                    known = now;
                }
                if !trigger.changed().await || tx.is_closed() {
                    return;
                }
            }
        });
        Watch { rx, task }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
