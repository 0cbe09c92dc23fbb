"""Pallas paged-attention kernels against the pure-jnp oracle (jaxserve/kernels/reference.py).

Everything runs on CPU: the GPU variant in Pallas interpret mode, the TPU variant under the TPU
interpreter; GPU (Triton) and TPU (Mosaic) lowering is checked by cross-lowering without executing.

Inputs are hostile on purpose: page tables are permuted, every page slot and page tail that holds no
valid key is NaN, and query rows past cu_q_lens[num_seqs] are NaN, so any read the kernel should not make
(or any masked value it fails to neutralise) shows up as NaN. The oracle itself is not NaN-safe (it
multiplies zero probabilities by V of unused pages), so it is fed the same pool with NaN replaced by 0:
its answer must not depend on those values either.

Attention sinks (gpt-oss): every path is checked against the oracle with `sinks`, and the oracle's sink
formulation itself against a dense numpy softmax over [scores..., sink].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.kernels import dispatch, reference, xla_attention, xla_decode_attention
from jaxserve.kernels.decode_attention import decode_paged_attention
from jaxserve.kernels.ragged_paged_attention import merge_attention, ragged_paged_attention

# Tolerances per dtype (outputs compared in f32). f32: both sides accumulate in f32 in a different
# order. bf16: outputs are rounded to bf16 (ulp 2^-8 relative) and the kernel feeds unnormalised
# probabilities to the P.V matmul in bf16 where the oracle feeds normalised ones.
TOL = {
    jnp.float32: dict(atol=2e-5, rtol=2e-5),
    jnp.bfloat16: dict(atol=3e-2, rtol=3e-2),
}
LSE_TOL = {
    jnp.float32: dict(atol=2e-5, rtol=2e-5),
    jnp.bfloat16: dict(atol=2e-3, rtol=2e-3),
}


# The oracles, jitted (eager op-by-op dispatch of the vmapped oracle is slow on 2 cores).
_STATIC = ("sm_scale", "sliding_window", "soft_cap", "return_lse")
ref_ragged = jax.jit(reference.ref_ragged_paged_attention, static_argnames=_STATIC)
ref_decode = jax.jit(reference.ref_decode_paged_attention, static_argnames=_STATIC)


# ------------------------------------------------------------------------------------------------
# input construction


def make_batch(rng, seqs, *, num_kv_heads, group, head_dim, page_size, dtype, pad_tokens=3, extra_seqs=0,
               spare_pages=3, shares=None):
    """seqs: [(q_len, kv_len)] of live sequences. Returns (args for the kernel, args for the oracle).

    `extra_seqs` dead sequence slots (index >= num_seqs) get garbage lengths and out-of-range page ids.
    `shares` {seq: (other, n)}: seq's first n pages are other's (a shared cached prefix)."""
    num_live = len(seqs)
    max_seqs = num_live + extra_seqs
    pages_per_seq = max(-(-kv // page_size) for _, kv in seqs) + 1  # one spare slot per row
    num_pages = num_live * pages_per_seq + spare_pages
    perm = rng.permutation(num_pages)
    page_indices = np.zeros((max_seqs, pages_per_seq), np.int32)
    page_indices[:num_live] = perm[:num_live * pages_per_seq].reshape(num_live, pages_per_seq)
    for seq, (other, n) in (shares or {}).items():
        page_indices[seq, :n] = page_indices[other, :n]
    page_indices[num_live:] = 10 ** 6  # dead rows: must never be dereferenced unclipped
    kv = rng.standard_normal((num_pages, page_size, 2 * num_kv_heads, head_dim)).astype(np.float32)
    valid = np.zeros((num_pages, page_size), bool)
    for s, (_, kv_len) in enumerate(seqs):
        for tok in range(kv_len):
            valid[page_indices[s, tok // page_size], tok % page_size] = True
    kv[~valid] = np.nan
    q_lens = np.array([q for q, _ in seqs] + [2] * extra_seqs, np.int32)
    kv_lens = np.array([k for _, k in seqs] + [7] * extra_seqs, np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    num_tokens = int(cu[num_live]) + pad_tokens
    q = rng.standard_normal((num_tokens, num_kv_heads * group, head_dim)).astype(np.float32)
    q[cu[num_live]:] = np.nan
    args = (jnp.asarray(q, dtype), jnp.asarray(kv, dtype), jnp.asarray(kv_lens), jnp.asarray(page_indices),
            jnp.asarray(cu), jnp.asarray([num_live], jnp.int32))
    clean_kv = jnp.where(jnp.isnan(args[1]), jnp.zeros((), dtype), args[1])
    clean_pi = jnp.where(args[3] >= num_pages, 0, args[3])
    oracle_args = (args[0], clean_kv, args[2], clean_pi) + args[4:]
    return args, oracle_args


def random_mix(rng, page_size, max_tokens=40):
    """A shuffled mix: pure prefill, prefill after a cached prefix, decode on and off a page boundary,
    with random lengths on and off page boundaries."""
    pure = int(rng.choice([page_size, 2 * page_size, rng.integers(2, 2 * page_size)]))
    prefix = int(rng.choice([page_size, rng.integers(1, 3 * page_size)]))
    chunk = int(rng.integers(2, 12))
    dec_on = page_size * int(rng.integers(1, 4))
    dec_off = int(rng.integers(2, 4 * page_size))
    if dec_off % page_size == 0:
        dec_off += 1
    seqs = [(pure, pure), (chunk, prefix + chunk), (1, dec_on), (1, dec_off)]
    while sum(q for q, _ in seqs) > max_tokens:  # keep the interpreter fast
        seqs[0] = (seqs[0][0] // 2, seqs[0][0] // 2)
    order = rng.permutation(len(seqs))
    return [seqs[i] for i in order]


def make_sinks(rng, num_q_heads):
    """f32[Hq] sink logits around the rows' key lse (~0.5-4 here), so sigmoid(lse - sink) spans (0, 1);
    the last head's sink is -inf (no sink), which must leave rows with no visible key at 0, not NaN."""
    sinks = rng.uniform(-1.0, 4.0, num_q_heads).astype(np.float32)
    sinks[-1] = -np.inf
    return jnp.asarray(sinks)


