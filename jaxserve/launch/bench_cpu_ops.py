"""The single-op measurements behind this session's CPU decisions, side by side in one run: matmul rates per
dtype, the KV write into an f32, a bf16 and a bf16-bits (uint16) cache, grouped expert matmuls (ragged_dot vs
blocked vs every expert), the CPU attention path's key-block size, the decode attention before/after session 5
and its key-block size, a greedy step's argmax vs two reductions (session 9), a lone prompt chunk's attention
with and without the lone-chunk path (session 10), steps of several sequences under the per-tile loop and the
general path that replaced it (session 11), a bf16 model's decode over a bf16-bits pool against the f32 one
(session 13), and 1, 2 or 4 live decodes of 8 slots each in big blocks of its own or in the lockstep loop
(sessions 13-14).

    python -m jaxserve.launch.bench_cpu_ops --out=out/bench_cpu_ops.json

Each figure is the least of `repeats` runs after a compile. Prints a table and writes JSON."""

from __future__ import annotations

import json
import os

from absl import app, flags

from jaxserve.bench.timing import least_seconds

flags.DEFINE_integer("repeats", 5, "timed repeats (least kept)")
flags.DEFINE_string("out", "out/bench_cpu_ops.json", "JSON output")
FLAGS = flags.FLAGS


def _ms(fn, *args) -> float:
    return least_seconds(fn, *args, repeats=FLAGS.repeats) * 1e3


