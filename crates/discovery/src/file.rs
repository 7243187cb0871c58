//! The file backend: a directory shared by the processes of one machine.
//!
//! Each registration is one file, `<escaped key>.json`, holding the key, the
//! value, the owner's pid and host, and the TTL. The owner refreshes the
//! file's modification time every third of the TTL from a thread of its own
//! (so a starved async runtime cannot let its lease lapse), and rewrites the
//! file if someone removed it. An entry is live while its modification time
//! is younger than its TTL and, when it was written on this host, while its
//! owner process exists, so a `kill -9` is noticed at the next scan, not only
//! when the TTL runs out. Anyone who finds a dead entry deletes it.
//!
//! Files are written to a hidden temporary name and renamed into place, so a
//! reader never sees half an entry. Watchers rescan when the directory
//! changes (inotify through the `notify` crate) and at least every
//! [`SCAN_INTERVAL`], which bounds how late an expiry is seen.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

use crate::watch::Trigger;
use crate::{check_key, Discovery, DiscoveryError, Entry, Lease, Registration, Watch};

/// Longest time between two scans of a watched directory.
pub const SCAN_INTERVAL: Duration = Duration::from_millis(200);

const SUFFIX: &str = ".json";

/// Longest file name stem used for an entry (file systems allow 255 bytes).
const MAX_FILE_STEM: usize = 200;

/// FNV-1a, 64 bits: a hash that is the same in every build and process,
/// which the standard library's hasher does not promise.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[derive(Debug, Serialize, Deserialize)]
struct FileEntry {
    key: String,
    value: serde_json::Value,
    pid: u32,
    host: String,
    ttl_ms: u64,
}

/// What identifies a version of an entry file: inode, length and creation
/// time (when the file system records one).
type Stamp = (u64, u64, Option<SystemTime>);

/// A parsed entry, the stamp of the file it was read from, and when.
type Cached = (Stamp, std::time::Instant, Arc<FileEntry>);

/// Cached entries are read again after this long whatever their stamp says,
/// which bounds the damage of an inode reused for a same-sized file.
const CACHE_FOR: Duration = Duration::from_secs(2);

/// Discovery through a shared directory. See the module docs.
#[derive(Debug, Clone)]
pub struct FileDiscovery {
    dir: Arc<PathBuf>,
    host: Arc<str>,
    /// File names already reported as unreadable, so each is logged once.
    bad_logged: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Parsed entries by file name, with the (inode, length) they were read at.
    cache: Arc<Mutex<HashMap<String, Cached>>>,
    /// Directory scans done by this handle and its clones (for metrics).
    scans: Arc<std::sync::atomic::AtomicU64>,
}