def assert_close(out, ref, dtype, tol=None):
    out = np.asarray(jnp.asarray(out, jnp.float32))
    ref = np.asarray(jnp.asarray(ref, jnp.float32))
    assert not np.isnan(out).any(), "kernel output has NaN: it read or failed to mask invalid data"
    np.testing.assert_allclose(out, ref, **(tol or TOL[dtype]))


def assert_lse_close(lse, ref_lse, dtype):
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], **LSE_TOL[dtype])


# ------------------------------------------------------------------------------------------------
# ragged kernel, GPU variant (Pallas interpret mode)


@pytest.mark.parametrize("group,head_dim", [(1, 64), (1, 128), (4, 64), (8, 128)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_ragged_matches_oracle(dtype, group, head_dim):
    rng = np.random.default_rng([group, head_dim, 0 if dtype == jnp.float32 else 1])
    page_size = 8 if head_dim == 64 else 16
    num_kv_heads = 2 if group < 8 else 1
    seqs = random_mix(rng, page_size)
    args, oracle_args = make_batch(rng, seqs, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
                                   page_size=page_size, dtype=dtype)
    sm_scale = head_dim ** -0.5
    out, lse = ragged_paged_attention(*args, sm_scale=sm_scale, return_lse=True, block_q=8, pages_per_block=2)
    ref, ref_lse = ref_ragged(*oracle_args, sm_scale=sm_scale, return_lse=True)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, dtype)
    assert_lse_close(lse, ref_lse, dtype)
    live_end = int(args[4][len(seqs)])
    assert np.all(np.asarray(out[live_end:], np.float32) == 0)  # rows of no live sequence


@pytest.mark.parametrize("kw", [dict(soft_cap=5.0), dict(sliding_window=11)], ids=["soft_cap", "window"])
def test_ragged_soft_cap_and_sliding_window(kw):
    rng = np.random.default_rng(7)
    seqs = [(13, 13), (6, 30), (1, 24), (1, 9)]
    args, oracle_args = make_batch(rng, seqs, num_kv_heads=2, group=4, head_dim=64, page_size=8,
                                   dtype=jnp.float32)
    out, lse = ragged_paged_attention(*args, sm_scale=0.3, return_lse=True, block_q=4, pages_per_block=1, **kw)
    ref, ref_lse = ref_ragged(*oracle_args, sm_scale=0.3, return_lse=True, **kw)
    assert_close(out, ref, jnp.float32)
    assert_lse_close(lse, ref_lse, jnp.float32)


# ------------------------------------------------------------------------------------------------
# the engine's CPU path (xla_attention): online softmax over the key blocks each tile can see


@pytest.mark.parametrize("kw", [dict(), dict(soft_cap=5.0), dict(sliding_window=11), dict(sliding_window=3)],
                         ids=["plain", "soft_cap", "window11", "window3"])
@pytest.mark.parametrize("block_q,block_k", [(None, None), (4, 8), (16, 16)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_xla_ragged_matches_oracle(dtype, block_q, block_k, kw):
    """Several key blocks per sequence (block_k 8-16 against 40-key contexts), windows that start past the first
    block, dead sequence slots, a live sequence with q_len 0, NaN in unused pages and padding rows."""
    rng = np.random.default_rng([block_k or 0, len(kw), 0 if dtype == jnp.float32 else 1])
    seqs = [(21, 21), (0, 5), (6, 40), (1, 33), (1, 8)]
    args, oracle_args = make_batch(rng, seqs, num_kv_heads=2, group=2, head_dim=64, page_size=8, dtype=dtype,
                                   extra_seqs=2, pad_tokens=5)
    out, lse = xla_attention.ragged_paged_attention_xla(*args, sm_scale=0.3, return_lse=True, block_q=block_q,
                                                        block_k=block_k, **kw)
    ref, ref_lse = ref_ragged(*oracle_args, sm_scale=0.3, return_lse=True, **kw)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)
    assert_lse_close(lse, ref_lse, dtype)


def assert_path_matches_oracle_and_loop(run, path: str, oracle_args, extra, dtype):
    """`run(**{path: True})` (a CPU attention path forced on) against the oracle, and equal to the path it stands
    in for (`run(**{path: False})`), outputs and lse."""
    out, lse = run(**{path: True})
    ref, ref_lse = ref_ragged(*oracle_args, sm_scale=0.3, return_lse=True, **extra)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)
    assert_lse_close(lse, ref_lse, dtype)
    tiled, tiled_lse = run(**{path: False})
    assert_close(out, tiled, dtype)
    assert_lse_close(lse, tiled_lse, dtype)


# A mixed step: decodes, cached suffixes, a prompt chunk over earlier keys, a fresh prompt, a live sequence
# with q_len 0. With 4-row windows and 16-key blocks every sequence spans several blocks, the longer ones
# several windows, and windows run past their sequence into the next one's rows.
MIXED_SEQS = [(1, 40), (9, 45), (1, 17), (30, 52), (0, 12), (1, 1), (13, 13)]


@pytest.mark.parametrize("dtype,kw", [(jnp.float32, "plain"), (jnp.bfloat16, "plain"), (jnp.float32, "soft_cap"),
                                      (jnp.bfloat16, "sinks"), (jnp.float32, "window5"), (jnp.bfloat16, "window20")],
                         ids=["f32-plain", "bf16-plain", "f32-soft_cap", "bf16-sinks", "f32-window5", "bf16-window20"])
def test_sequence_blocks_match_oracle_and_the_per_tile_loop(dtype, kw):
    """The general path (each sequence's key blocks gathered once, run over its rows in windows) on a mixed
    step fed NaN in unused pages, padding rows and dead slots, against the oracle; and equal to the per-tile
    loop it replaced. Sliding windows of 5 and 20 keys leave whole blocks and windows unvisited."""
    rng = np.random.default_rng([len(kw), 0 if dtype == jnp.float32 else 1])
    args, oracle_args = make_batch(rng, MIXED_SEQS, num_kv_heads=2, group=2, head_dim=64, page_size=8,
                                   dtype=dtype, extra_seqs=2, pad_tokens=6)
    extra = dict(soft_cap=dict(soft_cap=5.0), sinks=dict(sinks=make_sinks(rng, 4)),
                 window5=dict(sliding_window=5), window20=dict(sliding_window=20)).get(kw, {})
    run = functools.partial(xla_attention.ragged_paged_attention_xla, *args, sm_scale=0.3, return_lse=True,
                            block_q=4, block_k=16, lone_chunk=False, **extra)
    assert_path_matches_oracle_and_loop(run, "sequence_blocks", oracle_args, extra, dtype)


# A step where a group shares a cached prefix: seq 0 owns it, seqs 1, 3, 4 (a decode) and 6 share its first 5
# pages (40 keys), seq 2 only its first 3 (24 keys: the group's shared prefix); seq 5 (q_len 0) shares 5 pages but
# has no rows; seq 7 is a fresh prompt and seq 8 a suffix over pages of its own.
SHARED_SEQS = [(7, 47), (8, 52), (5, 40), (6, 56), (1, 45), (0, 44), (9, 49), (13, 13), (4, 30)]
SHARED_PAGES = {1: (0, 5), 2: (0, 3), 3: (0, 5), 4: (0, 5), 5: (0, 5), 6: (0, 5)}


def step_shared_prefix(kv_lens, page_indices, cu_q_lens, num_seqs, page_size):
    """`xla_attention.shared_prefix` of a ragged step, as the general path calls it."""
    live = jnp.arange(page_indices.shape[0]) < num_seqs[0]
    return xla_attention.shared_prefix(kv_lens, cu_q_lens[1:] - cu_q_lens[:-1], live, page_indices, page_size)


@pytest.mark.parametrize("dtype,kw", [(jnp.float32, "plain"), (jnp.float32, "soft_cap"), (jnp.bfloat16, "sinks"),
                                      (jnp.float32, "window20")],
                         ids=["f32-plain", "f32-soft_cap", "bf16-sinks", "f32-window20"])
def test_shared_prefix_phase_matches_oracle_and_the_per_tile_loop(dtype, kw):
    """The general path's shared-prefix phase (a group's common cached pages gathered once and run over every
    member row at once) on a step where six sequences share leading pages, one of them fewer, beside sequences
    of their own: the group and its prefix are found (24 keys, the shortest member's), and the answer is the
    oracle's and the per-tile loop's. Shared-phase windows of 16 rows make windows with and without member rows;
    a sliding window of 20 keys hides part of the prefix from some rows."""
    rng = np.random.default_rng([len(kw), 2 if dtype == jnp.float32 else 3])
    args, oracle_args = make_batch(rng, SHARED_SEQS, num_kv_heads=2, group=2, head_dim=64, page_size=8,
                                   dtype=dtype, extra_seqs=2, pad_tokens=6, shares=SHARED_PAGES)
    ref, shared_len, member = step_shared_prefix(*args[2:], 8)
    assert int(shared_len) == 24
    assert np.asarray(member)[:len(SHARED_SEQS)].tolist() == [True] * 5 + [False, True, False, False]
    assert int(ref) in (0, 1, 2, 3, 4, 6)
    extra = dict(soft_cap=dict(soft_cap=5.0), sinks=dict(sinks=make_sinks(rng, 4)),
                 window5=dict(sliding_window=5), window20=dict(sliding_window=20)).get(kw, {})
    run = functools.partial(xla_attention.ragged_paged_attention_xla, *args, sm_scale=0.3, return_lse=True,
                            block_q=4, block_k=16, shared_block_q=16, shared_block_k=16, lone_chunk=False, **extra)
    assert_path_matches_oracle_and_loop(run, "sequence_blocks", oracle_args, extra, dtype)


def test_no_shared_prefix_without_a_group():
    """Sequences on pages of their own, a lone member, or members with nothing cached form no group."""
    rng = np.random.default_rng(9)
    for seqs, shares in (([(7, 47), (8, 52), (1, 30)], None), ([(7, 47), (8, 52)], None),
                         ([(7, 7), (8, 8)], {1: (0, 1)})):
        args, _ = make_batch(rng, seqs, num_kv_heads=1, group=2, head_dim=64, page_size=8, dtype=jnp.float32,
                             extra_seqs=1, shares=shares)
        _, shared_len, member = step_shared_prefix(*args[2:], 8)
        assert int(shared_len) == 0 and not np.asarray(member).any()


@pytest.mark.parametrize("dtype,seq,kw", [
    (jnp.float32, (150, 150), "plain"), (jnp.float32, (150, 195), "plain"), (jnp.bfloat16, (150, 195), "plain"),
    (jnp.float32, (150, 195), "soft_cap"), (jnp.bfloat16, (150, 150), "sinks"), (jnp.float32, (150, 195), "sinks"),
], ids=["f32-fresh", "f32-over_context", "bf16-over_context", "f32-soft_cap", "bf16-fresh-sinks", "f32-sinks"])
def test_lone_chunk_matches_oracle(dtype, seq, kw):
    """The lone-chunk path (one live sequence: keys before the chunk in blocks with every row at once, then the
    chunk's own keys in static causal row tiles), fed NaN in unused pages, padding rows and a dead slot, against
    the oracle; and equal to the general path. 150 rows make two row tiles (LONE_BLOCK_Q 128), a context of 45
    keys before the chunk with 16-key blocks makes the block loop run three times with a partial last block."""
    rng = np.random.default_rng([seq[1], len(kw), 0 if dtype == jnp.float32 else 1])
    args, oracle_args = make_batch(rng, [seq], num_kv_heads=2, group=2, head_dim=64, page_size=8, dtype=dtype,
                                   extra_seqs=1, pad_tokens=5)
    extra = dict(soft_cap=dict(soft_cap=5.0), sinks=dict(sinks=make_sinks(rng, 4))).get(kw, {})
    run = functools.partial(xla_attention.ragged_paged_attention_xla, *args, sm_scale=0.3, return_lse=True,
                            block_k=16, **extra)  # forced on, then off
    assert_path_matches_oracle_and_loop(run, "lone_chunk", oracle_args, extra, dtype)


def test_lone_chunk_path_is_taken_only_for_one_live_sequence():
    """With the path compiled, a step of several sequences still gets the general path's answer (the oracle's),
    and one with a lone sequence gets the lone path's (bit-equal to calling it directly)."""
    rng = np.random.default_rng(5)
    many, many_oracle = make_batch(rng, [(40, 40), (30, 70), (1, 9)], num_kv_heads=1, group=2, head_dim=64,
                                   page_size=8, dtype=jnp.float32, extra_seqs=1)
    out = xla_attention.ragged_paged_attention_xla(*many, sm_scale=0.3, lone_chunk=True)
    assert_close(out, ref_ragged(*many_oracle, sm_scale=0.3), jnp.float32)
    lone, _ = make_batch(rng, [(60, 90)], num_kv_heads=1, group=2, head_dim=64, page_size=8, dtype=jnp.float32,
                         extra_seqs=1)
    out = xla_attention.ragged_paged_attention_xla(*lone, sm_scale=0.3, lone_chunk=True)
    direct, _ = jax.jit(functools.partial(xla_attention.lone_chunk_attention, sm_scale=0.3, sliding_window=None,
                                          soft_cap=None, block_q=16, sinks=None, kv_cache_dtype="auto",
                                          layer=None))(*lone)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(direct))
    # The engine hands the whole stacked cache and a layer: the same answer as that layer's pages alone.
    stacked = jnp.stack([jnp.full_like(lone[1], jnp.nan), lone[1]])
    layered = xla_attention.ragged_paged_attention_xla(lone[0], stacked, *lone[2:], sm_scale=0.3, lone_chunk=True,
                                                       layer=1)
    np.testing.assert_array_equal(np.asarray(layered), np.asarray(direct))


