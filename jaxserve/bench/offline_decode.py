"""The offline side of `jaxserve.launch.bench_serve`: a decode workload through `LLM.generate` (the reference a
served TPOT is compared with), and the CPU time of a process (served CPU per generated token)."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Iterable

from jaxserve.bench.openai_client import random_prompt


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (None: this one, every thread), from /proc (Linux)."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class OfflineDecode:
    """`batch` fresh random prompts of prompt_len tokens, new_tokens each (greedy, ignore_eos), through one
    `LLM` with the served instance's engine settings (**llm_kwargs); every batch size in `batches` runs once
    unmeasured first (compiles)."""

    def __init__(self, model: str, rng, vocab: int, *, batches: Iterable[int], prompt_len: int, new_tokens: int,
                 **llm_kwargs):
        from jaxserve import LLM, SamplingParams
        self.llm = LLM(model, **llm_kwargs)
        self.params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        self.rng, self.vocab, self.prompt_len = rng, vocab, prompt_len
        for batch in batches:
            self.decode(batch)

    def decode(self, batch: int) -> dict:
        """tok/s (tokens after each request's first / (last token - first token of any)) and median TPOT."""
        start = time.perf_counter()
        outs = self.llm.generate([random_prompt(self.rng, self.prompt_len, self.vocab) for _ in range(batch)],
                                 self.params)
        first = start + min(o.ttft_s for o in outs)
        last = start + max(o.e2e_s for o in outs)
        tpots = [(o.e2e_s - o.ttft_s) / (len(o.token_ids) - 1) for o in outs]
        return {f"decode_b{batch}_tok_s": sum(len(o.token_ids) - 1 for o in outs) / (last - first),
                f"decode_b{batch}_tpot_p50_s": statistics.median(tpots)}
