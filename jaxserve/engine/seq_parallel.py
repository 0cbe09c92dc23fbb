"""Sequence-parallel (context-parallel) prefill of one long prompt over the `seq` axis of the engine mesh.

The uncached suffix of the prompt is padded to a multiple of 2N (N = size of `seq`) and laid out in zig-zag
order (`kernels/ring_attention.zigzag_order`): device i holds suffix chunks i and 2N-1-i. The whole model
runs in that order: per-token work (embeddings, projections, MLP, norms) is sharded over `seq` by XLA, and
every layer's attention is swapped (the `attention_hook` of `model/decoder.py`) for ring attention:
- queries attend to the cached prefix, read from the MemPool pages of that layer (`kv_cache[layer, pages]`);
- and to the suffix K/V, passed around the ring with `ppermute`, partial results merged by log-sum-exp;
- the suffix K/V is written into the request's pool pages (`reference.write_kv`, the same scatter as the
  normal step), so decode continues from the pool without recomputation.

The pool is sharded over `tp` (KV heads) and replicated over `seq`, so every device of the mesh can decode
any request after the prefill; heads are split over `tp` inside the ring as well (2-D mesh `seq` x `tp`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxserve.engine.device_ops import DeviceOps, LocalOps
from jaxserve.engine.sampling import sample_tokens, sampling_arrays
from jaxserve.kernels import kv_quant, reference
from jaxserve.kernels.ring_attention import padded_length, ring_attention, zigzag_order
from jaxserve.model.decoder import Decoder
from jaxserve.util import next_pow2


class SPBatch(NamedTuple):
    """One sequence-parallel prefill (a pytree of int32 arrays). Rows are in zig-zag order."""

    positions: Any      # i32[Lpad] absolute position of each row (padding rows continue past the end)
    slot_pages: Any     # i32[Lpad] pool page each row's K/V goes to; padding -> sink page 0
    slot_offsets: Any   # i32[Lpad]
    prefix_pages: Any   # i32[Pp] pages of the cached prefix (padded with page 0, masked by prefix_len)
    prefix_len: Any     # i32[] cached tokens before the suffix


def make_attention_hook(mesh, *, seq_axis: str = "seq", tp_axis: str | None = "tp", balanced: bool = True,
                        communicate: bool = True, kv_cache_dtype: str = "auto"):
    """The `Decoder.attention_hook` for context-parallel prefill on `mesh`; quantized pages
    (`kv_cache_dtype`) are dequantized when the prefix is read and quantized when the suffix is written."""

    def hook(q, k, v, kv_cache, batch: SPBatch, layer: int, sm_scale: float):
        # Cached prefix of this layer, read from the pool before this layer's suffix K/V is written.
        prefix = kv_cache[layer, batch.prefix_pages]                      # [Pp, page, 2Hkv, D]
        prefix = kv_quant.dequantize(prefix.reshape(-1, *prefix.shape[2:]), kv_cache_dtype, q.dtype)
        out = ring_attention(q, k, v, batch.positions, prefix, batch.prefix_len, mesh=mesh, seq_axis=seq_axis,
                             tp_axis=tp_axis, sm_scale=sm_scale, balanced=balanced, communicate=communicate)
        kv_cache = reference.write_kv(kv_cache, layer, k, v, batch.slot_pages, batch.slot_offsets, kv_cache_dtype)
        return out, kv_cache

    return hook


@functools.lru_cache(maxsize=None)
def jitted_sp_step(model_config, mesh, seq_axis: str = "seq", tp_axis: str | None = "tp", balanced: bool = True,
                   communicate: bool = True):
    """One jitted context-parallel prefill step per (model, mesh): `(params, kv_cache, token_ids, batch,
    logits_indices, sampling) -> (tokens, logits, kv_cache)`; the cache is donated and keeps its sharding."""
    hook = make_attention_hook(mesh, seq_axis=seq_axis, tp_axis=tp_axis, balanced=balanced,
                               communicate=communicate, kv_cache_dtype=model_config.kv_cache_dtype)
    model = Decoder(model_config, attention_hook=hook)
    kv_spec = P(None, None, None, tp_axis, None)
    replicated = NamedSharding(mesh, P())

    def step(params, kv_cache, token_ids, batch, logits_indices, sampling):
        logits, kv_cache = model.apply({"params": params}, token_ids, batch.positions, kv_cache, batch,
                                       decode_only=False, logits_indices=logits_indices)
        return sample_tokens(logits, **sampling), logits, kv_cache

    return jax.jit(step, donate_argnums=(1,),
                   out_shardings=(replicated, replicated, NamedSharding(mesh, kv_spec)))


class SequenceParallelPrefill:
    """Runs a single request's prefill over the `seq` axis of `mesh`, reading and writing `pool`."""

    def __init__(self, model_config, params, pool, mesh, *, seq_axis: str = "seq", tp_axis: str | None = "tp",
                 balanced: bool = True, communicate: bool = True, ops: DeviceOps | None = None,
                 on_new_shape: Callable[[], None] | None = None):
        """`ops`: the instance's device-op channel (default: a single process's); every prefill runs through
        it (op "sp_forward"), so the followers of a multi-process instance run it too. `on_new_shape()`: called
        before a prefill whose shapes were never run (it compiles first; a step watchdog extends its deadline)."""
        self.model_config = model_config
        self.params = params
        self.pool = pool
        self.mesh = mesh
        self.seq_axis = seq_axis
        self.num_devices = mesh.shape[seq_axis]
        self.page_size = pool.page_size
        self._step = jitted_sp_step(model_config, mesh, seq_axis, tp_axis if tp_axis in mesh.shape else None,
                                    balanced, communicate)
        self._rows = NamedSharding(mesh, P(seq_axis))
        self._replicated = NamedSharding(mesh, P())
        self.shapes_seen: set[tuple] = set()
        self.num_prefills = 0
        self.ops = ops if ops is not None else LocalOps()
        self.on_new_shape = on_new_shape
        self.ops.bind("sp_forward", self._forward)

    def prepare(self, token_ids, start: int, pages) -> tuple[np.ndarray, SPBatch, np.ndarray]:
        """Host-side layout. token_ids: the suffix (positions start ... start+n-1); pages: the request's page
        table covering start+n tokens. Returns (token rows, batch, row of each suffix token)."""
        n = len(token_ids)
        ps = self.page_size
        lpad = padded_length(next_pow2(n, 16), self.num_devices)
        order = zigzag_order(lpad, self.num_devices)           # row -> suffix index
        pages = np.asarray(pages, np.int32)
        idx = np.arange(lpad)
        real = idx < n
        pos = start + idx
        toks = np.zeros(lpad, np.int32)
        toks[:n] = np.asarray(token_ids, np.int32)
        slot_pages = np.where(real, pages[np.minimum(pos, start + n - 1) // ps], 0).astype(np.int32)
        slot_offsets = np.where(real, pos % ps, 0).astype(np.int32)
        n_prefix_pages = -(-start // ps)
        prefix_pages = np.zeros(next_pow2(max(n_prefix_pages, 1)), np.int32)
        prefix_pages[:n_prefix_pages] = pages[:n_prefix_pages]
        batch = SPBatch(positions=pos[order].astype(np.int32), slot_pages=slot_pages[order],
                        slot_offsets=slot_offsets[order], prefix_pages=prefix_pages,
                        prefix_len=np.asarray(start, np.int32))
        row_of = np.argsort(order)[:n]                          # suffix index -> row
        return toks[order], batch, row_of

    def forward(self, token_ids, start: int, pages, *, logits_for: str = "last", sampling=None):
        """Prefill `token_ids` (the uncached suffix, after `start` cached tokens) into `pages`. Returns
        (sampled tokens, logits f32[k, vocab]) for the last suffix token (`logits_for="last"`) or for every
        suffix token in order (`"all"`). Runs as the "sp_forward" device op (on every process)."""
        if sampling is None:  # greedy
            k = 1 if logits_for == "last" else len(token_ids)
            sampling = sampling_arrays([None] * k, [0] * k, [0] * k, k)
        return self.ops.call("sp_forward", np.asarray(token_ids, np.int32), int(start), np.asarray(pages, np.int32),
                             str(logits_for), sampling)

    def _forward(self, token_ids, start, pages, logits_for, sampling):
        """The "sp_forward" op's local function."""
        toks, batch, row_of = self.prepare(token_ids, start, pages)
        rows = row_of[-1:] if logits_for == "last" else row_of
        shape = (len(toks), len(batch.prefix_pages), len(rows))
        if self.on_new_shape is not None and shape not in self.shapes_seen:
            self.on_new_shape()  # this prefill compiles first
        put_rows = lambda x: jax.device_put(x, self._rows)
        batch = batch._replace(positions=put_rows(batch.positions))
        self.shapes_seen.add(shape)
        tokens, logits, self.pool.kv_cache = self._step(self.params, self.pool.kv_cache, put_rows(toks), batch,
                                                        np.asarray(rows, np.int32), sampling)
        self.num_prefills += 1
        return np.asarray(tokens), logits

    def run(self, batch) -> np.ndarray:
        """Engine entry: a ScheduledBatch with a single (request, n) entry computing its whole suffix."""
        (req, n), = batch.entries
        start = req.num_computed
        toks = req.all_token_ids[start:start + n]
        sampling = sampling_arrays([req.params], [req.seed], [len(req.output_token_ids)], 1)
        tokens, _ = self.forward(toks, start, req.pages, sampling=sampling)
        return tokens[:1]
