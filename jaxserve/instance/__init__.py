"""A serving instance: one engine behind the `jaxserve.v1.Instance` gRPC service, registered with the
global scheduler. `InstanceServer(engine, InstanceConfig(...))` in-process, `python -m jaxserve.launch.instance` as a
process; `EngineLoop` is the thread that owns the engine."""

from jaxserve.instance.engine_loop import EngineLoop
from jaxserve.instance.server import ROLES, InstanceConfig, InstanceServer, build_engine

__all__ = ["ROLES", "EngineLoop", "InstanceConfig", "InstanceServer", "build_engine"]
