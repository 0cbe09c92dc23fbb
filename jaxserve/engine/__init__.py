"""One instance's runtime: requests, continuous batching, jitted steps, sampling, offline API."""