@pytest.mark.parametrize("block_q,pages_per_block", [(None, None), (1, 1), (16, 4)])
def test_ragged_tilings_dead_sequences_and_empty_queries(block_q, pages_per_block):
    """Tile / KV-block sizes that do and do not divide the lengths; a live sequence with q_len 0;
    dead sequence slots (>= num_seqs) with garbage lengths and out-of-range page ids; a GQA group that
    is not a power of two (padded inside)."""
    rng = np.random.default_rng(11)
    seqs = [(9, 9), (0, 5), (4, 20), (1, 16)]
    args, oracle_args = make_batch(rng, seqs, num_kv_heads=1, group=3, head_dim=64, page_size=8,
                                   dtype=jnp.float32, extra_seqs=2, pad_tokens=5)
    out = ragged_paged_attention(*args, sm_scale=0.125, block_q=block_q, pages_per_block=pages_per_block)
    ref = ref_ragged(*oracle_args, sm_scale=0.125)
    assert_close(out, ref, jnp.float32)


def test_merge_attention_of_two_kv_halves_equals_whole():
    """Split one sequence's keys at a page boundary into a cached prefix A and a new chunk B. Attention
    of the chunk's queries over A (each query as its own one-query sequence with kv_len = |A|, which sees
    all of A) merged with causal attention over B (a pure-prefill sequence on B's pages) must equal
    attention over A u B."""
    rng = np.random.default_rng(3)
    ps, hkv, group, d = 8, 2, 4, 64
    len_a, len_b = 16, 5
    (q, kv, _, pi, _, _), _ = make_batch(rng, [(len_b, len_a + len_b)], num_kv_heads=hkv, group=group,
                                         head_dim=d, page_size=ps, dtype=jnp.float32, pad_tokens=0)
    kv = jnp.where(jnp.isnan(kv), 0.0, kv)
    pages = pi[0, :3]  # A = pages[:2] (16 keys), B = pages[2] (5 keys)
    # All three calls use len_b sequence slots and 3-page tables, so they share one compilation.
    one_seq = (jnp.array([0] + [len_b] * len_b, jnp.int32), jnp.array([1], jnp.int32))
    per_query = (jnp.arange(len_b + 1, dtype=jnp.int32), jnp.array([len_b], jnp.int32))

    def table(row0):
        return jnp.zeros((len_b, 3), jnp.int32).at[0].set(row0)

    run = functools.partial(ragged_paged_attention, sm_scale=0.125, return_lse=True)
    whole, whole_lse = run(q, kv, jnp.array([len_a + len_b] + [0] * (len_b - 1), jnp.int32), table(pages),
                           *one_seq)
    out_a, lse_a = run(q, kv, jnp.full((len_b,), len_a, jnp.int32),
                       jnp.tile(jnp.concatenate([pages[:2], pages[:1]])[None], (len_b, 1)), *per_query)
    out_b, lse_b = run(q, kv, jnp.array([len_b] + [0] * (len_b - 1), jnp.int32),
                       table(jnp.array([pages[2], 0, 0], jnp.int32)), *one_seq)
    merged, merged_lse = merge_attention(out_a, lse_a, out_b, lse_b)
    assert_close(merged, whole, jnp.float32)
    np.testing.assert_allclose(merged_lse, whole_lse, atol=1e-5, rtol=1e-5)
    # With sinks the lse returned is the keys' only: merge the halves, then apply the sink once.
    sinks = make_sinks(rng, hkv * group)
    whole_s, whole_s_lse = run(q, kv, jnp.array([len_a + len_b] + [0] * (len_b - 1), jnp.int32),
                               table(pages), *one_seq, sinks=sinks)
    np.testing.assert_array_equal(whole_s_lse, whole_lse)
    assert_close(reference.apply_sinks(merged, merged_lse, sinks), whole_s, jnp.float32)
    # merging with an empty range (lse -inf) is the identity
    empty = jnp.full_like(lse_a, -jnp.inf)
    same, same_lse = merge_attention(whole, whole_lse, jnp.zeros_like(whole), empty)
    assert_close(same, whole, jnp.float32)
    np.testing.assert_allclose(same_lse, whole_lse)


