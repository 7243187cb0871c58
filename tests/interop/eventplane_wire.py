"""The parts of docs/wire-format.md that every foreign subscriber needs,
written from the document alone (no eventplane code): channel subjects (§1),
the envelope (§2) and sequence tracking (§3.4). Shared by the ZMQ and NATS
interop subscribers."""

import json
import sys

import msgpack

SUBJECT_PREFIX = "ep"
MAX_NAME_LEN = 256
WIRE_VERSION = 2
ENVELOPE_FIELDS = 7
KIND_DATA = 0
KIND_HEARTBEAT = 1
U64_MAX = (1 << 64) - 1
PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class Violation(Exception):
    """A message or discovery entry that breaks the wire format."""


def fail(status, message, who="subscriber"):
    print(f"{who}: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def escape(name):
    """§1.2: bytes outside [A-Za-z0-9_-] become %XX (upper-case hex)."""
    return "".join(chr(b) if b in PLAIN else "%{:02X}".format(b) for b in name.encode("utf-8"))


def check_name(part, name):
    size = len(name.encode("utf-8"))
    if size == 0:
        raise ValueError(f"the {part} name is empty")
    if size > MAX_NAME_LEN:
        raise ValueError(f"the {part} name is {size} bytes long; the limit is {MAX_NAME_LEN}")


def subject_of(namespace, component, endpoint, topic):
    """§1.3: ep.<ns>.<comp>[.<endpoint>].<topic>, each name escaped."""
    parts = [("namespace", namespace), ("component", component)]
    if endpoint is not None:
        parts.append(("endpoint", endpoint))
    parts.append(("topic", topic))
    for part, name in parts:
        check_name(part, name)
    return ".".join([SUBJECT_PREFIX] + [escape(name) for _, name in parts])


def is_u64(v):
    # bool is a subclass of int in Python; msgpack true/false are not integers.
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= U64_MAX


def decode_envelope(buf):
    """§2.3: returns (kind, publisher_id, incarnation, seq, timestamp_ns, payload).
    The envelope does not name its channel; the transport's framing does, and
    the caller has checked it (§5.3, §11)."""
    try:
        env = msgpack.unpackb(buf, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise Violation(f"envelope is not one MessagePack value: {e!r}")
    if not isinstance(env, (list, tuple)):
        raise Violation(f"envelope is not an array but {type(env).__name__}")
    if len(env) < ENVELOPE_FIELDS:
        raise Violation(f"envelope has {len(env)} elements; at least {ENVELOPE_FIELDS} expected")
    # Elements after the seventh are ignored.
    version, kind, pub_id, inc, seq, ts, payload = env[:ENVELOPE_FIELDS]
    for field, v in (("version", version), ("kind", kind), ("publisher_id", pub_id),
                     ("incarnation", inc), ("seq", seq), ("timestamp_ns", ts)):
        if not is_u64(v):
            raise Violation(f"field {field} is {v!r}, not an unsigned 64-bit integer")
    if version != WIRE_VERSION:
        raise Violation(f"unsupported envelope version {version}")
    if kind not in (KIND_DATA, KIND_HEARTBEAT):
        raise Violation(f"unknown envelope kind {kind}")
    if not isinstance(payload, bytes):
        raise Violation(f"payload is {type(payload).__name__}, not a MessagePack bin")
    if kind == KIND_HEARTBEAT and payload:
        raise Violation(f"heartbeat with a {len(payload)}-byte payload")
    return kind, pub_id, inc, seq, ts, payload


class Tracker:
    """§3.4 per publisher_id: incarnation, highest seq known, missing seqs."""

    def __init__(self):
        self.pubs = {}  # publisher_id -> {"inc", "highest", "missing": set}
        self.heartbeats = 0
        self.gaps = 0
        self.lost = 0
        self.late = 0
        self.duplicates = 0
        self.restarts = 0
        self.stale = 0

    def observe(self, kind, pub_id, inc, seq):
        """Returns True when a data message is to be delivered."""
        is_data = kind == KIND_DATA
        if not is_data:
            self.heartbeats += 1
        t = self.pubs.get(pub_id)
        if t is None or inc > t["inc"]:
            if t is not None:
                self.restarts += 1
            # Joining (or rejoining after a restart) wherever the stream is.
            self.pubs[pub_id] = {"inc": inc, "highest": seq, "missing": set()}
            return is_data
        if inc < t["inc"]:
            self.stale += 1
            return False
        highest = t["highest"]
        if seq > highest:
            last_missing = seq - 1 if is_data else seq
            if last_missing > highest:
                self.gaps += 1
                self.lost += last_missing - highest
                t["missing"].update(range(highest + 1, last_missing + 1))
            t["highest"] = seq
            return is_data
        if not is_data:
            return False  # nothing new
        if seq in t["missing"]:
            t["missing"].discard(seq)
            self.late += 1
            self.lost -= 1
            return True
        self.duplicates += 1
        return False


def json_safe(v):
    """msgpack values that JSON cannot hold (bin, ext, non-str keys) made printable."""
    if isinstance(v, bytes):
        return {"$bin": v.hex()}
    if isinstance(v, msgpack.ExtType):
        return {"$ext": v.code, "data": v.data.hex()}
    if isinstance(v, dict):
        return {k if isinstance(k, str) else json.dumps(json_safe(k)): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def accept(tracker, messages, envelope):
    """§2.3, §3.4 and §4 for one received envelope: decode it, track its
    sequence number, and append a delivered data message (its payload
    decoded as MessagePack) to `messages`. Raises Violation."""
    kind, pub_id, inc, seq, ts, payload = decode_envelope(envelope)
    if not tracker.observe(kind, pub_id, inc, seq):
        return
    try:
        value = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:
        raise Violation(f"payload of {pub_id}#{seq} is not MessagePack: {e!r}")
    messages.append({
        "publisher_id": pub_id,
        "incarnation": inc,
        "seq": seq,
        "timestamp_ns": ts,
        "value": json_safe(value),
    })


def print_result(subject, messages, tracker, **extra):
    """The result line every interop subscriber prints on stdout."""
    print(json.dumps({
        "subject": subject,
        "messages": messages,
        "heartbeats": tracker.heartbeats,
        "gaps": tracker.gaps,
        "lost": tracker.lost,
        "late": tracker.late,
        "duplicates": tracker.duplicates,
        "restarts": tracker.restarts,
        "stale": tracker.stale,
        **extra,
    }), flush=True)
