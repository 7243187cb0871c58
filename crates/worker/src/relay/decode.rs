//! Decoding the KV events vLLM and SGLang publish (`BRIEF.md`, "Engine wire
//! formats"): a MessagePack batch `[ts, events, data_parallel_rank?]`, or
//! the same as a map (`ts`, `events`, `data_parallel_rank`), whose events are
//! tagged arrays (`["BlockStored", block_hashes, parent_block_hash,
//! token_ids, block_size, lora_id, medium, ...]`) or maps with a `type` key.
//!
//! Both encodings are accepted at both levels; unknown fields and trailing
//! array elements are ignored; optional fields may be missing (msgspec's
//! `omit_defaults` drops trailing defaults from arrays). Engine block hashes
//! may be integers (above 2^63 too, or negative) or bytes; they are reduced
//! to a `u64` key ([`EngineHash`]) used only to find our own hash again when
//! the engine removes the block. Nothing here panics on bad input: every
//! problem is a [`DecodeError`] naming what was wrong: for the whole batch
//! when its frame is unreadable, for one event ([`EngineEvent::Invalid`])
//! when only that event is, so the batch's other events still apply. An
//! event of an unknown type is [`EngineEvent::Unknown`], not an error.

use rmpv::Value;
use xxhash_rust::xxh3::xxh3_64;

/// An engine's block hash, reduced to 64 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EngineHash(pub u64);

/// One decoded engine event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineEvent {
    /// Blocks cached, in prefix order.
    BlockStored {
        /// The engine's hashes of the blocks.
        block_hashes: Vec<EngineHash>,
        /// The engine's hash of the block before the first, if any.
        parent: Option<EngineHash>,
        /// The tokens of all the blocks, in order.
        token_ids: Vec<u32>,
        /// Tokens per block.
        block_size: u32,
        /// The LoRA adapter, by id.
        lora_id: Option<i64>,
        /// The LoRA adapter, by name (newer engines).
        lora_name: Option<String>,
        /// Where the blocks live (`GPU`, `CPU`, ...); `None` means GPU.
        medium: Option<String>,
    },
    /// Blocks evicted.
    BlockRemoved {
        /// The engine's hashes.
        block_hashes: Vec<EngineHash>,
        /// Where they lived.
        medium: Option<String>,
    },
    /// The whole cache dropped.
    AllBlocksCleared,
    /// An event type this build does not know (skipped, counted).
    Unknown(String),
    /// An event that could not be read (a field of the wrong type, a
    /// missing one): skipped and counted; the batch's other events apply.
    Invalid(DecodeError),
}

/// A decoded batch.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineBatch {
    /// The engine's timestamp (seconds).
    pub ts: f64,
    /// The events, in order.
    pub events: Vec<EngineEvent>,
    /// The data-parallel rank, when the engine says.
    pub data_parallel_rank: Option<u32>,
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

fn err<T>(what: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(what.into()))
}

/// Decodes one payload.
pub fn decode_batch(payload: &[u8]) -> Result<EngineBatch, DecodeError> {
    let mut rd = payload;
    let value = rmpv::decode::read_value(&mut rd)
        .map_err(|e| DecodeError(format!("not MessagePack: {e}")))?;
    if !rd.is_empty() {
        return err(format!("{} bytes after the batch", rd.len()));
    }
    let (ts, events, rank) = match &value {
        Value::Array(a) => (a.first(), a.get(1), a.get(2)),
        Value::Map(_) => (
            field(&value, "ts"),
            field(&value, "events"),
            field(&value, "data_parallel_rank"),
        ),
        other => {
            return err(format!(
                "a batch must be an array or a map, got {}",
                kind(other)
            ))
        }
    };
    let ts = match ts {
        Some(v) => v
            .as_f64()
            .or_else(|| v.as_i64().map(|i| i as f64))
            .or_else(|| v.as_u64().map(|u| u as f64))
            .ok_or_else(|| DecodeError(format!("ts must be a number, got {}", kind(v))))?,
        None => return err("the batch has no ts"),
    };
    let events = match events {
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, e)| {
                decode_event(e).unwrap_or_else(|e| {
                    EngineEvent::Invalid(DecodeError(format!("event {i}: {}", e.0)))
                })
            })
            .collect(),
        Some(other) => return err(format!("events must be an array, got {}", kind(other))),
        None => return err("the batch has no events"),
    };
    let data_parallel_rank = match rank {
        None | Some(Value::Nil) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|r| u32::try_from(r).ok())
                .ok_or_else(|| {
                    DecodeError(format!(
                        "data_parallel_rank must be a small non-negative integer, got {v}"
                    ))
                })?,
        ),
    };
    Ok(EngineBatch {
        ts,
        events,
        data_parallel_rank,
    })
}

