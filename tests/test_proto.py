"""The wire contract: generated code matches the .proto files, messages behave as documented, and the
control plane imports without jax."""

import subprocess
import sys
from pathlib import Path

import pytest

from jaxserve.proto import generate
from jaxserve.proto.v1 import common_pb2, instance_pb2, instance_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc


def test_generated_code_is_not_stale(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev dependency) regenerates the code")
    fresh = generate.generate(tmp_path / "v1")
    committed = sorted(p for p in generate.GENERATED_DIR.iterdir() if p.is_file())
    assert [p.name for p in fresh] == [p.name for p in committed], "generated file set differs: run " \
        "`python -m jaxserve.proto.generate`"
    for new, old in zip(fresh, committed):
        assert new.read_bytes() == old.read_bytes(), f"{old} is stale: run `python -m jaxserve.proto.generate`"


def test_every_proto_file_has_generated_modules():
    names = {p.stem for p in generate.proto_files()}
    assert names == {"common", "instance", "scheduler"}
    for name in names:
        assert (generate.GENERATED_DIR / f"{name}_pb2.py").exists()


def test_services_have_the_documented_methods():
    scheduler = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"]
    assert {m.name for m in scheduler.methods} == {
        "Generate", "Tokenize", "ListInstances", "GetStats", "DrainInstance", "Register", "ReportEvents",
        "Deregister"}
    generate_method = scheduler.methods_by_name["Generate"]
    assert generate_method.server_streaming and not generate_method.client_streaming
    assert scheduler.methods_by_name["ReportEvents"].client_streaming
    instance = instance_pb2.DESCRIPTOR.services_by_name["Instance"]
    assert {m.name for m in instance.methods} == {
        "Generate", "Prefill", "Decode", "PrepareKvTransfer", "CommitKvTransfer", "Abort", "Profile", "GetStats",
        "Drain", "PushKv", "FetchKv", "GenerateMany"}
    assert instance.methods_by_name["Decode"].server_streaming and instance.methods_by_name["FetchKv"].server_streaming
    many = instance.methods_by_name["GenerateMany"]
    assert many.server_streaming and many.client_streaming
    assert hasattr(scheduler_pb2_grpc, "SchedulerStub") and hasattr(instance_pb2_grpc, "InstanceStub")


def test_optional_fields_tell_absent_from_zero():
    request = scheduler_pb2.GenerateRequest(text="hi")
    assert not request.HasField("max_tokens") and not request.sampling.HasField("top_p")
    request.max_tokens = 0
    request.sampling.top_k = 0
    assert request.HasField("max_tokens") and request.sampling.HasField("top_k")
    assert request.WhichOneof("prompt") == "text"
    request.token_ids.ids.extend([1, 2])
    assert request.WhichOneof("prompt") == "token_ids"


def test_messages_round_trip():
    report = scheduler_pb2.InstanceReport(
        instance_id="i0", load=common_pb2.Load(num_running_requests=3, num_free_pages=7),
        events=[common_pb2.IndexEvent(kind=common_pb2.IndexEvent.INSERT, token_ids=[1, 2, 3, 4], page_size=4)])
    again = scheduler_pb2.InstanceReport.FromString(report.SerializeToString())
    assert again == report and again.events[0].kind == common_pb2.IndexEvent.INSERT


def test_control_plane_does_not_import_jax():
    code = ("import sys, jaxserve.scheduler, jaxserve.client, jaxserve.testing.fake_instance, "
            "jaxserve.scheduler.server; assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' == "
            "m.split('.')[0]); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
