"""One device-op channel: every op that all processes of an instance must run, declared once.

An instance whose mesh spans several processes (jaxserve/engine/multihost.py) runs every piece of device work
on every process, in the same order: the leader (process 0) decides, the followers repeat. Every such op is
declared in `OPS` below with its wire codec; the engine parts that run one receive a `DeviceOps` in their
constructor, `bind` the op's local function there, and run it only through `ops.call(name, *args)`:

| op             | bound by (local function)                    | arguments                                       |
|----------------|----------------------------------------------|-------------------------------------------------|
| step           | ModelRunner (`execute`)                      | StepInputs                                      |
| sp_forward     | SequenceParallelPrefill (`_forward`)         | tokens, start, pages, logits_for, sampling      |
| copy_to_host   | KvStore (`_copy_to_host`)                    | device pages, host pages                        |
| copy_to_device | KvStore (`_copy_to_device`)                  | host pages, device pages                        |
| kv_offer       | multihost.KvShardOps (`offer_shards`)        | pages, uuid, receiver layout                    |
| kv_receive     | multihost.KvShardOps (pull, agree, scatter)  | sources, shape, dtype, chunks, pages, timeout   |

Three implementations of one interface (as nano-vllm's `call(name, ...)` and vLLM's `collective_rpc`):
- `LocalOps` (single process): `call` runs the bound function;
- `LeaderOps`: `call` encodes the arguments, sends the frame to every follower, then runs the function;
- `FollowerOps`: `call` is refused; `serve()` receives frames and dispatches them through the same table to
  its own engine's bound functions, until the leader stops it (or disappears).
An op that is not declared cannot be bound, called or sent (`UndeclaredOp`), so a new piece of device work
cannot silently skip the followers: it has no way to run except through this table.

Wire format (the only one between the processes of an instance; no pickle): one frame per op,
`int32[4]` header `[op code, number of int32 words, number of JSON bytes, 0]`, then the int32 words (every
array argument, concatenated; float32 / uint32 arrays travel as their bit patterns), then UTF-8 JSON
`{"m": <the op's small arguments>, "n": <the length of each array>}`. Code 0 is STOP.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

log = logging.getLogger("jaxserve.device_ops")

HEADER_LEN = 4
OP_STOP = 0

# The sampler's arrays (sampling.sampling_arrays) as they travel: name, dtype (4-byte types only).
SAMPLING_WIRE = (("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32), ("seeds", np.uint32),
                 ("output_index", np.int32))


class UndeclaredOp(LookupError):
    """An op name that is not in `OPS`: it cannot be bound, called or sent."""


class OpSpec(NamedTuple):
    code: int
    name: str
    encode: Callable[..., tuple[dict, list]]          # (*args) -> (JSON-able meta, [arrays of 4-byte items])
    decode: Callable[[dict, list], tuple]             # (meta, [int32 arrays]) -> args
    follower_may_fail: bool                           # True: a follower logs a failure and goes on


OPS: dict[str, OpSpec] = {}
_BY_CODE: dict[int, OpSpec] = {}


def declare(code: int, name: str, encode, decode, *, follower_may_fail: bool = False) -> OpSpec:
    if code == OP_STOP or code in _BY_CODE or name in OPS:
        raise ValueError(f"op {name!r} / code {code} is already declared")
    spec = OpSpec(code, name, encode, decode, follower_may_fail)
    OPS[name] = _BY_CODE[code] = spec
    return spec


def spec_of(name: str) -> OpSpec:
    try:
        return OPS[name]
    except KeyError:
        raise UndeclaredOp(f"device op {name!r} is not declared in jaxserve.engine.device_ops.OPS (declared: "
                           f"{sorted(OPS)})") from None


# ---------------------------------------------------------------------------------------------- frames
def encode_frame(name: str, *args) -> bytes:
    spec = spec_of(name)
    meta, arrays = spec.encode(*args)
    words = [_as_words(a) for a in arrays]
    data = np.concatenate(words) if words else np.zeros(0, np.int32)
    text = json.dumps({"m": meta, "n": [len(w) for w in words]}, separators=(",", ":")).encode()
    return np.array([spec.code, data.size, len(text), 0], np.int32).tobytes() + data.tobytes() + text


def stop_frame() -> bytes:
    return np.array([OP_STOP, 0, 0, 0], np.int32).tobytes()


def read_frame(recv_exact: Callable[[int], bytes]) -> tuple[str | None, tuple]:
    """(op name, decoded args) of the next frame; (None, ()) for STOP."""
    code, n_words, n_text, _ = (int(v) for v in np.frombuffer(recv_exact(4 * HEADER_LEN), np.int32))
    if code == OP_STOP:
        return None, ()
    spec = _BY_CODE.get(code)
    data = np.frombuffer(recv_exact(4 * n_words), np.int32) if n_words else np.zeros(0, np.int32)
    body = json.loads(recv_exact(n_text)) if n_text else {"m": {}, "n": []}
    if spec is None:
        raise UndeclaredOp(f"received device op code {code}, which is not declared here (a version mismatch?)")
    arrays, at = [], 0
    for n in body["n"]:
        arrays.append(data[at:at + n])
        at += n
    return spec.name, spec.decode(body["m"], arrays)


def decode_frame(frame: bytes) -> tuple[str | None, tuple]:
    """`read_frame` of one whole frame (tests, tools)."""
    view = memoryview(frame)
    at = 0

    def take(n: int) -> bytes:
        nonlocal at
        at += n
        return bytes(view[at - n:at])
    return read_frame(take)


def _as_words(a) -> np.ndarray:
    a = np.ascontiguousarray(a).reshape(-1)
    if a.dtype.itemsize != 4:
        a = a.astype(np.int32)
    return a.view(np.int32)


# ---------------------------------------------------------------------------------------------- codecs
def _sampling_words(sampling: dict) -> list:
    if set(sampling) != {name for name, _ in SAMPLING_WIRE}:  # keep the wire format in step with sampling.py
        raise ValueError(f"device ops: sampling inputs {sorted(sampling)} do not match the wire format "
                         f"{[name for name, _ in SAMPLING_WIRE]}")
    return [np.asarray(sampling[name], dt) for name, dt in SAMPLING_WIRE]


def _sampling_of(words: list) -> dict:
    return {name: np.ascontiguousarray(w).view(dt) for (name, dt), w in zip(SAMPLING_WIRE, words)}


def _encode_step(inputs):
    if inputs.extra is not None:
        raise ValueError("logprobs, penalties, logit_bias, min_p and min_tokens are not supported on a "
                         "multi-process instance yet")
    a = inputs.attn
    arrays = [inputs.token_ids, inputs.prev_slots, inputs.positions, a.slot_pages, a.slot_offsets, a.kv_lens,
              a.page_indices, a.cu_q_lens, a.num_seqs, inputs.logits_indices]
    return ({"decode_only": bool(inputs.decode_only), "pages_per_seq": int(a.page_indices.shape[1])},
            [np.asarray(x, np.int32) for x in arrays] + _sampling_words(inputs.sampling))


def _decode_step(meta, arrays):
    from jaxserve.engine.model_runner import StepInputs
    from jaxserve.model.batch import AttentionBatch
    tok, prev, pos, sp, so, kvl, pi, cu, ns, li = arrays[:10]
    attn = AttentionBatch(slot_pages=sp, slot_offsets=so, kv_lens=kvl,
                          page_indices=pi.reshape(len(li), int(meta["pages_per_seq"])), cu_q_lens=cu, num_seqs=ns)
    return (StepInputs(bool(meta["decode_only"]), tok, prev, pos, attn, li, _sampling_of(arrays[10:])),)


def _encode_sp(token_ids, start, pages, logits_for, sampling):
    return ({"start": int(start), "logits_for": str(logits_for)},
            [np.asarray(token_ids, np.int32), np.asarray(pages, np.int32)] + _sampling_words(sampling))


def _decode_sp(meta, arrays):
    return arrays[0], meta["start"], arrays[1], meta["logits_for"], _sampling_of(arrays[2:])


def _encode_pages(a, b):
    return {}, [np.asarray([int(x) for x in a], np.int32), np.asarray([int(x) for x in b], np.int32)]


def _decode_pages(meta, arrays):
    return [int(x) for x in arrays[0]], [int(x) for x in arrays[1]]


def _encode_offer(pages, uuid, layout):
    return ({"uuid": int(uuid), "layout": [[int(s.process), int(s.start), int(s.end)] for s in layout]},
            [np.asarray([int(p) for p in pages], np.int32)])


def _decode_offer(meta, arrays):
    from jaxserve.mempool.transfer import HeadShard
    return ([int(p) for p in arrays[0]], int(meta["uuid"]),
            [HeadShard(int(p), int(a), int(b)) for p, a, b in meta["layout"]])


def _encode_receive(sources, shape, dtype, num_chunks, pages, timeout):
    return ({"sources": [[int(s.receiver_process), str(s.address), int(s.uuid), [[int(v) for v in x] for x in s.pieces]]
                         for s in sources],
             "shape": [int(d) for d in shape], "dtype": str(dtype), "chunks": int(num_chunks),
             "timeout": None if timeout is None else float(timeout)},
            [np.asarray([int(p) for p in pages], np.int32)])


def _decode_receive(meta, arrays):
    from jaxserve.mempool.transfer import ShardSource
    sources = [ShardSource(int(p), str(addr), int(uuid), tuple(tuple(int(v) for v in x) for x in pieces))
               for p, addr, uuid, pieces in meta["sources"]]
    return sources, meta["shape"], meta["dtype"], meta["chunks"], [int(p) for p in arrays[0]], meta["timeout"]


declare(1, "step", _encode_step, _decode_step)
declare(2, "sp_forward", _encode_sp, _decode_sp)
declare(3, "copy_to_host", _encode_pages, _decode_pages)
declare(4, "copy_to_device", _encode_pages, _decode_pages)
# A follower's failed offer only makes the receiver's pull time out; a failed receive fails on every process
# (the processes agree before writing): the instance keeps serving either way.
declare(5, "kv_offer", _encode_offer, _decode_offer, follower_may_fail=True)
declare(6, "kv_receive", _encode_receive, _decode_receive, follower_may_fail=True)


# ---------------------------------------------------------------------------------------------- channels
class DeviceOps:
    """The interface: `bind(name, fn)` once per op on each process, `call(name, *args)` to run an op."""

    is_multiprocess = False
    role = "local"

    def __init__(self):
        self._handlers: dict[str, Callable] = {}

    def bind(self, name: str, fn: Callable) -> None:
        spec_of(name)
        if name in self._handlers:
            raise ValueError(f"device op {name!r} is already bound on this channel (one engine per channel)")
        self._handlers[name] = fn

    def is_bound(self, name: str) -> bool:
        return name in self._handlers

    def call(self, name: str, *args):
        raise NotImplementedError

    def _run(self, name: str, args: tuple):
        """Run an op's local function (every implementation dispatches through here)."""
        fn = self._handlers.get(name)
        if fn is None:
            raise RuntimeError(f"device op {name!r} has no local function on this process (nothing bound it)")
        return fn(*args)

    def close(self) -> None:
        pass


