"""Load Hugging Face checkpoints (config.json + safetensors, single or sharded) into our param tree.

No torch at load time: tensors are read with `safetensors` in numpy, bfloat16 through `ml_dtypes`. Each
param names the checkpoint tensors it is built from (`_sources`); a tensor that no param uses is an error,
since it means the checkpoint has a feature the decoder would silently drop.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

from jaxserve.config import ModelConfig
from jaxserve.model.decoder import abstract_params
from jaxserve.model.hf_config import config_from_hf

SINGLE_WEIGHTS_FILE = "model.safetensors"
SHARDED_INDEX_FILE = "model.safetensors.index.json"

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


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


_IGNORED = ("rotary_emb.inv_freq",)  # buffers some exporters save; recomputed from the config
# MXFP4 (OCP microscaling): 4-bit E2M1 codes, two per byte (low nibble first), one E8M0 power-of-two scale
# (bias 127) per 32 values. gpt-oss publishes its expert weights this way.
_FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                       np.float32)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks u8[E, out, G, 16], scales u8[E, out, G] -> f32[E, in = G * 32, out] (the bf16 checkpoint's
    layout of gpt-oss expert weights)."""
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not match")
    values = np.stack([_FP4_VALUES[blocks & 0x0F], _FP4_VALUES[blocks >> 4]], axis=-1)
    values = values.reshape(*blocks.shape[:-1], blocks.shape[-1] * 2)
    values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
    return values.reshape(*blocks.shape[:-2], -1).swapaxes(-1, -2)


def _linear(name):
    """A torch Linear weight [out, in] -> our kernel [in, out]."""
    return [name], lambda t: t.T


def _stacked(names, transpose):
    return names, lambda *ts: np.stack([t.T if transpose else t for t in ts])


def _sources(config: ModelConfig, path: tuple[str, ...], available=frozenset()):
    """Our param path -> (checkpoint tensor names, function combining them into the param)."""
    if path == ("embed_tokens", "embedding"):
        return ["model.embed_tokens.weight"], lambda t: t
    if path == ("norm", "scale"):
        return ["model.norm.weight"], lambda t: t
    if path == ("lm_head", "kernel"):
        return _linear("lm_head.weight")
    layer, block, *rest = path
    hf = f"model.layers.{layer.split('_')[1]}."
    if block.endswith("layernorm"):
        return [hf + block + ".weight"], lambda t: t
    if block in ("self_attn", "mlp") and rest[-1] in ("kernel", "bias") and len(rest) == 2:
        name = f"{hf}{block}.{rest[0]}." + ("weight" if rest[1] == "kernel" else "bias")
        return _linear(name) if rest[1] == "kernel" else ([name], lambda t: t)
    if block == "self_attn" and rest == ["sinks"]:
        return [hf + "self_attn.sinks"], lambda t: t
    if block == "self_attn":  # q_norm / k_norm
        return [f"{hf}self_attn.{rest[0]}.weight"], lambda t: t
    if block == "moe":
        return _moe_sources(config, hf, tuple(rest), available)
    raise ValueError(f"no checkpoint mapping for param {'/'.join(path)}")


def _moe_sources(config: ModelConfig, hf: str, rest: tuple[str, ...], available=frozenset()):
    experts = range(config.num_experts)
    arch = config.architecture
    if arch == "GptOssForCausalLM":
        fused = hf + "mlp.experts."

        def weight(name):  # bf16/f32 export, or the published MXFP4 blocks + scales
            if fused + name + "_blocks" in available:
                return [fused + name + "_blocks", fused + name + "_scales"], dequantize_mxfp4
            return [fused + name], lambda t: t

        gate_up_names, gate_up = weight("gate_up_proj")
        down_names, down = weight("down_proj")
        table = {("router", "kernel"): _linear(hf + "mlp.router.weight"),
                 ("router", "bias"): ([hf + "mlp.router.bias"], lambda t: t),
                 # gate and up are interleaved along the last axis of the fused [E, H, 2I] tensor
                 ("gate_proj",): (gate_up_names, lambda *t: gate_up(*t)[..., 0::2]),
                 ("up_proj",): (gate_up_names, lambda *t: gate_up(*t)[..., 1::2]),
                 ("down_proj",): (down_names, down),
                 ("gate_bias",): ([fused + "gate_up_proj_bias"], lambda t: t[..., 0::2]),
                 ("up_bias",): ([fused + "gate_up_proj_bias"], lambda t: t[..., 1::2]),
                 ("down_bias",): ([fused + "down_proj_bias"], lambda t: t)}
    else:
        prefix, names = ((hf + "block_sparse_moe.", ("w1", "w3", "w2")) if arch == "MixtralForCausalLM"
                         else (hf + "mlp.", ("gate_proj", "up_proj", "down_proj")))
        table = {("router", "kernel"): _linear(prefix + "gate.weight")}
        for ours, theirs in zip(("gate_proj", "up_proj", "down_proj"), names):
            table[(ours,)] = _stacked([f"{prefix}experts.{e}.{theirs}.weight" for e in experts], transpose=True)
    if rest not in table:
        raise ValueError(f"no checkpoint mapping for MoE param {'/'.join(rest)} of {arch}")
    return table[rest]


def load_hf_checkpoint(folder: str | os.PathLike, dtype: str | None = None, weight_dtype: str | None = None
                       ) -> tuple[ModelConfig, dict]:
    """Read an HF model folder. `dtype` ("float32" / "bfloat16") overrides the checkpoint's own dtype;
    `weight_dtype` keeps matmul weights in another one (`ModelConfig.weight_dtype`)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"no config.json in {folder} (looked for {config_path})")
    config = config_from_hf(json.loads(config_path.read_text()), dtype)
    if weight_dtype is not None and weight_dtype != config.dtype:
        config = dataclasses.replace(config, weight_dtype=weight_dtype)
    files = _weight_files(folder)
    available = frozenset(files)
    handles: dict[Path, Any] = {}
    used: set[str] = set()

    def read(name: str) -> np.ndarray:
        if name not in files:
            raise ValueError(f"tensor {name!r} is missing from the checkpoint in {folder}")
        file = files[name]
        if file not in handles:
            handles[file] = safe_open(str(file), framework="np")
        used.add(name)
        return _read_tensor(file, handles[file], name)

    def build(key_path, abstract):
        path = tuple(str(getattr(k, "key", k)) for k in key_path)
        names, combine = _sources(config, path, available)
        tensors = [read(n) for n in names]
        value = combine(*tensors)
        if tuple(value.shape) != tuple(abstract.shape):
            got = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, tensors))
            raise ValueError(f"tensor {got} does not give param {'/'.join(path)} its expected shape: got "
                             f"{tuple(value.shape)}, expected {tuple(abstract.shape)} (as torch [out, in]: "
                             f"{tuple(abstract.shape)[::-1]})")
        return jnp.asarray(value).astype(abstract.dtype)

    params = jax.tree_util.tree_map_with_path(build, abstract_params(config))
    unused = sorted(n for n in files if n not in used and not n.endswith(_IGNORED))
    if unused:
        raise ValueError(f"{len(unused)} checkpoint tensors map to nothing in {config.architecture} (an unsupported "
                         f"feature?): {unused[:5]}")
    return config, params
