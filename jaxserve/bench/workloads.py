"""Deterministic, seeded benchmark workloads (no jax).

A workload is a list of sessions. A session has a shared `prefix` (system prompt, few-shot examples, a long
document), then turns; turn k's prompt is

    prefix + (user_0 + answer_0) + ... + (user_{k-1} + answer_{k-1}) + user_k      (carry_history=True)
    prefix + user_k                                                             (carry_history=False)

where answer_j is whatever the server generated for turn j (exactly `output_len` tokens: requests are sent
with ignore_eos). Prompts are built from `Segment`s: a segment is `length` tokens of a fixed pseudo-random
block named by `key`, so the same key always gives the same tokens (shared prefixes share keys), and the
simulator can reason about sharing without materialising tokens.

Generators: `shared_prefix` (SGLang's generated-shared-prefix), `multi_turn` (ShareGPT-like lengths),
`react` (fixed few-shot prefix + growing thought/action/observation steps), `long_doc_qa` (LooGLE-like),
`trace` (Mooncake-format replay: hash id -> fixed pseudo-random 512-token block, lengths scaled)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
from pathlib import Path
from typing import Callable, Sequence

DEFAULT_TRACE = Path(__file__).resolve().parents[3] / "shared" / "data" / "traces" / "mooncake_synthetic_trace.jsonl"
TRACE_BLOCK = 512            # tokens per hash id in the Mooncake trace
_TRACE_NAMESPACE = 0x7ACE    # trace blocks depend on the hash id only, not on the workload seed
ANSWER_KEY_BASE = 1 << 48    # keys of simulated answers (the simulator's stand-in for generated tokens)


@dataclasses.dataclass(frozen=True)
class Segment:
    """`length` tokens: the first `length` of the block `key` (a block is `full` tokens, >= length)."""

    key: int
    length: int
    full: int = 0            # 0: the block is exactly `length` tokens
    namespace: int = 0       # 0: the workload's seed; else a fixed namespace (trace blocks)

    @property
    def block_len(self) -> int:
        return max(self.full, self.length)


@dataclasses.dataclass(frozen=True)
class Turn:
    user: tuple[Segment, ...]
    output_len: int
    think_s: float = 0.0     # pause after the previous answer before this turn is sent


@dataclasses.dataclass(frozen=True)
class Session:
    session_id: str
    prefix: tuple[Segment, ...]
    turns: tuple[Turn, ...]
    carry_history: bool = True
    arrival_s: float | None = None   # fixed arrival (trace replay); None: the load generator draws one

    def prompt_segments(self, k: int, answers: Sequence[Segment] | None = None) -> list[Segment]:
        """Segments of turn k's prompt; `answers[j]` stands for turn j's answer (default: a simulated
        answer segment of output_len tokens)."""
        segs = list(self.prefix)
        if self.carry_history:
            for j in range(k):
                segs += self.turns[j].user
                segs.append(answers[j] if answers is not None else answer_segment(self.session_id, j,
                                                                                    self.turns[j].output_len))
        segs += self.turns[k].user
        return segs


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    sessions: tuple[Session, ...]
    seed: int
    vocab_size: int
    description: str = ""

    @property
    def num_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)

    def prompt_lengths(self) -> list[int]:
        """Prompt tokens of every request, assuming every answer has its full output_len."""
        out = []
        for s in self.sessions:
            for k in range(len(s.turns)):
                out.append(sum(seg.length for seg in s.prompt_segments(k)))
        return out

    def max_context(self) -> int:
        """Longest prompt + output of any request."""
        best = 0
        for s in self.sessions:
            for k, t in enumerate(s.turns):
                best = max(best, sum(seg.length for seg in s.prompt_segments(k)) + t.output_len)
        return best

    def tokens(self, segments: Sequence[Segment]) -> list[int]:
        out: list[int] = []
        for seg in segments:
            out += segment_tokens(seg, self.seed, self.vocab_size)
        return out

    def summary(self) -> dict:
        lens = self.prompt_lengths()
        outs = [t.output_len for s in self.sessions for t in s.turns]
        return dict(name=self.name, sessions=len(self.sessions), requests=len(lens),
                    mean_prompt=sum(lens) / len(lens), max_prompt=max(lens), mean_output=sum(outs) / len(outs))


def answer_segment(session_id: str, turn: int, length: int) -> Segment:
    """The simulator's stand-in for turn `turn`'s generated answer: unique per (session, turn)."""
    return Segment(ANSWER_KEY_BASE + (_stable_hash(session_id) << 8) + turn, length)


def _stable_hash(text: str) -> int:
    h = 1469598103934665603
    for b in text.encode():
        h = ((h ^ b) * 1099511628211) & ((1 << 40) - 1)
    return h


@functools.lru_cache(maxsize=4096)
def _block(key: int, namespace: int, length: int, vocab: int) -> tuple[int, ...]:
    rng = random.Random(namespace * 1_000_003 ^ key * 7_919 ^ (key << 20))
    return tuple(rng.randrange(vocab) for _ in range(length))


def segment_tokens(seg: Segment, seed: int, vocab: int) -> tuple[int, ...]:
    ns = seg.namespace or (seed + 1)
    return _block(seg.key, ns, seg.block_len, vocab)[:seg.length]


# -------------------------------------------------------------------------------------------- helpers
class _Keys:
    def __init__(self):
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return self.n


def _lognormal(rng: random.Random, mean: float, sigma: float, lo: int, hi: int) -> int:
    mu = math.log(mean) - sigma * sigma / 2
    return int(min(max(round(rng.lognormvariate(mu, sigma)), lo), hi))


def _scaled(n: float, scale: float, lo: int = 1) -> int:
    return max(lo, int(round(n * scale)))


# ------------------------------------------------------------------------------------------ generators
def shared_prefix(num_groups: int = 8, prompts_per_group: int = 8, system_len: int = 2048, question_len: int = 128,
                  output_len: int = 256, scale: float = 1.0, seed: int = 0, vocab_size: int = 256) -> Workload:
    """SGLang's generated-shared-prefix: groups of prompts sharing one system prompt, each prompt a
    system prompt + its own question; single turn; shuffled."""
    rng, key = random.Random(seed), _Keys()
    sessions = []
    for g in range(num_groups):
        system = Segment(key(), _scaled(system_len, scale))
        for p in range(prompts_per_group):
            q = Segment(key(), _scaled(question_len, scale))
            sessions.append(Session(f"sp{g}-{p}", (system,), (Turn((q,), _scaled(output_len, scale)),)))
    rng.shuffle(sessions)
    return Workload("shared_prefix", tuple(sessions), seed, vocab_size,
                    f"{num_groups} groups x {prompts_per_group} prompts, system {system_len}, question "
                    f"{question_len}, output {output_len}, scale {scale:g}")


def multi_turn(num_sessions: int = 32, mean_turns: float = 4.0, max_turns: int = 12, user_mean: float = 120,
               output_mean: float = 240, max_len: int = 1024, system_len: int = 0, think_s: float = 0.0,
               scale: float = 1.0, seed: int = 0, vocab_size: int = 256) -> Workload:
    """ShareGPT-like chat: turns per session 1 + geometric (mean `mean_turns`), user messages and answers
    log-normal (sigma 1.0) around ShareGPT's means, clipped to [4, max_len]; optional shared system prompt."""
    rng, key = random.Random(seed), _Keys()
    system = (Segment(key(), _scaled(system_len, scale)),) if system_len else ()
    p = 1.0 / max(mean_turns, 1.0)
    sessions = []
    for s in range(num_sessions):
        n = 1
        while n < max_turns and rng.random() > p:
            n += 1
        turns = tuple(Turn((Segment(key(), _scaled(_lognormal(rng, user_mean, 1.0, 4, max_len), scale)),),
                           _scaled(_lognormal(rng, output_mean, 1.0, 4, max_len), scale),
                           think_s if k else 0.0) for k in range(n))
        sessions.append(Session(f"chat{s}", system, turns))
    return Workload("multi_turn", tuple(sessions), seed, vocab_size,
                    f"{num_sessions} sessions, mean {mean_turns:g} turns, user~{user_mean:g}, "
                    f"output~{output_mean:g}, scale {scale:g}")


