"""Benchmark harness: workloads, the gRPC load generator, reports (no jax); `layerwise` and `kv_peer` (jax,
imported only by the disaggregation benchmark and tests): the layer-by-layer transfer baseline and a pool in
another process."""
