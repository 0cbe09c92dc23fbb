"""The secret-recovery attack of issue 16 item 4, served: client A's prompt holds a secret digit; client B
probes every candidate and reads `usage.cached_tokens`. Without salts the right guess stands out (the
control: the attack is real); with different cache salts (the request's `cache_salt`, or the scheduler's
`salt_cache_by_api_key`) B sees exactly what it sees when no secret is cached at all, while A's own salt still
hits its cache, and every greedy answer equals the plain uncached run. Colocated and disaggregated
(caching2: the salt travels with the KV transfer), real engines (tiny random model) in process."""

import contextlib
import json

import pytest

pytest.importorskip("aiohttp")

from jaxserve import LLM, SamplingParams  # noqa: E402
from jaxserve.client import AsyncClient  # noqa: E402
from jaxserve.config import ModelConfig  # noqa: E402
from jaxserve.instance import InstanceConfig, InstanceServer  # noqa: E402
from jaxserve.scheduler import GlobalSchedulerConfig, ModelInfo, Scheduler  # noqa: E402
from jaxserve.scheduler.http_front import HttpFront  # noqa: E402
from test_http_front import raw, run  # noqa: E402

CFG = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=256,
                  eos_token_id=(257,))
PAGE = 8
FAST = dict(health_interval_s=0.2, health_timeout_s=2.0, unhealthy_after=3, no_instance_wait_s=30.0,
            shutdown_grace_s=0.0, profile_instances=False)
MAX_TOKENS = 3


def tiny(caching: bool, device: int) -> LLM:
    return LLM(model=CFG, page_size=PAGE, num_pages=128, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
               compilation_cache="off", enable_prefix_caching=caching, device_ids=[device])


@contextlib.asynccontextmanager
async def served(disaggregated: bool, api_keys=None, **config):
    scheduler = Scheduler(GlobalSchedulerConfig(port=0, **{**FAST, **config}), ModelInfo.byte_level(256))
    await scheduler.start()
    if disaggregated:
        roles = [("prefill", 0), ("decode", 1)]
    else:
        roles = [("colocated", 0)]
    servers = [await InstanceServer(tiny(True, dev).engine, InstanceConfig(
        role=role, pd_mode="caching2", scheduler_address=scheduler.address, instance_id=f"{role}-0",
        shutdown_grace_s=0)).start() for role, dev in roles]
    http = HttpFront(scheduler, port=0, api_key=api_keys)
    await http.start()
    try:
        yield scheduler, http
    finally:
        await http.stop()
        for s in servers:
            await s.stop(0)
        await scheduler.stop(0)


def prompts(tok):
    """(prefix, secret text, probe(guess)): the secret digit is the last token of the prefix's second page."""
    prefix = "The vault code"
    while len(tok.encode(prefix)) < 2 * PAGE - 1:
        prefix += "."
    assert len(tok.encode(prefix + "7")) == 2 * PAGE
    return prefix + "7 opens the door.", lambda guess: f"{prefix}{guess}, right?"


async def complete(http, prompt, key=None, salt=None):
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    if salt is not None:
        body["cache_salt"] = salt
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    code, r = await raw(http, "POST", "/v1/completions", data=json.dumps(body).encode(), headers=headers)
    assert code == 200, (code, r)
    return r["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0), r["choices"][0]["text"]


async def probe_all(http, probe, **who):
    return [(await complete(http, probe(d), **who))[0] for d in range(10)]


@pytest.mark.parametrize("disaggregated", [False, True])
def test_cached_tokens_reveal_nothing_across_salts_and_keys(disaggregated):
    ref = tiny(False, 2)
    tok = ModelInfo.byte_level(256).tokenizer

    def ref_ids(text):
        out = ref.generate([tok.encode(text)], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))[0]
        return tuple(out.token_ids)

    def want(text):
        """The uncached reference's greedy text (random bytes: the served stream drops a trailing partial UTF-8
        character where the offline decode shows U+FFFD)."""
        full = tok.decode(list(ref_ids(text)))
        return {full, full.rstrip("\ufffd")}

    async def body():
        secret, probe = prompts(tok)
        # Control: without salts the right guess stands out.
        async with served(disaggregated) as (scheduler, http):
            _, text = await complete(http, secret)
            assert text in want(secret)
            leaked = await probe_all(http, probe)
            assert leaked[7] == 2 * PAGE and all(c == PAGE for i, c in enumerate(leaked) if i != 7), leaked

        # Per-request salts: B sees what it sees with nothing cached; A's salt still hits.
        async with served(disaggregated) as (scheduler, http):
            fresh = await probe_all(http, probe, salt="mallory-before")
            _, text = await complete(http, secret, salt="alice")
            assert text in want(secret)
            assert await probe_all(http, probe, salt="mallory") == fresh
            assert await probe_all(http, probe) == fresh  # no salt at all
            cached, text = await complete(http, probe(7), salt="alice")
            assert cached == 2 * PAGE and text in want(probe(7))
            # gRPC takes the same field.
            async with AsyncClient(scheduler.address) as client:
                c = await client.generate(tok.encode(probe(7)), max_tokens=MAX_TOKENS, ignore_eos=True,
                                          cache_salt="mallory-grpc")
                assert c.usage.cached_tokens == 0 and c.token_ids == ref_ids(probe(7))
                c = await client.generate(tok.encode(probe(7)), max_tokens=MAX_TOKENS, ignore_eos=True,
                                          cache_salt="alice")
                assert c.usage.cached_tokens == 2 * PAGE and c.token_ids == ref_ids(probe(7))

        # salt_cache_by_api_key: B cannot reach A's cache whatever salt it sends, even A's own.
        async with served(disaggregated, api_keys=["key-alice", "key-mallory"],
                          salt_cache_by_api_key=True) as (scheduler, http):
            fresh = await probe_all(http, probe, key="key-mallory", salt="before")
            _, text = await complete(http, secret, key="key-alice")
            assert text in want(secret)
            assert await probe_all(http, probe, key="key-mallory") == fresh  # the same body salt as A's (none)
            assert await probe_all(http, probe, key="key-mallory", salt="again") == fresh
            cached, text = await complete(http, probe(7), key="key-alice")
            assert cached == 2 * PAGE and text in want(probe(7))
            code, _ = await raw(http, "POST", "/v1/completions", body={"prompt": "x"})
            assert code == 401
    run(body(), timeout=600)
