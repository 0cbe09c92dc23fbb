"""Model layer against transformers: dense and paged logits, greedy generation, bf16, Orbax, TP, loader errors.

Tolerances (float32 on CPU): logits within atol 1e-4 / rtol 1e-4 of transformers. bfloat16: see `test_bfloat16`.
"""

from __future__ import annotations

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import ModelConfig
from jaxserve.model import (AttentionBatch, ByteTokenizer, HFTokenizer, Decoder, abstract_params, forward_dense,
                            init_params, kv_cache_partition_spec, kv_cache_shape, load, load_hf_checkpoint, load_model,
                            load_tokenizer, make_attention_batch, make_paged_forward, param_partition_specs,
                            resolve_model_path, save_model)
from jaxserve.model.loader import config_from_hf


def _hf_modules():
    """(torch, transformers), or skip. CI installs both, so the parity tests do run there; only the
    tests that compare against transformers ask for them."""
    return pytest.importorskip("torch"), pytest.importorskip("transformers")


F32_TOL = dict(atol=1e-4, rtol=1e-4)
VOCAB = 300
PAGE_SIZE = 4
NUM_PAGES = 32
PAGES_PER_SEQ = 12      # 48 tokens: a 13-token prompt plus 32 generated ones
PREFILL_TOKENS = 16     # padded step size; prompt lengths below are deliberately not multiples of PAGE_SIZE
PREFILL_SEQS = 2
NEW_TOKENS = 32

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.1, rms_norm_eps=1e-6)
VARIANTS = {
    "llama": lambda tf: tf.LlamaConfig(**COMMON, num_hidden_layers=2, max_position_embeddings=256),
    "llama3_rope": lambda tf: tf.LlamaConfig(
        **COMMON, num_hidden_layers=2, max_position_embeddings=256, rope_theta=500000.0,
        # original_max_position_embeddings 64 puts head_dim 16's frequencies in all three llama3 bands.
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}),
    "mistral": lambda tf: tf.MistralConfig(**COMMON, num_hidden_layers=2, max_position_embeddings=256,
                                                  sliding_window=None),
    "qwen2_tied": lambda tf: tf.Qwen2Config(**COMMON, num_hidden_layers=3, max_position_embeddings=256,
                                                   tie_word_embeddings=True),
}
HF_CLASSES = {"llama": "LlamaForCausalLM", "llama3_rope": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
              "qwen2_tied": "Qwen2ForCausalLM"}


def _build_hf_model(variant: str, folder, **save_kwargs):
    torch, transformers = _hf_modules()
    torch.manual_seed(sum(map(ord, variant)))
    model = getattr(transformers, HF_CLASSES[variant])(VARIANTS[variant](transformers)).eval()
    with torch.no_grad():
        # HF initialises norms to 1 and biases to 0; random values make a wrong mapping visible.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = None  # generate exactly NEW_TOKENS, like our loop
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    return model


class Loaded:
    """One variant: the HF model, our config/params, and jitted paged steps (compiled once per variant)."""

    def __init__(self, variant, folder):
        self.variant, self.folder = variant, folder
        # The tied Qwen2 variant is saved in several shards to exercise the index file.
        self.hf = _build_hf_model(variant, folder, **({"max_shard_size": "40KB"} if variant == "qwen2_tied" else {}))
        self.config, self.params = load_hf_checkpoint(folder)
        self.prefill = make_paged_forward(self.config, decode_only=False)
        self.decode = make_paged_forward(self.config, decode_only=True)

    def hf_logits(self, ids) -> np.ndarray:
        torch, _ = _hf_modules()
        with torch.no_grad():
            return self.hf(torch.tensor(np.asarray(ids))).logits.float().numpy()

    def empty_cache(self):
        return jnp.zeros(kv_cache_shape(self.config, NUM_PAGES, PAGE_SIZE), jnp.dtype(self.config.dtype))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    cache = {}

    def get(variant) -> Loaded:
        if variant not in cache:
            cache[variant] = Loaded(variant, tmp_path_factory.mktemp(variant))
        return cache[variant]

    return get


def _prompt(seed, length):
    return np.random.RandomState(seed).randint(3, VOCAB, size=length).astype(np.int32)


def _page_table(seed):
    # Pages out of order and never page 0 (the sink), so a layout bug cannot hide behind identity paging.
    return np.random.RandomState(seed).permutation(np.arange(1, NUM_PAGES))[:PAGES_PER_SEQ].astype(np.int32)