impl FileDiscovery {
    /// Uses (and creates, if needed) `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, DiscoveryError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        Ok(Self {
            dir: Arc::new(dir),
            host: hostname().into(),
            bad_logged: Arc::default(),
            cache: Arc::default(),
            scans: Arc::default(),
        })
    }

    /// The directory used when none is configured: `$XDG_RUNTIME_DIR/eventplane/discovery`
    /// if that variable is set, else `<temp dir>/eventplane-<uid>/discovery`.
    pub fn default_dir() -> PathBuf {
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(run) if !run.is_empty() => PathBuf::from(run).join("eventplane").join("discovery"),
            _ => {
                // SAFETY: getuid has no preconditions and cannot fail.
                let uid = unsafe { libc::getuid() };
                std::env::temp_dir()
                    .join(format!("eventplane-{uid}"))
                    .join("discovery")
            }
        }
    }

    /// The directory in use.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, key: &str) -> PathBuf {
        let mut name = String::with_capacity(key.len() + SUFFIX.len());
        for &b in key.as_bytes() {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                name.push(b as char);
            } else {
                name.push_str(&format!("%{b:02X}"));
            }
        }
        if name.len() > MAX_FILE_STEM {
            // File names are limited (255 bytes on most file systems); keep a
            // readable start and make the rest unique with a hash of the whole
            // key. Readers match the key inside the file, never the name.
            let mut cut = MAX_FILE_STEM - 17;
            while !name.is_char_boundary(cut) {
                cut -= 1;
            }
            name = format!("{}~{:016x}", &name[..cut], fnv1a(key.as_bytes()));
        }
        name.push_str(SUFFIX);
        self.dir.join(name)
    }

    /// Reads every live entry under `prefix`, deleting dead ones.
    fn scan(&self, prefix: &str) -> Result<Vec<Entry>, DiscoveryError> {
        self.scans.fetch_add(1, Ordering::Relaxed);
        let rd = std::fs::read_dir(&*self.dir).map_err(|e| io_err(&self.dir, e))?;
        let now = SystemTime::now();
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for dent in rd.flatten() {
            let name = dent.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') || !name.ends_with(SUFFIX) {
                continue;
            }
            seen.insert(name.to_owned());
            let path = dent.path();
            let Ok(meta) = std::fs::metadata(&path) else {
                continue; // removed between listing and reading
            };
            // Entries are replaced by rename (a new inode) and kept alive by
            // touching: an unchanged inode and length means unchanged content,
            // so a scan of a large directory reads only what changed.
            let stamp = (meta.ino(), meta.len(), meta.created().ok());
            let cached = self
                .cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(name)
                .filter(|(s, at, _)| *s == stamp && at.elapsed() < CACHE_FOR)
                .map(|(_, _, e)| e.clone());
            let entry = match cached {
                Some(entry) => entry,
                None => {
                    let Ok(bytes) = std::fs::read(&path) else {
                        continue;
                    };
                    match serde_json::from_slice::<FileEntry>(&bytes) {
                        Ok(e) => {
                            let e = Arc::new(e);
                            self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(
                                name.to_owned(),
                                (stamp, std::time::Instant::now(), e.clone()),
                            );
                            e
                        }
                        Err(e) => {
                            if self
                                .bad_logged
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(name.to_owned())
                            {
                                tracing::warn!(path = %path.display(), error = %e, "unreadable discovery entry ignored");
                            }
                            continue;
                        }
                    }
                }
            };
            if !entry.key.starts_with(prefix) {
                continue;
            }
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            let owner_dead = entry.host == *self.host && !process_alive(entry.pid);
            if owner_dead || age > Duration::from_millis(entry.ttl_ms) {
                tracing::debug!(key = %entry.key, pid = entry.pid, owner_dead, age_ms = age.as_millis() as u64, "expiring dead discovery entry");
                let _ = std::fs::remove_file(&path);
                self.cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(name);
                continue;
            }
            out.push(Entry {
                key: entry.key.clone(),
                value: entry.value.clone(),
            });
        }
        // Forget files that are gone.
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, _| seen.contains(name));
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

fn io_err(path: &Path, source: std::io::Error) -> DiscoveryError {
    DiscoveryError::Io {
        backend: "file",
        location: path.display().to_string(),
        source,
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // when the name fits, and we stop at the first NUL either way.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::from("localhost");
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Whether the process `pid` on this host still runs.
///
/// A process killed but not yet reaped by its parent (a zombie) does not
/// run: `kill(pid, 0)` still succeeds for it, so on Linux its state in
/// `/proc/<pid>/stat` decides. Without this, an owner killed with `kill -9`
/// under a parent that reaps late (a test harness, a slow supervisor) would
/// keep its entry until the TTL ran out.
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    let exists = rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && !is_zombie(pid)
}

/// Reads the state letter of `/proc/<pid>/stat`: the field after the
/// command name, which is parenthesised and may itself hold `)` or spaces.
/// Where `/proc` cannot tell (another OS, a race with exit), the process
/// counts as not a zombie and the TTL remains the backstop.
fn is_zombie(pid: libc::pid_t) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].split_ascii_whitespace().next());
    matches!(state, Some("Z" | "X"))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".tmp-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[derive(Debug)]
