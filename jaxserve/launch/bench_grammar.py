"""Grammar-mask cost per decode step of the structured-output libraries, for choosing one (issue 17):
llguidance and xgrammar, on the demo byte tokenizer and a synthetic 32k vocabulary (no BPE tokenizer is on
this box).
Each run drives a JSON-schema grammar along a fixed valid document, one token per step: compile time, then
the mean and p99 of (fill the next-token bitmask + accept the token).

    python -m jaxserve.launch.bench_grammar [--synthetic_vocab=32000]
"""

from __future__ import annotations

import json
import time

import numpy as np
from absl import app, flags

flags.DEFINE_integer("synthetic_vocab", 32000, "also measure a BPE-sized vocabulary of this many tokens (bytes, "
                     "printable bigrams, then random ASCII words; greedy longest-match encoding); 0: skip")
FLAGS = flags.FLAGS

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
DOC = '{"name": "Ada Lovelace", "age": 36, "tags": ["math", "engines", "poetry"]}'


def byte_vocab():
    """(token bytes per id, encode, eos id, special ids) of the demo ByteTokenizer."""
    tokens = [bytes([i]) for i in range(256)] + [b"<s>", b"</s>"]
    return tokens, lambda s: list(s.encode()), 257, [256, 257]


def synthetic_vocab(size):
    """A vocabulary the size of a BPE one: the 256 bytes, printable bigrams, then random ASCII words of 3-8
    characters; eos is the last id. Encoding is greedy longest match (every string encodes: bytes are in)."""
    rng = np.random.default_rng(0)
    printable = [chr(c) for c in range(32, 127)]
    words = {a + b for a in printable for b in printable}
    alphabet = list("abcdefghijklmnopqrstuvwxyz \"{}:,[]0123456789")
    while len(words) < size - 257:
        words.add("".join(rng.choice(alphabet, rng.integers(3, 9))))
    tokens = [bytes([i]) for i in range(256)] + [w.encode() for w in sorted(words)][:size - 257] + [b"</s>"]
    index = {t: i for i, t in enumerate(tokens[:-1])}

    def encode(s):
        b, out, i = s.encode(), [], 0
        while i < len(b):
            n = next(n for n in range(min(8, len(b) - i), 0, -1) if b[i:i + n] in index)
            out.append(index[b[i:i + n]])
            i += n
        return out
    return tokens, encode, len(tokens) - 1, [len(tokens) - 1]


def _stats(times):
    t = np.asarray(times) * 1e6
    return f"mean {t.mean():7.1f} us  p99 {np.percentile(t, 99):7.1f} us  ({len(t)} steps)"


def bench_llguidance(tokens, encode, eos, specials):
    import llguidance
    import llguidance.numpy as lnp

    class Wrapped:
        eos_token_id, bos_token_id, special_token_ids = eos, None, specials

        def __init__(self):
            self.tokens = tokens

        def __call__(self, s):
            return encode(s.decode() if isinstance(s, bytes) else s)
    t0 = time.perf_counter()
    tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    m = llguidance.LLMatcher(tok, grammar)
    compile_s = time.perf_counter() - t0
    mask = lnp.allocate_token_bitmask(1, tok.vocab_size)
    times = []
    for t in encode(DOC):
        s = time.perf_counter()
        lnp.fill_next_token_bitmask(m, mask, 0)
        m.consume_token(t)
        times.append(time.perf_counter() - s)
    assert not m.is_error(), m.get_error()
    return compile_s, times


def bench_xgrammar(tokens, encode, eos, specials):
    import xgrammar as xgr
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(tokens, vocab_type=xgr.VocabType.RAW, stop_token_ids=[eos])
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
    m = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    times = []
    for t in encode(DOC):
        s = time.perf_counter()
        m.fill_next_token_bitmask(mask, 0)
        assert m.accept_token(t), t
        times.append(time.perf_counter() - s)
    return compile_s, times


def main(argv):
    vocabs = [("demo bytes (258)", byte_vocab())]
    if FLAGS.synthetic_vocab:
        vocabs.append((f"synthetic ({FLAGS.synthetic_vocab})", synthetic_vocab(FLAGS.synthetic_vocab)))
    for name, vocab in vocabs:
        for lib, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
            try:
                compile_s, times = fn(*vocab)
            except Exception as e:  # noqa: BLE001 - a library missing or failing is a result too
                print(f"{name:40s} {lib:11s} failed: {type(e).__name__}: {e}")
                continue
            print(f"{name:40s} {lib:11s} compile {compile_s * 1e3:7.1f} ms  step {_stats(times)}")


if __name__ == "__main__":
    app.run(main)
