//! The in-process backend: a map in memory. Entries live exactly as long as
//! their [`Registration`]; the TTL is accepted for interface parity.

use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

use crate::watch::Trigger;
use crate::{check_key, Discovery, DiscoveryError, Entry, Lease, Registration, Watch};

#[derive(Debug, Default)]
struct State {
    entries: BTreeMap<String, (u64, serde_json::Value)>,
    next_lease: u64,
}

/// In-process discovery. Clones share the same map.
#[derive(Debug, Clone)]
pub struct MemDiscovery {
    state: Arc<Mutex<State>>,
    version: Arc<watch::Sender<u64>>,
}

impl Default for MemDiscovery {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            version: Arc::new(watch::channel(0).0),
        }
    }
}

impl MemDiscovery {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    fn snapshot(&self, prefix: &str) -> Vec<Entry> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.entries
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (_, v))| Entry {
                key: k.clone(),
                value: v.clone(),
            })
            .collect()
    }
}

#[derive(Debug)]
struct MemLease {
    owner: MemDiscovery,
    key: String,
    lease: u64,
}

impl Lease for MemLease {
    fn withdraw(&mut self) {
        let mut st = self.owner.state.lock().unwrap_or_else(|p| p.into_inner());
        // Only remove the entry if it is still ours (not re-registered since).
        if st
            .entries
            .get(&self.key)
            .is_some_and(|(l, _)| *l == self.lease)
        {
            st.entries.remove(&self.key);
            drop(st);
            self.owner.bump();
        }
    }
}

#[async_trait]
impl Trigger for watch::Receiver<u64> {
    async fn changed(&mut self) -> bool {
        watch::Receiver::changed(self).await.is_ok()
    }
}

#[async_trait]
impl Discovery for MemDiscovery {
    fn name(&self) -> &'static str {
        "mem"
    }

    async fn register(
        &self,
        key: &str,
        value: serde_json::Value,
        _ttl: Duration,
    ) -> Result<Registration, DiscoveryError> {
        check_key(key)?;
        let lease = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.next_lease += 1;
            let lease = st.next_lease;
            st.entries.insert(key.to_owned(), (lease, value));
            lease
        };
        self.bump();
        Ok(Registration::new(
            key.to_owned(),
            Box::new(MemLease {
                owner: self.clone(),
                key: key.to_owned(),
                lease,
            }),
        ))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, DiscoveryError> {
        Ok(self.snapshot(prefix))
    }

    async fn watch(&self, prefix: &str) -> Result<Watch, DiscoveryError> {
        let me = self.clone();
        let prefix = prefix.to_owned();
        let mut rx = self.version.subscribe();
        rx.mark_unchanged();
        Ok(Watch::spawn(
            move || {
                let entries = me.snapshot(&prefix);
                async move { Some(entries) }
            },
            rx,
        ))
    }
}