# ------------------------------------------------------------------------------------------------
# attention sinks: the oracle pinned by a dense numpy computation, then every path against the oracle


@pytest.mark.parametrize("kw", [dict(), dict(sliding_window=3, soft_cap=2.0)], ids=["plain", "window-cap"])
def test_oracle_sinks_match_dense_numpy(kw):
    """Per row and head: softmax over [visible scaled (capped) scores..., sink], sink column dropped."""
    rng = np.random.default_rng(21)
    hkv, group, d, ps, sm_scale = 2, 2, 8, 4, 0.5
    seqs = [(3, 6), (1, 5), (4, 4)]
    _, (q, kv, kv_lens, pi, cu, num_seqs) = make_batch(rng, seqs, num_kv_heads=hkv, group=group, head_dim=d,
                                                       page_size=ps, dtype=jnp.float32)
    sinks = jnp.asarray([0.5, 2.5, 30.0, -np.inf], jnp.float32)  # mid, high, dominant, none
    out, lse = ref_ragged(q, kv, kv_lens, pi, cu, num_seqs, sm_scale=sm_scale, return_lse=True, sinks=sinks,
                          **kw)
    q, kv, sinks = np.asarray(q, np.float64), np.asarray(kv, np.float64), np.asarray(sinks, np.float64)
    window, cap = kw.get("sliding_window"), kw.get("soft_cap")
    want = np.zeros(q.shape)
    want_lse = np.full(q.shape[:2], -np.inf)
    for s, (q_len, kv_len) in enumerate(seqs):
        keys = np.concatenate([kv[pi[s, j]] for j in range(pi.shape[1])])[:kv_len]  # [kv_len, 2Hkv, D]
        for i in range(q_len):
            t, pos = int(cu[s]) + i, kv_len - q_len + i
            lo = 0 if window is None else max(0, pos - window + 1)
            for h in range(hkv * group):
                k, v = keys[lo:pos + 1, 2 * (h // group)], keys[lo:pos + 1, 2 * (h // group) + 1]
                scores = sm_scale * (k @ q[t, h])
                if cap is not None:
                    scores = cap * np.tanh(scores / cap)
                logits = np.append(scores, sinks[h])
                e = np.exp(logits - logits.max())
                want[t, h] = (e / e.sum())[:-1] @ v
                want_lse[t, h] = np.log(np.exp(scores - scores.max()).sum()) + scores.max()
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-6, rtol=1e-5)  # keys only, no sink


_WINDOW_CAP = dict(sliding_window=9, soft_cap=5.0)
SINK_CASES = [(jnp.float32, dict()), (jnp.bfloat16, dict()), (jnp.float32, _WINDOW_CAP), (jnp.bfloat16, _WINDOW_CAP)]
SINK_IDS = ["f32", "bf16", "f32-window-cap", "bf16-window-cap"]


def _sink_batch(dtype, seed):
    rng = np.random.default_rng([seed, 0 if dtype == jnp.float32 else 1])
    seqs = [(13, 13), (6, 30), (1, 24), (1, 9)]
    args, oracle_args = make_batch(rng, seqs, num_kv_heads=2, group=4, head_dim=64, page_size=8, dtype=dtype)
    return args, oracle_args, make_sinks(rng, 8), len(seqs)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("dtype,kw", SINK_CASES, ids=SINK_IDS)
def test_ragged_with_sinks_matches_oracle(dtype, kw, impl):
    """The engine's XLA path and the Pallas ragged kernel (GPU variant, interpret mode), both fed the
    NaN-poisoned pool."""
    args, oracle_args, sinks, _ = _sink_batch(dtype, 31)
    if impl == "xla":
        out, lse = xla_attention.ragged_paged_attention_xla(*args, sm_scale=0.125, return_lse=True, sinks=sinks,
                                                        block_q=8, **kw)
    else:
        out, lse = ragged_paged_attention(*args, sm_scale=0.125, return_lse=True, sinks=sinks, block_q=4,
                                          pages_per_block=2, **kw)
    ref, ref_lse = ref_ragged(*oracle_args, sm_scale=0.125, return_lse=True, sinks=sinks, **kw)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, dtype)
    assert_lse_close(lse, ref_lse, dtype)
    no_sink = ref_ragged(*oracle_args, sm_scale=0.125, **kw)
    assert not np.allclose(np.asarray(ref, np.float32), np.asarray(no_sink, np.float32), atol=0.1)  # it bites