class LocalOps(DeviceOps):
    """Single process: run."""

    def call(self, name: str, *args):
        spec_of(name)
        return self._run(name, args)


class LeaderOps(DeviceOps):
    """Process 0 of a multi-process instance: send to every follower, then run. `transport.send(bytes)`
    delivers a frame to every follower, in order; `transport.close()`."""

    is_multiprocess = True
    role = "leader"

    def __init__(self, transport):
        super().__init__()
        self.transport = transport
        self._stopped = False

    def call(self, name: str, *args):
        if self._stopped:
            raise RuntimeError(f"device op {name!r}: the followers were stopped")
        frame = encode_frame(name, *args)  # raises before anything is sent
        self.transport.send(frame)
        return self._run(name, args)

    def stop_followers(self) -> None:
        """End the followers' `serve` loops (once, at shutdown) and close the channel."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.transport.send(stop_frame())
        finally:
            self.transport.close()

    close = stop_followers


class FollowerOps(DeviceOps):
    """Any other process: `serve()` runs the leader's ops; it originates none. `transport.recv_exact(n)`
    returns the next n bytes (ConnectionError when the leader is gone); `transport.close()`."""

    is_multiprocess = True
    role = "follower"

    def __init__(self, transport):
        super().__init__()
        self.transport = transport
        self.counts: collections.Counter = collections.Counter()

    def call(self, name: str, *args):
        raise RuntimeError(f"device op {name!r} on a follower: followers run the leader's ops and send none")

    def serve(self) -> collections.Counter:
        """Receive and run ops until STOP; returns how many of each ran. An op that fails ends the loop (and
        raises) unless the table says a follower may fail it (KV transfers: logged)."""
        try:
            while True:
                name, args = read_frame(self.transport.recv_exact)
                if name is None:
                    return self.counts
                try:
                    self._run(name, args)
                except Exception:
                    if not spec_of(name).follower_may_fail:
                        raise
                    log.exception("follower: device op %s failed", name)
                self.counts[name] += 1
        finally:
            self.transport.close()


class SocketSender:
    """LeaderOps' transport over one connected socket per follower ({process index: socket})."""

    def __init__(self, socks: dict):
        self.socks = socks

    def send(self, data: bytes) -> None:
        for i, conn in sorted(self.socks.items()):
            try:
                conn.sendall(data)
            except OSError as e:
                raise RuntimeError(f"multihost: follower process {i} is unreachable: {e}") from e

    def close(self) -> None:
        for conn in self.socks.values():
            conn.close()


