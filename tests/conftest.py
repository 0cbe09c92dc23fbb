"""Test-session setup shared by all test files; must run before anything imports jax."""

import os

# 8 virtual CPU devices so mesh / tensor-parallel tests run on a machine without accelerators.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gc

import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. XLA:CPU maps each executable's code into memory;
    the whole suite in one process otherwise reaches the kernel's vm.max_map_count (65530 here: measured
    62,400 maps two thirds of the way through) and the next compilation segfaults."""
    yield
    import jax
    jax.clear_caches()
    gc.collect()
