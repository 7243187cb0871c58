//! What every backend must do, shared by the test files: one scenario
//! (register, list, watch, replace, withdraw) and a bounded wait for a watch
//! event.

use eventplane_discovery::{Discovery, Entry, Watch, WatchEvent};
use serde_json::json;
use std::time::Duration;

/// The longest wait for an event that should come.
pub const WAIT: Duration = Duration::from_secs(10);

/// The next event of `w`; panics if none comes within [`WAIT`].
pub async fn next(w: &mut Watch) -> WatchEvent {
    tokio::time::timeout(WAIT, w.next())
        .await
        .expect("watch event within 10 s")
        .expect("watch open")
}

/// Register, list, watch, replace, withdraw: the same observable behaviour
/// on every backend.
pub async fn scenario(d: &dyn Discovery) {
    let ttl = Duration::from_secs(5);
    let a = d
        .register("svc/a", json!({"endpoint": "tcp://127.0.0.1:1"}), ttl)
        .await
        .unwrap();
    let _other = d.register("other/x", json!(1), ttl).await.unwrap();
    let listed = d.list("svc/").await.unwrap();
    assert_eq!(
        listed,
        vec![Entry {
            key: "svc/a".into(),
            value: json!({"endpoint": "tcp://127.0.0.1:1"})
        }]
    );

    let mut w = d.watch("svc/").await.unwrap();
    assert_eq!(next(&mut w).await, WatchEvent::Added(listed[0].clone()));

    let b = d.register("svc/b", json!("b"), ttl).await.unwrap();
    assert_eq!(
        next(&mut w).await,
        WatchEvent::Added(Entry {
            key: "svc/b".into(),
            value: json!("b")
        })
    );

    // Replacing a value shows as removed-then-added.
    let b2 = d.register("svc/b", json!("b2"), ttl).await.unwrap();
    assert_eq!(
        next(&mut w).await,
        WatchEvent::Removed {
            key: "svc/b".into()
        }
    );
    assert_eq!(
        next(&mut w).await,
        WatchEvent::Added(Entry {
            key: "svc/b".into(),
            value: json!("b2")
        })
    );
    // The older registration must not remove the newer value (mem; etcd: the
    // key is under b2's lease now); file: same file, gone.
    drop(b);
    if d.name() == "mem" {
        b2.withdraw();
    } else {
        drop(b2);
    }
    assert_eq!(
        next(&mut w).await,
        WatchEvent::Removed {
            key: "svc/b".into()
        }
    );

    a.withdraw();
    assert_eq!(
        next(&mut w).await,
        WatchEvent::Removed {
            key: "svc/a".into()
        }
    );
    assert!(d.list("svc/").await.unwrap().is_empty());
    assert!(d.register("", json!(0), ttl).await.is_err());
}