@pytest.mark.parametrize("impl", ["xla", "xla_blocked", "pallas"])
@pytest.mark.parametrize("dtype,kw", SINK_CASES, ids=SINK_IDS)
def test_decode_with_sinks_matches_oracle(dtype, kw, impl):
    """Decode paths against the *ragged* oracle with one query per sequence; kv_len 0 rows give 0."""
    rng = np.random.default_rng([41, 0 if dtype == jnp.float32 else 1])
    kv_lens = [1, 16, 29, 0, 40]
    (_, kv, lens, pi, _, _), (_, kv_clean, _, pi_clean, _, _) = make_batch(
        rng, [(1, k) for k in kv_lens], num_kv_heads=2, group=3, head_dim=64, page_size=8, dtype=dtype)
    num = len(kv_lens)
    q = jnp.asarray(rng.standard_normal((num, 6, 64)), dtype)
    sinks = make_sinks(rng, 6)
    if impl == "xla":
        out, lse = reference.decode_paged_attention_xla(q, kv, lens, pi, sm_scale=0.125, return_lse=True,
                                                        sinks=sinks, **kw)
    elif impl == "xla_blocked":
        out, lse = xla_decode_attention.decode_paged_attention_blocked(q, kv, lens, pi, sm_scale=0.125, return_lse=True,
                                                                sinks=sinks, block_k=16, **kw)
    else:
        out, lse = decode_paged_attention(q, kv, lens, pi, sm_scale=0.125, return_lse=True, sinks=sinks,
                                          num_kv_splits=3, pages_per_block=1, **kw)
    ref, ref_lse = ref_ragged(q, kv_clean, lens, pi_clean, jnp.arange(num + 1, dtype=jnp.int32),
                              jnp.array([num], jnp.int32), sm_scale=0.125, return_lse=True, sinks=sinks, **kw)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, dtype)
    assert_lse_close(lse, ref_lse, dtype)
    assert np.all(np.asarray(out[kv_lens.index(0)], np.float32) == 0)


