"""Our own model folder: Orbax params, `model_config.json` beside them, and the tokenizer's files.

Layout: folder/model_config.json, folder/params/ (Orbax StandardCheckpointer), folder/<tokenizer files>.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax

from jaxserve.config import ModelConfig
from jaxserve.model.decoder import abstract_params
from jaxserve.model.tokenizer import Tokenizer

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def save_model(folder: str | os.PathLike, config: ModelConfig, params, tokenizer: Tokenizer | None = None) -> None:
    """Write (or overwrite) a model folder."""
    import orbax.checkpoint as ocp  # heavy; only the save/load paths need it

    folder = Path(folder).absolute()  # Orbax insists on absolute paths
    folder.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(folder / PARAMS_DIR, params, force=True)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
    (folder / MODEL_CONFIG_FILE).write_text(config.to_json())
    if tokenizer is not None:
        tokenizer.save(folder)


def load_config(folder: str | os.PathLike) -> ModelConfig:
    path = Path(folder) / MODEL_CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {MODEL_CONFIG_FILE} in {folder} (looked for {path})")
    return ModelConfig.from_dict(json.loads(path.read_text()))


def load_model(folder: str | os.PathLike, shardings=None) -> tuple[ModelConfig, dict]:
    """Read a model folder. `shardings`: an optional pytree of `jax.sharding.Sharding` matching the params
    (e.g. from `param_partition_specs`) to restore straight onto a mesh; default: this process's first device."""
    import orbax.checkpoint as ocp

    folder = Path(folder).absolute()
    config = load_config(folder)
    params_dir = folder / PARAMS_DIR
    if not params_dir.exists():
        raise FileNotFoundError(f"no Orbax params in {folder} (looked for {params_dir})")
    abstract = abstract_params(config)
    if shardings is None:
        # This process's first device (multi-process instances: each process restores its own host copy).
        default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: default, abstract)
    # Giving the sharding explicitly keeps restore independent of the topology the checkpoint was saved on.
    target = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                          abstract, shardings)
    checkpointer = ocp.StandardCheckpointer()
    try:
        params = checkpointer.restore(params_dir, target)
    finally:
        checkpointer.close()
    return config, params
