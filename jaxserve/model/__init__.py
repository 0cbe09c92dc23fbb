"""The model layer: decoder (every supported family), HF / Orbax weight loading and tokenizers, behind one `load`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxserve.config import ModelConfig
from jaxserve.model.batch import AttentionBatch, make_attention_batch
from jaxserve.model.checkpoint import MODEL_CONFIG_FILE, load_model, save_model
from jaxserve.model.decoder import (Decoder, abstract_params, forward_dense, init_params, kv_cache_partition_spec,
                                  kv_cache_shape, make_paged_forward, param_partition_specs)
from jaxserve.model.loader import load_hf_checkpoint
from jaxserve.model.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_model"

# Short names for bundled models; the lead ships the demo model's folder.
_NAMED_MODELS = {"demo": DEMO_MODEL_DIR}


def resolve_model_path(name: str | os.PathLike) -> Path:
    """A bundled model's short name ("demo") -> its folder; anything else is taken as a path."""
    if isinstance(name, str) and name in _NAMED_MODELS:
        return _NAMED_MODELS[name]
    return Path(name)


def default_compute_dtype(platform: str | None = None) -> str | None:
    """The dtype a checkpoint is computed in when the caller names none: on CPU float32, because XLA:CPU runs
    bf16 matmuls many times slower than f32 (WORKSPACE_NOTES.md, "bf16 on CPU"); elsewhere None, i.e. the
    checkpoint's own dtype (bf16 on GPU/TPU)."""
    return "float32" if (platform or jax.default_backend()) == "cpu" else None


def load(model: str | os.PathLike, *, dtype: str | None = None, require_tokenizer: bool = True
         ) -> tuple[ModelConfig, dict, Tokenizer | None]:
    """(config, params, tokenizer) from an Orbax model folder (has model_config.json) or an HF folder (has
    config.json + safetensors). `dtype` casts the params ("float32" / "bfloat16"); None or "auto" means
    `default_compute_dtype()`. Without tokenizer files, raises unless `require_tokenizer=False` (then the
    tokenizer is None)."""
    if dtype in (None, "auto"):
        dtype = default_compute_dtype()
    folder = resolve_model_path(model)
    if not folder.is_dir():
        raise FileNotFoundError(f"model {str(model)!r}: {folder} is not a directory")
    if (folder / MODEL_CONFIG_FILE).exists():
        config, params = load_model(folder)
        if dtype is not None and dtype != config.dtype:
            config = dataclasses.replace(config, dtype=dtype)
            params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
    elif (folder / "config.json").exists():
        config, params = load_hf_checkpoint(folder, dtype=dtype)
    else:
        raise FileNotFoundError(f"{folder} is neither an Orbax model folder ({MODEL_CONFIG_FILE}) nor an HF "
                                "folder (config.json)")
    try:
        tokenizer = load_tokenizer(folder)
    except FileNotFoundError:
        if require_tokenizer:
            raise
        tokenizer = None
    return config, params, tokenizer


__all__ = [
    "AttentionBatch", "ByteTokenizer", "HFTokenizer", "Decoder", "Tokenizer", "abstract_params", "forward_dense",
    "init_params", "kv_cache_partition_spec", "kv_cache_shape", "load", "load_hf_checkpoint", "load_model",
    "load_tokenizer", "make_attention_batch", "make_paged_forward", "param_partition_specs",
    "resolve_model_path", "save_model",
]
