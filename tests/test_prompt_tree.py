"""Global prompt tree: insert / evict / remove-instance / match against a brute-force model, and match cost
that follows the prompt, not the tree."""

import random
import time

from hypothesis import given, settings, strategies as st

from jaxserve.scheduler.prompt_tree import PromptTree

PS = 2
INSTANCES = ("a", "b", "c")


class BruteForce:
    """Each instance's set of held page-aligned prefixes."""

    def __init__(self):
        self.held = {i: set() for i in INSTANCES}

    def insert(self, i, seq):
        n = len(seq) // PS
        self.held[i].update(tuple(seq[:k * PS]) for k in range(1, n + 1))

    def evict(self, i, seq):
        n = len(seq) // PS * PS
        if n:
            prefix = tuple(seq[:n])
            self.held[i] = {p for p in self.held[i] if not (len(p) >= n and p[:n] == prefix)}

    def remove(self, i):
        self.held[i] = set()

    def match(self, query):
        out = {}
        for i, prefixes in self.held.items():
            best = max((k * PS for k in range(1, len(query) // PS + 1) if tuple(query[:k * PS]) in prefixes),
                       default=0)
            if best:
                out[i] = best
        return out


tokens = st.lists(st.integers(0, 2), max_size=12)
ops = st.one_of(
    st.tuples(st.just("insert"), st.sampled_from(INSTANCES), tokens),
    st.tuples(st.just("evict"), st.sampled_from(INSTANCES), tokens),
    st.tuples(st.just("remove"), st.sampled_from(INSTANCES), st.just([])),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=40), st.lists(tokens, min_size=1, max_size=6))
def test_tree_matches_brute_force(operations, queries):
    tree, model = PromptTree(PS), BruteForce()
    for op, inst, seq in operations:
        if op == "insert":
            tree.insert(inst, seq)
            model.insert(inst, seq)
        elif op == "evict":
            tree.evict(inst, seq)
            model.evict(inst, seq)
        else:
            tree.remove_instance(inst)
            model.remove(inst)
        tree.check_invariants()
        for i in INSTANCES:
            assert tree.held_tokens(i) == len(model.held[i]) * PS
        assert tree.num_tokens == len(set().union(*model.held.values())) * PS
        for q in queries + [seq]:
            assert tree.match(q) == model.match(q), (op, inst, seq, q)


def test_insert_split_and_evict_by_hand():
    tree = PromptTree(4)
    assert tree.insert("a", list(range(10))) == 8  # the partial page is ignored
    assert tree.insert("b", [0, 1, 2, 3, 9, 9, 9, 9]) == 8
    assert tree.match([0, 1, 2, 3, 4, 5, 6, 7, 8]) == {"a": 8, "b": 4}
    assert tree.match([0, 1, 2, 3, 9, 9, 9, 9]) == {"a": 4, "b": 8}
    assert tree.match([1, 2, 3, 4]) == {}
    # a evicts its second page; b is untouched.
    assert tree.evict("a", [0, 1, 2, 3, 4, 5, 6, 7]) == 4
    assert tree.match([0, 1, 2, 3, 4, 5, 6, 7]) == {"a": 4, "b": 4}
    # evicting a page a does not hold changes nothing.
    assert tree.evict("a", [0, 1, 2, 3, 9, 9, 9, 9]) == 0
    tree.remove_instance("b")
    assert tree.match([0, 1, 2, 3, 9, 9, 9, 9]) == {"a": 4}
    tree.check_invariants()
    assert tree.instances() == {"a"}
    tree.remove_instance("a")
    assert tree.num_nodes == 0 and tree.num_tokens == 0


def test_compaction_undoes_splits():
    tree = PromptTree(1)
    tree.insert("a", [1, 2, 3, 4])
    tree.insert("b", [1, 2])
    assert tree.num_nodes == 2
    tree.remove_instance("b")
    assert tree.num_nodes == 1
    tree.check_invariants()


def _random_tree(num_sequences, seq_len, page_size, system, rng):
    tree = PromptTree(page_size)
    for k in range(num_sequences):
        tail = [rng.randrange(32000) for _ in range(seq_len - len(system))]
        tree.insert(f"i{k % 64}", system + tail)
    return tree


def test_match_cost_follows_the_prompt_not_the_tree():
    rng = random.Random(0)
    page_size, seq_len = 16, 2048
    system = [rng.randrange(32000) for _ in range(256)]
    small = _random_tree(8, seq_len, page_size, system, rng)
    big = _random_tree(800, seq_len, page_size, system, rng)
    assert big.num_tokens > 1_000_000
    query = system + [rng.randrange(32000) for _ in range(seq_len - len(system))]
    small.insert("i0", query)
    big.insert("i0", query)

    def cost(tree):
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(20):
                tree.match(query)
            best = min(best, time.perf_counter() - t)
        return best, tree.nodes_visited

    t_small, visited_small = cost(small)
    t_big, visited_big = cost(big)
    # Nodes walked: bounded by the prompt's pages, and the same for both trees (shared prefix + divergence).
    assert visited_small == visited_big <= seq_len // page_size
    assert big.match(query)["i0"] == seq_len
    # 100x more sequences: the time must not follow (generous bound for a noisy 2-core machine).
    assert t_big < 5 * t_small + 1e-3, (t_small, t_big)
