"""Benchmark harness (no jax): workloads, the gRPC load generator, reports."""
