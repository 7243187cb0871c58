//! The envelope every message travels in, and its MessagePack codec.
//!
//! An envelope is one MessagePack array (see `docs/wire-format.md`, which is
//! the normative description):
//!
//! ```text
//! [version=2, kind, publisher_id, incarnation, seq, timestamp_ns, payload]
//! ```
//!
//! The channel's subject is not in the envelope: every transport already
//! carries it beside the envelope (the NATS subject, the ZMQ frame's prefix,
//! the in-process queue's key) and checks it there. Version 1 repeated it
//! inside, a second copy of 20–40 bytes per message that bought no check the
//! transport did not already make, and on two cores bytes cost latency
//! (docs/transport-bench-history.md, 2026-12-07).
//!
//! The codec is written by hand over `rmp` rather than derived with serde: the
//! layout is a documented wire contract that must not drift with a struct's
//! field order, and decoding must borrow the payload instead of copying it.
//! Decoding never panics on any input; it returns a [`DecodeError`] that says
//! which field was wrong.

use rmp::decode::{self, NumValueReadError, ValueReadError};
use std::time::{SystemTime, UNIX_EPOCH};

/// The version written in the first element of every envelope.
pub const WIRE_VERSION: u64 = 2;

/// Number of array elements in a version-2 envelope. Decoders ignore any
/// elements after these (room for compatible additions).
pub const ENVELOPE_FIELDS: u32 = 7;

/// What an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// An application message; `seq` is its own sequence number.
    Data = 0,
    /// A liveness beacon with no payload; `seq` is the sequence number of the
    /// last data message published (0 if none). Sent when a publisher is idle
    /// and whenever a new subscriber joins, so subscribers learn of tail loss
    /// and of the connection without waiting for data.
    Heartbeat = 1,
}

impl Kind {
    /// The name used in logs and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Data => "data",
            Kind::Heartbeat => "heartbeat",
        }
    }
}

/// The fixed-size fields of an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Data or heartbeat.
    pub kind: Kind,
    /// Identifies the publisher; stable across its restarts when the
    /// application gives it a stable id.
    pub publisher_id: u64,
    /// Chosen anew at every start of a publisher (its start time in
    /// nanoseconds, so later incarnations compare greater).
    pub incarnation: u64,
    /// Per-publisher sequence number: 1, 2, 3, ... with no holes.
    pub seq: u64,
    /// Publish time, nanoseconds since the Unix epoch.
    pub timestamp_ns: u64,
}

/// A decoded envelope borrowing its payload from the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvelopeRef<'a> {
    /// The fixed fields.
    pub header: Header,
    /// The application payload (MessagePack for typed publishers).
    pub payload: &'a [u8],
}

/// Why an envelope could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer does not start with a MessagePack array.
    #[error("not a MessagePack array")]
    NotAnArray,
    /// Fewer than [`ENVELOPE_FIELDS`] elements.
    #[error("array has {0} elements; an envelope has at least {ENVELOPE_FIELDS}")]
    TooFewFields(u32),
    /// The buffer ended inside the named field.
    #[error("truncated in field `{0}`")]
    Truncated(&'static str),
    /// The named field had the wrong MessagePack type or range.
    #[error("field `{0}` has the wrong type")]
    WrongType(&'static str),
    /// A version this decoder does not speak (version 1, which carried the
    /// subject inside, included: see `docs/wire-format.md` §2.5).
    #[error("unsupported envelope version {0} (this build speaks {WIRE_VERSION})")]
    UnsupportedVersion(u64),
    /// A kind this decoder does not know.
    #[error("unknown envelope kind {0}")]
    UnknownKind(u64),
}

impl DecodeError {
    /// A short, stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            DecodeError::NotAnArray => "not_an_array",
            DecodeError::TooFewFields(_) => "too_few_fields",
            DecodeError::Truncated(_) => "truncated",
            DecodeError::WrongType(_) => "wrong_type",
            DecodeError::UnsupportedVersion(_) => "unsupported_version",
            DecodeError::UnknownKind(_) => "unknown_kind",
        }
    }
}

