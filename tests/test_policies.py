"""Routing policies and the router, without servers: locality, its load guard, least_load, round_robin,
session, disaggregated picks, instance removal, and the cost model fit."""

import pytest

from jaxserve.proto.v1 import common_pb2
from jaxserve.scheduler.cost_model import CostModel, profile_points
from jaxserve.scheduler.policies import MISS_WEIGHT, LoadGuard, Locality, RouteRequest, make_policy
from jaxserve.scheduler.router import COLOCATED, DECODE, PREFILL, InstanceRecord, Router

PS = 4
INSERT = common_pb2.IndexEvent.INSERT
EVICT = common_pb2.IndexEvent.EVICT
CLEAR = common_pb2.IndexEvent.CLEAR


def make_router(policy, n=4, role=COLOCATED, mode="auto", guard=LoadGuard()):
    router = Router(policy, guard, mode)
    records = [InstanceRecord(f"{role}-{k}", f"127.0.0.1:{k}", role, PS) for k in range(n)]
    for r in records:
        router.add(r)
    return router, records


def event(kind, tokens=()):
    return common_pb2.IndexEvent(kind=kind, token_ids=list(tokens), page_size=PS)


def prompt(prefix, n_new, start=1000):
    return tuple(prefix) + tuple(range(start, start + n_new))


SYSTEM = tuple(range(1, 257))  # a 256-token shared prefix


def test_locality_routes_to_the_instance_holding_the_prefix():
    router, recs = make_router("locality")
    router.apply_event(recs[2], event(INSERT, SYSTEM))
    decision = router.route(prompt(SYSTEM, 20))
    assert decision.instance is recs[2] and decision.cached_tokens == 256
    # Without a shared prefix, any instance (all idle) will do; the prediction is 0.
    assert router.route(prompt((), 50, start=5000)).cached_tokens == 0


def test_locality_weighs_cached_prefix_against_queued_work():
    router, recs = make_router("locality", n=2)
    for r in recs:
        r.cost_model = CostModel(fixed_s=0.0, per_token_s=1e-3, attention_s=0.0)
    router.apply_event(recs[0], event(INSERT, SYSTEM))
    p = prompt(SYSTEM, 44)  # 300 tokens: 0.044 s on recs[0], 0.3 s on recs[1]
    # recs[1] also pays MISS_WEIGHT x the 0.256 s it would recompute: 0.3 + 10 x 0.256 = 2.86 s.
    assert MISS_WEIGHT == 10.0
    recs[0].pending_prefill_s = 2.5
    assert router.route(p).instance is recs[0]   # 2.544 < 2.86 / 1.1
    recs[0].pending_prefill_s = 3.2
    assert router.route(p).instance is recs[1]   # 3.244 > 2.86 * 1.1
    # Weight 0 is greedy TTFT: the queue beats the cache as soon as 0.2 + 0.044 > 0.3 fails.
    greedy = Locality(miss_weight=0.0)
    recs[0].pending_prefill_s = 0.2
    assert greedy.choose(RouteRequest(300), recs, {recs[0].instance_id: 256}) is recs[0]
    recs[0].pending_prefill_s = 0.5
    assert greedy.choose(RouteRequest(300), recs, {recs[0].instance_id: 256}) is recs[1]
    with pytest.raises(ValueError, match="miss_weight"):
        Locality(miss_weight=-1)


def test_load_guard_spreads_a_hot_prefix():
    guard = LoadGuard(factor=1.5, slack=2)
    router, recs = make_router("locality", guard=guard)
    router.apply_event(recs[0], event(INSERT, SYSTEM))
    picks = []
    for k in range(40):
        # Requests stay in flight (long decodes): their prefill is done, so only the guard sees them.
        d = router.route(prompt(SYSTEM, 10, start=2000 + 10 * k))
        d.instance.in_flight_requests += 1
        picks.append(d.instance.instance_id)
    loads = [r.in_flight_requests for r in recs]
    mean = sum(loads) / len(loads)
    assert max(loads) <= guard.factor * mean + guard.slack + 1, loads
    assert loads[0] == max(loads) and min(loads) > 0, loads
    # The first requests all go to the holder, until the guard kicks in.
    assert picks[:3] == [recs[0].instance_id] * 3


def test_without_guard_a_hot_prefix_piles_up():
    # Sanity check of the test above: a huge factor disables the guard and everything lands on recs[0].
    router, recs = make_router("locality", guard=LoadGuard(factor=1e9, slack=1e9))
    router.apply_event(recs[0], event(INSERT, SYSTEM))
    for k in range(20):
        router.route(prompt(SYSTEM, 10, start=2000 + 10 * k)).instance.in_flight_requests += 1
    assert recs[0].in_flight_requests == 20


def test_least_load_picks_the_fewest_requests_and_rotates_ties():
    router, recs = make_router("least_load")
    for r, load in zip(recs, (3, 1, 1, 2)):
        r.in_flight_requests = load
    picks = {router.route(prompt((), 8)).instance.instance_id for _ in range(4)}
    assert picks == {recs[1].instance_id, recs[2].instance_id}
    recs[1].in_flight_requests = recs[2].in_flight_requests = 5
    assert router.route(prompt((), 8)).instance is recs[3]


def test_round_robin_cycles_and_ignores_the_tree():
    router, recs = make_router("round_robin")
    router.apply_event(recs[0], event(INSERT, SYSTEM))
    picks = [router.route(prompt(SYSTEM, 4)).instance for _ in range(8)]
    assert picks == recs + recs


