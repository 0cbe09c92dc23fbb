"""Multi-controller instances: one engine whose mesh spans the devices of several processes (jax.distributed).

Every process of the instance builds the same `Engine` over the global mesh (`jax.devices()` lists the devices
of all processes), so the params and the MemPool's device tier are global `jax.Array`s sharded across hosts.
Process 0 is the leader: it alone runs the scheduler, the prompt index and the request bookkeeping. Before each
jitted step it broadcasts that step's host inputs (the padded numpy arrays `ModelRunner.prepare` builds) to the
followers, and then every process calls the same jitted step with the same inputs. Followers only loop:
receive a step, execute it, until the leader sends STOP.

Broadcast, not deterministic replay: replaying the schedule on every process would require every process to
see the same requests in the same order at the same step boundaries (arrival times, aborts, gRPC timing,
stop strings, wall-clock based policies) -- i.e. broadcasting the request stream anyway, plus keeping every
piece of scheduler state bit-identical forever. The step inputs are small (a few KB of int32 per step) and
already fully determine the device computation, so broadcasting them is simpler and cannot diverge. The
followers' MemPool host-side bookkeeping is therefore unused (only the leader's is authoritative); the
device tier is identical by construction because every process runs the same jitted programs.

Wire format per step (through `multihost_utils.broadcast_one_to_all`, a cross-process collective):
1. a fixed-size int32 header [op, decode_only, T, S, P, payload_len, 0, 0];
2. for op == STEP, one int32 payload with every input array concatenated (float32 / uint32 sampling arrays
   travel as their bit patterns).

Limits of this first version (checked, with a clear error): no host KV tier (`num_host_pages=0`), no
sequence-parallel prefill, no KV transfers (colocated role only): those run device-tier operations outside the
step that would also have to be replayed on every process.
"""

from __future__ import annotations

import numpy as np

HEADER_LEN = 8
OP_STEP, OP_STOP = 1, 2

_SAMPLING = (("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32), ("seeds", np.uint32),
             ("output_index", np.int32))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_count: int | None = None,
               cpu_collectives: str = "gloo") -> None:
    """`jax.distributed.initialize` for an instance; call before anything else touches jax's backends.

    All three of coordinator_address / num_processes / process_id None: JAX auto-detects them (TPU pods,
    SLURM, ...). `local_device_count` (CPU only, tests): that many CPU devices in this process.
    """
    import jax
    if local_device_count:
        jax.config.update("jax_num_cpu_devices", int(local_device_count))
    if cpu_collectives:  # only used by the CPU backend; GPU uses NCCL and TPU ICI/DCN
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if coordinator_address is None and num_processes is None and process_id is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)


def is_multiprocess() -> bool:
    import jax
    return jax.process_count() > 1


def check_supported(engine) -> None:
    """Raise if the engine uses features that run device-tier work outside the broadcast step."""
    cfg = engine.config
    if cfg.cache.num_host_pages:
        raise ValueError(f"multi-process instances do not support a host KV tier yet (num_host_pages="
                         f"{cfg.cache.num_host_pages}); use num_host_pages=0")
    if cfg.mesh.seq > 1:
        raise ValueError("multi-process instances do not support sequence-parallel prefill yet (seq > 1)")
    import jax
    mesh = getattr(engine, "mesh", None)
    if mesh is not None and jax.process_count() > 1:
        have = {d.process_index for d in mesh.devices.flat}
        if have != set(range(jax.process_count())):
            missing = sorted(set(range(jax.process_count())) - have)
            raise ValueError(f"the instance mesh ({mesh.devices.size} devices) has no device of process(es) "
                             f"{missing}: use tp = all {len(jax.devices())} devices (or device_ids spanning every "
                             f"process)")


def _broadcast(x: np.ndarray, is_leader: bool) -> np.ndarray:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.broadcast_one_to_all(x, is_source=is_leader))


def _pack(inputs) -> tuple[np.ndarray, np.ndarray]:
    a = inputs.attn
    if set(inputs.sampling) != {name for name, _ in _SAMPLING}:  # keep the wire format in step with sampling.py
        raise ValueError(f"multihost: sampling inputs {sorted(inputs.sampling)} do not match the wire format "
                         f"{[name for name, _ in _SAMPLING]}")
    parts = [inputs.token_ids, inputs.positions, a.slot_pages, a.slot_offsets, a.kv_lens, a.page_indices,
             a.cu_q_lens, a.num_seqs, inputs.logits_indices]
    parts += [np.asarray(inputs.sampling[name], dt).view(np.int32) for name, dt in _SAMPLING]
    payload = np.concatenate([np.asarray(p).reshape(-1).astype(np.int32, copy=False) for p in parts])
    header = np.array([OP_STEP, int(inputs.decode_only), len(inputs.token_ids), len(inputs.logits_indices),
                       a.page_indices.shape[1], payload.size, 0, 0], np.int32)
    return header, payload


def _unpack(header: np.ndarray, payload: np.ndarray):
    from jaxserve.engine.model_runner import StepInputs
    from jaxserve.model.batch import AttentionBatch
    _, decode_only, T, S, P = (int(v) for v in header[:5])
    sizes = [T, T, T, T, S, S * P, S + 1, 1, S] + [S] * len(_SAMPLING)
    chunks, at = [], 0
    for n in sizes:
        chunks.append(payload[at:at + n])
        at += n
    tok, pos, sp, so, kvl, pi, cu, ns, li = chunks[:9]
    attn = AttentionBatch(slot_pages=sp, slot_offsets=so, kv_lens=kvl, page_indices=pi.reshape(S, P),
                          cu_q_lens=cu, num_seqs=ns)
    sampling = {name: np.ascontiguousarray(c).view(dt) for (name, dt), c in zip(_SAMPLING, chunks[9:])}
    return StepInputs(bool(decode_only), tok, pos, attn, li, sampling)


def make_leader(engine) -> None:
    """Install the broadcast hook on process 0's engine: every step's inputs go to the followers first."""
    check_supported(engine)

    def before_execute(inputs):
        header, payload = _pack(inputs)
        _broadcast(header, True)
        _broadcast(payload, True)

    engine.runner.before_execute = before_execute


def stop_followers(engine) -> None:
    """Leader: end the followers' loops (call once, when the instance shuts down)."""
    _broadcast(np.array([OP_STOP] + [0] * (HEADER_LEN - 1), np.int32), True)


def follower_loop(engine) -> int:
    """Followers (process_index != 0): execute the leader's steps until STOP. Returns the number of steps."""
    check_supported(engine)
    steps = 0
    while True:
        header = _broadcast(np.zeros(HEADER_LEN, np.int32), False)
        op = int(header[0])
        if op == OP_STOP:
            return steps
        if op != OP_STEP:
            raise RuntimeError(f"multihost follower: unknown op {op} in header {header.tolist()}")
        payload = _broadcast(np.zeros(int(header[5]), np.int32), False)
        engine.runner.execute(_unpack(header, payload))
        steps += 1
