"""The shared helpers of jaxserve.util and jaxserve.proto.enums (written once, imported everywhere)."""

from jaxserve.proto.enums import FINISH_REASON_CODES, FINISH_REASON_NAMES
from jaxserve.proto.v1 import common_pb2
from jaxserve.util import DEMO_MODEL_DIR, next_pow2, resolve_model_path


def test_next_pow2():
    assert [next_pow2(n) for n in (0, 1, 2, 3, 4, 5, 16, 17)] == [1, 1, 2, 4, 4, 8, 16, 32]
    assert next_pow2(3, 16) == 16 and next_pow2(17, 16) == 32 and next_pow2(0, 8) == 8


def test_resolve_model_path_and_finish_reasons():
    assert resolve_model_path("demo") == DEMO_MODEL_DIR and DEMO_MODEL_DIR.is_dir()
    assert str(resolve_model_path("some/folder")) == "some/folder"
    assert FINISH_REASON_NAMES[common_pb2.FINISH_REASON_LENGTH] == "length"
    assert all(FINISH_REASON_NAMES[FINISH_REASON_CODES[n]] == n for n in ("stop", "length", "abort"))