def _rows():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxserve.kernels import reference, xla_attention, xla_decode_attention
    from jaxserve.model import make_attention_batch
    from jaxserve.model.moe import grouped_matmul

    rows = []
    a, b = jnp.ones((544, 256)), jnp.ones((256, 1024))
    bf = jnp.bfloat16
    rows.append(("dot 544x256x1024", "f32", _ms(jax.jit(lambda x, y: x @ y), a, b)))
    rows.append(("dot 544x256x1024", "bf16", _ms(jax.jit(lambda x, y: x @ y), a.astype(bf), b.astype(bf))))
    rows.append(("dot 544x256x1024", "bf16, f32 accumulation", _ms(jax.jit(
        lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32)), a.astype(bf), b.astype(bf))))

    # The gated MLP of a 768-token prefill bucket: f32; bf16 weights with bf16 inputs and f32 accumulation
    # (model.layers.Linear's path); the same with the weights first promoted to f32 (what nn.Dense did).
    x = jnp.ones((768, 256))
    w = [jnp.full(shape, 0.01, bf) for shape in ((256, 1024), (256, 1024), (1024, 256))]

    def mlp(cast, promote):
        def dot(u, v):
            v = v.astype(jnp.float32) if promote else v
            return jnp.dot(cast(u), cast(v), preferred_element_type=jnp.float32)
        return jax.jit(lambda x, a, b, c: dot(jax.nn.silu(dot(x, a)) * dot(x, b), c))

    f32_weights = [v.astype(jnp.float32) for v in w]
    rows.append(("MLP 768x256x1024", "f32", _ms(mlp(lambda u: u, False), x, *f32_weights)))
    rows.append(("MLP 768x256x1024", "bf16 weights, bf16 in, f32 acc", _ms(mlp(lambda u: u.astype(bf), False), x, *w)))
    rows.append(("MLP 768x256x1024", "same, weights via f32", _ms(mlp(lambda u: u.astype(bf), True), x, *w)))

    for dtype in (jnp.float32, bf, jnp.uint16):  # uint16: a bf16 model's KV on CPU, as bf16 bits (session 13)
        k = jnp.ones((8, 1, 128), jnp.float32 if dtype == jnp.uint16 else dtype)
        slots, offsets = jnp.arange(1, 9, dtype=jnp.int32), jnp.zeros(8, jnp.int32)
        write = jax.jit(lambda c, k: reference.write_kv(c, 1, k, k, slots, offsets), donate_argnums=0)
        state = {"cache": jnp.zeros((4, 1024, 16, 2, 128), dtype)}

        def step(k):
            state["cache"] = write(state["cache"], k)
            return state["cache"]
        rows.append(("KV write, 8 tokens into a 4x1024-page cache", jnp.dtype(dtype).name, _ms(step, k)))

    groups = 8
    x = jax.random.normal(jax.random.key(0), (512, 256))
    w = jax.random.normal(jax.random.key(1), (groups, 256, 512))
    sizes = jnp.asarray(np.random.RandomState(0).multinomial(512, [1 / groups] * groups), jnp.int32)
    rows.append(("grouped matmul 512 rows, 8 groups, 256x512", "lax.ragged_dot",
                 _ms(jax.jit(lambda x, w, s: jax.lax.ragged_dot(x, w, s)), x, w, sizes)))
    rows.append(("grouped matmul 512 rows, 8 groups, 256x512", "blocked (moe.grouped_matmul on CPU)",
                 _ms(jax.jit(lambda x, w, s: grouped_matmul(x, w, s, "cpu")), x, w, sizes)))
    rows.append(("grouped matmul 512 rows, 8 groups, 256x512", "every expert over every row",
                 _ms(jax.jit(lambda x, w: jnp.einsum("rk,gkn->grn", x, w)), x, w)))
    rows.append(("grouped matmul 512 rows, 8 groups, 256x512", "one plain dot (floor)",
                 _ms(jax.jit(lambda x, w: x @ w[0]), x, w)))

    for length, bucket, pages_bucket in ((544, 768, 64), (4096, 4096, 256)):
        pages = list(range(1, 1 + -(-length // 16)))
        kv = jnp.asarray(np.random.RandomState(0).randn(pages_bucket + 2, 16, 2, 128).astype(np.float32))
        batch, _ = make_attention_batch([length], [length], [pages], page_size=16, num_tokens=bucket, max_seqs=8,
                                        pages_per_seq=pages_bucket)
        q = jnp.asarray(np.random.RandomState(1).randn(bucket, 2, 128).astype(np.float32))
        batch = [jnp.asarray(v) for v in batch][2:]
        for block_k in (256, 512):
            fn = jax.jit(lambda q, kv, *bb, bk=block_k: xla_attention.ragged_paged_attention_xla(
                q, kv, *bb, sm_scale=0.1, block_k=bk, lone_chunk=False, sequence_blocks=False))
            rows.append((f"CPU attention, {length}-token prefill, one layer", f"per-tile loop, block_k {block_k}",
                         _ms(fn, q, kv, *batch)))
        fn = jax.jit(lambda q, kv, *bb: xla_attention.ragged_paged_attention_xla(q, kv, *bb, sm_scale=0.1,
                                                                                 lone_chunk=False))
        rows.append((f"CPU attention, {length}-token prefill, one layer", "general path (sequence blocks)",
                     _ms(fn, q, kv, *batch)))

    # Steps of several sequences (8 query / 4 KV heads of 64, the offline benchmark's model; 32 slots, a 64-page
    # table): the per-tile loop vs the general path that replaced it (session 11).
    kv = jnp.asarray(np.random.RandomState(7).randn(1024, 16, 8, 64).astype(np.float32))
    for what, q_lens, kv_lens, bucket in (
            ("13 decodes + 3 x 64-token suffixes + a 307-token chunk, ~830 keys each", [1] * 13 + [64] * 3 + [307],
             [840] * 13 + [832] * 3 + [832], 512),
            ("two chunks of 320 and 192 tokens, one over 512 earlier keys", [320, 192], [832, 192], 512),
            ("3 x 64-token suffixes over 768 keys", [64] * 3, [832] * 3, 192),
            ("a burst of 7 x 32-token suffixes over 512 keys", [32] * 7, [544] * 7, 256),
            ("a burst of 7 x 32-token suffixes over one shared 512-key prefix", [32] * 7, [544] * 7, 256),
            ("13 decodes over 840 keys", [1] * 13, [840] * 13, 16)):
        starts = np.cumsum([0] + [-(-n // 16) for n in kv_lens])
        tables = [list(range(1 + a, 1 + b)) for a, b in zip(starts, starts[1:])]
        if "shared" in what:  # the general path's shared-prefix phase (session 12)
            tables = [tables[0][:32] + t[32:] for t in tables]
        batch, _ = make_attention_batch(q_lens, kv_lens, tables, page_size=16, num_tokens=bucket, max_seqs=32,
                                        pages_per_seq=64)
        q = jnp.asarray(np.random.RandomState(8).randn(bucket, 8, 64).astype(np.float32))
        batch = [jnp.asarray(v) for v in batch][2:]
        for general in (False, True):
            fn = jax.jit(lambda q, kv, *bb, g=general: xla_attention.ragged_paged_attention_xla(
                q, kv, *bb, sm_scale=0.1, sequence_blocks=g))
            rows.append((f"CPU attention, {what}, one layer", "general path (sequence blocks)" if general
                         else "per-tile loop", _ms(fn, q, kv, *batch)))
        rows.append((f"CPU attention, {what}, one layer", "general path, bf16 queries",
                     _ms(fn, q.astype(jnp.bfloat16), kv, *batch)))

    # A step of one prompt's chunk (the engine's 128-page table, 8 slots): the general path vs the lone-chunk
    # path the kernel takes for it (session 10): cached suffixes, from scratch, and over 512 earlier keys.
    kv = jnp.asarray(np.random.RandomState(5).randn(130, 16, 2, 128).astype(np.float32))
    for chunk, before in ((32, 512), (64, 768), (256, 0), (512, 0), (1024, 0), (512, 512)):
        batch, _ = make_attention_batch([chunk], [chunk + before], [list(range(1, 129))], page_size=16,
                                        num_tokens=chunk, max_seqs=8, pages_per_seq=128)
        q = jnp.asarray(np.random.RandomState(6).randn(chunk, 2, 128).astype(np.float32))
        batch = [jnp.asarray(v) for v in batch][2:]
        for lone in (False, True):
            fn = jax.jit(lambda q, kv, *bb, lc=lone: xla_attention.ragged_paged_attention_xla(
                q, kv, *bb, sm_scale=0.1, lone_chunk=lc))
            rows.append((f"CPU attention, one {chunk}-token chunk over {before} earlier keys, one layer",
                         "lone chunk" if lone else "general path", _ms(fn, q, kv, *batch)))
        # A bf16 checkpoint's attention reads bf16 queries over the f32 cache (session 11).
        rows.append((f"CPU attention, one {chunk}-token chunk over {before} earlier keys, one layer",
                     "lone chunk, bf16 queries", _ms(fn, q.astype(jnp.bfloat16), kv, *batch)))

    # Decode attention, one layer (1 KV head of 128, 2 query heads, 2048-page pool): the batched gather of
    # every page in the power-of-two bucket (the CPU path before session 5) vs the blocked loop up to the
    # longest live sequence over one table width for every step (engine's path now: one compile per batch).
    rs = np.random.RandomState(2)
    kv = jnp.asarray(rs.randn(2048, 16, 2, 128).astype(np.float32))
    kv_bits = jax.lax.bitcast_convert_type(kv.astype(bf), jnp.uint16)
    for seqs, context in ((8, 300), (32, 96), (32, 600), (32, 1800), (128, 300)):
        q = jnp.asarray(rs.randn(seqs, 2, 128).astype(np.float32))
        lens = jnp.full((seqs,), context, jnp.int32)
        bucket = 1 << (-(-context // 16) - 1).bit_length()
        narrow = jnp.asarray(rs.randint(1, 2048, (seqs, bucket)).astype(np.int32))
        wide = jnp.asarray(rs.randint(1, 2048, (seqs, 128)).astype(np.int32))
        what = f"CPU decode attention, {seqs} seqs x {context} tokens, one layer"
        rows.append((what, f"gather of the {bucket}-page bucket", _ms(
            lambda q, p: reference.decode_paged_attention_xla(q, kv, lens, p, sm_scale=0.1), q, narrow)))
        rows.append((what, "blocked, 128-page table, 64-key blocks (sessions 5-8)", _ms(
            lambda q, p: xla_decode_attention.decode_paged_attention_blocked(q, kv, lens, p, sm_scale=0.1, block_k=64),
            q, wide)))
        rows.append((what, f"blocked, 128-page table, {xla_decode_attention.DECODE_BLOCK_K}-key blocks (default)", _ms(
            lambda q, p: xla_decode_attention.decode_paged_attention_blocked(q, kv, lens, p, sm_scale=0.1), q, wide)))
        # A bf16 checkpoint's decode: bf16 queries over the f32 pool (before session 13) or over its bf16 bits.
        for name, pool in (("bf16 queries, f32 pool", kv), ("bf16 queries, bf16-bits pool (default)", kv_bits)):
            rows.append((what, name, _ms(lambda q, p, pool=pool: xla_decode_attention.decode_paged_attention_blocked(
                q, pool, lens, p, sm_scale=0.1), q.astype(bf), wide)))

    # A few users' decodes: 1, 2 or 4 live sequences of an 8-slot step, their keys in the lockstep 32-key loop
    # (which runs the padding slots too) or each in its own 512-key blocks (session 14; one live: session 13).
    for live, context in ((1, 100), (1, 600), (1, 1800), (2, 600), (2, 1800), (4, 600), (4, 1800)):
        q = jnp.asarray(rs.randn(8, 2, 128)).astype(bf)
        lens = jnp.zeros((8,), jnp.int32).at[:live].set(context - jnp.arange(live) * 40)
        table = jnp.asarray(rs.randint(1, 2048, (8, 128)).astype(np.int32))
        what = f"CPU decode attention, {live} live seqs of 8 slots x ~{context} tokens, bf16-bits pool, one layer"
        for name, own in (("lockstep loop only", False), ("each in its own big blocks when cheaper (default)", True)):
            rows.append((what, name, _ms(lambda q, p, own=own: xla_decode_attention.decode_paged_attention_blocked(
                q, kv_bits, lens, p, sm_scale=0.1, own_blocks=own), q, table)))

    # Decodes of requests over one cached 512-token prompt: the shared prefix gathered once, every query in one dot
    # per block (session 12), against the same lengths on pages of their own.
    for seqs in (8, 32):
        q = jnp.asarray(rs.randn(seqs, 2, 128).astype(np.float32))
        lens = jnp.full((seqs,), 544, jnp.int32)
        own = np.arange(1, 1 + seqs * 128, dtype=np.int32).reshape(seqs, 128) % 2047 + 1
        shared = own.copy()
        shared[:, :32] = own[0, :32]
        what = f"CPU decode attention, {seqs} seqs x 544 tokens, one layer"
        for name, table in (("pages of their own", own), ("a 512-token prefix shared (gathered once)", shared)):
            rows.append((what, name, _ms(lambda q, p: xla_decode_attention.decode_paged_attention_blocked(
                q, kv, lens, p, sm_scale=0.1), q, jnp.asarray(table))))

    # A greedy step's token choice over an 8k vocabulary: argmax (a (value, index) reduce) vs the engine's two
    # plain reductions (session 9).
    from jaxserve.engine.sampling import greedy_tokens
    for seqs in (8, 32, 128):
        logits = jnp.asarray(rs.randn(seqs, 8192).astype(np.float32))
        what = f"greedy token of {seqs} rows x 8192 logits"
        rows.append((what, "jnp.argmax", _ms(jax.jit(lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32)), logits)))
        rows.append((what, "max, then min index of the max (greedy_tokens)", _ms(jax.jit(greedy_tokens), logits)))
    return rows


def main(_):
    import jax
    rows = _rows()
    print(f"\nSingle ops on {jax.default_backend()} ({os.cpu_count()} cores), least of {FLAGS.repeats}\n")
    print("| op | variant | ms |")
    print("|---|---|---|")
    for op, variant, ms in rows:
        print(f"| {op} | {variant} | {ms:.3f} |")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump([dict(op=op, variant=v, ms=ms) for op, v, ms in rows], f, indent=1)
    print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
