"""Peer fetch when disaggregated (issue 18), and the scheduler's measured link model. Two prefill instances
(PD-Caching-2, peer fetch) and one decode instance in one process: a prefix prefilled on one prefill instance;
that instance made busy; the next request for it goes to the other prefill instance, which first pulls the
prefix from the holder (PushKv), prefills only the rest and sends the KV on to the decode instance. Greedy
tokens equal the plain uncached run; no page left held anywhere. The pull's timing feeds `MeasuredLinks`,
whose fit is checked on its own against known link parameters."""

import asyncio

import pytest

from jaxserve import SamplingParams
from jaxserve.instance import InstanceConfig
from jaxserve.scheduler.kv_pool import MeasuredLinks, TransferModel
from jaxserve.scheduler.router import PREFILL
from test_peer_fetch_served import busy, clean, eventually, kv_pool_cluster, stats, tiny


def pd_cluster():
    return kv_pool_cluster([(name, dict(role=role, pd_mode="caching2", peer_fetch=role == "prefill",
                                        kv_transfer_timeout_s=5))
                            for name, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"))])


def test_prefill_instance_pulls_the_busy_holders_prefix():
    prefix = [(3 * i + 11) % 251 + 1 for i in range(64)]  # 8 pages
    first, second = prefix + [4, 5, 6], prefix + [9, 8, 7, 6, 5]
    ref = tiny(False, 3).generate([first, second], SamplingParams(max_tokens=6, ignore_eos=True))

    async def body():
        async with pd_cluster() as (scheduler, servers, client):
            out = await client.generate(first, max_tokens=6, ignore_eos=True, timeout_s=60)
            assert list(out.token_ids) == list(ref[0].token_ids)
            holder = "p0" if (await stats(servers["p0"].address)).cached_pages >= 8 else "p1"
            other = "p1" if holder == "p0" else "p0"

            async def indexed():
                return scheduler.router.trees[PREFILL].match(tuple(prefix)).get(holder, 0) >= 64
            await eventually(indexed, what="the prefix in the scheduler's prefill prompt tree")
            busy(scheduler, holder)
            out = await client.generate(second, max_tokens=6, ignore_eos=True, timeout_s=60)
            assert list(out.token_ids) == list(ref[1].token_ids)
            sh, so = await stats(servers[holder].address), await stats(servers[other].address)
            assert sh.kv_peer_sent_tokens == 64 and sh.kv_peer_push_failures == 0
            assert so.kv_received_tokens == 64 and so.kv_received_bytes == sh.kv_peer_sent_bytes
            assert scheduler.core.peer_fetch == dict(tokens=64, bytes=sh.kv_peer_sent_bytes, failures=0)
            assert scheduler.core.instances.links.samples[-1][:2] == (64, sh.kv_peer_sent_bytes)
            for s in servers.values():
                await eventually(lambda: clean(s.address), what=f"{s.instance_id} clean")
                s.engine.pool.check_invariants()
    asyncio.run(asyncio.wait_for(body(), 240))


def test_decode_instances_do_not_take_peer_fetch():
    with pytest.raises(ValueError, match="colocated and prefill"):
        InstanceConfig(role="decode", pd_mode="caching2", peer_fetch=True)
    with pytest.raises(ValueError, match="caching1-3"):
        InstanceConfig(role="prefill", pd_mode="basic", peer_fetch=True)


def test_measured_links_fit_latency_and_bandwidth():
    configured = TransferModel(kv_bytes_per_token=100.0, link_bytes_s=1e12, link_latency_s=1e-4)
    links = MeasuredLinks(configured)
    assert links.observe(16, 2048 * 16, 0.05) is configured  # too few pulls: the configured model
    lat, bw = 0.02, 1e8  # the true link
    for tokens in (16, 64, 256, 32, 128):
        model = links.observe(tokens, 2048 * tokens, lat + 2048 * tokens / bw)
    links.observe(64, 2048 * 64, 5.0)  # one pull stalled behind a busy holder: the median shrugs it off
    model = links.model()
    assert model.kv_bytes_per_token == pytest.approx(2048)
    assert model.link_latency_s == pytest.approx(lat, rel=0.05)
    assert model.link_bytes_s == pytest.approx(bw, rel=0.05)
    assert model.pull_s("a", "b", 100) == pytest.approx(lat + 2048 * 100 / bw, rel=0.05)
    # Pulls all of one size: no slope to fit; the configured bandwidth stays, the latency is measured.
    same = MeasuredLinks(configured)
    for s in (0.03, 0.031, 0.029):
        same.observe(64, 6400, s)
    assert same.model().link_bytes_s == configured.link_bytes_s
    assert same.model().link_latency_s == pytest.approx(0.03, abs=1e-3)