def _step(fn, params, tokens_per_seq, kv_lens, tables, cache, *, num_tokens, max_seqs, logits_rows):
    batch, positions = make_attention_batch([len(t) for t in tokens_per_seq], kv_lens, tables, page_size=PAGE_SIZE,
                                            num_tokens=num_tokens, max_seqs=max_seqs, pages_per_seq=PAGES_PER_SEQ)
    token_ids = np.zeros(num_tokens, np.int32)
    flat = np.concatenate(tokens_per_seq)
    token_ids[:len(flat)] = flat
    batch = AttentionBatch(*map(jnp.asarray, batch))
    return fn(params, jnp.asarray(token_ids), jnp.asarray(positions), cache, batch,
              jnp.asarray(logits_rows, jnp.int32))


# ----------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dense_matches_transformers(loaded, variant):
    m = loaded(variant)
    ids = np.stack([_prompt(1, 21), _prompt(2, 21)])
    ours = np.asarray(forward_dense(m.params, m.config, jnp.asarray(ids)))
    assert ours.shape == (2, 21, VOCAB)
    np.testing.assert_allclose(ours, m.hf_logits(ids), **F32_TOL)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_paged_prefill_and_greedy_generation_match_transformers(loaded, variant):
    m = loaded(variant)
    prompt = _prompt(3, 13)
    table = _page_table(4)
    # One live sequence in a step padded to 16 tokens and 2 slots; logits for every prompt position.
    logits, cache = _step(m.prefill, m.params, [prompt], [len(prompt)], [table], m.empty_cache(),
                          num_tokens=PREFILL_TOKENS, max_seqs=PREFILL_SEQS, logits_rows=np.arange(len(prompt)))
    np.testing.assert_allclose(np.asarray(logits), m.hf_logits(prompt[None])[0], **F32_TOL)

    generated = [int(np.argmax(np.asarray(logits)[-1]))]
    while len(generated) < NEW_TOKENS:
        kv_len = len(prompt) + len(generated)
        logits, cache = _step(m.decode, m.params, [np.array(generated[-1:], np.int32)], [kv_len], [table], cache,
                              num_tokens=1, max_seqs=1, logits_rows=[0])
        generated.append(int(np.argmax(np.asarray(logits)[0])))
    torch, _ = _hf_modules()
    with torch.no_grad():
        hf_out = m.hf.generate(torch.tensor(prompt[None]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=NEW_TOKENS, do_sample=False)
    assert generated == hf_out[0, len(prompt):].tolist()


def test_chunked_prefill_mixed_with_other_sequence_matches_dense(loaded):
    """Two steps, two sequences: A prefills 9 then 6 tokens (second chunk starts mid-page), B prefills 7 then
    decodes one; every returned row must equal the dense forward at that position."""
    m = loaded("llama")
    seq_a, seq_b = _prompt(5, 15), _prompt(6, 8)
    table_a, table_b = _page_table(7)[:6], _page_table(7)[6:]
    cache = m.empty_cache()
    logits1, cache = _step(m.prefill, m.params, [seq_a[:9], seq_b[:7]], [9, 7], [table_a, table_b], cache,
                           num_tokens=PREFILL_TOKENS, max_seqs=PREFILL_SEQS, logits_rows=np.arange(16))
    logits2, cache = _step(m.prefill, m.params, [seq_a[9:], seq_b[7:]], [15, 8], [table_a, table_b], cache,
                           num_tokens=PREFILL_TOKENS, max_seqs=PREFILL_SEQS, logits_rows=np.arange(16))
    dense_a = np.asarray(forward_dense(m.params, m.config, jnp.asarray(seq_a[None])))[0]
    dense_b = np.asarray(forward_dense(m.params, m.config, jnp.asarray(seq_b[None])))[0]
    np.testing.assert_allclose(np.asarray(logits1)[:9], dense_a[:9], **F32_TOL)
    np.testing.assert_allclose(np.asarray(logits1)[9:16], dense_b[:7], **F32_TOL)
    np.testing.assert_allclose(np.asarray(logits2)[:6], dense_a[9:], **F32_TOL)
    np.testing.assert_allclose(np.asarray(logits2)[6], dense_b[7], **F32_TOL)
    # Padding tokens wrote only to the sink page.
    untouched = np.setdiff1d(np.arange(1, NUM_PAGES), np.concatenate([table_a[:4], table_b[:2]]))
    assert not np.asarray(cache)[:, untouched].any()


def test_long_lone_chunks_match_transformers(loaded):
    """A 240-token prompt in two 256-token steps with one live sequence each (the CPU attention's lone-chunk
    path: 150 rows from scratch, then 90 rows over those 150 keys, pages out of order): every row's logits
    equal transformers'."""
    m = loaded("llama")
    prompt = _prompt(8, 240)
    pages = 64
    table = np.random.RandomState(9).permutation(np.arange(1, pages + 1)).astype(np.int32)
    cache = jnp.zeros(kv_cache_shape(m.config, pages + 1, PAGE_SIZE), jnp.float32)
    rows = []
    for lo, hi in ((0, 150), (150, 240)):
        batch, positions = make_attention_batch([hi - lo], [hi], [table], page_size=PAGE_SIZE, num_tokens=256,
                                                max_seqs=8, pages_per_seq=pages)
        token_ids = np.zeros(256, np.int32)
        token_ids[:hi - lo] = prompt[lo:hi]
        logits, cache = m.prefill(m.params, jnp.asarray(token_ids), jnp.asarray(positions), cache,
                                  AttentionBatch(*map(jnp.asarray, batch)), jnp.arange(hi - lo, dtype=jnp.int32))
        rows.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(rows), m.hf_logits(prompt[None])[0], **F32_TOL)