/// Field positions after the tag in the array form.
const STORED_FIELDS: [&str; 6] = [
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
];

fn decode_event(v: &Value) -> Result<EngineEvent, DecodeError> {
    let form = match v {
        Value::Array(a) => Form::Array(a),
        Value::Map(_) => Form::Map(v),
        other => {
            return err(format!(
                "an event must be an array or a map, got {}",
                kind(other)
            ))
        }
    };
    let tag = match form {
        Form::Array(a) => a
            .first()
            .and_then(Value::as_str)
            .ok_or_else(|| DecodeError("an array event must start with its type name".into()))?,
        Form::Map(m) => field(m, "type")
            .and_then(Value::as_str)
            .ok_or_else(|| DecodeError("a map event needs a string `type`".into()))?,
    };
    let get = |name: &str, i: usize| form.get(name, i);
    match tag {
        "BlockStored" => {
            let f = |i: usize| get(STORED_FIELDS[i], i);
            let block_hashes = hashes(f(0), "block_hashes")?;
            let parent = f(1).map(|p| hash(p, "parent_block_hash")).transpose()?;
            let token_ids = match f(2) {
                Some(Value::Array(t)) => t
                    .iter()
                    .map(|x| {
                        x.as_u64()
                            .and_then(|t| u32::try_from(t).ok())
                            .ok_or_else(|| {
                                DecodeError(format!("token_ids holds {x}, not a token id"))
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                Some(other) => {
                    return err(format!("token_ids must be an array, got {}", kind(other)))
                }
                None => return err("BlockStored without token_ids"),
            };
            let block_size = f(3)
                .and_then(Value::as_u64)
                .and_then(|b| u32::try_from(b).ok())
                .filter(|&b| b > 0)
                .ok_or_else(|| DecodeError("BlockStored needs a positive block_size".into()))?;
            let lora_id = f(4).and_then(Value::as_i64);
            let medium = f(5).and_then(Value::as_str).map(str::to_owned);
            // Newer optional fields exist only by name (map form).
            let lora_name = match form {
                Form::Map(m) => field(m, "lora_name")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                Form::Array(_) => None,
            };
            Ok(EngineEvent::BlockStored {
                block_hashes,
                parent,
                token_ids,
                block_size,
                lora_id,
                lora_name,
                medium,
            })
        }
        "BlockRemoved" => Ok(EngineEvent::BlockRemoved {
            block_hashes: hashes(get("block_hashes", 0), "block_hashes")?,
            medium: get("medium", 1).and_then(Value::as_str).map(str::to_owned),
        }),
        "AllBlocksCleared" => Ok(EngineEvent::AllBlocksCleared),
        other => Ok(EngineEvent::Unknown(other.to_owned())),
    }
}

/// An event's fields: by position after the tag (array form) or by name
/// (map form). Nil counts as absent.
#[derive(Clone, Copy)]
enum Form<'a> {
    Array(&'a [Value]),
    Map(&'a Value),
}

impl<'a> Form<'a> {
    fn get(self, name: &str, position: usize) -> Option<&'a Value> {
        let v = match self {
            Form::Array(a) => a.get(position + 1),
            Form::Map(m) => field(m, name),
        };
        v.filter(|x| !x.is_nil())
    }
}

fn hashes(v: Option<&Value>, name: &str) -> Result<Vec<EngineHash>, DecodeError> {
    match v {
        Some(Value::Array(list)) => list.iter().map(|h| hash(h, name)).collect(),
        Some(other) => err(format!("{name} must be an array, got {}", kind(other))),
        None => err(format!("missing {name}")),
    }
}

fn hash(v: &Value, name: &str) -> Result<EngineHash, DecodeError> {
    if let Some(u) = v.as_u64() {
        return Ok(EngineHash(u));
    }
    if let Some(i) = v.as_i64() {
        return Ok(EngineHash(i as u64));
    }
    match v {
        Value::Binary(b) => Ok(EngineHash(xxh3_64(b))),
        Value::String(s) => Ok(EngineHash(xxh3_64(s.as_bytes()))),
        other => err(format!("{name} holds {}, not a hash", kind(other))),
    }
}

fn field<'a>(map: &'a Value, name: &str) -> Option<&'a Value> {
    match map {
        Value::Map(entries) => entries
            .iter()
            .find(|(k, _)| k.as_str() == Some(name))
            .map(|(_, v)| v),
        _ => None,
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "a boolean",
        Value::Integer(_) => "an integer",
        Value::F32(_) | Value::F64(_) => "a float",
        Value::String(_) => "a string",
        Value::Binary(_) => "bytes",
        Value::Array(_) => "an array",
        Value::Map(_) => "a map",
        Value::Ext(..) => "an extension value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }

    fn s(x: &str) -> Value {
        Value::from(x)
    }

    #[test]
    fn array_form_with_omitted_defaults_and_big_hashes() {
        let stored = Value::Array(vec![
            s("BlockStored"),
            Value::Array(vec![Value::from(u64::MAX), Value::from(-5i64)]),
            Value::Nil,
            Value::Array((1..=8u32).map(Value::from).collect()),
            Value::from(4u32),
        ]);
        let batch = Value::Array(vec![
            Value::F64(1.5),
            Value::Array(vec![stored, Value::Array(vec![s("AllBlocksCleared")])]),
        ]);
        let b = decode_batch(&encode(&batch)).unwrap();
        assert_eq!(b.data_parallel_rank, None);
        assert_eq!(
            b.events[0],
            EngineEvent::BlockStored {
                block_hashes: vec![EngineHash(u64::MAX), EngineHash(-5i64 as u64)],
                parent: None,
                token_ids: (1..=8).collect(),
                block_size: 4,
                lora_id: None,
                lora_name: None,
                medium: None,
            }
        );
        assert_eq!(b.events[1], EngineEvent::AllBlocksCleared);
    }

    #[test]
    fn map_form_with_unknown_fields_and_types() {
        let removed = Value::Map(vec![
            (s("type"), s("BlockRemoved")),
            (
                s("block_hashes"),
                Value::Array(vec![Value::Binary(vec![1, 2, 3])]),
            ),
            (s("medium"), s("GPU")),
            (s("future"), Value::from(1)),
        ]);
        let unknown = Value::Map(vec![(s("type"), s("BlockMoved"))]);
        let batch = Value::Map(vec![
            (s("ts"), Value::from(3u32)),
            (s("events"), Value::Array(vec![removed, unknown])),
            (s("data_parallel_rank"), Value::from(2u32)),
        ]);
        let b = decode_batch(&encode(&batch)).unwrap();
        assert_eq!(b.data_parallel_rank, Some(2));
        assert_eq!(
            b.events[0],
            EngineEvent::BlockRemoved {
                block_hashes: vec![EngineHash(xxh3_64(&[1, 2, 3]))],
                medium: Some("GPU".into())
            }
        );
        assert_eq!(b.events[1], EngineEvent::Unknown("BlockMoved".into()));
    }

    #[test]
    fn bad_input_is_an_error_that_says_what() {
        for (payload, expect) in [
            (vec![0x92, 0x01], "not MessagePack"),
            (encode(&Value::from(7)), "array or a map"),
            (encode(&Value::Array(vec![Value::F64(0.0)])), "no events"),
        ] {
            let e = decode_batch(&payload).unwrap_err();
            assert!(e.0.contains(expect), "{} should mention {expect}", e.0);
        }
        // A bad event spoils only itself.
        let batch = encode(&Value::Array(vec![
            Value::F64(0.0),
            Value::Array(vec![
                Value::from(1),
                Value::Array(vec![
                    s("BlockStored"),
                    Value::Array(vec![]),
                    Value::Nil,
                    s("x"),
                    Value::from(4),
                ]),
                Value::Array(vec![s("AllBlocksCleared")]),
            ]),
        ]));
        let b = decode_batch(&batch).unwrap();
        let errors: Vec<String> = b
            .events
            .iter()
            .filter_map(|e| match e {
                EngineEvent::Invalid(e) => Some(e.0.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(errors.len(), 2);
        assert!(errors[0].contains("event 0"), "{errors:?}");
        assert!(
            errors[1].contains("token_ids must be an array"),
            "{errors:?}"
        );
        assert_eq!(b.events[2], EngineEvent::AllBlocksCleared);
    }
}
