"""One request's life inside an engine: its tokens, pages, progress and timings."""

from __future__ import annotations

import dataclasses
import enum
import time

from jaxserve.cache_salt import salt_tokens
from jaxserve.engine.sampling import SamplingParams

# Output slot of a token sampled by a step still running on the device (async scheduling): the next step
# reads its value on the device; the host fills it in when that step completes.
PENDING = -1


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    max_total_len: int                      # prompt + output may not exceed this (the model's context)
    arrival_time: float = dataclasses.field(default_factory=time.perf_counter)
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    pages: list[int] = dataclasses.field(default_factory=list)  # device pages, in order; each holds one ref
    num_computed: int = 0                   # tokens whose KV is in `pages`
    num_indexed_pages: int = 0              # leading pages already offered to the prompt index
    num_cached_tokens: int = 0              # prompt tokens reused from the cache at first admission
    num_preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None        # "stop" | "length" | "abort"
    text: str = ""
    stop_text_len: int | None = None        # where a stop string cut the text
    stop_reason: int | str | None = None    # the stop token id or stop string that ended it (None: EOS, length)
    # params.logprobs set: output index -> (logprob of the sampled token, [(token id, logprob)] of the top k)
    logprobs: dict = dataclasses.field(default_factory=dict)
    grammar: object = None                  # params.json_schema: its engine.structured.Matcher
    admitted_once: bool = False
    deferred: bool = False                  # waited once for a shared prefix another request was computing
    # Disaggregation hooks. prefill_only: stop after the first token and keep the pages (status FINISHED,
    # finish_reason "prefilled") until the engine `release`s them, e.g. after a transfer. preloaded: the
    # request arrives with `pages` already holding the KV of its first `num_computed` tokens.
    prefill_only: bool = False
    preloaded: bool = False
    # Async scheduling: the slot of the in-flight step that samples the last (PENDING) output token, and
    # whether the request stops once that step completes whatever it samples (length, prefill-only).
    pending_slot: int | None = None
    finishing: bool = False
    # Tenant isolation (vLLM's cache_salt): the prefix cache keys this request's tokens by `index_tokens`.
    cache_salt: str = ""

    def index_tokens(self, tokens: list[int]) -> list[int]:
        """`tokens` (a prefix of this request's) as the prefix cache keys them for this request's salt."""
        return salt_tokens(tokens, self.cache_salt)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_known_tokens(self) -> int:
        """Prompt and output tokens known on the host: all but the trailing PENDING ones (at most two: the
        sample of the running step and that of the step dispatched after it)."""
        n = len(self.output_token_ids)
        while n and self.output_token_ids[n - 1] == PENDING:
            n -= 1
        return len(self.prompt_token_ids) + n

    @property
    def ready_output_token_ids(self) -> list[int]:
        """The output tokens known on the host."""
        return self.output_token_ids[:self.num_known_tokens - len(self.prompt_token_ids)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        """Still computing prompt tokens (or re-computing after preemption): more than one token to go."""
        return self.num_uncomputed > 1 or (not self.output_token_ids and self.num_uncomputed > 0)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
