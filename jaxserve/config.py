"""Frozen, validated configuration dataclasses shared by every layer (no jax import here)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


ROPE_TYPES = ("linear", "llama3", "yarn")

# How the KV cache stores K and V (issue 19; jaxserve/kernels/kv_quant.py): "auto" keeps the model's dtype; the
# 8-bit formats store each row (one token's K or V of one KV head) as head_dim bytes plus its f32 scale.
KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2", "int8")
KV_SCALE_BYTES = 4


def kv_row_width(head_dim: int, kv_cache_dtype: str) -> int:
    """Last-axis length of a stored KV row: head_dim, plus the scale's bytes when quantized."""
    return head_dim + KV_SCALE_BYTES if kv_cache_dtype != "auto" else head_dim


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A RoPE scaling rule: `linear` (positions / factor), `llama3` (Llama 3.1+ bands) or `yarn` (gpt-oss);
    `None` in ModelConfig means plain RoPE. Fields a rule does not use keep their defaults."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None  # yarn: None -> 0.1 * ln(factor) + 1

    def __post_init__(self):
        _require(self.rope_type in ROPE_TYPES, f"rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        _require(self.factor > 0, f"rope scaling factor must be > 0, got {self.factor}")


LAYER_TYPES = ("full_attention", "sliding_attention")
NORM_STYLES = ("llama", "gemma", "f32")  # see model/layers.RMSNorm
HIDDEN_ACTS = ("silu", "gelu_tanh")
ROUTERS = ("softmax_topk", "topk_softmax")
EXPERT_ACTS = ("swiglu", "clamped_swiglu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer. The defaults are Llama; each family switches on the features it
    uses (model/hf_config.py maps every supported architecture onto these fields)."""

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
    # Matmul weights (linear kernels, embeddings, experts) when they differ from `dtype`: "bfloat16" with
    # dtype "float32" keeps bf16 weights and computes every matmul from bf16 inputs with f32 accumulation,
    # all else in f32 -- the fastest arithmetic on CPU (WORKSPACE_NOTES.md, "Engine speed"). None: `dtype`.
    weight_dtype: str | None = None
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    # -- attention --------------------------------------------------------------------------------------
    o_bias: bool = False                      # bias on o_proj (gpt-oss, Llama/Qwen3 with attention_bias)
    qk_norm: bool = False                     # per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3)
    query_pre_attn_scalar: float | None = None  # softmax scale = this ** -0.5 (Gemma); None: head_dim ** -0.5
    attn_logit_softcap: float | None = None   # scores -> cap * tanh(scores / cap) (Gemma 2)
    attention_sinks: bool = False             # one learned logit per query head in every softmax (gpt-oss)
    sliding_window: int | None = None         # keys visible to a sliding layer: the last `sliding_window`
    layer_types: tuple[str, ...] = ()         # per layer, from LAYER_TYPES; () = all full attention
    local_rope_theta: float | None = None     # RoPE base of sliding layers, unscaled (Gemma 3); None: as full
    # -- blocks ----------------------------------------------------------------------------------------
    norm_style: str = "llama"
    hidden_act: str = "silu"                  # MLP activation: SwiGLU (silu) or GeGLU (gelu_tanh)
    embed_scale: bool = False                 # embeddings times sqrt(hidden_size) (Gemma)
    sandwich_norms: bool = False              # norms before and after attention and MLP (Gemma 2/3)
    final_logit_softcap: float | None = None
    # -- mixture of experts (num_experts > 0) --------------------------------------------------------
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    moe_layers: tuple[int, ...] = ()          # layers whose MLP is the expert block; the others are dense
    router: str = "softmax_topk"              # softmax over all experts then top-k (Mixtral, Qwen3-MoE), or
                                              # top-k logits then softmax over them (gpt-oss)
    norm_topk_prob: bool = True               # softmax_topk: renormalise the k chosen weights to sum 1
    router_bias: bool = False
    expert_act: str = "swiglu"                # or clamped_swiglu: gpt-oss's biased, clamped GLU
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    # -- KV cache ----------------------------------------------------------------------------------------
    # How the paged step writes and reads K/V (KV_CACHE_DTYPES); the engine sets it from
    # CacheConfig.kv_cache_dtype, so the compiled step and the pool agree.
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            _require(getattr(self, name) >= 1, f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        _require(self.num_heads % self.num_kv_heads == 0,
                 f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        _require(self.dtype in ("float32", "bfloat16"), f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        _require(self.weight_dtype in (None, "float32", "bfloat16"),
                 f"weight_dtype must be None, 'float32' or 'bfloat16', got {self.weight_dtype!r}")
        _require(self.architecture in SUPPORTED_ARCHITECTURES,
                 f"architecture {self.architecture!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        _require(self.norm_style in NORM_STYLES, f"norm_style must be one of {NORM_STYLES}, got {self.norm_style!r}")
        _require(self.hidden_act in HIDDEN_ACTS, f"hidden_act must be one of {HIDDEN_ACTS}, got {self.hidden_act!r}")
        _require(self.router in ROUTERS, f"router must be one of {ROUTERS}, got {self.router!r}")
        _require(self.expert_act in EXPERT_ACTS, f"expert_act must be one of {EXPERT_ACTS}, got {self.expert_act!r}")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES,
                 f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.layer_types:
            _require(len(self.layer_types) == self.num_layers,
                     f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            _require(not bad, f"layer_types {bad} are not supported; supported: {LAYER_TYPES}")
            _require("sliding_attention" not in self.layer_types or (self.sliding_window or 0) >= 1,
                     "sliding_attention layers need sliding_window >= 1")
        _require(self.sliding_window is None or self.sliding_window >= 1,
                 f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"{name} must be > 0 or None, got {value}")
        if self.num_experts:
            _require(1 <= self.num_experts_per_tok <= self.num_experts,
                     f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts="
                     f"{self.num_experts}]")
            _require(self.moe_intermediate_size >= 1, "moe_intermediate_size must be >= 1 with experts")
            bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
            _require(not bad, f"moe_layers {bad} are outside [0, {self.num_layers})")
        else:
            _require(not self.moe_layers, "moe_layers given but num_experts is 0")

    # -- per-layer views (static under jit) -------------------------------------------------------------
    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"

    def layer_window(self, layer: int) -> int | None:
        """Keys a query of layer `layer` sees (None: all before it)."""
        return self.sliding_window if self.is_sliding(layer) else None

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer in self.moe_layers

    @property
    def matmul_dtype(self) -> str:
        """The dtype of matmul weights and inputs (see `weight_dtype`)."""
        return self.weight_dtype or self.dtype

    @property
    def sm_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def has_sliding_layers(self) -> bool:
        return "sliding_attention" in self.layer_types

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        for name in ("eos_token_id", "layer_types", "moe_layers"):
            d[name] = tuple(d.get(name) or ())
        return cls(**d)


SUPPORTED_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
    "MixtralForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "GptOssForCausalLM"})


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """KV-cache memory: page geometry, device pages and host-tier pages, and how K/V are stored."""

    page_size: int = 16
    num_pages: int = 512          # device tier, page 0 included (reserved as the write sink of padding)
    num_host_pages: int = 0       # host tier; 0 disables swap_out (evicted prefixes are dropped)
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPES: "auto" (the model's dtype) or an 8-bit format
    # Device-tier budget in bytes (scales included); set: the engine sizes num_pages from it (and
    # num_host_pages from host_memory_bytes), so an 8-bit cache holds ~2x the pages of bf16 (4x of f32).
    memory_bytes: int | None = None
    host_memory_bytes: int | None = None

    def __post_init__(self):
        _require(self.page_size >= 1 and (self.page_size & (self.page_size - 1)) == 0,
                 f"page_size must be a power of two >= 1, got {self.page_size}")
        _require(self.num_pages >= 2, f"num_pages must be >= 2 (page 0 is reserved), got {self.num_pages}")
        _require(self.num_host_pages >= 0, f"num_host_pages must be >= 0, got {self.num_host_pages}")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES,
                 f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        for name in ("memory_bytes", "host_memory_bytes"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"{name} must be > 0 or None, got {value}")


def kv_page_bytes(model: "ModelConfig", page_size: int, dtype_bytes: int) -> int:
    """Bytes of one KV page (K and V of every layer for `page_size` tokens), as the pool stores it."""
    return model.num_layers * page_size * 2 * model.num_kv_heads * model.head_dim * dtype_bytes


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices of one instance: tensor-parallel degree (KV heads and MLP columns are split over `tp`),
    expert-parallel degree (`ep` > 1: experts of MoE layers split over an `ep` axis, attention replicated
    over it; a 2-D mesh `ep` x `tp`) and sequence-parallel degree (`seq` > 1: a 2-D mesh `seq` x `tp`; long
    prefills are split along the sequence over `seq`)."""

    tp: int = 1
    device_ids: tuple[int, ...] | None = None  # None: the first `seq * ep * tp` devices
    seq: int = 1
    ep: int = 1

    def __post_init__(self):
        _require(self.tp >= 1, f"tp must be >= 1, got {self.tp}")
        _require(self.seq >= 1, f"seq must be >= 1, got {self.seq}")
        _require(self.ep >= 1, f"ep must be >= 1, got {self.ep}")
        _require(self.seq == 1 or self.ep == 1,
                 f"sequence parallelism (seq={self.seq}) and expert parallelism (ep={self.ep}) cannot be combined")
        if self.device_ids is not None:
            _require(len(self.device_ids) == self.num_devices,
                     f"device_ids has {len(self.device_ids)} entries but seq x ep x tp is {self.num_devices}")

    @property
    def num_devices(self) -> int:
        return self.seq * self.ep * self.tp


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits of one engine step."""

    max_num_batched_tokens: int = 256   # token budget of a step (prefill chunks + decodes)
    max_num_seqs: int = 32              # sequences in one step
    enable_chunked_prefill: bool = True
    # With chunked prefill: end a step's last prefill chunk at a smaller token bucket when the step would
    # otherwise pad far past its tokens (the rest runs next step; `engine.buckets.padding_cut`).
    cut_padding: bool = True

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
    # Overlap the host with the device (vLLM's async scheduling): step N+1 is scheduled and dispatched while
    # step N runs, its decode inputs taken from step N's samples on the device; stop checks land a step late
    # (a request that stops at step N may compute one extra token, discarded).
    async_scheduling: bool = True

    def __post_init__(self):
        _require(self.sp_threshold >= 1, f"sp_threshold must be >= 1, got {self.sp_threshold}")
        _require(self.attention_impl in ATTENTION_IMPLS,
                 f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.max_model_len is not None:
            _require(self.max_model_len >= 1, f"max_model_len must be >= 1, got {self.max_model_len}")