# ------------------------------------------------------------------------------------------------
# flash-decoding kernel


@pytest.mark.parametrize("group,head_dim,num_kv_splits", [(1, 128, None), (4, 64, 3), (8, 64, 2)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_decode_matches_oracle(dtype, group, head_dim, num_kv_splits):
    rng = np.random.default_rng([group, head_dim, 5])
    ps = 8 if head_dim == 64 else 16
    kv_lens = [1, 2 * ps, 3 * ps + 5, 0]  # one token, on a boundary, off a boundary, empty
    rng.shuffle(kv_lens)
    (_, kv, lens, pi, _, _), (_, kv_clean, _, _, _, _) = make_batch(
        rng, [(1, k) for k in kv_lens], num_kv_heads=2, group=group, head_dim=head_dim, page_size=ps,
        dtype=dtype)
    q = jnp.asarray(rng.standard_normal((len(kv_lens), 2 * group, head_dim)), dtype)
    out, lse = decode_paged_attention(q, kv, lens, pi, sm_scale=head_dim ** -0.5, return_lse=True,
                                      num_kv_splits=num_kv_splits, pages_per_block=1)
    ref, ref_lse = ref_decode(q, kv_clean, lens, pi, sm_scale=head_dim ** -0.5,
                                                        return_lse=True)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, dtype)
    assert_lse_close(lse, ref_lse, dtype)


@pytest.mark.parametrize("kw", [dict(soft_cap=4.0), dict(sliding_window=10)], ids=["soft_cap", "window"])
def test_decode_soft_cap_and_sliding_window(kw):
    rng = np.random.default_rng(2)
    seqs = [(1, 37), (1, 8), (1, 3)]
    (_, kv, lens, pi, _, _), (_, kv_clean, _, _, _, _) = make_batch(
        rng, seqs, num_kv_heads=2, group=3, head_dim=64, page_size=8, dtype=jnp.float32)
    q = jnp.asarray(rng.standard_normal((3, 6, 64)), jnp.float32)
    out = decode_paged_attention(q, kv, lens, pi, sm_scale=0.2, num_kv_splits=2, pages_per_block=2, **kw)
    ref = ref_decode(q, kv_clean, lens, pi, sm_scale=0.2, **kw)
    assert_close(out, ref, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kw", [dict(), dict(soft_cap=4.0), dict(sliding_window=10)], ids=["plain", "soft_cap", "window"])
def test_blocked_decode_ignores_table_width(dtype, kw):
    """The CPU decode path loops over key blocks up to the longest live sequence: a page table widened with
    out-of-range garbage columns (the engine passes one width for every decode step) changes nothing, and
    the result matches the oracle on the narrow table."""
    rng = np.random.default_rng([7, 0 if dtype == jnp.float32 else 1])
    kv_lens = [37, 1, 0, 16, 9]
    (_, kv, lens, pi, _, _), (_, kv_clean, _, pi_clean, _, _) = make_batch(
        rng, [(1, k) for k in kv_lens], num_kv_heads=2, group=3, head_dim=64, page_size=8, dtype=dtype)
    q = jnp.asarray(rng.standard_normal((len(kv_lens), 6, 64)), dtype)
    wide = jnp.concatenate([pi, jnp.full((pi.shape[0], 11), 10 ** 6, jnp.int32)], axis=1)
    out, lse = xla_decode_attention.decode_paged_attention_blocked(q, kv, lens, wide, sm_scale=0.2, return_lse=True,
                                                            block_k=16, **kw)
    ref, ref_lse = ref_decode(q, kv_clean, lens, pi_clean, sm_scale=0.2, return_lse=True, **kw)
    assert_close(out, ref, dtype)
    assert_lse_close(lse, ref_lse, dtype)
    assert np.all(np.asarray(out[kv_lens.index(0)], np.float32) == 0)


# Decodes where a group shares a cached prefix: seqs 0-3 and 5 share 4 pages of seq 0's (seq 4 a decode of its
# own, seq 6 empty); seq 3 shares only 2, which sets the group's prefix to 16 keys.
SHARED_DECODES = [(1, 37), (1, 45), (1, 33), (1, 29), (1, 20), (1, 40), (1, 0)]
SHARED_DECODE_PAGES = {1: (0, 4), 2: (0, 4), 3: (0, 2), 5: (0, 4), 6: (0, 4)}


@pytest.mark.parametrize("dtype,kw", [(jnp.float32, {}), (jnp.float32, dict(sliding_window=25, soft_cap=4.0)),
                                      (jnp.bfloat16, dict(sinks=True)), (jnp.float32, dict(own_blocks=False))],
                         ids=["f32", "f32-window-soft_cap", "bf16-sinks", "f32-lockstep-only"])
def test_blocked_decode_shared_prefix_matches_oracle(dtype, kw):
    """The CPU decode path with a group sharing a cached prefix (gathered once, every member's query in one dot
    per block, 8-key shared blocks so there are two) on a wide table with garbage columns and NaN in unused
    slots: the group (five members, 16 keys) is found and the result is the oracle's; an empty sequence gives 0.
    The rest of each member's keys go in its own 8-key blocks (cheaper than the lockstep loop), or with
    own_blocks=False in the loop."""
    rng = np.random.default_rng([11, 0 if dtype == jnp.float32 else 1, len(kw)])
    own = dict(own_blocks=kw.pop("own_blocks", True))
    (_, kv, lens, pi, _, _), (_, kv_clean, _, pi_clean, _, _) = make_batch(
        rng, SHARED_DECODES, num_kv_heads=2, group=3, head_dim=64, page_size=8, dtype=dtype,
        shares=SHARED_DECODE_PAGES)
    _, shared_len, member = xla_attention.shared_prefix(lens, jnp.ones_like(lens), lens > 0, pi, 8)
    assert int(shared_len) == 16 and np.asarray(member).tolist() == [True] * 4 + [False, True, False]
    first_key = np.maximum(np.where(member, 16, 0), np.asarray(lens) - kw.get("sliding_window", 10 ** 6))
    assert bool(xla_decode_attention.own_blocks_cheaper(jnp.asarray(first_key), lens, 0, 6, 8, 8))
    q = jnp.asarray(rng.standard_normal((len(SHARED_DECODES), 6, 64)), dtype)
    if kw.get("sinks"):
        kw = dict(sinks=make_sinks(rng, 6))
    wide = jnp.concatenate([pi, jnp.full((pi.shape[0], 5), 10 ** 6, jnp.int32)], axis=1)
    out, lse = xla_decode_attention.decode_paged_attention_blocked(q, kv, lens, wide, sm_scale=0.2, return_lse=True,
                                                            block_k=8, shared_block_k=8, **own, **kw)
    ref, ref_lse = ref_ragged(q, kv_clean, lens, pi_clean, jnp.arange(len(lens) + 1, dtype=jnp.int32),
                              jnp.array([len(lens)], jnp.int32), sm_scale=0.2, return_lse=True, **kw)
    assert_close(out, ref, dtype)
    assert_lse_close(lse[:-1], ref_lse[:-1], dtype)
    assert np.all(np.asarray(out[-1], np.float32) == 0)


@pytest.mark.parametrize("seqs,big_k,kw,own", [
    ([(1, 37), (1, 0), (1, 0), (1, 0)], 8, {}, True),
    ([(1, 37), (1, 0), (1, 0), (1, 0)], 8, dict(sliding_window=20), True),
    ([(1, 37), (1, 0), (1, 5), (1, 0)], 8, dict(soft_cap=4.0), True),
    ([(1, 37), (1, 30), (1, 20), (1, 12)], 32, {}, False),
    ([(1, 3), (1, 0), (1, 0), (1, 0)], 32, {}, False),
], ids=["one-live", "one-live-window", "two-live-soft_cap", "all-live-in-the-loop", "one-short-in-the-loop"])
def test_blocked_decode_of_few_live_sequences_in_their_own_blocks(seqs, big_k, kw, own):
    """A decode step (4 slots, NaN in unused pages, garbage page-table columns) whose live sequences would cost
    less each in its own `big_k`-key blocks than every slot in the 8-key lockstep loop (`own_blocks_cheaper`)
    takes them one after the other; otherwise the loop. The path taken is asserted, and either way the result
    is the oracle's; empty slots give 0."""
    rng = np.random.default_rng([13, len(seqs), big_k, len(kw)])
    (_, kv, lens, pi, _, _), (_, kv_clean, _, pi_clean, _, _) = make_batch(
        rng, seqs, num_kv_heads=2, group=3, head_dim=64, page_size=8, dtype=jnp.float32)
    first_key = np.maximum(np.asarray(lens) - kw.get("sliding_window", 10 ** 6), 0) * (np.asarray(lens) > 0)
    live = np.asarray(lens) > 0
    lo, hi = first_key[live].min() // 8, -(-np.asarray(lens).max() // 8)
    assert bool(xla_decode_attention.own_blocks_cheaper(jnp.asarray(first_key), lens, lo, hi, 8, big_k)) == own
    q = jnp.asarray(rng.standard_normal((len(seqs), 6, 64)), jnp.float32)
    wide = jnp.concatenate([pi, jnp.full((pi.shape[0], 4), 10 ** 6, jnp.int32)], axis=1)  # as wide as a big block
    out, lse = xla_decode_attention.decode_paged_attention_blocked(
        q, kv, lens, wide, sm_scale=0.2, return_lse=True, block_k=8, shared_block_k=big_k, **kw)
    ref, ref_lse = ref_decode(q, kv_clean, lens, pi_clean, sm_scale=0.2, return_lse=True, **kw)
    assert_close(out[live], ref[live], jnp.float32)
    assert_lse_close(lse[live], ref_lse[live], jnp.float32)
    assert np.all(np.asarray(out[~live]) == 0)


# ------------------------------------------------------------------------------------------------
# TPU (Mosaic) variant under the TPU interpreter


@pytest.mark.parametrize("with_sinks", [False, True], ids=["no_sinks", "sinks"])
@pytest.mark.parametrize("dtype,group,head_dim,kw", [
    (jnp.float32, 4, 64, dict(return_lse=True)),
    (jnp.bfloat16, 1, 128, dict(sliding_window=9, soft_cap=6.0)),
], ids=["f32-gqa4-d64-lse", "bf16-mha-d128-window-cap"])
def test_tpu_variant_under_tpu_interpreter(dtype, group, head_dim, kw, with_sinks):
    from jax.experimental.pallas import tpu as pltpu

    rng = np.random.default_rng([group, head_dim, 19 if with_sinks else 9])
    ps = 8 if head_dim == 64 else 16
    seqs = [(7, 7), (3, ps + 3), (1, 2 * ps)]
    args, oracle_args = make_batch(rng, seqs, num_kv_heads=2, group=group, head_dim=head_dim, page_size=ps,
                                   dtype=dtype)
    sinks = make_sinks(rng, 2 * group) if with_sinks else None
    with pltpu.force_tpu_interpret_mode():
        res = ragged_paged_attention(*args, sm_scale=0.1, backend="tpu", interpret=False, block_q=4,
                                     pages_per_block=2, sinks=sinks, **kw)
    ref = ref_ragged(*oracle_args, sm_scale=0.1, sinks=sinks, **kw)
    if kw.get("return_lse"):
        assert_close(res[0], ref[0], dtype)
        assert_lse_close(res[1], ref[1], dtype)
    else:
        assert res.dtype == dtype
        assert_close(res, ref, dtype)


@pytest.mark.parametrize("with_sinks", [False, True], ids=["no_sinks", "sinks"])
def test_tpu_variant_decode_under_tpu_interpreter(with_sinks):
    rng = np.random.default_rng(4)
    seqs = [(1, 19), (1, 8)]
    (_, kv, lens, pi, _, _), (_, kv_clean, _, _, _, _) = make_batch(
        rng, seqs, num_kv_heads=2, group=4, head_dim=64, page_size=8, dtype=jnp.float32)
    q = jnp.asarray(rng.standard_normal((2, 8, 64)), jnp.float32)
    sinks = make_sinks(rng, 8) if with_sinks else None
    out = decode_paged_attention(q, kv, lens, pi, sm_scale=0.2, backend="tpu", interpret=True,
                                 pages_per_block=2, sinks=sinks)
    ref = ref_decode(q, kv_clean, lens, pi, sm_scale=0.2, sinks=sinks)
    assert_close(out, ref, jnp.float32)


# ------------------------------------------------------------------------------------------------
# lowering for the real backends (no execution: no GPU / TPU here)


@pytest.mark.parametrize("platform,backend", [("cuda", "gpu"), ("tpu", "tpu")])
def test_kernels_lower_for_gpu_and_tpu(platform, backend):
    """Pallas -> Triton IR (CUDA) and Pallas -> Mosaic MLIR (TPU) succeed at serving-like shapes, so no
    primitive or shape the backends reject is left. Backend compilation itself needs the device."""
    sds = jax.ShapeDtypeStruct
    t, hq, hkv, d, p, ps, s, pps = 64, 16, 2, 128, 128, 16, 8, 16
    ragged_args = (sds((t, hq, d), jnp.bfloat16), sds((p, ps, 2 * hkv, d), jnp.bfloat16), sds((s,), jnp.int32),
                   sds((s, pps), jnp.int32), sds((s + 1,), jnp.int32), sds((1,), jnp.int32))
    sinks = sds((hq,), jnp.float32)
    for use_sinks, kw in ((False, dict()), (True, dict(sliding_window=64, soft_cap=30.0, return_lse=True))):
        def f(*a, fn=ragged_paged_attention, kw=kw, use_sinks=use_sinks):  # a[-1]: sinks
            return fn(*a[:-1], sm_scale=0.1, interpret=False, backend=backend,
                      sinks=a[-1] if use_sinks else None, **kw)
        text = jax.jit(f).trace(*ragged_args, sinks).lower(lowering_platforms=(platform,)).as_text()
        assert ("triton" in text) if platform == "cuda" else ("tpu_custom_call" in text)
        g = functools.partial(f, fn=decode_paged_attention)
        text = jax.jit(g).trace(sds((s, hq, d), jnp.bfloat16), *ragged_args[1:4], sinks).lower(
            lowering_platforms=(platform,)).as_text()
        assert ("triton" in text) if platform == "cuda" else ("tpu_custom_call" in text)


# ------------------------------------------------------------------------------------------------
# dispatch


@pytest.mark.parametrize("with_sinks", [False, True], ids=["no_sinks", "sinks"])
@pytest.mark.parametrize("decode_only", [False, True], ids=["mixed", "decode_only"])
def test_dispatch_pallas_equals_reference(decode_only, with_sinks):
    rng = np.random.default_rng(6)
    seqs = [(1, 20), (1, 8), (1, 1)] if decode_only else [(10, 10), (4, 21), (1, 8)]
    _, args = make_batch(rng, seqs, num_kv_heads=2, group=2, head_dim=64, page_size=8, dtype=jnp.float32,
                         pad_tokens=0 if decode_only else 2)
    args = (jnp.where(jnp.isnan(args[0]), 0.0, args[0]),) + args[1:]
    kw = dict(sm_scale=0.125, decode_only=decode_only, soft_cap=None, sliding_window=None,
              sinks=make_sinks(rng, 4) if with_sinks else None)
    out = dispatch.paged_attention(*args, impl="pallas", **kw)
    ref = dispatch.paged_attention(*args, impl="reference", **kw)
    assert_close(out, ref, jnp.float32)


# ------------------------------------------------------------------------------------------------
# KV write path: the donated cache is updated in place


def test_write_kv_under_donation_reuses_the_cache_buffer():
    cache = jnp.zeros((2, 16, 8, 4, 64), jnp.float32)
    k = jnp.ones((3, 2, 64), jnp.float32)
    v = 2 * jnp.ones((3, 2, 64), jnp.float32)
    pages, offs = jnp.array([1, 1, 5], jnp.int32), jnp.array([0, 1, 7], jnp.int32)
    write = jax.jit(reference.write_kv, static_argnums=1, donate_argnums=0)
    hlo = write.lower(cache, 1, k, v, pages, offs).compile().as_text()
    assert "input_output_alias={ {}: (0, {}" in hlo  # output 0 aliases parameter 0
    shape = "f32[2,16,8,4,64]"
    assert not [line for line in hlo.splitlines() if f"= {shape}" in line and " copy(" in line]
    ptr = cache.unsafe_buffer_pointer()
    new = write(cache, 1, k, v, pages, offs)
    assert cache.is_deleted()
    assert new.unsafe_buffer_pointer() == ptr  # same device buffer: no copy of the pool
    np.testing.assert_array_equal(new[1, 5, 7, 0::2], k[2])
    np.testing.assert_array_equal(new[1, 5, 7, 1::2], v[2])
    assert float(jnp.abs(new[0]).sum()) == 0


# ------------------------------------------------------------------------------------------------
# benchmark smoke run


def test_bench_tiny_configuration_runs(tmp_path):
    from jaxserve.kernels import bench

    cfg = bench.BenchConfig(**{**bench.QUICK, "batches": (2,), "contexts": (32,), "iters": 1})
    report = bench.run_bench(cfg, str(tmp_path / "bench.json"), log=lambda *_: None)
    impls = {(r["mode"], r["impl"]) for r in report["results"] if "error" not in r}
    assert {("decode", "decode"), ("decode", "ragged"), ("decode", "xla"), ("prefill", "ragged"),
            ("prefill", "xla")} <= impls
    for r in report["results"]:
        assert "error" not in r and r["max_abs_err"] < 5e-2
    assert (tmp_path / "bench.json").exists()
