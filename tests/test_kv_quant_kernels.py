"""Quantized KV pages (jaxserve/kernels/kv_quant.py) in every attention path: the round trip's error bound per
format, then each path reading quantized pages directly against the oracle fed the dequantized pages.

Unused page slots and page tails hold 0xFF bytes: NaN in both fp8 formats, and a NaN scale for every format
(int8 included), so a path that reads or fails to mask them shows NaN, as in tests/test_kernels.py.

Tolerances: against the oracle on dequantized inputs the only difference is where the dequantization happens
(the same f32 products), so the f32 tolerances of test_kernels.py hold. Against the unquantized pages the
error is the format's: fp8_e4m3 keeps 3 mantissa bits (relative error <= 2^-4 per value), fp8_e5m2 keeps 2
(<= 2^-3), int8 rounds to scale / 2 = amax / 254; the attention output, a convex mix of V rows, inherits
that, so the bound there is per format (OUT_TOL).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels import assert_close, make_batch, random_mix

from jaxserve.kernels import kv_quant, reference, xla_attention, xla_decode_attention
from jaxserve.kernels.decode_attention import decode_paged_attention
from jaxserve.kernels.ragged_paged_attention import ragged_paged_attention

QUANT = ("fp8_e4m3", "fp8_e5m2", "int8")
# Output of attention on quantized pages vs the same attention on the original f32 pages (unit-normal q, K, V,
# sm_scale 0.2): (mean, max) absolute error allowed, about twice what three seeds measured (e4m3 0.010-0.012 /
# 0.09-0.12, e5m2 0.019-0.022 / 0.17, int8 0.0024-0.0026 / 0.014-0.016). The max is set by sharp rows with few
# keys, where a K error moves the softmax.
OUT_TOL = {"fp8_e4m3": (0.02, 0.2), "fp8_e5m2": (0.04, 0.3), "int8": (0.005, 0.03)}


def assert_within_format(out, unquantized, fmt):
    err = np.abs(np.asarray(out, np.float32) - np.asarray(unquantized, np.float32))
    mean_tol, max_tol = OUT_TOL[fmt]
    assert err.mean() <= mean_tol and err.max() <= max_tol, (fmt, err.mean(), err.max())

_STATIC = ("sm_scale", "sliding_window", "soft_cap", "return_lse", "kv_cache_dtype")
ref_ragged = jax.jit(reference.ref_ragged_paged_attention, static_argnames=_STATIC)


def quantize_pool(kv_f32, kv_cache_dtype):
    """f32 pages with NaN in unused slots -> uint8 quantized pages with 0xFF bytes there, and the f32 pages the
    oracle reads (the dequantized values, 0 in unused slots)."""
    kv_f32 = np.asarray(kv_f32)
    unused = np.isnan(kv_f32).any(axis=-1)
    q = np.array(kv_quant.quantize(jnp.asarray(np.where(np.isnan(kv_f32), 0, kv_f32)), kv_cache_dtype))
    q[unused] = 0xFF
    dq = np.asarray(kv_quant.dequantize(jnp.asarray(q), kv_cache_dtype))
    return jnp.asarray(q), jnp.asarray(np.where(unused[..., None], 0, dq))


@pytest.mark.parametrize("fmt", QUANT)
def test_round_trip_error_bound(fmt):
    rng = np.random.default_rng(0)
    # Rows spanning 6 orders of magnitude, with outliers, and an all-zero row.
    x = rng.standard_normal((64, 4, 32)).astype(np.float32) * np.logspace(-3, 3, 64, dtype=np.float32)[:, None, None]
    x[3, 1, 5] *= 50
    x[7, 2] = 0
    packed = kv_quant.quantize(jnp.asarray(x), fmt)
    assert packed.dtype == jnp.uint8 and packed.shape == (64, 4, 32 + kv_quant.SCALE_BYTES)
    back = np.asarray(kv_quant.dequantize(packed, fmt))
    amax = np.abs(x).max(-1, keepdims=True)
    scale = np.where(amax > 0, amax / {"fp8_e4m3": 448, "fp8_e5m2": 57344, "int8": 127}[fmt], 1)
    np.testing.assert_allclose(np.asarray(kv_quant.row_scale(packed)), scale, rtol=1e-6)
    bound = {"fp8_e4m3": np.abs(x) * 2.0 ** -4 + scale * 2.0 ** -9,
             "fp8_e5m2": np.abs(x) * 2.0 ** -3 + scale * 2.0 ** -16,
             "int8": scale / 2 * (1 + 1e-6)}[fmt]
    assert np.all(np.abs(back - x) <= bound + 1e-30)
    assert np.all(back[7, 2] == 0)
    # The row's largest value survives exactly (it maps to the format's largest value).
    i = np.argmax(np.abs(x[3, 1]))
    np.testing.assert_allclose(back[3, 1, i], x[3, 1, i], rtol=1e-6)


def test_bad_kv_cache_dtype_is_refused():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        kv_quant.check_kv_cache_dtype("fp4")
    q = jnp.zeros((4, 2, 16)); kv = jnp.zeros((3, 8, 2, 16), jnp.float32)
    lens, pi, cu, n = jnp.ones(1, jnp.int32), jnp.zeros((1, 1), jnp.int32), jnp.array([0, 1]), jnp.array([1])
    with pytest.raises(ValueError, match="needs uint8 kv_pages"):
        xla_attention.ragged_paged_attention_xla(q, kv, lens, pi, cu, n, kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="head_dim mismatch"):
        xla_attention.ragged_paged_attention_xla(q, kv.astype(jnp.uint8), lens, pi, cu, n, kv_cache_dtype="int8")


def _batch(seed, fmt, seqs, **kw):
    rng = np.random.default_rng(seed)
    args, oracle_args = make_batch(rng, seqs, dtype=jnp.float32, **kw)
    qkv, dq = quantize_pool(args[1], fmt)
    return args, oracle_args, (args[0], qkv) + args[2:], (oracle_args[0], dq) + oracle_args[2:]


@pytest.mark.parametrize("fmt", QUANT)
def test_quantized_paths_match_oracle_on_dequantized_pages(fmt):
    """Oracle, CPU XLA path and the ragged Pallas kernel (interpret mode) reading quantized pages, against
    the oracle on the dequantized f32 pages; and all of them against the unquantized pages within the
    format's tolerance."""
    seqs = random_mix(np.random.default_rng(5), 8, max_tokens=24)
    args, oracle_args, qargs, dq_args = _batch(1, fmt, seqs, num_kv_heads=2, group=2, head_dim=32, page_size=8,
                                               extra_seqs=1)
    ref = ref_ragged(*dq_args, sm_scale=0.2)
    quant_ref = ref_ragged(*(qargs[:3] + oracle_args[3:]), sm_scale=0.2, kv_cache_dtype=fmt)
    assert_close(quant_ref, ref, jnp.float32)
    xla = xla_attention.ragged_paged_attention_xla(*qargs, sm_scale=0.2, block_q=4, block_k=8, kv_cache_dtype=fmt)
    assert_close(xla, ref, jnp.float32)
    pallas = ragged_paged_attention(*qargs, sm_scale=0.2, block_q=4, pages_per_block=2, kv_cache_dtype=fmt)
    assert_close(pallas, ref, jnp.float32)
    unquantized = ref_ragged(*oracle_args, sm_scale=0.2)
    assert_within_format(pallas, unquantized, fmt)


