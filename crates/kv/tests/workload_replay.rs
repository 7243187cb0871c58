//! Replaying the shared Mooncake-derived workload reproduces the fingerprint
//! its header promises: the sum over all queries of the longest match.

use std::path::PathBuf;

use eventplane_kv::workload::{Workload, WorkloadOp};
use eventplane_kv::{Matches, PrefixIndex, SeqHashes};

fn shared_workload(name: &str) -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/workloads")
        .join(name);
    if path.exists() {
        return Some(path);
    }
    // CI always has shared/ beside the clone; elsewhere, say why we skip.
    assert!(
        std::env::var_os("CI").is_none(),
        "{} is missing",
        path.display()
    );
    eprintln!("skipping: {} not found", path.display());
    None
}

#[test]
fn conversation_16w_fingerprint_matches_the_header() {
    let Some(path) = shared_workload("conversation-16w.kvops.jsonl.gz") else {
        return;
    };
    let workload = Workload::read(&path).unwrap();
    let expected = workload
        .expected_fingerprint()
        .expect("the header has a fingerprint");
    let mut index = PrefixIndex::new();
    let reader = index.reader();
    let (mut from_writer, mut from_reader) = (Matches::new(), Matches::new());
    let mut fingerprint = 0u64;
    for op in &workload.ops {
        if let WorkloadOp::Query { blocks } = op {
            index.lookup(SeqHashes::new(blocks, None), &mut from_writer);
            reader.lookup(SeqHashes::new(blocks, None), &mut from_reader);
            assert_eq!(from_writer.longest(), from_reader.longest());
            fingerprint += u64::from(from_writer.longest());
        } else {
            op.apply_to(&mut index);
        }
    }
    assert_eq!(fingerprint, expected);
    let stats = index.stats();
    assert_eq!(stats.inconsistencies(), 0, "{stats:?}");
    // Every block the file stored and did not remove is still there.
    assert_eq!(index.cached_blocks(), 185_848 - 95_848);
}