def test_bfloat16(loaded):
    """bf16 weights and activations (norms, softmax and logits in f32) against transformers in bf16:
    atol 0.1 on logits of magnitude ~5, and the same argmax at >= 90% of positions."""
    m = loaded("llama3_rope")
    config, params = load_hf_checkpoint(m.folder, dtype="bfloat16")
    assert config.dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    ids = np.stack([_prompt(8, 21)])
    ours = np.asarray(forward_dense(params, config, jnp.asarray(ids)))
    assert ours.dtype == np.float32
    torch, transformers = _hf_modules()
    hf_bf16 = getattr(transformers, HF_CLASSES["llama3_rope"]).from_pretrained(m.folder, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref = hf_bf16(torch.tensor(ids)).logits.float().numpy()
    np.testing.assert_allclose(ours, ref, atol=0.1, rtol=0)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_bf16_checkpoint_on_cpu_keeps_bf16_weights_under_f32_arithmetic(loaded, tmp_path):
    """A bf16 checkpoint loaded with the default dtype on CPU: f32 activations and norms, bf16 matmul weights,
    every linear layer's dot fed bf16 on both sides (no f32 copy of the weights, which would run at f32
    speed), logits within bf16 rounding of transformers in f32 over the same bf16 weights."""
    from jaxserve import model as model_lib

    torch, transformers = _hf_modules()
    m = loaded("llama3_rope")
    hf_bf16 = getattr(transformers, HF_CLASSES["llama3_rope"]).from_pretrained(m.folder, dtype=torch.bfloat16)
    hf_bf16.save_pretrained(tmp_path, safe_serialization=True)
    assert model_lib.serving_dtypes("bfloat16", None, "cpu") == ("float32", "bfloat16")
    assert model_lib.serving_dtypes("bfloat16", None, "gpu") == ("bfloat16", None)
    assert model_lib.serving_dtypes("bfloat16", "float32", "cpu") == ("float32", None)
    config, params, _ = model_lib.load(tmp_path, require_tokenizer=False)
    assert (config.dtype, config.weight_dtype) == ("float32", "bfloat16")
    layer = params["layers_0"]
    assert layer["mlp"]["down_proj"]["kernel"].dtype == jnp.bfloat16
    assert layer["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    assert layer["input_layernorm"]["scale"].dtype == jnp.float32
    ids = np.stack([_prompt(8, 21)])
    jaxpr = jax.make_jaxpr(lambda p, t: forward_dense(p, config, t))(params, jnp.asarray(ids))
    bf16_dots = [e for e in jaxpr.jaxpr.eqns[0].params["jaxpr"].eqns if e.primitive.name == "dot_general"
                 and all(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
    linears_per_layer = 7  # q, k, v, o, gate, up, down
    assert len(bf16_dots) >= linears_per_layer * config.num_layers + 1  # + lm_head
    ours = np.asarray(forward_dense(params, config, jnp.asarray(ids)))
    hf_f32 = hf_bf16.float().eval()
    with torch.no_grad():
        ref = hf_f32(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=0.1, rtol=0)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    # The engine's paged step: attention's dots read bf16 too (the CPU paths cast each key block from the f32
    # cache), within the same bound of transformers in f32.
    prefill = make_paged_forward(config, decode_only=False)
    cache = jnp.zeros(kv_cache_shape(config, NUM_PAGES, PAGE_SIZE), jnp.float32)
    step = functools.partial(_step, prefill, params, [ids[0]], [ids.shape[1]], [_page_table(3)], cache,
                             num_tokens=32, max_seqs=8, logits_rows=np.arange(ids.shape[1]))
    paged, _ = step()
    np.testing.assert_allclose(np.asarray(paged)[:ids.shape[1]], ref[0], atol=0.1, rtol=0)
    assert (np.asarray(paged)[:ids.shape[1]].argmax(-1) == ref[0].argmax(-1)).mean() >= 0.9
    attention_dots = [e for e in _equations(jax.make_jaxpr(step)().jaxpr) if e.primitive.name == "dot_general"
                      and e.invars[0].aval.ndim >= 3 and all(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
    assert attention_dots, "the paged step's attention dots do not read bf16"


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its loops, conds and calls."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


# ------------------------------------------------------------------------------------------ param tree, TP
def test_param_tree_matches_module(loaded):
    m = loaded("qwen2_tied")
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), m.params)
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), abstract_params(m.config))
    assert "lm_head" not in m.params and "bias" in m.params["layers_0"]["self_attn"]["q_proj"]
    assert sorted(k for k in m.params if k.startswith("layers_")) == ["layers_0", "layers_1", "layers_2"]


def test_init_params_random_model():
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=16, dtype="bfloat16")
    params = init_params(config, jax.random.key(0))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), abstract_params(config))
    assert params["norm"]["scale"].dtype == jnp.bfloat16 and float(params["norm"]["scale"][0]) == 1.0
    logits = forward_dense(params, config, jnp.arange(6, dtype=jnp.int32)[None])
    assert logits.shape == (1, 6, VOCAB) and logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


