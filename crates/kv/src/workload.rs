//! Reading `*.kvops.jsonl(.gz)` workloads (`shared/workloads/FORMAT.md`): the
//! KV events and lookups a router's index saw, in order, so any index can
//! replay exactly the same work.
//!
//! Workers in the file are plain numbers; they become rank 0 of that worker.
//! Queries carry local hashes; a replayer chains them into sequence hashes
//! with [`crate::hash::SeqHashes`], as a router would from token ids.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde::Deserialize;

use crate::event::WorkerKey;
use crate::hash::{BlockHash, LocalHash, SeqHash};
use crate::index::PrefixIndex;

/// One line of a workload, after the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadOp {
    /// A worker cached blocks after `parent`.
    Store {
        /// Who.
        worker: WorkerKey,
        /// Sequence hash of the block before the first, if any.
        parent: Option<SeqHash>,
        /// The blocks, in prefix order.
        blocks: Vec<BlockHash>,
    },
    /// A worker evicted blocks.
    Remove {
        /// Who.
        worker: WorkerKey,
        /// Sequence hashes.
        blocks: Vec<SeqHash>,
    },
    /// A worker dropped its cache.
    Clear {
        /// Who.
        worker: WorkerKey,
    },
    /// A request's blocks, to look up.
    Query {
        /// Local hashes, in prefix order.
        blocks: Vec<LocalHash>,
    },
}

impl WorkloadOp {
    /// Applies a store, remove or clear to `index`; returns false (doing
    /// nothing) for a query.
    pub fn apply_to(&self, index: &mut PrefixIndex) -> bool {
        match self {
            WorkloadOp::Store {
                worker,
                parent,
                blocks,
            } => index.store(*worker, *parent, blocks),
            WorkloadOp::Remove { worker, blocks } => index.remove(*worker, blocks),
            WorkloadOp::Clear { worker } => index.clear(*worker),
            WorkloadOp::Query { .. } => return false,
        }
        true
    }

    /// Blocks stored or removed by this op (0 for clears and queries).
    pub fn block_ops(&self) -> usize {
        match self {
            WorkloadOp::Store { blocks, .. } => blocks.len(),
            WorkloadOp::Remove { blocks, .. } => blocks.len(),
            WorkloadOp::Clear { .. } | WorkloadOp::Query { .. } => 0,
        }
    }
}

/// A parsed workload.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The header line, if the file has one (free-form metadata).
    pub header: Option<serde_json::Map<String, serde_json::Value>>,
    /// Every other line, in order.
    pub ops: Vec<WorkloadOp>,
}

/// Why a workload could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A line is not a valid op.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Line {
    Header,
    Store {
        worker: u64,
        parent: Option<u64>,
        blocks: Vec<(u64, u64)>,
    },
    Remove {
        worker: u64,
        blocks: Vec<u64>,
    },
    Clear {
        worker: u64,
    },
    Query {
        blocks: Vec<u64>,
    },
}

impl Workload {
    /// Reads a workload file; a name ending in `.gz` is decompressed.
    pub fn read(path: &Path) -> Result<Self, WorkloadError> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| WorkloadError::Io {
            path: name.clone(),
            source,
        })?;
        let reader: Box<dyn Read> = if name.ends_with(".gz") {
            Box::new(flate2::read::MultiGzDecoder::new(file))
        } else {
            Box::new(file)
        };
        Self::parse(BufReader::with_capacity(1 << 20, reader), &name)
    }

    /// Parses workload lines from `input`; `name` labels errors.
    pub fn parse(input: impl BufRead, name: &str) -> Result<Self, WorkloadError> {
        let mut header = None;
        let mut ops = Vec::new();
        for (n, line) in input.lines().enumerate() {
            let line = line.map_err(|source| WorkloadError::Io {
                path: name.to_string(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let parse_error = |message: String| WorkloadError::Parse {
                path: name.to_string(),
                line: n + 1,
                message,
            };
            let parsed: Line =
                serde_json::from_str(&line).map_err(|e| parse_error(e.to_string()))?;
            let op = match parsed {
                Line::Header => {
                    if n > 0 {
                        return Err(parse_error("a header is only allowed on line 1".into()));
                    }
                    header = serde_json::from_str(&line).ok();
                    continue;
                }
                Line::Store {
                    worker,
                    parent,
                    blocks,
                } => WorkloadOp::Store {
                    worker: WorkerKey::new(worker),
                    parent: parent.map(SeqHash),
                    blocks: blocks
                        .into_iter()
                        .map(|(l, s)| BlockHash {
                            local: LocalHash(l),
                            seq: SeqHash(s),
                        })
                        .collect(),
                },
                Line::Remove { worker, blocks } => WorkloadOp::Remove {
                    worker: WorkerKey::new(worker),
                    blocks: blocks.into_iter().map(SeqHash).collect(),
                },
                Line::Clear { worker } => WorkloadOp::Clear {
                    worker: WorkerKey::new(worker),
                },
                Line::Query { blocks } => WorkloadOp::Query {
                    blocks: blocks.into_iter().map(LocalHash).collect(),
                },
            };
            ops.push(op);
        }
        Ok(Workload { header, ops })
    }

    /// The fingerprint the header promises, if it has one.
    pub fn expected_fingerprint(&self) -> Option<u64> {
        self.header.as_ref()?.get("fingerprint")?.as_u64()
    }

    /// Blocks stored plus blocks removed over the whole workload.
    pub fn block_ops(&self) -> usize {
        self.ops.iter().map(WorkloadOp::block_ops).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_op_and_keeps_the_header() {
        let text = r#"{"op":"header","fingerprint":3,"workers":2}
{"op":"store","worker":1,"parent":null,"blocks":[[5,5],[6,18446744073709551615]]}
{"op":"query","blocks":[5,6]}

{"op":"remove","worker":1,"blocks":[18446744073709551615]}
{"op":"clear","worker":1}
"#;
        let w = Workload::parse(text.as_bytes(), "t").unwrap();
        assert_eq!(w.expected_fingerprint(), Some(3));
        assert_eq!(w.ops.len(), 4);
        assert_eq!(w.block_ops(), 3);
        assert!(
            matches!(&w.ops[2], WorkloadOp::Remove { blocks, .. } if blocks[0] == SeqHash(u64::MAX))
        );
    }

    #[test]
    fn a_bad_line_is_reported_with_its_number() {
        let text = "{\"op\":\"query\",\"blocks\":[1]}\n{\"op\":\"store\",\"worker\":-1}\n";
        let e = Workload::parse(text.as_bytes(), "w.jsonl").unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("w.jsonl:2: "), "{msg}");
    }
}
