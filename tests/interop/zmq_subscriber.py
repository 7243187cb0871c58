#!/usr/bin/env python3
"""A subscriber of one eventplane channel over ZMQ, written from
docs/wire-format.md alone (it uses no eventplane code): only pyzmq and msgpack.

It finds the channel's publishers in a file-discovery directory, connects to
them, receives until it has --count data messages, validates every message
against the wire format, and prints on stdout:

    {"ready": true}                       once connected to a publisher
    {"subject": ..., "messages": [...], "heartbeats": n, "gaps": n, ...}

Any violation of the wire format is fatal (exit status 1); so is a timeout
(exit status 2). Diagnostics go to stderr.
"""

import argparse
import json
import os
import socket
import time

import zmq

from eventplane_wire import (
    Tracker, Violation, accept, fail, is_u64, print_result, subject_of,
)

RESCAN_S = 0.2


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


def live_publishers(directory, subject, hostname):
    """§6.2-§6.5: endpoint -> advertisement, for every live registration of
    the channel's ZMQ publishers. Read-only: dead entries are skipped, not
    deleted."""
    prefix = f"eventplane/zmq/{subject}/"
    found = {}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return found
    now = time.time()
    for name in names:
        if name.startswith(".") or not name.endswith(".json"):
            continue
        path = os.path.join(directory, name)
        try:
            mtime = os.stat(path).st_mtime
            with open(path, "rb") as f:
                entry = json.load(f)
        except (OSError, ValueError):
            continue  # removed meanwhile, or not an entry: ignored
        if not isinstance(entry, dict):
            continue
        key, value = entry.get("key"), entry.get("value")
        pid, host, ttl_ms = entry.get("pid"), entry.get("host"), entry.get("ttl_ms")
        if not isinstance(key, str) or not key.startswith(prefix):
            continue
        if not (is_u64(pid) and isinstance(host, str) and is_u64(ttl_ms)):
            continue
        age = max(0.0, now - mtime)
        if age > ttl_ms / 1000.0:
            continue
        if host == hostname and not pid_alive(pid):
            continue
        if not isinstance(value, dict):
            raise Violation(f"registration {key!r}: value is not an object")
        endpoint = value.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith("tcp://"):
            raise Violation(f"registration {key!r}: bad endpoint {endpoint!r}")
        if value.get("subject") != subject:
            raise Violation(f"registration {key!r}: subject {value.get('subject')!r} is not {subject!r}")
        pub_id, inc = value.get("publisher_id"), value.get("incarnation")
        if not (is_u64(pub_id) and is_u64(inc)):
            raise Violation(f"registration {key!r}: publisher_id/incarnation are not u64")
        expected_key = f"{prefix}{pub_id:016x}-{inc:016x}"
        if key != expected_key:
            raise Violation(f"registration key {key!r}, expected {expected_key!r}")
        found[endpoint] = value
    return found



def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--discovery-dir", required=True)
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--component", required=True)
    ap.add_argument("--endpoint", default=None, help="endpoint of the scope (optional)")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--count", type=int, required=True, help="data messages to receive")
    ap.add_argument("--timeout", type=float, required=True, help="seconds, for everything")
    a = ap.parse_args()

    try:
        subject = subject_of(a.namespace, a.component, a.endpoint, a.topic)
    except ValueError as e:
        fail(1, str(e))
    deadline = time.monotonic() + a.timeout
    hostname = socket.gethostname()
    sub_prefix = subject.encode("ascii") + b"\x00"

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.SUBSCRIBE, sub_prefix)
    connected = set()

    def connect_new():
        for endpoint in live_publishers(a.discovery_dir, subject, hostname):
            if endpoint not in connected:
                sock.connect(endpoint)
                connected.add(endpoint)

    tracker = Tracker()
    messages = []
    try:
        # Find at least one publisher, then say so.
        while True:
            connect_new()
            if connected:
                break
            if time.monotonic() >= deadline:
                fail(2, f"timeout: no live publisher of {subject} in {a.discovery_dir} "
                        f"within {a.timeout} s")
            time.sleep(0.05)
        print(json.dumps({"ready": True}), flush=True)

        next_scan = time.monotonic() + RESCAN_S
        while len(messages) < a.count:
            now = time.monotonic()
            if now >= deadline:
                fail(2, f"timeout: {len(messages)} of {a.count} data messages on {subject} "
                        f"within {a.timeout} s ({tracker.heartbeats} heartbeats, "
                        f"{len(connected)} publisher endpoint(s))")
            if now >= next_scan:
                connect_new()  # publishers that appeared since
                next_scan = now + RESCAN_S
            wait_ms = max(1, int(min(deadline - now, RESCAN_S) * 1000))
            if not sock.poll(wait_ms, zmq.POLLIN):
                continue
            frames = sock.recv_multipart(zmq.NOBLOCK)
            # §5.2: one frame, <subject> NUL <envelope>.
            if len(frames) != 1:
                raise Violation(f"message of {len(frames)} frames; exactly 1 expected")
            frame = frames[0]
            if not frame.startswith(sub_prefix):
                raise Violation(f"frame does not start with the subject and NUL: {frame[:64]!r}")
            accept(tracker, messages, frame[len(sub_prefix):])
    except Violation as e:
        fail(1, f"wire-format violation on {subject}: {e}")
    finally:
        sock.close(0)
        ctx.term()

    print_result(subject, messages, tracker, endpoints=sorted(connected))


if __name__ == "__main__":
    main()