struct FileLease {
    path: PathBuf,
    stop: Option<std_mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Lease for FileLease {
    fn withdraw(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Wakes a file watcher on directory events and on a timer.
struct FileTrigger {
    events: mpsc::Receiver<()>,
    _watcher: Option<notify::RecommendedWatcher>,
}

#[async_trait]
impl Trigger for FileTrigger {
    async fn changed(&mut self) -> bool {
        tokio::select! {
            _ = self.events.recv() => {
                // Let a burst of events settle into one scan.
                tokio::time::sleep(Duration::from_millis(2)).await;
                while self.events.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(SCAN_INTERVAL) => {}
        }
        true
    }
}

#[async_trait]
impl Discovery for FileDiscovery {
    fn name(&self) -> &'static str {
        "file"
    }

    fn metrics(&self) -> Vec<crate::DiscoveryMetric> {
        vec![crate::DiscoveryMetric {
            name: "scans",
            help: "directory scans (on each change, and at least every 200 ms per watch)",
            value: self.scans.load(Ordering::Relaxed),
            gauge: false,
        }]
    }

    async fn register(
        &self,
        key: &str,
        value: serde_json::Value,
        ttl: Duration,
    ) -> Result<Registration, DiscoveryError> {
        check_key(key)?;
        let ttl = ttl.max(Duration::from_millis(100));
        let path = self.path_of(key);
        let entry = FileEntry {
            key: key.to_owned(),
            value,
            pid: std::process::id(),
            host: self.host.to_string(),
            ttl_ms: ttl.as_millis() as u64,
        };
        let bytes = serde_json::to_vec_pretty(&entry).expect("a JSON value serializes");
        write_atomically(&path, &bytes).map_err(|e| io_err(&path, e))?;
        let (stop_tx, stop_rx) = std_mpsc::channel::<()>();
        let (thread_path, refresh) = (path.clone(), ttl / 3);
        let thread = std::thread::Builder::new()
            .name("ep-file-lease".into())
            .spawn(move || {
                let warned = AtomicBool::new(false);
                while let Err(std_mpsc::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(refresh) {
                    let touched = std::fs::File::options()
                        .write(true)
                        .open(&thread_path)
                        .and_then(|f| f.set_modified(SystemTime::now()));
                    let result = match touched {
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => write_atomically(&thread_path, &bytes),
                        other => other,
                    };
                    match result {
                        Ok(()) => warned.store(false, Ordering::Relaxed),
                        Err(e) if !warned.swap(true, Ordering::Relaxed) => {
                            tracing::warn!(path = %thread_path.display(), error = %e, "cannot refresh discovery lease; retrying");
                        }
                        Err(_) => {}
                    }
                }
            })
            .map_err(|e| io_err(&path, e))?;
        Ok(Registration::new(
            key.to_owned(),
            Box::new(FileLease {
                path,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
        ))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, DiscoveryError> {
        let me = self.clone();
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || me.scan(&prefix))
            .await
            .unwrap_or_else(|e| Err(io_err(&self.dir, std::io::Error::other(e))))
    }

    async fn watch(&self, prefix: &str) -> Result<Watch, DiscoveryError> {
        // Fail now, not inside the watcher, if the directory is unusable.
        self.list(prefix).await?;
        let (tx, rx) = mpsc::channel(1);
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Reads change nothing, and our own scans read the directory:
            // reacting to access events made every scan trigger the next one,
            // a loop of hundreds of scans a second on an idle directory.
            if let Ok(ev) = &res {
                if matches!(ev.kind, notify::EventKind::Access(_)) {
                    return;
                }
            }
            let _ = tx.try_send(());
        })
        .and_then(|mut w| {
            use notify::Watcher;
            w.watch(&self.dir, notify::RecursiveMode::NonRecursive)
                .map(|()| w)
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "no file-system notifications; discovery falls back to scanning every {SCAN_INTERVAL:?}");
                None
            }
        };
        let me = self.clone();
        let prefix = prefix.to_owned();
        let logged = Arc::new(AtomicBool::new(false));
        Ok(Watch::spawn(
            move || {
                let (me, prefix, logged) = (me.clone(), prefix.clone(), logged.clone());
                async move {
                    match tokio::task::spawn_blocking(move || me.scan(&prefix)).await {
                        Ok(Ok(entries)) => Some(entries),
                        Ok(Err(e)) => {
                            if !logged.swap(true, Ordering::Relaxed) {
                                tracing::warn!(error = %e, "discovery scan failed; keeping the last known entries");
                            }
                            None
                        }
                        Err(_) => None,
                    }
                }
            },
            FileTrigger {
                events: rx,
                _watcher: watcher,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_child_not_yet_reaped_is_not_alive() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        assert!(process_alive(pid), "a running child is alive");
        child.kill().expect("kill");
        // Wait for it to exit without reaping it (WNOWAIT): a zombie now.
        // SAFETY: siginfo_t is plain data, and waitid writes it for our child.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        assert_eq!(rc, 0, "waitid: {}", std::io::Error::last_os_error());
        assert!(is_zombie(pid as libc::pid_t), "exited, unreaped: a zombie");
        assert!(!process_alive(pid), "a zombie counts as dead");
        child.wait().expect("reap");
        assert!(!process_alive(pid), "a reaped child is gone");
    }
}
