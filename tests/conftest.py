"""Test-session setup shared by all test files; must run before anything imports jax."""

import os

# 8 virtual CPU devices so mesh / tensor-parallel tests run on a machine without accelerators.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests fork launcher processes (LocalCluster, subprocess with a preexec_fn) while gRPC threads are live; with
# gRPC's fork support on, its fork handlers sometimes abort the child before it execs (exit -6; see
# jaxserve/launch/bench.py). It must be off before anything imports grpc, so here, not in a test module: a test
# module's own setting comes after the modules collected before it (and every pytest-xdist worker's) import it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import gc

import pytest


def pytest_configure(config):
    """Every program compiles through JAX's persistent cache, the one `jaxserve serve` uses
    (~/.cache/jaxserve/xla or $JAXSERVE_COMPILATION_CACHE; "off" disables it), from the first test on: a
    second run of the suite skips XLA's backend compile of what it compiled before. `LLM(...,
    compilation_cache="off")` leaves the process's setting as it is."""
    from jaxserve.engine.llm import enable_compilation_cache
    enable_compilation_cache()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. XLA:CPU maps each executable's code into memory;
    the whole suite in one process otherwise reaches the kernel's vm.max_map_count (65530 here: measured
    62,400 maps two thirds of the way through) and the next compilation segfaults."""
    yield
    import jax
    jax.clear_caches()
    gc.collect()
