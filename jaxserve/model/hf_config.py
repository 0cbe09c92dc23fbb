"""Map a Hugging Face `config.json` onto ModelConfig, one rule set per supported architecture; anything the
decoder would compute differently from transformers is refused with an error that names the field."""

from __future__ import annotations

from typing import Any

from jaxserve.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling

# Half-precision checkpoints are served in bfloat16 (ModelConfig holds float32 or bfloat16 only).
HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "bfloat16", "float": "float32",
             "half": "bfloat16"}

_GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
_QWEN = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")


def _rope_parameters(hf: dict[str, Any], layer_type: str) -> dict[str, Any]:
    """The RoPE dict of one layer type, from the transformers>=5 `rope_parameters` (flat or per layer type)
    or the older `rope_theta` / `rope_scaling` / `rope_local_base_freq` fields."""
    params = hf.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        if layer_type not in params:
            raise ValueError(f"rope_parameters has no entry for {layer_type!r} layers: {sorted(params)}")
        return dict(params[layer_type])
    merged = {**(hf.get("rope_scaling") or {}), **params}
    merged.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if layer_type == "sliding_attention" and hf.get("rope_local_base_freq") is not None:
        return {"rope_type": "default", "rope_theta": hf["rope_local_base_freq"]}
    return merged


def _rope_scaling(rope: dict[str, Any], hf: dict[str, Any], truncate_default: Any) -> RopeScaling | None:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"partial_rotary_factor={rope['partial_rotary_factor']} is not supported")
    if rope_type == "default":
        return None
    original = int(rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192)))
    if rope_type == "linear":
        return RopeScaling(rope_type="linear", factor=float(rope["factor"]))
    if rope_type == "llama3":
        return RopeScaling(rope_type="llama3", factor=float(rope["factor"]),
                           low_freq_factor=float(rope["low_freq_factor"]),
                           high_freq_factor=float(rope["high_freq_factor"]), original_max_position_embeddings=original)
    if rope_type == "yarn":
        if rope.get("mscale") or rope.get("mscale_all_dim"):
            raise ValueError("yarn rope scaling with mscale / mscale_all_dim is not supported")
        factor = rope.get("factor") or hf["max_position_embeddings"] / original
        return RopeScaling(rope_type="yarn", factor=float(factor), original_max_position_embeddings=original,
                           beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                           truncate=bool(truncate_default),
                           attention_factor=None if rope.get("attention_factor") is None
                           else float(rope["attention_factor"]))
    raise ValueError(f"rope scaling type {rope_type!r} is not supported; supported: 'default', 'linear', "
                     "'llama3', 'yarn'")


def _layer_types(hf: dict[str, Any], architecture: str, num_layers: int) -> tuple[str, ...]:
    """Which layers use the sliding window, as transformers decides it for each architecture."""
    window = hf.get("sliding_window")
    given = hf.get("layer_types")
    if architecture in ("LlamaForCausalLM",):
        return ()
    if architecture in ("MistralForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM"):
        # transformers masks every layer with the window when one is set (Qwen3-MoE: only if it is used).
        if architecture == "Qwen3MoeForCausalLM" and not hf.get("use_sliding_window", False):
            return ()
        return ("sliding_attention",) * num_layers if window is not None else ()
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        if not hf.get("use_sliding_window", False) or window is None:
            return ()
        if given:
            return tuple(given)
        start = int(hf.get("max_window_layers", num_layers))
        return tuple("sliding_attention" if i >= start else "full_attention" for i in range(num_layers))
    if given:
        return tuple(given)
    if architecture == "Gemma3ForCausalLM":
        pattern = int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6)
        return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers))
    # Gemma 2 and gpt-oss alternate, starting with a sliding layer.
    return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers))


def _moe_fields(hf: dict[str, Any], architecture: str, num_layers: int) -> dict[str, Any]:
    if architecture not in ("Qwen3MoeForCausalLM", "MixtralForCausalLM", "GptOssForCausalLM"):
        return {}
    num_experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
    if num_experts < 1:
        raise ValueError(f"{architecture} config has no experts (num_experts / num_local_experts)")
    fields = dict(num_experts=num_experts, num_experts_per_tok=int(hf["num_experts_per_tok"]))
    if architecture == "Qwen3MoeForCausalLM":
        step = int(hf.get("decoder_sparse_step", 1))
        dense_only = set(int(i) for i in hf.get("mlp_only_layers") or [])
        fields.update(moe_intermediate_size=int(hf["moe_intermediate_size"]),
                      norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                      moe_layers=tuple(i for i in range(num_layers) if i not in dense_only and (i + 1) % step == 0))
    elif architecture == "MixtralForCausalLM":
        fields.update(moe_intermediate_size=int(hf["intermediate_size"]), norm_topk_prob=True,
                      moe_layers=tuple(range(num_layers)))
    else:
        fields.update(moe_intermediate_size=int(hf["intermediate_size"]), router="topk_softmax", router_bias=True,
                      expert_act="clamped_swiglu", swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
                      swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)), moe_layers=tuple(range(num_layers)))
    return fields


