//! Watches: the [`Watch`] handle, the [`Emitter`] that turns state changes
//! into [`WatchEvent`]s (the one place that diffs), and the state-based
//! watcher shared by the mem and file backends (snapshot, diff, emit).

use std::collections::BTreeMap;
use std::future::Future;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::{Entry, WatchEvent};

/// How many events wait for a consumer before the watcher waits in turn.
const CHANNEL_CAPACITY: usize = 256;

/// What wakes a watcher to take a new snapshot.
#[async_trait::async_trait]
pub(crate) trait Trigger: Send + 'static {
    /// Resolves when the entries may have changed; `false` to stop watching.
    async fn changed(&mut self) -> bool;
}

/// The consumer dropped its [`Watch`]: the watcher should stop.
#[derive(Debug)]
pub(crate) struct Closed;

/// The entries a watcher has reported, and the bounded channel it reports
/// on. Every send is awaited, so a slow consumer delays the watcher instead
/// of losing events; a changed value is reported as `Removed` then `Added`.
#[derive(Debug)]
pub(crate) struct Emitter {
    tx: mpsc::Sender<WatchEvent>,
    known: BTreeMap<String, serde_json::Value>,
}

impl Emitter {
    /// Reports that `key` now has `value` (`None`: the key is gone), if that
    /// differs from what was reported last.
    pub(crate) async fn set(
        &mut self,
        key: &str,
        value: Option<serde_json::Value>,
    ) -> Result<(), Closed> {
        if self.known.get(key) == value.as_ref() {
            return Ok(());
        }
        if self.known.remove(key).is_some() {
            self.send(WatchEvent::Removed {
                key: key.to_owned(),
            })
            .await?;
        }
        if let Some(value) = value {
            self.known.insert(key.to_owned(), value.clone());
            self.send(WatchEvent::Added(Entry {
                key: key.to_owned(),
                value,
            }))
            .await?;
        }
        Ok(())
    }

    /// Reports the difference between what was reported and `now`, a
    /// complete snapshot: first every removal (and the removal half of every
    /// change), then every addition.
    pub(crate) async fn replace_all(
        &mut self,
        now: BTreeMap<String, serde_json::Value>,
    ) -> Result<(), Closed> {
        let stale: Vec<String> = self
            .known
            .iter()
            .filter(|(key, value)| now.get(*key) != Some(value))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            self.set(&key, None).await?;
        }
        for (key, value) in now {
            self.set(&key, Some(value)).await?;
        }
        Ok(())
    }

    /// Whether the consumer is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    async fn send(&self, event: WatchEvent) -> Result<(), Closed> {
        self.tx.send(event).await.map_err(|_| Closed)
    }
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

    /// Starts a watcher task running `run` with an [`Emitter`] that knows
    /// nothing yet. The task is aborted when the [`Watch`] is dropped.
    pub(crate) fn spawn_with<F, Fut>(run: F) -> Watch
    where
        F: FnOnce(Emitter) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let task = tokio::spawn(run(Emitter {
            tx,
            known: BTreeMap::new(),
        }));
        Watch { rx, task }
    }

    /// Starts a state-based watcher: `snapshot` lists the live entries under
    /// the prefix (`None`: unknown this time); `trigger` resolves when they
    /// may have changed (a file-system event, a timer). Changes between two
    /// snapshots coalesce.
    pub(crate) fn spawn<S, SF, T>(mut snapshot: S, mut trigger: T) -> Watch
    where
        S: FnMut() -> SF + Send + 'static,
        SF: Future<Output = Option<Vec<Entry>>> + Send,
        T: Trigger,
    {
        Self::spawn_with(move |mut emitter| async move {
            loop {
                if let Some(entries) = snapshot().await {
                    let now = entries.into_iter().map(|e| (e.key, e.value)).collect();
                    if emitter.replace_all(now).await.is_err() {
                        return;
                    }
                }
                if !trigger.changed().await || emitter.is_closed() {
                    return;
                }
            }
        })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