def react(num_sessions: int = 32, fewshot_len: int = 1500, question_len: int = 60, min_steps: int = 3,
          max_steps: int = 8, thought_len: int = 64, observation_mean: float = 150, scale: float = 1.0,
          seed: int = 0, vocab_size: int = 256) -> Workload:
    """ReAct agents: every session starts with the same few-shot prefix and its own question, then steps;
    each step's answer is a thought + action (`thought_len` tokens), and the next step appends the tool's
    observation (log-normal around `observation_mean`)."""
    rng, key = random.Random(seed), _Keys()
    fewshot = Segment(key(), _scaled(fewshot_len, scale))
    sessions = []
    for s in range(num_sessions):
        steps = rng.randint(min_steps, max_steps)
        turns = []
        for k in range(steps):
            user = Segment(key(), _scaled(question_len, scale)) if k == 0 else \
                Segment(key(), _scaled(_lognormal(rng, observation_mean, 0.6, 8, 1024), scale))
            turns.append(Turn((user,), _scaled(thought_len * rng.uniform(0.6, 1.4), scale)))
        sessions.append(Session(f"react{s}", (fewshot,), tuple(turns)))
    return Workload("react", tuple(sessions), seed, vocab_size,
                    f"{num_sessions} agents, few-shot {fewshot_len}, {min_steps}-{max_steps} steps, scale {scale:g}")


