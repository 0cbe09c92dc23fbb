"""Tenant isolation of the prefix cache (issue 16 item 4, vLLM's `cache_salt`): requests with different salts
never share KV, in the engine's index (offline, colocated and disaggregated) and in the scheduler's prompt
trees; the same salt shares as before; greedy tokens equal the plain uncached run. The served attack (a
client recovering another's secret from `usage.cached_tokens`) is in tests/test_cache_salt_served.py."""

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.cache_salt import SALTED_TOKENS, VOCAB_LIMIT, salt_tokens
from jaxserve.config import ModelConfig
from jaxserve.scheduler.prompt_tree import PromptTree

CFG = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=256,
                  eos_token_id=(257,))
PAGE = 8
GREEDY = SamplingParams(max_tokens=4, ignore_eos=True)


def make_llm(**kw):
    opts = dict(page_size=PAGE, num_pages=128, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
                compilation_cache="off")
    opts.update(kw)
    return LLM(model=CFG, **opts)


def test_salted_tokens_keep_length_never_collide_with_real_ids_and_differ_by_salt():
    toks = list(range(40))
    assert salt_tokens(toks, "") is toks
    a, b = salt_tokens(toks, "tenant-a"), salt_tokens(toks, "tenant-b")
    assert len(a) == len(b) == len(toks)
    assert all(t < 0 for t in a[:SALTED_TOKENS]) and a[SALTED_TOKENS:] == toks[SALTED_TOKENS:]
    assert all(-2**31 <= t for t in a)  # fits the int32 token ids of index events
    assert a[:SALTED_TOKENS] != b[:SALTED_TOKENS] and a == salt_tokens(toks, "tenant-a")
    # Injective in the tokens: one changed token changes its salted id.
    c = salt_tokens([1] + toks[1:], "tenant-a")
    assert c[0] != a[0] and c[1:] == a[1:]
    with pytest.raises(ValueError, match="ids must be in"):
        salt_tokens([VOCAB_LIMIT], "x")


def test_scheduler_prompt_tree_separates_salts():
    tree = PromptTree(4)
    prompt = tuple(range(1, 33))
    tree.insert("i0", salt_tokens(prompt, "a"))
    assert tree.match(tuple(salt_tokens(prompt, "a"))).get("i0") == 32
    assert tree.match(tuple(salt_tokens(prompt, "b"))).get("i0", 0) == 0
    assert tree.match(prompt).get("i0", 0) == 0


@pytest.mark.parametrize("disaggregated", [False, True])
def test_different_salts_never_share_and_same_salt_does(disaggregated):
    extra = dict(disaggregated=True, prefill_devices=[0], decode_devices=[1], pd_mode="caching2") \
        if disaggregated else {}
    llm = make_llm(**extra)
    ref = make_llm(enable_prefix_caching=False)
    secret = [65 + (i * 7) % 26 for i in range(40)]
    probe = secret[:32] + [3, 4, 5]

    def run(prompt, salt=None):
        p = {"prompt_token_ids": prompt} if salt is None else {"prompt_token_ids": prompt, "cache_salt": salt}
        return llm.generate([p], GREEDY)[0]

    first = run(secret, "alice")
    assert first.num_cached_tokens == 0
    others = [run(probe, "mallory"), run(probe)]  # another salt, and no salt at all
    assert [o.num_cached_tokens for o in others] == [0, 0]
    same = run(probe, "alice")
    assert same.num_cached_tokens == 32
    others.append(run(probe, ""))  # an empty salt is no salt: it shares with the unsalted probe
    assert others[-1].num_cached_tokens == 32
    want = ref.generate([secret, probe], GREEDY)
    assert first.token_ids == want[0].token_ids
    assert all(o.token_ids == want[1].token_ids for o in (*others, same))
    with pytest.raises(ValueError, match="exactly one of"):
        llm.generate([{"prompt": "x", "prompt_token_ids": [1]}], GREEDY)
