"""Wall-clock limits for tests that scale with the machine, so a loaded box (2 cores shared by many runs) does
not turn a slow pass into a failure.

`scaled(seconds)` multiplies by JAXSERVE_TEST_TIMEOUT_SCALE (default 1) and by the load per core when the
box is busier than one runnable process per core (1-minute load average / cores, at least 1). Use it for
safety nets against hangs and for "within N seconds" bounds; correctness assertions should not depend on
time at all.
"""

from __future__ import annotations

import os


def factor() -> float:
    """The current scale: the env knob times the load per core (at least 1)."""
    try:
        env = float(os.environ.get("JAXSERVE_TEST_TIMEOUT_SCALE", "1") or 1)
    except ValueError:
        raise ValueError("JAXSERVE_TEST_TIMEOUT_SCALE must be a number, got "
                         f"{os.environ['JAXSERVE_TEST_TIMEOUT_SCALE']!r}") from None
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        load = 1.0
    return max(env, 0.1) * max(load, 1.0)


def scaled(seconds: float) -> float:
    """`seconds` scaled to this machine's current load (see the module docstring)."""
    return seconds * factor()