def test_tensor_parallel_matches_single_device(loaded):
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    m = loaded("qwen2_tied")
    prompt, table = _prompt(9, 11), _page_table(10)
    rows = np.arange(len(prompt))
    expected, _ = _step(m.prefill, m.params, [prompt], [len(prompt)], [table], m.empty_cache(),
                        num_tokens=PREFILL_TOKENS, max_seqs=PREFILL_SEQS, logits_rows=rows)

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tp",))
    specs = param_partition_specs(m.config)
    params = jax.device_put(m.params, jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs))
    cache = jax.device_put(m.empty_cache(), jax.sharding.NamedSharding(mesh, kv_cache_partition_spec()))
    q_kernel = params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "tp")
    assert q_kernel.addressable_shards[0].data.shape == (64, 32)
    assert params["layers_0"]["mlp"]["down_proj"]["kernel"].addressable_shards[0].data.shape == (64, 64)
    sharded_step = make_paged_forward(m.config, decode_only=False)
    logits, cache = _step(sharded_step, params, [prompt], [len(prompt)], [table], cache,
                          num_tokens=PREFILL_TOKENS, max_seqs=PREFILL_SEQS, logits_rows=rows)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5, rtol=1e-5)
    # Each device holds its own kv heads: 2 of the 4 interleaved K/V rows.
    assert cache.addressable_shards[0].data.shape[3] == m.config.num_kv_heads


# ----------------------------------------------------------------------------------- Orbax and `load`
def test_orbax_round_trip_and_load(loaded, tmp_path):
    m = loaded("qwen2_tied")
    tokenizer = ByteTokenizer(vocab_size=VOCAB)
    save_model(tmp_path / "ours", m.config, m.params, tokenizer=tokenizer)
    config, params = load_model(tmp_path / "ours")
    assert config == m.config
    ids = jnp.asarray(_prompt(11, 21)[None])
    expected = np.asarray(forward_dense(m.params, m.config, ids))
    np.testing.assert_array_equal(np.asarray(forward_dense(params, config, ids)), expected)
    # Overwriting an existing folder works (the engine re-exports).
    save_model(tmp_path / "ours", m.config, m.params)

    config2, params2, tok = load(str(tmp_path / "ours"))
    assert config2 == m.config and isinstance(tok, ByteTokenizer) and tok.vocab_size == VOCAB
    np.testing.assert_array_equal(np.asarray(forward_dense(params2, config2, ids)), expected)
    config3, _, tok3 = load(m.folder, require_tokenizer=False)
    assert config3 == m.config and tok3 is None
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load(m.folder)
    assert resolve_model_path("demo").parts[-3:] == ("jaxserve", "assets", "demo_model")


