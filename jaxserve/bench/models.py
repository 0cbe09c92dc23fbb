"""The model shape of issue 14's side-by-side (a random Llama: hidden 256, intermediate 1024, 4 layers, 2 heads /
1 KV head of 128, vocab 8192), as the CPU benchmarks build it; `bench_serve --make_checkpoint` saves the same
shape as a Hugging Face checkpoint."""

from __future__ import annotations

from jaxserve.config import ModelConfig


def issue14_config(**overrides) -> ModelConfig:
    """Issue 14's shape with bf16 matmul weights under f32 arithmetic (the CPU default for a bf16 checkpoint);
    `overrides` replace fields (num_layers, max_position_embeddings, weight_dtype=None for all-f32, ...)."""
    fields = dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=2,
                  num_kv_heads=1, head_dim=128, max_position_embeddings=2048, weight_dtype="bfloat16")
    return ModelConfig(**{**fields, **overrides})
