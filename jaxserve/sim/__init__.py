"""Cluster simulator (no jax): the scheduler's real policies and prompt trees over a cost model."""
