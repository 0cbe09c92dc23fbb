"""The jax-free parts of jaxserve/launch/validate_sim_kvpool.py: the two phases of the workload, the robust link
fit, and the simulator side end to end on a made-up real run (no cluster)."""

import json
import random

from absl import flags

from jaxserve.bench import workloads
from jaxserve.launch import validate_sim_kvpool as v


def test_phases_keep_shapes_and_arrivals_but_not_tokens():
    wl = workloads.long_doc_qa(num_docs=3, questions_per_doc=2, doc_mean=100, seed=0)
    a = v.phase(wl, "fit", v.FIT_NS, 0.0, rate=4.0, seed=0)
    b = v.phase(wl, "val", v.VAL_NS, 10.0, rate=4.0, seed=0)
    for s, x, y in zip(wl.sessions, a.sessions, b.sessions):
        assert x.session_id == "fit-" + s.session_id and y.session_id == "val-" + s.session_id
        segs = [s.prompt_segments(0), x.prompt_segments(0), y.prompt_segments(0)]
        assert [g.length for g in segs[0]] == [g.length for g in segs[1]] == [g.length for g in segs[2]]
        assert wl.tokens(segs[1]) != wl.tokens(segs[2])
        assert y.arrival_s == x.arrival_s + 10.0
    assert [s.arrival_s for s in a.sessions] == workloads.poisson_arrivals(wl, 4.0, 0)
    # Questions of one document share its tokens within a phase (the prefix structure is kept).
    docs = {}
    for s in b.sessions:
        docs.setdefault(s.session_id.split("-")[1], set()).add(tuple(wl.tokens(s.prefix)))
    assert all(len(t) == 1 for t in docs.values())


def test_theil_sen_ignores_an_outlier():
    xs = [1e6, 1.5e6, 2e6, 1e6, 2e6, 1.5e6]
    ys = [0.01 + x / 1e8 for x in xs]
    ys[1] = 0.8  # a pull that waited on a compilation
    lat, bw = v.theil_sen(xs, ys)
    assert abs(lat - 0.01) < 1e-6 and abs(bw / 1e8 - 1) < 1e-6
    lat, bw = v.theil_sen([1e6, 2e6], [0.05, 0.04])  # no size effect: all latency
    assert bw >= 1e11 and 0.04 <= lat <= 0.05


def test_sim_side_on_a_made_up_run(tmp_path):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["x", "--num_docs=6", "--questions_per_doc=2", f"--out={tmp_path}"])
    try:
        wl = v.base_workload()
        rng = random.Random(0)

        def records(tag):
            out = []
            for s in wl.sessions:
                p = sum(g.length for g in s.prompt_segments(0))
                out.append(dict(request_id=f"r-{tag}-{s.session_id}", session_id=f"{tag}-{s.session_id}", ok=True,
                                arrival_s=0.0, prompt_tokens=p, cached_tokens=p // 2, output_tokens=8,
                                ttft_s=0.05 + 0.02 * rng.random(), server_ttft_s=0.045, jct_s=0.08, kv_bytes=None))
            return out
        profile = [dict(kind="prefill", prompt_len=n, cached_len=int(n * f), seconds=2e-3 + n * (1 - f) * 4e-5)
                   for n in (32, 128, 512, 1000) for f in (0, 0.5, 0.875)]
        pushes = [dict(t=0, seconds=0.02 + k * 1e-3, ok=True, request_id="x", tokens=100 * k, bytes=204800 * k)
                  for k in range(1, 4)]
        real = dict(host_copy=dict(samples=[], latency_s=1e-4, bytes_s=5e9, page_bytes=32768), profile=profile,
                    routing_cost_model=dict(fixed_s=2e-3, per_token_s=4e-5, attention_s=0.0),
                    phases={t: dict(start_s=0.0 if t == "fit" else 5.0, records=records(t), host_tokens_planned=64,
                                    pulls_planned=3, pushes=pushes, stats={}) for t in ("fit", "val")})
        path = tmp_path / "real.json"
        path.write_text(json.dumps(real))
        flags.FLAGS.real = str(path)
        v.main([])
        res = json.loads((tmp_path / "validate.json").read_text())
        assert set(res["same_window"]) == {"fit", "val"}
        for variant in res["variants"].values():
            for tag in ("fit", "val"):
                sim = variant["rows"][tag]["sim"]
                assert sim["requests"] == wl.num_requests
                assert abs(sim["device"] + sim["host"] + sim["peer"] - sim["hit"]) < 1e-9
        no_host = next(r for k, r in res["variants"].items() if k.endswith("without host tier"))
        assert no_host["rows"]["val"]["sim"]["host"] == 0
    finally:
        flags.FLAGS.unparse_flags()