def _refuse_unsupported(hf: dict[str, Any], architecture: str) -> None:
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        if not (method == "mxfp4" and architecture == "GptOssForCausalLM"):
            raise ValueError(f"quantized checkpoints (quantization_config.quant_method={method!r}) are not "
                             "supported (only gpt-oss's MXFP4 experts, dequantized at load); use an unquantized "
                             "(bf16/f32) checkpoint")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=true (embedding-style Gemma) is not supported")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    allowed = ("gelu_pytorch_tanh", "gelu_tanh") if architecture in _GEMMA else ("silu", "swish")
    if act not in allowed:
        raise ValueError(f"{architecture}: hidden activation {act!r} is not supported; supported: {allowed}")
    if architecture == "Qwen3MoeForCausalLM" and int(hf.get("shared_expert_intermediate_size") or 0):
        raise ValueError("shared experts (shared_expert_intermediate_size) are not supported")


def config_from_hf(hf: dict[str, Any], dtype: str | None = None) -> ModelConfig:
    """Map a transformers config.json dict onto ModelConfig; refuse what our model would compute wrongly."""
    architectures = hf.get("architectures") or []
    supported = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
    if not supported:
        raise ValueError(f"unsupported architecture {architectures or hf.get('model_type')!r}; supported: "
                         f"{sorted(SUPPORTED_ARCHITECTURES)}")
    architecture = supported[0]
    _refuse_unsupported(hf, architecture)
    num_layers = int(hf["num_hidden_layers"])
    num_heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or int(hf["hidden_size"]) // num_heads
    layer_types = _layer_types(hf, architecture, num_layers)
    if layer_types and "sliding_attention" not in layer_types:
        layer_types = ()
    full_rope = _rope_parameters(hf, "full_attention")
    truncate = (hf.get("rope_parameters") or {}).get("truncate", True)
    scaling = _rope_scaling(full_rope, hf, truncate)
    local_theta = None
    if "sliding_attention" in layer_types:
        local_rope = _rope_parameters(hf, "sliding_attention")
        local_scaling = _rope_scaling(local_rope, hf, truncate)
        if local_scaling != scaling or float(local_rope["rope_theta"]) != float(full_rope["rope_theta"]):
            if local_scaling is not None:
                raise ValueError(f"scaled RoPE on sliding layers ({local_rope}) is not supported")
            local_theta = float(local_rope["rope_theta"])

    attention_bias = bool(hf.get("attention_bias", False))
    if architecture == "Qwen2ForCausalLM":
        qkv_bias, o_bias = True, False
    elif architecture in ("MistralForCausalLM", "MixtralForCausalLM") + _GEMMA:
        if attention_bias:
            raise ValueError(f"{architecture} with attention_bias=true is not supported")
        qkv_bias = o_bias = False
    else:  # Llama, Qwen3(-MoE), gpt-oss: one flag biases q, k, v and o
        qkv_bias = o_bias = attention_bias
    gemma = architecture in _GEMMA
    family = dict(
        qk_norm=architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"),
        norm_style="gemma" if gemma else ("f32" if architecture == "GptOssForCausalLM" else "llama"),
        hidden_act="gelu_tanh" if gemma else "silu",
        embed_scale=gemma, sandwich_norms=gemma,
        query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]) if gemma and hf.get("query_pre_attn_scalar")
        else None,
        # Gemma 3's config carries the field but transformers' Gemma3Attention never applies it.
        attn_logit_softcap=float(hf["attn_logit_softcapping"])
        if hf.get("attn_logit_softcapping") and architecture != "Gemma3ForCausalLM" else None,
        final_logit_softcap=float(hf["final_logit_softcapping"]) if hf.get("final_logit_softcapping") else None,
        attention_sinks=architecture == "GptOssForCausalLM",
    )
    eos = hf.get("eos_token_id")
    eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    if dtype is None:
        hf_dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        if hf_dtype not in HF_DTYPES:
            raise ValueError(f"checkpoint dtype {hf_dtype!r} is not supported; supported: {sorted(HF_DTYPES)}")
        dtype = HF_DTYPES[hf_dtype]
    bos = hf.get("bos_token_id")
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(full_rope["rope_theta"]),
        rope_scaling=scaling,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        dtype=dtype,
        architecture=architecture,
        bos_token_id=(int(bos[0]) if bos else None) if isinstance(bos, list) else (None if bos is None else int(bos)),
        eos_token_id=eos_ids,
        sliding_window=int(hf["sliding_window"]) if layer_types else None,
        layer_types=layer_types,
        local_rope_theta=local_theta,
        **family,
        **_moe_fields(hf, architecture, num_layers),
    )
