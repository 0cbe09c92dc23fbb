"""jaxserve: LLM serving in JAX with an elastic memory pool (MemServe).

`LLM` and `SamplingParams` are imported lazily so that the control plane (scheduler, client, simulator),
which imports `jaxserve.*` submodules, never pulls in jax."""

__all__ = ["LLM", "SamplingParams", "RequestOutput"]


def __getattr__(name):
    if name == "LLM" or name == "RequestOutput":
        from jaxserve.engine import llm
        return getattr(llm, name)
    if name == "SamplingParams":
        from jaxserve.engine.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
