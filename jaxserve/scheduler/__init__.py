"""The global scheduler (control plane, no jax): tokenizes and validates requests, routes them with global
prompt trees and a policy, proxies the instances' token streams, and keeps the fleet healthy.

Entry points: `Scheduler(GlobalSchedulerConfig(...), load_model_info(model))` (in-process; `await
scheduler.start()`), `python -m jaxserve.launch.scheduler` (a process). One request path serves both fronts:
`SchedulerCore` (`core`: validate, then generate(valid, deadline)) raises `errors` (typed, each with a gRPC
status name) that the gRPC servicer (`server`) and the OpenAI HTTP front (`http_front`) map to their codes.
Instance servers plug in through `InstanceReporter` (Register + ReportEvents) and by serving
`jaxserve.v1.Instance`; `jaxserve.testing.fake_instance` is a stand-in for tests and benchmarks."""

from jaxserve.scheduler.config import GlobalSchedulerConfig
from jaxserve.scheduler.core import SchedulerCore
from jaxserve.scheduler.cost_model import CostModel
from jaxserve.scheduler.policies import POLICIES, LoadGuard, make_policy
from jaxserve.scheduler.prompt_tree import PromptTree
from jaxserve.scheduler.reporter import InstanceReporter
from jaxserve.scheduler.router import InstanceRecord, RouteDecision, Router
from jaxserve.scheduler.server import Scheduler
from jaxserve.scheduler.tokenizer import ModelInfo, load_model_info

__all__ = [
    "POLICIES", "CostModel", "GlobalSchedulerConfig", "InstanceRecord", "InstanceReporter", "LoadGuard",
    "ModelInfo", "PromptTree", "RouteDecision", "Router", "Scheduler", "SchedulerCore", "load_model_info",
    "make_policy",
]
