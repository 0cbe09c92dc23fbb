"""The offline API's results in vLLM's shape: `RequestOutput.outputs[i]` is a `CompletionOutput` with text,
token_ids, logprobs, finish_reason and stop_reason; the request-level fields stay for existing callers."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Logprob:
    """One token's log probability (of the raw model output), its 1-based rank among the vocabulary where
    known (None: the sampled token fell outside the top `logprobs`), and its text."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None   # per generated token: sampled token and the top k
    finish_reason: str | None
    stop_reason: int | str | None = None        # the stop token id or stop string that ended it


@dataclasses.dataclass
class RequestOutput:
    """vLLM's fields (request_id, prompt_token_ids, outputs, finished) plus jaxserve's accounting. `text`,
    `token_ids`, `finish_reason` and `stop_reason` are those of outputs[0] (kept for existing callers)."""
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    num_prompt_tokens: int
    num_cached_tokens: int
    ttft_s: float
    e2e_s: float
    finish_reason: str
    num_preemptions: int
    error: str | None = None            # disaggregated: why the request failed (finish_reason "error")
    transferred_tokens: int = 0         # disaggregated: prompt tokens whose KV moved prefill -> decode
    returned_tokens: int = 0            # disaggregated caching3: tokens whose KV moved decode -> prefill
    outputs: list[CompletionOutput] = dataclasses.field(default_factory=list)
    prompt: str | None = None
    stop_reason: int | str | None = None
    finished: bool = True


def token_logprobs(req, decode) -> tuple[list[dict[int, Logprob]] | None, float | None]:
    """vLLM-shaped logprobs of an engine Request's outputs (None unless it asked for them) and their sum.
    A resumed token (generated elsewhere) has none: its entry is empty."""
    if req.params.logprobs is None:
        return None, None
    out, total = [], 0.0
    for i, tok in enumerate(req.output_token_ids):
        entry = req.logprobs.get(i)
        if entry is None:
            out.append({})
            continue
        lp, top = entry
        d = {t: Logprob(l, rank=j + 1, decoded_token=decode([t])) for j, (t, l) in enumerate(top)}
        if tok not in d:
            d = {tok: Logprob(lp, rank=None, decoded_token=decode([tok])), **d}
        out.append(d)
        total += lp
    return out, total