class SocketReceiver:
    """FollowerOps' transport over the socket connected to the leader."""

    def __init__(self, sock):
        self.sock = sock

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            got = self.sock.recv(n - len(buf))
            if not got:
                raise ConnectionError("multihost: the leader closed the op channel (it stopped or died)")
            buf += got
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()


class MemoryTransport:
    """Both ends of an in-process channel (tests, tools): `send` appends, `recv_exact` waits for bytes (any
    amount may be buffered, so a leader can run a whole workload before its follower replays it)."""

    def __init__(self):
        self._buf = bytearray()
        self._closed = False
        self._cv = threading.Condition()

    def send(self, data: bytes) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("multihost: the op channel is closed")
            self._buf += data
            self._cv.notify_all()

    def recv_exact(self, n: int) -> bytes:
        with self._cv:
            while len(self._buf) < n:
                if self._closed:
                    raise ConnectionError("multihost: the leader closed the op channel (it stopped or died)")
                self._cv.wait()
            out = bytes(self._buf[:n])
            del self._buf[:n]
            return out

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


def local_pair(leader_cls=None, follower_cls=None) -> tuple[LeaderOps, FollowerOps]:
    """A leader and a follower channel joined in this process (tests: two engines, one the other's follower)."""
    pipe = MemoryTransport()
    return (leader_cls or LeaderOps)(pipe), (follower_cls or FollowerOps)(pipe)
