"""Filling wire messages the same way wherever they are built, written once: the prompt of a
`GenerateRequest` (the client and the HTTP front) and the decode request a prefill side sends with its KV (the
instance and the fake instance). Hand-written (not generated); no jax."""

from __future__ import annotations

from typing import Sequence

from jaxserve.proto.v1 import instance_pb2, scheduler_pb2

# Trailing metadata of a failed Prefill whose decode target (not the prefill instance) failed the KV transfer:
# the scheduler charges the failure to the decode instance and retries on another one.
FAILED_PEER_KEY = "jaxserve-failed-peer"
FAILED_PEER_DECODE = "decode_target"


def set_prompt(request: scheduler_pb2.GenerateRequest, prompt: str | Sequence[int], max_tokens: int | None):
    """A text or token-id prompt, and max_tokens if given (else the scheduler's default)."""
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    if max_tokens is not None:
        request.max_tokens = max_tokens
    return request


def decode_request(inner: instance_pb2.InstanceGenerateRequest, first_token: int
                   ) -> instance_pb2.InstanceGenerateRequest:
    """The request a prefill side commits to its decode target: `inner` resumed after its first token."""
    request = instance_pb2.InstanceGenerateRequest()
    request.CopyFrom(inner)
    request.generated_token_ids.append(first_token)
    request.max_tokens = max(inner.max_tokens - 1, 1)
    return request
