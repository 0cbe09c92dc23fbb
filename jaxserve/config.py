"""Frozen, validated configuration dataclasses shared by every layer (no jax import here)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """The llama3 rope-scaling rule (Llama 3.1+); `None` in ModelConfig means plain RoPE."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder (Llama, Mistral, Qwen2 share it)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # weights and activations: "float32" or "bfloat16"
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            _require(getattr(self, name) >= 1, f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        _require(self.num_heads % self.num_kv_heads == 0,
                 f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        _require(self.dtype in ("float32", "bfloat16"), f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        _require(self.architecture in SUPPORTED_ARCHITECTURES,
                 f"architecture {self.architecture!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_id"] = tuple(d.get("eos_token_id") or ())
        return cls(**d)


SUPPORTED_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """KV-cache memory: page geometry, device pages and host-tier pages."""

    page_size: int = 16
    num_pages: int = 512          # device tier, page 0 included (reserved as the write sink of padding)
    num_host_pages: int = 0       # host tier; 0 disables swap_out (evicted prefixes are dropped)
    enable_prefix_caching: bool = True

    def __post_init__(self):
        _require(self.page_size >= 1 and (self.page_size & (self.page_size - 1)) == 0,
                 f"page_size must be a power of two >= 1, got {self.page_size}")
        _require(self.num_pages >= 2, f"num_pages must be >= 2 (page 0 is reserved), got {self.num_pages}")
        _require(self.num_host_pages >= 0, f"num_host_pages must be >= 0, got {self.num_host_pages}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices of one instance: tensor-parallel degree (KV heads are split over `tp`) and sequence-parallel
    degree (`seq` > 1: a 2-D mesh `seq` x `tp`; long prefills are split along the sequence over `seq`)."""

    tp: int = 1
    device_ids: tuple[int, ...] | None = None  # None: the first `seq * tp` devices
    seq: int = 1

    def __post_init__(self):
        _require(self.tp >= 1, f"tp must be >= 1, got {self.tp}")
        _require(self.seq >= 1, f"seq must be >= 1, got {self.seq}")
        if self.device_ids is not None:
            _require(len(self.device_ids) == self.tp * self.seq,
                     f"device_ids has {len(self.device_ids)} entries but seq x tp is {self.seq * self.tp}")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits of one engine step."""

    max_num_batched_tokens: int = 256   # token budget of a step (prefill chunks + decodes)
    max_num_seqs: int = 32              # sequences in one step
    enable_chunked_prefill: bool = True

    def __post_init__(self):
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1")
        _require(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        _require(self.max_num_batched_tokens >= self.max_num_seqs,
                 f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                 f"({self.max_num_seqs}) so every running sequence can decode in one step")


ATTENTION_IMPLS = ("auto", "reference", "pallas")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    mesh: MeshConfig = MeshConfig()
    attention_impl: str = "auto"  # auto: Pallas on GPU/TPU, jnp on CPU
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    seed: int = 0
    # With mesh.seq > 1: a waiting request whose uncached suffix has at least this many tokens is prefilled
    # alone, sequence-parallel over `seq`, in one step; shorter ones take the normal batched path.
    sp_threshold: int = 512

    def __post_init__(self):
        _require(self.sp_threshold >= 1, f"sp_threshold must be >= 1, got {self.sp_threshold}")
        _require(self.attention_impl in ATTENTION_IMPLS,
                 f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.max_model_len is not None:
            _require(self.max_model_len >= 1, f"max_model_len must be >= 1, got {self.max_model_len}")