/// Nanoseconds since the Unix epoch, now. On Linux read straight from
/// `clock_gettime(CLOCK_REALTIME)`: through `SystemTime` the conversion's
/// checks cost ~60 instructions more, a tenth of a publish.
pub fn unix_nanos() -> u64 {
    #[cfg(target_os = "linux")]
    if let Some(ns) = clock_nanos(libc::CLOCK_REALTIME) {
        return ns;
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Nanoseconds of `clock` (a `CLOCK_REALTIME` variant, so since the Unix
/// epoch); `None` if the kernel refuses.
#[cfg(target_os = "linux")]
fn clock_nanos(clock: libc::clockid_t) -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; the call has no other
    // effect.
    (unsafe { libc::clock_gettime(clock, &mut ts) } == 0).then(|| {
        (ts.tv_sec as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec as u64)
    })
}

/// Nanoseconds since the Unix epoch, from the kernel's coarse clock: it
/// advances once per scheduler tick (1–4 ms), and a read cost 3.4 ns
/// against 22.8 ns for `CLOCK_REALTIME` (a loop of `clock_gettime` calls on
/// the 2-vCPU reference VM, TSC clock source). For what needs only that
/// precision once per message (when a subscriber last heard a publisher);
/// elsewhere [`unix_nanos`].
pub fn coarse_unix_nanos() -> u64 {
    #[cfg(target_os = "linux")]
    if let Some(ns) = clock_nanos(libc::CLOCK_REALTIME_COARSE) {
        return ns;
    }
    unix_nanos()
}

/// Appends the encoded envelope to `out`.
pub fn encode(header: &Header, payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(48 + payload.len());
    encode_head(header, payload.len(), out);
    out.extend_from_slice(payload);
}

/// Appends everything of the envelope but the payload bytes themselves (which
/// must follow, `payload_len` of them). Lets a transport assemble the frame
/// with a single copy of the payload.
pub fn encode_head(header: &Header, payload_len: usize, out: &mut Vec<u8>) {
    // Writing to a Vec cannot fail.
    let _ = rmp::encode::write_array_len(out, ENVELOPE_FIELDS);
    let _ = rmp::encode::write_uint(out, WIRE_VERSION);
    let _ = rmp::encode::write_uint(out, header.kind as u64);
    let _ = rmp::encode::write_uint(out, header.publisher_id);
    let _ = rmp::encode::write_uint(out, header.incarnation);
    let _ = rmp::encode::write_uint(out, header.seq);
    let _ = rmp::encode::write_uint(out, header.timestamp_ns);
    let _ = rmp::encode::write_bin_len(out, payload_len as u32);
}

/// The head of a publisher's envelopes (everything before the payload, and
/// whatever the transport wants in front), with what never changes encoded
/// once: the array header, version, publisher id and incarnation.
/// A publish then writes only its kind, sequence number, timestamp and
/// payload length. Encoding the whole head each time was over half of a
/// publish's instructions. The output is byte for byte [`encode_head`]'s.
#[derive(Debug, Clone)]
pub struct HeadTemplate {
    /// Prefix, array header, version, a kind byte, publisher id, incarnation.
    before_seq: Vec<u8>,
    /// Where the kind byte is in `before_seq` (0 and 1 are one-byte fixints).
    kind_at: usize,
}

impl HeadTemplate {
    /// The template for envelopes with `prefix` in front, from `publisher_id`
    /// (`incarnation`).
    pub fn new(prefix: &[u8], publisher_id: u64, incarnation: u64) -> Self {
        let mut before_seq = prefix.to_vec();
        let _ = rmp::encode::write_array_len(&mut before_seq, ENVELOPE_FIELDS);
        let _ = rmp::encode::write_uint(&mut before_seq, WIRE_VERSION);
        let kind_at = before_seq.len();
        let _ = rmp::encode::write_uint(&mut before_seq, Kind::Data as u64);
        let _ = rmp::encode::write_uint(&mut before_seq, publisher_id);
        let _ = rmp::encode::write_uint(&mut before_seq, incarnation);
        Self {
            before_seq,
            kind_at,
        }
    }

    /// Appends the head of an envelope to `out`: the prefix, then what
    /// [`encode_head`] writes for `kind`, `seq`, `timestamp_ns` and a
    /// payload of `payload_len` bytes.
    pub fn encode(
        &self,
        kind: Kind,
        seq: u64,
        timestamp_ns: u64,
        payload_len: usize,
        out: &mut Vec<u8>,
    ) {
        let start = out.len();
        out.reserve(self.before_seq.len() + 23);
        out.extend_from_slice(&self.before_seq);
        out[start + self.kind_at] = kind as u8;
        let _ = rmp::encode::write_uint(out, seq);
        let _ = rmp::encode::write_uint(out, timestamp_ns);
        let _ = rmp::encode::write_bin_len(out, payload_len as u32);
    }
}

/// Decodes an envelope, borrowing its payload from `buf`.
pub fn decode(buf: &[u8]) -> Result<EnvelopeRef<'_>, DecodeError> {
    match decode_usual(buf) {
        Some(env) => Ok(env),
        None => decode_any(buf),
    }
}

/// The envelopes publishers write, read byte by byte: an array of exactly
/// 7, version 2, kind 0 or 1, four unsigned integers and a bin payload.
/// `None` for anything else (another valid encoding, or an invalid
/// envelope), which [`decode_any`] then decides, errors included; where this
/// returns an envelope, [`decode_any`] returns the same one (a property test
/// checks it). Through `rmp` alone decoding took ~350 instructions, a third
/// of a subscriber's work per message.
#[inline]
fn decode_usual(buf: &[u8]) -> Option<EnvelopeRef<'_>> {
    let [0x97, 0x02, kind @ (0x00 | 0x01), rest @ ..] = buf else {
        return None;
    };
    let (publisher_id, rest) = usual_uint(rest)?;
    let (incarnation, rest) = usual_uint(rest)?;
    let (seq, rest) = usual_uint(rest)?;
    let (timestamp_ns, rest) = usual_uint(rest)?;
    let (payload_len, rest) = match *rest {
        [0xc4, n, ref rest @ ..] => (usize::from(n), rest),
        [0xc5, a, b, ref rest @ ..] => (usize::from(u16::from_be_bytes([a, b])), rest),
        [0xc6, a, b, c, d, ref rest @ ..] => (u32::from_be_bytes([a, b, c, d]) as usize, rest),
        _ => return None,
    };
    let payload = rest.get(..payload_len)?;
    Some(EnvelopeRef {
        header: Header {
            kind: if *kind == 0 {
                Kind::Data
            } else {
                Kind::Heartbeat
            },
            publisher_id,
            incarnation,
            seq,
            timestamp_ns,
        },
        payload,
    })
}

