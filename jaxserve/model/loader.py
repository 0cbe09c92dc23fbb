"""Load Hugging Face Llama / Mistral / Qwen2 checkpoints (config.json + safetensors) into our param tree.

No torch at load time: tensors are read with `safetensors` in numpy, bfloat16 through `ml_dtypes`.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

from jaxserve.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling

SINGLE_WEIGHTS_FILE = "model.safetensors"
SHARDED_INDEX_FILE = "model.safetensors.index.json"

# Half-precision checkpoints are served in bfloat16 (ModelConfig holds float32 or bfloat16 only).
_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "bfloat16", "float": "float32",
              "half": "bfloat16"}

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


# --------------------------------------------------------------------------------------------------- config
def _rope_fields(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, rope_scaling) from either the transformers<5 fields (rope_theta, rope_scaling) or the
    transformers>=5 `rope_parameters` dict."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if params and any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"per-layer-type rope_parameters are not supported: {params}")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(f"rope scaling type {rope_type!r} is not supported; supported: 'default', 'llama3'")
    return float(theta), RopeScaling(
        factor=float(merged["factor"]),
        low_freq_factor=float(merged["low_freq_factor"]),
        high_freq_factor=float(merged["high_freq_factor"]),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings",
                                                        hf.get("max_position_embeddings", 8192))))


def _first_or_none(value):
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def config_from_hf(hf: dict[str, Any], dtype: str | None = None) -> ModelConfig:
    """Map a transformers config.json dict onto ModelConfig; refuse what our model would compute wrongly."""
    architectures = hf.get("architectures") or []
    supported = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
    if not supported:
        raise ValueError(f"unsupported architecture {architectures or hf.get('model_type')!r}; supported: "
                         f"{sorted(SUPPORTED_ARCHITECTURES)}")
    architecture = supported[0]
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {act!r} is not supported (SwiGLU with silu only)")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported")
    max_positions = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    window_used = architecture == "MistralForCausalLM" or hf.get("use_sliding_window", False)
    if window_used and window is not None and int(window) < max_positions:
        raise ValueError(f"sliding-window attention (sliding_window={window} < max_position_embeddings="
                         f"{max_positions}) is not supported")
    if architecture == "Qwen2ForCausalLM":
        qkv_bias = True
    else:
        qkv_bias = bool(hf.get("attention_bias", False))
        if qkv_bias:
            # transformers' Llama puts a bias on o_proj too when attention_bias is set; ModelConfig has no field.
            raise ValueError(f"{architecture} with attention_bias=true (q/k/v and o_proj biases) is not supported")

    num_heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or int(hf["hidden_size"]) // num_heads
    theta, scaling = _rope_fields(hf)
    eos = hf.get("eos_token_id")
    eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    if dtype is None:
        hf_dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        if hf_dtype not in _HF_DTYPES:
            raise ValueError(f"checkpoint dtype {hf_dtype!r} is not supported; supported: {sorted(_HF_DTYPES)}")
        dtype = _HF_DTYPES[hf_dtype]
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        max_position_embeddings=max_positions,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=qkv_bias,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype,
        architecture=architecture,
        bos_token_id=_first_or_none(hf.get("bos_token_id")),
        eos_token_id=eos_ids,
    )


# -------------------------------------------------------------------------------------------------- tensors
def _read_tensor(path: Path, handle, name: str) -> np.ndarray:
    try:
        return handle.get_tensor(name)
    except TypeError:
        # numpy has no bfloat16, so safetensors' numpy reader refuses it; read the bytes ourselves.
        return _read_raw_tensor(path, name)


def _read_raw_tensor(path: Path, name: str) -> np.ndarray:
    """Safetensors layout: u64 header size, JSON header {name: {dtype, shape, data_offsets}}, then the data."""
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(header_size))[name]
        begin, end = entry["data_offsets"]
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} in {path} has unsupported dtype {entry['dtype']}")
        f.seek(8 + header_size + begin)
        data = f.read(end - begin)
    return np.frombuffer(data, dtype=_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> file holding it."""
    index = folder / SHARDED_INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: folder / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.exists():
                raise FileNotFoundError(f"weights file {file} listed in {index} does not exist")
        return files
    single = folder / SINGLE_WEIGHTS_FILE
    if not single.exists():
        raise FileNotFoundError(f"no weights in {folder}: expected {single} or {index}")
    with safe_open(str(single), framework="np") as handle:
        return {name: single for name in handle.keys()}


def _expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape (torch Linear weights are [out, in])."""
    hidden, q_dim = config.hidden_size, config.num_heads * config.head_dim
    kv_dim, inter = config.num_kv_heads * config.head_dim, config.intermediate_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for i in range(config.num_layers):
        layer = f"model.layers.{i}."
        shapes.update({
            layer + "input_layernorm.weight": (hidden,),
            layer + "post_attention_layernorm.weight": (hidden,),
            layer + "self_attn.q_proj.weight": (q_dim, hidden),
            layer + "self_attn.k_proj.weight": (kv_dim, hidden),
            layer + "self_attn.v_proj.weight": (kv_dim, hidden),
            layer + "self_attn.o_proj.weight": (hidden, q_dim),
            layer + "mlp.gate_proj.weight": (inter, hidden),
            layer + "mlp.up_proj.weight": (inter, hidden),
            layer + "mlp.down_proj.weight": (hidden, inter),
        })
        if config.qkv_bias:
            shapes.update({layer + "self_attn.q_proj.bias": (q_dim,), layer + "self_attn.k_proj.bias": (kv_dim,),
                           layer + "self_attn.v_proj.bias": (kv_dim,)})
    return shapes


def _param_path(hf_name: str) -> tuple[tuple[str, ...], bool]:
    """HF tensor name -> (path in our param tree, whether it is a Linear weight to transpose into a kernel)."""
    if hf_name == "model.embed_tokens.weight":
        return ("embed_tokens", "embedding"), False
    if hf_name == "model.norm.weight":
        return ("norm", "scale"), False
    if hf_name == "lm_head.weight":
        return ("lm_head", "kernel"), True
    _, _, index, *rest = hf_name.split(".")
    layer = f"layers_{index}"
    if rest[0].endswith("layernorm"):
        return (layer, rest[0], "scale"), False
    block, proj, kind = rest
    return (layer, block, proj, "kernel" if kind == "weight" else "bias"), kind == "weight"


def load_hf_checkpoint(folder: str | os.PathLike, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """Read an HF model folder. `dtype` ("float32" / "bfloat16") overrides the checkpoint's own dtype."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"no config.json in {folder} (looked for {config_path})")
    config = config_from_hf(json.loads(config_path.read_text()), dtype)
    files = _weight_files(folder)
    target_dtype = jnp.dtype(config.dtype)
    params: dict = {}
    handles: dict[Path, Any] = {}
    for name, shape in _expected_hf_shapes(config).items():
        if name not in files:
            raise ValueError(f"tensor {name!r} is missing from the checkpoint in {folder}")
        file = files[name]
        if file not in handles:
            handles[file] = safe_open(str(file), framework="np")
        tensor = _read_tensor(file, handles[file], name)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name!r} in {file.name} has shape {tuple(tensor.shape)}, expected {shape}")
        path, is_linear = _param_path(name)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(tensor.T if is_linear else tensor).astype(target_dtype)
    return config, params
