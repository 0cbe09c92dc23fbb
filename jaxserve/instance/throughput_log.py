"""The instance's periodic status line (vLLM's "Avg prompt throughput ..." log): while it has work, one line
every `interval_s` with prompt and generation tokens/s, running and waiting requests, KV usage and the
prefix-cache hit rate over the interval; silent while idle."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("jaxserve.instance")


class ThroughputLog:
    def __init__(self, name: str, interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 emit: Callable[[str], None] | None = None):
        self.name = name
        self.interval_s = interval_s
        self.clock = clock
        self.emit = emit or log.info
        self._last_time = clock()
        self._last = dict(prompt_tokens=0, cached_tokens=0, generated_tokens=0)

    def observe(self, counters: dict, load: dict) -> str | None:
        """Called after each engine-loop turn with the loop's cumulative counters and current load; emits (and
        returns) a line when an interval has passed and something happened in it."""
        now = self.clock()
        elapsed = now - self._last_time
        if elapsed < self.interval_s or self.interval_s <= 0:
            return None
        delta = {k: counters.get(k, 0) - v for k, v in self._last.items()}
        busy = load.get("num_running_requests", 0) + load.get("num_queued_requests", 0)
        self._last_time, self._last = now, {k: counters.get(k, 0) for k in self._last}
        if not busy and not any(delta.values()):
            return None
        total = max(load.get("num_total_pages", 0), 1)
        used = total - load.get("num_free_pages", total)
        hit = delta["cached_tokens"] / delta["prompt_tokens"] if delta["prompt_tokens"] else 0.0
        line = (f"{self.name}: prompt {delta['prompt_tokens'] / elapsed:.1f} tok/s, generation "
                f"{delta['generated_tokens'] / elapsed:.1f} tok/s, running {load.get('num_running_requests', 0)}, "
                f"waiting {load.get('num_queued_requests', 0)}, KV usage {100.0 * used / total:.1f}%, "
                f"prefix hit rate {100.0 * hit:.1f}%")
        self.emit(line)
        return line