/// An unsigned integer as `rmp` writes one (the shortest of positive
/// fixint, uint 8/16/32/64), and what follows it.
#[inline]
fn usual_uint(buf: &[u8]) -> Option<(u64, &[u8])> {
    Some(match *buf {
        [m @ 0x00..=0x7f, ref rest @ ..] => (u64::from(m), rest),
        [0xcc, a, ref rest @ ..] => (u64::from(a), rest),
        [0xcd, a, b, ref rest @ ..] => (u64::from(u16::from_be_bytes([a, b])), rest),
        [0xce, a, b, c, d, ref rest @ ..] => (u64::from(u32::from_be_bytes([a, b, c, d])), rest),
        [0xcf, a, b, c, d, e, f, g, h, ref rest @ ..] => {
            (u64::from_be_bytes([a, b, c, d, e, f, g, h]), rest)
        }
        _ => return None,
    })
}

/// Any valid envelope, through `rmp`, and the error that names the field
/// for an invalid one.
fn decode_any(buf: &[u8]) -> Result<EnvelopeRef<'_>, DecodeError> {
    let mut rd = buf;
    let len = decode::read_array_len(&mut rd).map_err(|e| match e {
        ValueReadError::TypeMismatch(_) => DecodeError::NotAnArray,
        _ => DecodeError::Truncated("array"),
    })?;
    if len < ENVELOPE_FIELDS {
        return Err(DecodeError::TooFewFields(len));
    }
    let version = read_u64(&mut rd, "version")?;
    if version != WIRE_VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let kind = match read_u64(&mut rd, "kind")? {
        0 => Kind::Data,
        1 => Kind::Heartbeat,
        other => return Err(DecodeError::UnknownKind(other)),
    };
    let header = Header {
        kind,
        publisher_id: read_u64(&mut rd, "publisher_id")?,
        incarnation: read_u64(&mut rd, "incarnation")?,
        seq: read_u64(&mut rd, "seq")?,
        timestamp_ns: read_u64(&mut rd, "timestamp_ns")?,
    };
    let payload_len =
        decode::read_bin_len(&mut rd).map_err(|e| value_error(e, "payload"))? as usize;
    let payload = take(&mut rd, payload_len, "payload")?;
    Ok(EnvelopeRef { header, payload })
}