# ----------------------------------------------------------------------------------------------- errors
@pytest.fixture
def hf_copy(loaded, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(loaded("llama").folder, folder)
    return folder


def _edit_config(folder, **changes):
    path = folder / "config.json"
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_error_unsupported_architecture(hf_copy):
    _edit_config(hf_copy, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*supported.*LlamaForCausalLM.*MistralForCausalLM"):
        load_hf_checkpoint(hf_copy)


def test_error_missing_files(hf_copy):
    (hf_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_checkpoint(hf_copy)
    (hf_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(hf_copy)


def test_error_missing_shard(loaded, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(loaded("qwen2_tied").folder, folder)
    shards = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) > 2  # the fixture really saved a sharded checkpoint
    (folder / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=shards[1].replace(".", r"\.")):
        load_hf_checkpoint(folder)


def test_error_tensor_shape_and_missing_tensor(hf_copy):
    from safetensors.numpy import load_file, save_file

    path = str(hf_copy / "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\(16, 64\).*\(32, 64\)"):
        load_hf_checkpoint(hf_copy)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*missing"):
        load_hf_checkpoint(hf_copy)


def test_sliding_window_mapping_and_unsupported_rope_type():
    base = dict(architectures=["MistralForCausalLM"], vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    windowed = config_from_hf({**base, "sliding_window": 1024})
    assert windowed.layer_types == ("sliding_attention",) * 2 and windowed.layer_window(1) == 1024
    assert config_from_hf({**base, "sliding_window": None}).layer_window(0) is None
    with pytest.raises(ValueError, match="'longrope' is not supported"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "longrope", "factor": 4.0}})
    with pytest.raises(ValueError, match="quant_method='mxfp4'"):
        config_from_hf({**base, "quantization_config": {"quant_method": "mxfp4"}})


def test_config_mapping_old_and_new_rope_fields():
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=4096, torch_dtype="bfloat16",
                eos_token_id=[5, 7], bos_token_id=1)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024}
    old = config_from_hf({**base, "rope_theta": 500000.0, "rope_scaling": scaling})
    new = config_from_hf({**base, "rope_parameters": {**scaling, "rope_theta": 500000.0}})
    assert old == new
    assert old.rope_theta == 500000.0 and old.rope_scaling.original_max_position_embeddings == 1024
    assert old.num_kv_heads == 4 and old.head_dim == 16 and old.dtype == "bfloat16"
    assert old.eos_token_id == (5, 7) and old.bos_token_id == 1
    assert config_from_hf({**base, "architectures": ["Qwen2ForCausalLM"]}).qkv_bias


# ------------------------------------------------------------------------------------------- tokenizers
def test_byte_tokenizer(tmp_path):
    tok = ByteTokenizer(vocab_size=VOCAB)
    ids = tok.encode("héllo")
    assert ids[0] == tok.bos_token_id == 256 and tok.eos_token_ids == (257,)
    assert tok.decode(ids + [257, 299]) == "héllo"
    assert tok.decode([0xC3]) == "\ufffd"
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, ByteTokenizer) and again.vocab_size == VOCAB and again.encode("a") == ids[:1] + [97]
    with pytest.raises(ValueError, match="258"):
        ByteTokenizer(vocab_size=100)


def test_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<eot>": 2, "[UNK]": 3, "hello": 4, "world": 5}
    rust = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    rust.add_special_tokens(["<s>", "</s>", "<eot>"])
    rust.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 6 and tok.bos_token_id == 0 and tok.eos_token_ids == (1, 2)
    assert tok.encode("hello world zzz") == [4, 5, 3]
    assert tok.decode([0, 4, 5, 1]) == "hello world"
    (tmp_path / "saved").mkdir()
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.bos_token_id == 0 and again.eos_token_ids == (1, 2) and again.encode("world") == [5]


def test_llama_module_is_one_model_for_both_paths(loaded):
    """The paged and dense paths read the same params: `Decoder.init` via either method builds one tree."""
    m = loaded("llama")
    model = Decoder(m.config)
    paged_tree = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32),
        jnp.zeros(kv_cache_shape(m.config, 2, PAGE_SIZE)),
        AttentionBatch(jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32), jnp.ones(1, jnp.int32),
                       jnp.ones((1, 1), jnp.int32), jnp.array([0, 4], jnp.int32), jnp.ones(1, jnp.int32)),
        False, jnp.zeros(1, jnp.int32))["params"])
    assert jax.tree.structure(paged_tree) == jax.tree.structure(abstract_params(m.config))
