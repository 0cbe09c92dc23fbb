"""Small helpers every layer shares, written once. Standard library only (no jax, numpy or protobuf), so
the kernels and the jax-free scheduler, client and simulator import the same code."""

from __future__ import annotations

import os
from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "demo_model"

# Short names for bundled models; the lead ships the demo model's folder.
NAMED_MODELS = {"demo": DEMO_MODEL_DIR}


def next_pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum) (shape buckets: jit compiles O(log n) shapes)."""
    n = max(int(n), minimum, 1)
    return 1 << (n - 1).bit_length()


def resolve_model_path(name: str | os.PathLike) -> Path:
    """A bundled model's short name ("demo") -> its folder; anything else is taken as a path."""
    if isinstance(name, str) and name in NAMED_MODELS:
        return NAMED_MODELS[name]
    return Path(name)


def run_async(main) -> object:
    """asyncio.run(main) on uvloop when it is installed (and JAXSERVE_UVLOOP is not "0"): the launchers' event
    loops carry every streamed token (gRPC and SSE), and uvloop's loop halves grpc.aio's per-call latency on
    this project's CPU boxes (docs/drafts/served-overhead.md)."""
    import asyncio
    if os.environ.get("JAXSERVE_UVLOOP", "1") != "0":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def pin_threads(cores) -> int:
    """Pin every thread this process has now (and so every thread they start later) to `cores` (Linux; a
    no-op elsewhere). Used after start-up compilation, which may use every core, so that serving keeps
    to its share of the machine. Returns how many threads were pinned."""
    cores = set(int(c) for c in cores)
    if not cores or not hasattr(os, "sched_setaffinity"):
        return 0
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    pinned = 0
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
            pinned += 1
        except OSError:  # the thread ended meanwhile
            pass
    return pinned


def die_with_parent() -> None:
    """`preexec_fn` of a child process: it gets SIGTERM when its launcher dies, however it dies (Linux), and
    has its own process group, so a terminal's Ctrl-C reaches the launcher only, which then stops the
    children in order."""
    import contextlib
    import ctypes
    import signal
    pr_set_pdeathsig = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    os.setpgrp()