fn read_u64(rd: &mut &[u8], field: &'static str) -> Result<u64, DecodeError> {
    decode::read_int::<u64, _>(rd).map_err(|e| match e {
        NumValueReadError::InvalidMarkerRead(_) | NumValueReadError::InvalidDataRead(_) => {
            DecodeError::Truncated(field)
        }
        _ => DecodeError::WrongType(field),
    })
}

fn value_error(e: ValueReadError, field: &'static str) -> DecodeError {
    match e {
        ValueReadError::TypeMismatch(_) => DecodeError::WrongType(field),
        _ => DecodeError::Truncated(field),
    }
}

fn take<'a>(rd: &mut &'a [u8], len: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
    if rd.len() < len {
        return Err(DecodeError::Truncated(field));
    }
    let (head, tail) = rd.split_at(len);
    *rd = tail;
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(seq: u64) -> Header {
        Header {
            kind: Kind::Data,
            publisher_id: u64::MAX,
            incarnation: 1_700_000_000_000_000_000,
            seq,
            timestamp_ns: 42,
        }
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        encode(&header(7), b"hello", &mut buf);
        let env = decode(&buf).unwrap();
        assert_eq!(env.header, header(7));
        assert_eq!(env.payload, b"hello");
    }

    #[test]
    fn known_bytes() {
        // The example in docs/wire-format.md.
        let mut buf = Vec::new();
        let h = Header {
            kind: Kind::Data,
            publisher_id: 7,
            incarnation: 1000,
            seq: 1,
            timestamp_ns: 5,
        };
        encode(&h, &[0xc0], &mut buf);
        let expected: &[u8] = &[
            0x97, 0x02, 0x00, 0x07, 0xcd, 0x03, 0xe8, 0x01, 0x05, 0xc4, 0x01, 0xc0,
        ];
        assert_eq!(buf, expected);
    }

    /// A version-1 envelope (the subject at index 6) is refused by its
    /// version, not misread: its subject would otherwise pass for the payload.
    #[test]
    fn version_one_is_refused_by_name() {
        let v1: &[u8] = &[
            0x98, 0x01, 0x00, 0x07, 0xcd, 0x03, 0xe8, 0x01, 0x05, 0xa8, b'e', b'p', b'.', b'n',
            b'.', b'c', b'.', b't', 0xc4, 0x01, 0xc0,
        ];
        assert_eq!(decode(v1), Err(DecodeError::UnsupportedVersion(1)));
    }

    #[test]
    fn extra_trailing_fields_are_ignored() {
        let mut buf = Vec::new();
        encode(&header(1), b"p", &mut buf);
        buf[0] = 0x98; // array of 8
        buf.push(0xc0); // nil
        assert_eq!(decode(&buf).unwrap().payload, b"p");
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(decode(&[]), Err(DecodeError::Truncated("array")));
        assert_eq!(decode(&[0xc0]), Err(DecodeError::NotAnArray));
        assert_eq!(decode(&[0x93, 2, 0, 0]), Err(DecodeError::TooFewFields(3)));
        assert_eq!(decode(&[0x97, 3]), Err(DecodeError::UnsupportedVersion(3)));
        assert_eq!(decode(&[0x97, 2, 9]), Err(DecodeError::UnknownKind(9)));
        assert_eq!(
            decode(&[0x97, 2, 0, 0xa1, b'x']),
            Err(DecodeError::WrongType("publisher_id"))
        );
        assert_eq!(
            decode(&[0x97, 2, 0, 0xff]),
            Err(DecodeError::WrongType("publisher_id"))
        );
        assert_eq!(
            decode(&[0x97, 2, 0, 1, 2, 3, 4, 0xa1, b'x']),
            Err(DecodeError::WrongType("payload"))
        );
        let mut buf = Vec::new();
        encode(&header(1), b"payload", &mut buf);
        for cut in 0..buf.len() {
            assert!(
                decode(&buf[..cut]).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
    }

    /// Integers of every encoded width (fixint, uint 8, 16, 32, 64).
    fn uint() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..128,
            128u64..256,
            256u64..65_536,
            65_536u64..(1 << 32),
            any::<u64>()
        ]
    }

    proptest! {
        #[test]
        fn the_usual_path_agrees_with_rmp(
            pid in uint(), inc in uint(), seq in uint(), ts in uint(), hb: bool,
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            at in any::<proptest::sample::Index>(), byte: u8, mutate: bool,
            cut in any::<proptest::sample::Index>(), truncate: bool,
        ) {
            let kind = if hb { Kind::Heartbeat } else { Kind::Data };
            let header = Header { kind, publisher_id: pid, incarnation: inc, seq, timestamp_ns: ts };
            let mut buf = Vec::new();
            encode(&header, &payload, &mut buf);
            // Unchanged, what publishers write takes the usual path.
            prop_assert_eq!(decode_usual(&buf), Some(decode_any(&buf).unwrap()));
            // Damaged, it either does and agrees, or leaves it to rmp.
            if mutate {
                let i = at.index(buf.len());
                buf[i] = byte;
            }
            if truncate {
                buf.truncate(cut.index(buf.len() + 1));
            }
            if let Some(env) = decode_usual(&buf) {
                prop_assert_eq!(Ok(env), decode_any(&buf));
            }
        }

        #[test]
        fn the_template_writes_what_encode_head_writes(
            prefix in proptest::collection::vec(any::<u8>(), 0..40),
            pid: u64, inc: u64, seq: u64, ts: u64, hb: bool,
            payload_len in 0usize..100_000,
        ) {
            let kind = if hb { Kind::Heartbeat } else { Kind::Data };
            let header = Header { kind, publisher_id: pid, incarnation: inc, seq, timestamp_ns: ts };
            let mut expected = prefix.clone();
            encode_head(&header, payload_len, &mut expected);
            let mut got = vec![7u8]; // the template appends
            HeadTemplate::new(&prefix, pid, inc).encode(kind, seq, ts, payload_len, &mut got);
            prop_assert_eq!(&got[1..], &expected[..]);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn round_trips_any_header(pid: u64, inc: u64, seq: u64, ts: u64, hb: bool, payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let h = Header { kind: if hb { Kind::Heartbeat } else { Kind::Data }, publisher_id: pid, incarnation: inc, seq, timestamp_ns: ts };
            let mut buf = Vec::new();
            encode(&h, &payload, &mut buf);
            let env = decode(&buf).unwrap();
            prop_assert_eq!(env.header, h);
            prop_assert_eq!(env.payload, payload.as_slice());
        }
    }
}
