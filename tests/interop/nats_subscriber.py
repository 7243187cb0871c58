#!/usr/bin/env python3
"""A subscriber of one eventplane channel over NATS, written from
docs/wire-format.md alone (it uses no eventplane code): only nats-py and
msgpack.

It subscribes to the channel's subject (§1.3), says hello on the hello
subject (§11.2), and again at every publisher's roll call, so publishers
welcome it with a heartbeat and count it; receives until it
has --count data messages, validates every message against the wire format,
and prints on stdout:

    {"ready": true}                       once subscribed and the hello is sent
    {"subject": ..., "messages": [...], "heartbeats": n, "gaps": n, ...}

Any violation of the wire format is fatal (exit status 1); so is a timeout
(exit status 2). Diagnostics go to stderr.
"""

import argparse
import asyncio
import json
import random

import nats

from eventplane_wire import (
    Tracker, Violation, accept, fail, print_result, subject_of,
)

HELLO_PREFIX = "_ep_hello."


async def run(a):
    try:
        subject = subject_of(a.namespace, a.component, a.endpoint, a.topic)
    except ValueError as e:
        fail(1, str(e), "nats_subscriber")
    nc = await nats.connect(a.server, connect_timeout=5, max_reconnect_attempts=0)
    queue = asyncio.Queue()

    async def on_message(msg):
        await queue.put((msg.subject, msg.data))

    my_id = random.getrandbits(64)
    hello = f"hello {my_id}".encode("ascii")

    async def on_roll(msg):
        # §11.2: a publisher's roll call is answered with a hello.
        if msg.data.strip() == b"roll":
            await nc.publish(HELLO_PREFIX + subject, hello)

    await nc.subscribe(subject, cb=on_message)
    await nc.subscribe(HELLO_PREFIX + subject, cb=on_roll)
    await nc.flush()
    await nc.publish(HELLO_PREFIX + subject, hello)
    await nc.flush()
    print(json.dumps({"ready": True}), flush=True)

    tracker = Tracker()
    messages = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + a.timeout
    try:
        while len(messages) < a.count:
            left = deadline - loop.time()
            if left <= 0:
                fail(2, f"timeout: {len(messages)} of {a.count} data messages on {subject} "
                        f"within {a.timeout} s ({tracker.heartbeats} heartbeats)", "nats_subscriber")
            try:
                got_subject, data = await asyncio.wait_for(queue.get(), timeout=left)
            except asyncio.TimeoutError:
                continue
            # §11.1: the NATS subject names the channel; the payload is the
            # envelope, nothing before it.
            if got_subject != subject:
                raise Violation(f"message on {got_subject!r}, not {subject!r}")
            accept(tracker, messages, data)
    except Violation as e:
        fail(1, f"wire-format violation on {subject}: {e}", "nats_subscriber")
    finally:
        try:
            await nc.publish(HELLO_PREFIX + subject, f"bye {my_id}".encode("ascii"))
            await nc.drain()
        except Exception:
            pass

    print_result(subject, messages, tracker)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", required=True, help="NATS server URL")
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--component", required=True)
    ap.add_argument("--endpoint", default=None, help="endpoint of the scope (optional)")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--count", type=int, required=True, help="data messages to receive")
    ap.add_argument("--timeout", type=float, required=True, help="seconds, for everything")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
