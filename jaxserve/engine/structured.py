"""Structured output (JSON object / JSON schema) through llguidance's token-mask API: one matcher per
request on the host; before each of its steps the engine turns the matcher's next-token bitmask into -inf
logit biases (sampling.sampling_extras), and the matcher advances on the tokens the request accepted.

llguidance was chosen over xgrammar by `python -m jaxserve.launch.bench_grammar` (mask + advance per step
equal within noise on this CPU: ~30 us at a 32k vocabulary, far below a model step) because it is a
standalone wheel, where xgrammar's package depends on torch and triton. Requests with a grammar need each
token on the host before their next step, so a step with one runs after the previous step completes (the
engine drops async overlap for that step only)."""

from __future__ import annotations

import functools
import json

import numpy as np

JSON_OBJECT_SCHEMA = '{"type": "object"}'  # response_format {"type": "json_object"}


class Grammars:
    """The engine's grammar factory for one tokenizer (jaxserve.tokenizer.ByteTokenizer or HFTokenizer)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids=()):
        import llguidance
        self._ll = llguidance
        self.vocab_size = vocab_size
        eos = list(eos_token_ids) or list(getattr(tokenizer, "eos_token_ids", ()) or ())
        inner = getattr(tokenizer, "_tokenizer", None)
        if inner is not None and hasattr(inner, "to_str"):  # HFTokenizer: llguidance reads tokenizer.json
            self.tokenizer = llguidance.LLTokenizer(inner.to_str(), n_vocab=vocab_size, eos_token=eos or None)
        else:  # ByteTokenizer: token i < 256 is byte i
            self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteVocab(vocab_size, eos)),
                                                    n_vocab=vocab_size)

    @functools.lru_cache(maxsize=64)
    def _grammar(self, schema: str) -> str:
        try:
            parsed = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"json_schema must be a JSON object, got {schema[:80]!r}")
        # Compact separators (vLLM's default too): flexible whitespace lets a weak model pad forever.
        grammar = self._ll.LLMatcher.grammar_from_json_schema(parsed, defaults={"whitespace_flexible": False})
        error = self._ll.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error and not error.startswith("WARNING"):
            raise ValueError(f"json_schema cannot be compiled: {error}")
        return grammar

    def validate(self, schema: str) -> None:
        self._grammar(schema)

    def matcher(self, schema: str) -> "Matcher":
        return Matcher(self._ll.LLMatcher(self.tokenizer, self._grammar(schema), log_level=0), self.vocab_size)


class Matcher:
    """One request's grammar state; `advance` catches up with the request's outputs."""

    def __init__(self, matcher, vocab_size: int):
        import llguidance.numpy as lnp
        self._m = matcher
        self._lnp = lnp
        self._mask = lnp.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size
        self.consumed = 0

    def advance(self, output_token_ids) -> None:
        for tok in output_token_ids[self.consumed:]:
            self._m.consume_token(int(tok))
            self.consumed += 1

    @property
    def done(self) -> bool:
        """The document is complete (only EOS may follow) or the grammar failed."""
        return self._m.is_stopped() or self._m.is_error()

    def apply(self, bias_row: np.ndarray) -> None:
        """-inf on every token the grammar does not allow next."""
        self._lnp.fill_next_token_bitmask(self._m, self._mask, 0)
        bits = np.unpackbits(self._mask[0].view(np.uint8), bitorder="little")[:len(bias_row)].astype(bool)
        bias_row[~bits] = -np.inf


class _ByteVocab:
    """What llguidance's TokenizerWrapper reads from a byte-level tokenizer."""

    def __init__(self, vocab_size: int, eos):
        self.tokens = [bytes([i]) for i in range(256)] + [b"<s>", b"</s>"] + [b""] * (vocab_size - 258)
        self.eos_token_id = eos[0] if eos else 257
        self.bos_token_id = 256
        self.special_token_ids = [256, 257]

    def __call__(self, s):
        return list(s if isinstance(s, bytes) else s.encode("utf-8"))