@pytest.mark.parametrize("fmt", QUANT)
def test_quantized_burst_matches_oracle_on_dequantized_pages(fmt):
    """The CPU path's general path on a burst of suffixes (several windows and key blocks per sequence), most of
    them over one shared cached prefix (the shared-prefix phase), reading quantized pages, against the oracle on
    the dequantized pages; and equal to the per-tile loop."""
    from test_kernels import SHARED_PAGES, SHARED_SEQS
    _, _, qargs, dq_args = _batch(2, fmt, SHARED_SEQS, num_kv_heads=2, group=2, head_dim=32, page_size=8,
                                  extra_seqs=1, shares=SHARED_PAGES)
    run = functools.partial(xla_attention.ragged_paged_attention_xla, *qargs, sm_scale=0.2, block_q=4, block_k=16,
                            shared_block_q=16, shared_block_k=16, kv_cache_dtype=fmt)
    xla = run()
    assert_close(xla, ref_ragged(*dq_args, sm_scale=0.2), jnp.float32)
    np.testing.assert_allclose(np.asarray(xla), np.asarray(run(sequence_blocks=False)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", QUANT)
def test_quantized_lone_chunk_matches_oracle_on_dequantized_pages(fmt):
    """The CPU path's lone chunk (one live sequence, 40 keys before a 30-row chunk) reading quantized pages,
    against the oracle on the dequantized pages."""
    _, _, qargs, dq_args = _batch(3, fmt, [(30, 70)], num_kv_heads=2, group=2, head_dim=32, page_size=8,
                                  extra_seqs=1)
    xla = xla_attention.ragged_paged_attention_xla(*qargs, sm_scale=0.2, block_k=16, kv_cache_dtype=fmt,
                                                   lone_chunk=True)
    assert_close(xla, ref_ragged(*dq_args, sm_scale=0.2), jnp.float32)


@pytest.mark.parametrize("fmt", QUANT)
def test_quantized_decode_paths_match_oracle(fmt):
    """Decode: the engine's XLA decode path and the flash-decoding Pallas kernel (several KV splits). Two of the
    three sequences share their first 4 pages (the XLA path's shared-prefix phase reads them quantized)."""
    seqs = [(1, 19), (1, 8), (1, 30)]
    args, oracle_args, qargs, dq_args = _batch(2, fmt, seqs, num_kv_heads=2, group=4, head_dim=32, page_size=4,
                                               pad_tokens=0, shares={2: (0, 4)})
    q, _, lens, pi = qargs[:4]
    clean_pi = oracle_args[3]
    ref = reference.ref_decode_paged_attention(q, dq_args[1], lens, clean_pi, sm_scale=0.2)
    xla = reference.decode_paged_attention_xla(q, qargs[1], lens, clean_pi, sm_scale=0.2, kv_cache_dtype=fmt)
    assert_close(xla, ref, jnp.float32)
    blocked = xla_decode_attention.decode_paged_attention_blocked(q, qargs[1], lens, pi, sm_scale=0.2, block_k=8,
                                                           kv_cache_dtype=fmt)  # the engine's CPU decode path
    assert_close(blocked, ref, jnp.float32)
    pallas = decode_paged_attention(q, qargs[1], lens, pi, sm_scale=0.2, num_kv_splits=2, pages_per_block=2,
                                    kv_cache_dtype=fmt)
    assert_close(pallas, ref, jnp.float32)
    unquantized = reference.ref_decode_paged_attention(q, oracle_args[1], lens, clean_pi, sm_scale=0.2)
    assert_within_format(pallas, unquantized, fmt)


def test_write_kv_quantizes_in_place_rows():
    """write_kv stores quantized rows (values + scale) at the slots named, K and V interleaved per head."""
    cache = jnp.zeros((2, 4, 4, 4, 16 + 4), jnp.uint8)
    rng = np.random.default_rng(3)
    k = jnp.asarray(rng.standard_normal((3, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((3, 2, 16)), jnp.float32) * 10
    cache = reference.write_kv(cache, 1, k, v, jnp.array([2, 2, 3]), jnp.array([0, 1, 3]), "int8")
    back = np.asarray(kv_quant.dequantize(cache, "int8"))
    np.testing.assert_allclose(back[1, 2, 1, 0::2], k[1], atol=float(jnp.abs(k[1]).max()) / 254 + 1e-6)
    np.testing.assert_allclose(back[1, 3, 3, 1::2], v[2], atol=float(jnp.abs(v[2]).max()) / 254 + 1e-6)
    assert not np.asarray(cache[0]).any() and not np.asarray(cache[1, 0]).any()


def test_row_widths():
    assert kv_quant.row_width(64, "auto") == 64 and kv_quant.row_width(64, "int8") == 68
    assert kv_quant.head_dim_of(68, "fp8_e5m2") == 64 and kv_quant.head_dim_of(64, "auto") == 64
    assert kv_quant.encode_kv(jnp.ones((2, 8)), "auto", jnp.float32).dtype == jnp.float32


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_quantized_kernels_lower_for_gpu(fmt):
    """Pallas -> Triton IR (CUDA) with quantized pages at serving-like shapes (no execution: no GPU here): the
    rows (head_dim + 4 bytes) are read as a power-of-two value block plus four one-byte scale loads."""
    sds = jax.ShapeDtypeStruct
    t, hq, hkv, d, p, ps, s, pps = 64, 16, 2, 128, 128, 16, 8, 16
    args = (sds((t, hq, d), jnp.bfloat16), sds((p, ps, 2 * hkv, d + 4), jnp.uint8), sds((s,), jnp.int32),
            sds((s, pps), jnp.int32), sds((s + 1,), jnp.int32), sds((1,), jnp.int32))
    for fn, a in ((ragged_paged_attention, args), (decode_paged_attention, (sds((s, hq, d), jnp.bfloat16),) + args[1:4])):
        def f(*a, fn=fn):
            return fn(*a, sm_scale=0.1, interpret=False, backend="gpu", kv_cache_dtype=fmt)
        assert "triton" in jax.jit(f).trace(*a).lower(lowering_platforms=("cuda",)).as_text()
    with pytest.raises(ValueError, match="not supported by the TPU"):
        ragged_paged_attention(*(jnp.zeros(x.shape, x.dtype) for x in args), backend="tpu", kv_cache_dtype=fmt)


@pytest.mark.parametrize("decode_only", [False, True], ids=["ragged", "decode"])
def test_tpu_dispatch_reads_quantized_pages_through_the_xla_path(monkeypatch, decode_only):
    """The Mosaic (TPU) variant refuses 8-bit pages, so on TPU the Pallas dispatch sends a quantized cache to
    the XLA path: same answer as the XLA path itself (the platform is faked; nothing runs on a TPU)."""
    from jaxserve.kernels import dispatch, pallas_dispatch
    seqs = [(1, 19), (1, 8), (1, 30)] if decode_only else [(5, 19), (1, 8), (3, 30)]
    _, _, qargs, _ = _batch(4, "int8", seqs, num_kv_heads=2, group=4, head_dim=32, page_size=4, pad_tokens=0)
    monkeypatch.setattr(pallas_dispatch, "platform_backend", lambda platform=None: ("tpu", False))
    kw = dict(sm_scale=0.2, decode_only=decode_only, kv_cache_dtype="int8")
    out = pallas_dispatch.paged_attention(*qargs, **kw)
    want = dispatch.paged_attention(*qargs, impl="reference", **kw)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
