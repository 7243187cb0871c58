#!/usr/bin/env python3
"""A stand-in for vLLM's KV-event publisher, written with pyzmq and msgspec
the way vLLM's `vllm/distributed/kv_events.py` does it, to test eventplane's
relay against the real wire format.

Sockets: a PUB (an XPUB here, which is the same on the wire, so we can see
when the relay has subscribed instead of sleeping) sending
`[topic, seq (8 bytes big-endian), payload]`, and a ROUTER replay socket
answering `["", start_seq]` with every buffered `["", seq, payload]` from
there, then `["", -1, ""]`.

It prints its endpoints as a JSON line, waits for the relay to subscribe
and for `go` on stdin, then plays this scenario (block size 4):
  seq 0  BlockStored A: 2 blocks, engine hashes above 2^63
  seq 1  BlockStored B after A (1 block), plus an event of an unknown type
  seq 2  BlockRemoved B, and an unknown block
  seq 3  BlockStored C (2 blocks)          -- NOT sent live: only in replay
  seq 4  BlockStored D after C             -- reveals the gap; the relay
                                              must replay 3
  seq 5  garbage (not MessagePack)         -- counted and skipped
  seq 6  BlockStored F with an unknown field, and a BlockStored of wrong
         types                             -- F applies, the other is
                                              counted and skipped
  -> prints {"checkpoint": 1, "cached": [...]} and waits for "next" on stdin
  the engine restarts:
  seq 0  BlockStored E (1 block)           -- the relay must clear first
  -> prints {"checkpoint": 2, "cached": [...]} and waits for "stop"

`cached` lists, for every block the engine holds, the token ids from the
start of its sequence through that block: the relay's state must match it
exactly.

Usage: vllm_publisher.py --encoding array|map
"""

import argparse
import json
import sys
import time
from typing import Optional, Union

import msgspec
import zmq

BLOCK = 4


def structs(array_like: bool):
    """vLLM's event classes, in one encoding."""

    class EventBatch(msgspec.Struct, array_like=array_like, omit_defaults=True, gc=False):
        ts: float
        events: list
        data_parallel_rank: Optional[int] = None

    class KVCacheEvent(msgspec.Struct, array_like=array_like, omit_defaults=True, gc=False, tag=True):
        pass

    class BlockStored(KVCacheEvent):
        block_hashes: list
        parent_block_hash: Optional[int]
        token_ids: list
        block_size: int
        lora_id: Optional[int]
        medium: Optional[str] = None
        lora_name: Optional[str] = None
        extra_keys: Optional[list] = None  # newer vLLM: unknown to the relay

    class BlockRemoved(KVCacheEvent):
        block_hashes: list
        medium: Optional[str] = None

    class AllBlocksCleared(KVCacheEvent):
        pass

    class BlockMoved(KVCacheEvent):  # a type the relay does not know
        block_hashes: list

    class KVEventBatch(EventBatch):
        events: list[Union[BlockStored, BlockRemoved, AllBlocksCleared, BlockMoved]]

    return KVEventBatch, BlockStored, BlockRemoved, BlockMoved


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoding", choices=["array", "map"], required=True)
    args = ap.parse_args()
    array = args.encoding == "array"
    Batch, Stored, Removed, Moved = structs(array)
    enc = msgspec.msgpack.Encoder()

    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.bind("tcp://127.0.0.1:*")
    router = ctx.socket(zmq.ROUTER)
    router.bind("tcp://127.0.0.1:*")
    print(json.dumps({"pub": pub.getsockopt_string(zmq.LAST_ENDPOINT),
                      "replay": router.getsockopt_string(zmq.LAST_ENDPOINT)}), flush=True)

    # The relay's subscription arrives as a message on the XPUB; then the
    # test says `go` once its own subscriber follows the relay.
    if not pub.poll(30_000):
        sys.exit("no subscriber within 30 s")
    pub.recv()
    if sys.stdin.readline().strip() != "go":
        sys.exit("expected `go` on stdin")

    buffer = {}  # seq -> payload, the replay buffer

    def batch(events):
        rank = 0 if array else None  # one encoding sends the rank, one omits it
        return enc.encode(Batch(ts=time.time(), events=events, data_parallel_rank=rank))

    def send(seq, payload, live=True):
        buffer[seq] = payload
        if live:
            pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])

    def serve_replay(timeout_ms=30_000):
        if not router.poll(timeout_ms):
            sys.exit("the relay never asked for a replay")
        ident, empty, start = router.recv_multipart()
        start = int.from_bytes(start, "big")
        for seq in sorted(s for s in buffer if s >= start):
            router.send_multipart([ident, b"", seq.to_bytes(8, "big"), buffer[seq]])
        router.send_multipart([ident, b"", (-1).to_bytes(8, "big", signed=True), b""])
        return start

    big = 2**63 + 12345
    a = [big, big + 1]
    tokens_a = list(range(1, 9))
    tokens_b = list(range(9, 13))
    tokens_c = list(range(100, 108))
    tokens_d = list(range(108, 112))

    send(0, batch([Stored(block_hashes=a, parent_block_hash=None, token_ids=tokens_a,
                          block_size=BLOCK, lora_id=None)]))
    send(1, batch([Stored(block_hashes=[2**64 - 1], parent_block_hash=a[1], token_ids=tokens_b,
                          block_size=BLOCK, lora_id=None, medium="GPU"),
                   Moved(block_hashes=[7])]))
    send(2, batch([Removed(block_hashes=[2**64 - 1, 999])]))
    send(3, batch([Stored(block_hashes=[31, 32], parent_block_hash=None, token_ids=tokens_c,
                          block_size=BLOCK, lora_id=None)]), live=False)
    send(4, batch([Stored(block_hashes=[41], parent_block_hash=32, token_ids=tokens_d,
                          block_size=BLOCK, lora_id=None)]))
    start = serve_replay()
    send(5, b"\x92\x01")  # truncated MessagePack
    # A good event beside one of the wrong types: the good one applies.
    tokens_f = list(range(300, 304))
    send(6, batch([Stored(block_hashes=[61], parent_block_hash=None, token_ids=tokens_f,
                          block_size=BLOCK, lora_id=None, extra_keys=[["x", 1]]),
                   Stored(block_hashes=[62], parent_block_hash=None, token_ids="oops",
                          block_size="four", lora_id=None)]))
    print(json.dumps({"checkpoint": 1, "replayed_from": start, "cached": [
        tokens_a[:4], tokens_a, tokens_c[:4], tokens_c, tokens_c + tokens_d, tokens_f]}), flush=True)
    if sys.stdin.readline().strip() != "next":
        sys.exit("expected `next` on stdin")

    # The engine restarts: a new process numbers from 0 again.
    buffer.clear()
    tokens_e = list(range(200, 204))
    send(0, batch([Stored(block_hashes=[51], parent_block_hash=None, token_ids=tokens_e,
                          block_size=BLOCK, lora_id=None)]))
    print(json.dumps({"checkpoint": 2, "cached": [tokens_e]}), flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    main()
