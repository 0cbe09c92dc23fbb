"""The kv_pool policy (issue 18): per request, reuse the own copy (swapping in its host-tier part), pull a
peer's copy over the link, or recompute, weighed against queued work; the load guard stays. Checked against
hand-computed costs of the cost and transfer models."""

import pytest

from jaxserve.proto.v1 import common_pb2
from jaxserve.scheduler.cost_model import CostModel
from jaxserve.scheduler.kv_pool import KVPool, TransferModel
from jaxserve.scheduler.policies import LoadGuard, Locality, RouteRequest, make_policy
from jaxserve.scheduler.router import COLOCATED, PREFILL, DECODE, InstanceRecord, Router

PS = 4
COST = CostModel(fixed_s=1e-3, per_token_s=1e-4, attention_s=0.0)  # 0.1 ms per computed token
PREFIX = tuple(range(1, 1025))  # 1,024 cached tokens: 102.4 ms to recompute
PROMPT = PREFIX + tuple(range(5000, 5064))


def make(transfer=TransferModel(kv_bytes_per_token=1000, link_bytes_s=1e9, link_latency_s=1e-3,
                                host_bytes_s=1e9), n=3, role=COLOCATED, guard=LoadGuard(), peer_fetch=True):
    router = Router("locality", guard)
    records = [InstanceRecord(f"i{k}", "", role, PS, cost_model=COST) for k in range(n)]
    for r in records:
        router.add(r)
    router.set_policy(role, KVPool(guard, transfer=transfer, peer_fetch=peer_fetch))
    return router, records


def event(kind, tokens):
    return common_pb2.IndexEvent(kind=kind, token_ids=list(tokens), page_size=PS)


def test_idle_holder_runs_it_without_moving_anything():
    router, (a, b, c) = make()
    router.apply_event(a, event(common_pb2.IndexEvent.INSERT, PREFIX))
    d = router.route(PROMPT)
    assert d.instance is a and d.cached_tokens == 1024 and d.pull_from is None and d.transfer_s == 0


def test_busy_holder_is_a_source_the_routed_instance_pulls_from():
    router, (a, b, c) = make()
    router.apply_event(a, event(common_pb2.IndexEvent.INSERT, PREFIX))
    a.pending_prefill_s = 0.5  # its queue: longer than a pull (1 ms + 1 MB at 1 GB/s = 2 ms)
    c.pending_prefill_s = 0.01
    d = router.route(PROMPT)
    assert d.instance is b and d.pull_from is a and d.pull_tokens == 1024 and d.cached_tokens == 1024
    assert d.transfer_s == pytest.approx(1e-3 + 1024 * 1000 / 1e9)
    assert d.estimate_s == pytest.approx(COST.exec(len(PROMPT), 1024))
    # Plain locality, same state: waits in the holder's queue (0.5 s) or recomputes elsewhere, never pulls.
    loc = Locality().choose(RouteRequest(len(PROMPT)), [a, b, c], {"i0": 1024})
    assert loc is a


def test_slow_link_recomputes_instead_of_pulling():
    slow = TransferModel(kv_bytes_per_token=1000, link_bytes_s=1e6, link_latency_s=1e-3, host_bytes_s=1e9)
    router, (a, b, c) = make(slow)  # a pull of 1 MB takes a second: recompute (0.1 s) is cheaper
    router.apply_event(a, event(common_pb2.IndexEvent.INSERT, PREFIX))
    a.pending_prefill_s = 5.0
    d = router.route(PROMPT)
    assert d.instance in (b, c) and d.pull_from is None and d.cached_tokens == 0


def test_per_pair_link_overrides_the_default():
    tm = TransferModel(kv_bytes_per_token=1000, link_bytes_s=1e6, links=(("i0", "i2", 1e9, 0.0),))
    router, (a, b, c) = make(tm)
    router.apply_event(a, event(common_pb2.IndexEvent.INSERT, PREFIX))
    a.pending_prefill_s = 5.0
    d = router.route(PROMPT)  # only i0 -> i2 is fast
    assert d.instance is c and d.pull_from is a and d.transfer_s == pytest.approx(1024 * 1000 / 1e9)


def test_host_tier_copy_costs_its_swap_in():
    router, (a, b, c) = make(peer_fetch=False)
    router.apply_event(a, event(common_pb2.IndexEvent.INSERT, PREFIX))
    router.apply_event(a, event(common_pb2.IndexEvent.OFFLOAD, PREFIX[:512 + PS]))  # tokens 512.. on host
    assert router.trees[COLOCATED].match_tiers(PROMPT)["i0"] == (1024, 512)
    d = router.route(PROMPT)
    assert d.instance is a and d.cached_tokens == 1024 and d.host_tokens == 512
    assert d.transfer_s == pytest.approx(512 * 1000 / 1e9)
    # A PCIe slower than recompute: keep the device part, recompute the rest.
    router.set_policy(COLOCATED, KVPool(transfer=TransferModel(kv_bytes_per_token=1000, host_bytes_s=1e6),
                                        peer_fetch=False))
    d = router.route(PROMPT)
    assert d.instance is a and d.cached_tokens == 512 and d.host_tokens == 0


def test_load_guard_stays_but_the_guarded_holder_still_serves_pulls():
    router, (a, b, c) = make(guard=LoadGuard(1.0, 0.0))
    router.apply_event(a, event(common_pb2.IndexEvent.INSERT, PREFIX))
    a.in_flight_requests, b.in_flight_requests, c.in_flight_requests = 9, 0, 0
    d = router.route(PROMPT)
    assert d.instance is not a and d.pull_from is a and d.cached_tokens == 1024


def test_prefill_side_of_a_disaggregated_cluster_pulls_too():
    router = Router("locality")
    recs = [InstanceRecord(f"p{k}", "", PREFILL, PS, cost_model=COST) for k in range(2)] + \
        [InstanceRecord("d0", "", DECODE, PS, cost_model=COST)]
    for r in recs:
        router.add(r)
    router.set_policy(PREFILL, KVPool(transfer=TransferModel(kv_bytes_per_token=1000, link_bytes_s=1e9)))
    router.apply_event(recs[0], event(common_pb2.IndexEvent.INSERT, PREFIX))
    recs[0].pending_prefill_s = 1.0
    d = router.route(PROMPT)
    assert d.mode == "disaggregated" and d.prefill is recs[1] and d.pull_from is recs[0]
    assert d.prefill_cached_tokens == 1024


def test_served_kv_pool_is_host_tier_aware_without_peer_fetch():
    p = make_policy("kv_pool")
    assert isinstance(p, KVPool) and not p.peer_fetch


@pytest.mark.parametrize("bad", [dict(link_bytes_s=0), dict(host_bytes_s=-1), dict(link_latency_s=-1),
                                 dict(links=(("a", "b", 0.0, 0.0),)), dict(kv_bytes_per_token=0)])
def test_transfer_model_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="TransferModel"):
        TransferModel(**bad)
