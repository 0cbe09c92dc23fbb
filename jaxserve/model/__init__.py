"""The model layer: decoder (every supported family), HF / Orbax weight loading and tokenizers, behind one `load`."""

from __future__ import annotations

import dataclasses
import json
import os

import jax

from jaxserve.config import ModelConfig
from jaxserve.model.batch import AttentionBatch, make_attention_batch
from jaxserve.model.checkpoint import MODEL_CONFIG_FILE, load_model, save_model
from jaxserve.model.decoder import (Decoder, abstract_params, forward_dense, init_params, kv_cache_partition_spec,
                                  kv_cache_shape, make_paged_forward, param_partition_specs)
from jaxserve.model.hf_config import config_from_hf
from jaxserve.model.loader import load_hf_checkpoint
from jaxserve.model.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from jaxserve.util import DEMO_MODEL_DIR, resolve_model_path


def serving_dtypes(checkpoint_dtype: str, requested: str | None = None, platform: str | None = None
                   ) -> tuple[str, str | None]:
    """(dtype, weight_dtype) a checkpoint is served in. An explicit `requested` dtype is used for everything.
    Otherwise ("auto"/None): on GPU/TPU the checkpoint's own dtype; on CPU float32 arithmetic, with a bf16
    checkpoint's matmul weights kept in bf16 and its matmuls fed bf16 with f32 accumulation -- XLA:CPU's
    fastest dot, while its bf16 elementwise ops and KV scatters are slow (WORKSPACE_NOTES.md, "Engine speed")."""
    if requested not in (None, "auto"):
        return requested, None
    if (platform or jax.default_backend()) == "cpu":
        return "float32", ("bfloat16" if checkpoint_dtype == "bfloat16" else None)
    return checkpoint_dtype, None


def load(model: str | os.PathLike, *, dtype: str | None = None, require_tokenizer: bool = True
         ) -> tuple[ModelConfig, dict, Tokenizer | None]:
    """(config, params, tokenizer) from an Orbax model folder (has model_config.json) or an HF folder (has
    config.json + safetensors). `dtype` ("float32" / "bfloat16") casts the params; None or "auto" means
    `serving_dtypes`' per-platform choice. Without tokenizer files, raises unless `require_tokenizer=False`
    (then the tokenizer is None)."""
    folder = resolve_model_path(model)
    if not folder.is_dir():
        raise FileNotFoundError(f"model {str(model)!r}: {folder} is not a directory")
    if (folder / MODEL_CONFIG_FILE).exists():
        config, params = load_model(folder)
        compute, weights = serving_dtypes(config.matmul_dtype, dtype)
        if (compute, weights) != (config.dtype, config.weight_dtype):
            config = dataclasses.replace(config, dtype=compute, weight_dtype=weights)
            params = jax.tree.map(lambda x, want: x.astype(want.dtype), params, abstract_params(config))
    elif (folder / "config.json").exists():
        checkpoint = config_from_hf(json.loads((folder / "config.json").read_text()))
        compute, weights = serving_dtypes(checkpoint.dtype, dtype)
        config, params = load_hf_checkpoint(folder, dtype=compute, weight_dtype=weights)
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
    "resolve_model_path", "save_model", "serving_dtypes",
]
