"""Subprocess teardown shared by the tests that start real server processes."""

from __future__ import annotations

import subprocess


def stop_processes(procs, grace_s: float = 10.0) -> None:
    """Stops every process still running: SIGTERM and up to `grace_s` to exit, then SIGKILL (grace_s=0: kill
    at once). No process outlives the test."""
    procs = list(procs)
    if grace_s > 0:
        for p in procs:
            if p.poll() is None:
                p.terminate()
    for p in procs:
        if p.poll() is None and grace_s > 0:
            try:
                p.wait(grace_s)
                continue
            except subprocess.TimeoutExpired:
                pass
        if p.poll() is None:
            p.kill()
            p.wait()
