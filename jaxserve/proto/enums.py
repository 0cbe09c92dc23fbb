"""The wire enums' names, written once: `FinishReason` values <-> the strings the engine, the client, the
metrics and the OpenAI front use ("stop", "length", "abort"). Hand-written (not generated); no jax."""

from __future__ import annotations

from jaxserve.proto.v1 import common_pb2

FINISH_REASON_NAMES = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
                       common_pb2.FINISH_REASON_ABORT: "abort"}
FINISH_REASON_CODES = {name: code for code, name in FINISH_REASON_NAMES.items()}
