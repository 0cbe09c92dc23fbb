"""Trains the embedded `demo` model: a small byte-level Llama on the Python standard library's own source,
which every machine with Python has. Saves it with Orbax to jaxserve/assets/demo_model.

    python scripts/train_demo_model.py --minutes=15

Deterministic given the Python version's stdlib: files are listed in sorted order, every 10th file is
held out, batches come from a seeded generator.
"""

from __future__ import annotations

import json
import os
import sysconfig
import time

from absl import app, flags

flags.DEFINE_float("minutes", 15.0, "wall-clock training budget")
flags.DEFINE_integer("max_steps", 1400, "steps; the cosine schedule decays over them")
flags.DEFINE_integer("batch", 16, "sequences per step")
flags.DEFINE_integer("seq_len", 256, "bytes per window; positions beyond it are never trained")
flags.DEFINE_float("lr", 3e-3, "peak learning rate")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "..", "jaxserve", "assets", "demo_model"),
                    "output folder")
flags.DEFINE_integer("seed", 0, "seed")
FLAGS = flags.FLAGS


def demo_config():
    from jaxserve.config import ModelConfig
    from jaxserve.model.tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    # ~1.6M parameters: with ~20 CPU-minutes of compute (~1e14 FLOPs) a smaller model than this learns less
    # per FLOP only once it has seen far more tokens than we can afford (compute-optimal scaling).
    return ModelConfig(vocab_size=tok.vocab_size, hidden_size=192, intermediate_size=512, num_layers=4,
                       num_heads=3, num_kv_heads=1, head_dim=64, max_position_embeddings=1024,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, dtype="float32",
                       bos_token_id=tok.bos_token_id, eos_token_id=tuple(tok.eos_token_ids))


def corpus():
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "idlelib", "site-packages",
                                                              "__pycache__", "lib2to3", "turtledemo"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    train, held = [], []
    for i, f in enumerate(files):
        with open(f, "rb") as fh:
            data = fh.read()
        (held if i % 10 == 0 else train).append(data)
    return b"\n".join(train), b"\n".join(held)


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jaxserve.model.checkpoint import save_model
    from jaxserve.model.decoder import forward_dense, init_params

    cfg = demo_config()
    train, held = corpus()
    train = np.frombuffer(train, np.uint8).astype(np.int32)
    held = np.frombuffer(held, np.uint8).astype(np.int32)
    print(f"train bytes {train.size:,}  held-out bytes {held.size:,}")
    params = init_params(cfg, jax.random.PRNGKey(FLAGS.seed))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"params {n_params:,}")
    sched = optax.warmup_cosine_decay_schedule(0.0, FLAGS.lr, 100, FLAGS.max_steps, FLAGS.lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    opt_state = opt.init(params)

    def loss_fn(p, x):
        logits = forward_dense(p, cfg, x[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

    @jax.jit
    def train_step(p, s, x):
        loss, g = jax.value_and_grad(loss_fn)(p, x)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    eval_loss = jax.jit(loss_fn)
    rng = np.random.default_rng(FLAGS.seed)
    L = FLAGS.seq_len + 1

    def batch(data, r):
        # Windows start with BOS, as the byte tokenizer's prompts do.
        starts = r.integers(0, data.size - L, FLAGS.batch)
        return jnp.asarray(np.stack([np.concatenate([[cfg.bos_token_id], data[s:s + L - 1]]) for s in starts]))

    held_rng = np.random.default_rng(1234)
    held_batches = [batch(held, held_rng) for _ in range(8)]
    t0 = time.time()
    step, losses = 0, []
    while step < FLAGS.max_steps and time.time() - t0 < FLAGS.minutes * 60:
        params, opt_state, loss = train_step(params, opt_state, batch(train, rng))
        losses.append(float(loss))
        step += 1
        if step % 50 == 0:
            print(f"step {step:5d}  loss {np.mean(losses[-50:]):.3f}  {time.time() - t0:6.0f}s", flush=True)
    train_loss = float(np.mean(losses[-50:]))
    held_loss = float(np.mean([eval_loss(params, b) for b in held_batches]))
    print(f"final: steps {step}, train loss {train_loss:.3f}, held-out loss {held_loss:.3f} (nats/byte)")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)  # halves the committed size
    from jaxserve.model.tokenizer import ByteTokenizer
    save_model(FLAGS.out, cfg, params, tokenizer=ByteTokenizer())
    with open(os.path.join(FLAGS.out, "training.json"), "w") as f:
        json.dump(dict(steps=step, train_loss=train_loss, held_out_loss=held_loss, params=n_params,
                       batch=FLAGS.batch, seq_len=FLAGS.seq_len, minutes=(time.time() - t0) / 60), f, indent=1)


if __name__ == "__main__":
    app.run(main)
