"""Test-session setup shared by all test files; must run before anything imports jax."""

import os

# 8 virtual CPU devices so mesh / tensor-parallel tests run on a machine without accelerators.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