def long_doc_qa(num_docs: int = 4, questions_per_doc: int = 16, doc_mean: float = 12000, question_len: int = 48,
                output_mean: float = 64, scale: float = 1.0, seed: int = 0, vocab_size: int = 256) -> Workload:
    """LooGLE-like long-document QA: documents (log-normal lengths, sigma 0.3), each asked many
    independent questions (one single-turn session per question: prompt = document + question);
    questions of all documents interleaved at random."""
    rng, key = random.Random(seed), _Keys()
    sessions = []
    for d in range(num_docs):
        doc = Segment(key(), _scaled(_lognormal(rng, doc_mean, 0.3, 64, 1 << 20), scale))
        for q in range(questions_per_doc):
            turn = Turn((Segment(key(), _scaled(question_len, scale)),),
                        _scaled(_lognormal(rng, output_mean, 0.5, 4, 512), scale))
            sessions.append(Session(f"doc{d}-q{q}", (doc,), (turn,)))
    rng.shuffle(sessions)
    return Workload("long_doc_qa", tuple(sessions), seed, vocab_size,
                    f"{num_docs} docs x {questions_per_doc} questions, doc~{doc_mean:g}, scale {scale:g}")


def trace(path: str | Path = DEFAULT_TRACE, max_requests: int | None = None, length_scale: float = 1.0,
          output_scale: float | None = None, time_scale: float = 1.0, start: int = 0, seed: int = 0,
          vocab_size: int = 256) -> Workload:
    """Replay a Mooncake-format trace. Hash id h -> the fixed pseudo-random block h of round(512 x
    length_scale) tokens (seeded by h alone); the prompt is the blocks of its hash ids, cut to
    round(input_length x length_scale). Arrivals: timestamp (ms) / 1000 / time_scale (time_scale 2 =
    twice as fast). Each request is its own session (the trace does not link turns)."""
    output_scale = length_scale if output_scale is None else output_scale
    block = max(1, int(round(TRACE_BLOCK * length_scale)))
    sessions = []
    with open(path) as f:
        for i, line in enumerate(f):
            if i < start:
                continue
            if max_requests is not None and len(sessions) >= max_requests:
                break
            r = json.loads(line)
            n = max(1, int(round(r["input_length"] * length_scale)))
            segs, left = [], n
            for h in r["hash_ids"]:
                if left <= 0:
                    break
                segs.append(Segment(int(h), min(block, left), full=block, namespace=_TRACE_NAMESPACE))
                left -= block
            if left > 0:  # more tokens than blocks (should not happen): pad with a request-private block
                segs.append(Segment((1 << 40) + i, left, namespace=_TRACE_NAMESPACE))
            out = max(1, int(round(r["output_length"] * output_scale)))
            sessions.append(Session(f"trace{i}", (), (Turn(tuple(segs), out),),
                                    arrival_s=r["timestamp"] / 1000.0 / time_scale))
    if sessions:
        t0 = sessions[0].arrival_s
        sessions = [dataclasses.replace(s, arrival_s=s.arrival_s - t0) for s in sessions]
    return Workload("trace", tuple(sessions), seed, vocab_size,
                    f"{Path(path).name} from {start}, {len(sessions)} requests, length x{length_scale:g}, "
                    f"time x{time_scale:g}")


WORKLOADS: dict[str, Callable[..., Workload]] = dict(
    shared_prefix=shared_prefix, multi_turn=multi_turn, react=react, long_doc_qa=long_doc_qa, trace=trace)
# Paper names
WORKLOADS.update(sharegpt=multi_turn, loogle=long_doc_qa)

# Presets that fit the 1,024-token demo model (prompt + output <= 1024).
DEMO_PRESETS = dict(
    shared_prefix=dict(num_groups=4, prompts_per_group=6, system_len=400, question_len=32, output_len=24),
    multi_turn=dict(num_sessions=12, mean_turns=3, max_turns=5, user_mean=48, output_mean=24, max_len=96),
    sharegpt=dict(num_sessions=12, mean_turns=3, max_turns=5, user_mean=48, output_mean=24, max_len=96),
    react=dict(num_sessions=8, fewshot_len=320, question_len=24, min_steps=2, max_steps=5, thought_len=20,
               observation_mean=40),
    long_doc_qa=dict(num_docs=3, questions_per_doc=8, doc_mean=600, question_len=24, output_mean=20),
    loogle=dict(num_docs=3, questions_per_doc=8, doc_mean=600, question_len=24, output_mean=20),
    trace=dict(max_requests=40, length_scale=1 / 64, output_scale=1 / 8, time_scale=1.0),
)


def make(name: str, **kwargs) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(sorted(WORKLOADS))}")
    return WORKLOADS[name](**kwargs)


def poisson_arrivals(workload: Workload, rate: float, seed: int = 0) -> list[float]:
    """Start time of every session: its fixed arrival if it has one, else a Poisson process of `rate`
    sessions per second (rate <= 0 or inf: all at 0)."""
    rng = random.Random(seed ^ 0x5EED)
    t, out = 0.0, []
    for s in workload.sessions:
        if s.arrival_s is not None:
            out.append(s.arrival_s)
            continue
        out.append(t)
        if rate > 0 and math.isfinite(rate):
            t += rng.expovariate(rate)
    return out