def test_session_affinity_until_the_guard_says_no():
    router, recs = make_router("session")
    first = router.route(prompt((), 8), session_id="s1").instance
    # Another instance now holds a better prefix, but the session stays where it is.
    other = next(r for r in recs if r is not first)
    router.apply_event(other, event(INSERT, SYSTEM))
    for _ in range(3):
        assert router.route(prompt(SYSTEM, 8), session_id="s1").instance is first
    # A new session goes by locality.
    assert router.route(prompt(SYSTEM, 8), session_id="s2").instance is other
    # The owner overloaded: the session moves.
    first.in_flight_requests = 50
    moved = router.route(prompt((), 8), session_id="s1").instance
    assert moved is not first
    first.in_flight_requests = 0
    assert router.route(prompt((), 8), session_id="s1").instance is moved
    # The owner leaves: its sessions are forgotten.
    router.remove(moved.instance_id)
    assert router.route(prompt((), 8), session_id="s1").instance is not moved


def test_removed_instance_takes_its_entries_and_is_never_picked():
    router, recs = make_router("locality")
    router.apply_event(recs[1], event(INSERT, SYSTEM))
    router.remove(recs[1].instance_id)
    assert router.trees[COLOCATED].match(SYSTEM) == {}
    assert all(router.route(prompt(SYSTEM, 8)).instance is not recs[1] for _ in range(8))


def test_index_events_evict_and_clear():
    router, recs = make_router("locality", n=2)
    router.apply_event(recs[0], event(INSERT, SYSTEM))
    router.apply_event(recs[0], event(EVICT, SYSTEM[:128]))
    assert router.trees[COLOCATED].match(SYSTEM) == {recs[0].instance_id: 124}
    router.apply_event(recs[0], event(CLEAR))
    assert router.trees[COLOCATED].match(SYSTEM) == {}
    with pytest.raises(ValueError, match="page_size"):
        router.apply_event(recs[0], common_pb2.IndexEvent(kind=INSERT, token_ids=SYSTEM, page_size=8))


def test_unroutable_instances_are_skipped_and_none_when_nobody_is_left():
    router, recs = make_router("least_load", n=2)
    recs[0].state = 2  # SUSPECT
    assert all(router.route(prompt((), 8)).instance is recs[1] for _ in range(3))
    assert router.route(prompt((), 8), exclude={recs[1].instance_id}) is None


def test_page_size_must_agree_within_a_role():
    router, _ = make_router("locality", n=1)
    with pytest.raises(ValueError, match="page_size"):
        router.add(InstanceRecord("other", "127.0.0.1:9", COLOCATED, PS * 2))
    router.add(InstanceRecord("prefill", "127.0.0.1:9", PREFILL, PS * 2))  # another role, another tree


def test_disaggregated_picks_prefill_by_prefill_tree_and_decode_by_decode_tree():
    router = Router("locality")
    prefills = [InstanceRecord(f"p{k}", f"a{k}", PREFILL, PS) for k in range(2)]
    decodes = [InstanceRecord(f"d{k}", f"b{k}", DECODE, PS) for k in range(2)]
    for r in prefills + decodes:
        router.add(r)
    router.apply_event(prefills[1], event(INSERT, SYSTEM))
    turn1 = prompt(SYSTEM, 40)
    router.apply_event(decodes[0], event(INSERT, turn1))  # d0 holds the session's KV
    d = router.route(prompt(turn1, 12, start=7000), session_id="s")
    assert d.mode == "disaggregated"
    assert d.prefill is prefills[1] and d.prefill_cached_tokens == 256
    assert d.instance is decodes[0] and d.cached_tokens == 296
    # ... if its load allows.
    decodes[0].in_flight_requests = 50
    assert router.route(prompt(turn1, 12, start=7000)).instance is decodes[1]
    # A colocated instance wins in auto mode; mode="disaggregated" keeps the pair.
    router.add(InstanceRecord("c0", "c", COLOCATED, PS))
    assert router.route(turn1).mode == "colocated"
    router.mode = "disaggregated"
    assert router.route(turn1).mode == "disaggregated"


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="locality, least_load, round_robin, session"):
        make_policy("random")


def test_cost_model_fit_recovers_the_profile():
    truth = CostModel(fixed_s=3e-3, per_token_s=2e-5, attention_s=4e-9)
    samples = [(p, c, truth.exec(p, c)) for p, c in profile_points(4096)]
    fitted = CostModel.fit(samples)
    for p, c in [(100, 0), (1000, 900), (4000, 0)]:
        assert fitted.exec(p, c) == pytest.approx(truth.exec(p, c), rel=1e-6)
    # Negative slopes (noise) are clamped: coefficients stay >= 0.
    noisy = CostModel.fit([(10, 0, 0.5), (1000, 0, 0.1), (2000, 0, 0.05)])
    assert min(noisy.fixed_s, noisy.per_token_s, noisy.attention_s) >= 0
    assert CostModel().exec(100, 90) < CostModel().exec(100, 0)


def test_locality_treats_near_equal_estimates_as_a_tie():
    """Two idle instances whose fitted models differ by 3%: requests alternate instead of all going to the
    one that profiled faster; 30% apart, the faster one wins."""
    router, recs = make_router("locality", n=2)
    recs[0].cost_model = CostModel(fixed_s=0.0, per_token_s=1.00e-3, attention_s=0.0)
    recs[1].cost_model = CostModel(fixed_s=0.0, per_token_s=1.03e-3, attention_s=0.0)
    picks = [router.route(prompt((), 100, start=1000 * k)).instance.instance_id for k in range(6)]
    assert picks.count(recs[0].instance_id) == picks.count(recs[1].instance_id) == 3
    recs[1].cost_model = CostModel(fixed_s=0.0, per_token_s=1.3e-3, attention_s=0.0)
    assert {router.route(prompt((), 100, start=9000 + k)).instance.instance_id for k in range(4)} == \
        {recs[0].instance_id}
