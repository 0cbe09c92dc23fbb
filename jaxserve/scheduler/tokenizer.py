"""The scheduler's jax-free view of a model: its tokenizer, context length and vocabulary, plus incremental
detokenization with stop strings for the token streams it proxies.

Tokenizers come from the jax-free `jaxserve.tokenizer` (shared with the model layer); the context length
and vocabulary are read from `model_config.json` (our Orbax folders) or `config.json` (HF) without loading
`jaxserve.model`, which imports jax."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from jaxserve.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer  # noqa: F401 (re-exported)
from jaxserve.util import resolve_model_path

MODEL_CONFIG_FILE = "model_config.json"
HF_CONFIG_FILE = "config.json"

def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the scheduler needs to know about the served model to tokenize and validate requests."""

    name: str
    max_model_len: int
    vocab_size: int  # ids in [0, vocab_size) are valid prompt tokens
    tokenizer: Tokenizer | None = dataclasses.field(default=None, compare=False)
    architecture: str = ""           # e.g. "LlamaForCausalLM" ("": unknown, not checked)
    tokenizer_fingerprint: str = ""  # `tokenizer_fingerprint(folder)` ("": unknown, not checked)

    def __post_init__(self):
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 (one prompt and one output token), got {self.max_model_len}")
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")

    @classmethod
    def byte_level(cls, max_model_len: int, vocab_size: int = 258, name: str = "byte") -> "ModelInfo":
        """The demo model's tokenizer without a folder (tests, benchmarks)."""
        return cls(name=name, max_model_len=max_model_len, vocab_size=vocab_size,
                   tokenizer=ByteTokenizer(vocab_size=vocab_size))


TOKENIZER_FILES = ("tokenizer.json", "byte_tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")


def tokenizer_fingerprint(folder: str | os.PathLike) -> str:
    """A short hash of the files that define a model folder's tokenizer: two folders with the same
    fingerprint map text to the same ids ("" when the folder has none)."""
    digest = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        path = Path(folder) / name
        if path.is_file():
            found = True
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16] if found else ""


def model_architecture(folder: str | os.PathLike) -> str:
    config = _read_json(Path(folder) / MODEL_CONFIG_FILE) or _read_json(Path(folder) / HF_CONFIG_FILE)
    archs = config.get("architectures") or [config.get("architecture") or config.get("model_type") or ""]
    return str(archs[0])


def describe_model(name: str, architecture: str, vocab_size: int, fingerprint: str) -> str:
    return f"{name!r} ({architecture or 'architecture unknown'}, vocab {vocab_size}, tokenizer {fingerprint or '-'})"


def identity_mismatch(mine: ModelInfo, name: str, architecture: str, vocab_size: int, fingerprint: str) -> str | None:
    """Why a registering instance's model differs from the scheduler's (None: the same as far as both know)."""
    different = (architecture and mine.architecture and architecture != mine.architecture) or \
        (fingerprint and mine.tokenizer_fingerprint and fingerprint != mine.tokenizer_fingerprint) or \
        (vocab_size and vocab_size < mine.vocab_size)
    if not different:
        return None
    return (f"the instance serves {describe_model(name, architecture, vocab_size, fingerprint)} but the scheduler "
            f"serves {describe_model(mine.name, mine.architecture, mine.vocab_size, mine.tokenizer_fingerprint)}:"
            f" start both with the same model")


def load_model_info(model: str | os.PathLike, max_model_len: int | None = None) -> ModelInfo:
    """ModelInfo from a model folder (or a bundled name such as "demo"). `max_model_len` caps the model's
    own context length (max_position_embeddings)."""
    folder = resolve_model_path(model)
    if not folder.is_dir():
        raise FileNotFoundError(f"model {str(model)!r}: {folder} is not a directory")
    config = _read_json(folder / MODEL_CONFIG_FILE) or _read_json(folder / HF_CONFIG_FILE)
    if not config:
        raise FileNotFoundError(f"{folder} has neither {MODEL_CONFIG_FILE} nor {HF_CONFIG_FILE}")
    model_len = int(config.get("max_position_embeddings", 2048))
    if max_model_len is not None:
        if max_model_len > model_len:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's context length {model_len}")
        model_len = max_model_len
    try:
        tokenizer = load_tokenizer(folder)
    except FileNotFoundError:
        tokenizer = None  # token-id prompts only
    vocab = int(config.get("vocab_size", 0)) or (tokenizer.vocab_size if tokenizer else 0)
    if tokenizer is not None:
        # A model's embedding table is often padded past the tokenizer's vocabulary; those rows mean nothing.
        vocab = min(vocab, tokenizer.vocab_size)
    return ModelInfo(name=str(model), max_model_len=model_len, vocab_size=vocab, tokenizer=tokenizer,
                     architecture=model_architecture(folder), tokenizer_fingerprint=tokenizer_fingerprint(folder))


class IncrementalDetokenizer:
    """Turns a growing token sequence into text deltas. A token that ends inside a multi-byte character (the
    decode ends in U+FFFD) waits for the next; a few prompt tokens give the first output token its context
    (SentencePiece drops the leading space of a sequence's first token)."""

    CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self._tok = tokenizer
        self._ids = list(prompt_ids[-(self.CONTEXT + 1):])
        self._prefix = max(len(self._ids) - self.CONTEXT, 0)
        self._read = len(self._ids)

    def add(self, token_ids: Sequence[int]) -> str:
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        full_text = self._tok.decode(self._ids[self._prefix:])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            delta = full_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
            if self._prefix > 64:  # drop what no later decode looks at (amortised)
                del self._ids[:self._prefix]
                self._read -= self._prefix
                self._prefix = 0
            return delta
        return ""

    def flush(self) -> str:
        """At the end of the stream: the text of the tokens still waiting for the rest of a character,
        decoded as they are (U+FFFD where incomplete, as a whole-sequence decode gives), so the final text
        does not depend on how the tokens were grouped on their way here."""
        if self._read >= len(self._ids):
            return ""
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        full_text = self._tok.decode(self._ids[self._prefix:])
        self._prefix, self._read = self._read, len(self._ids)
        return full_text[len(prefix_text):]


class TextStream:
    """Incremental text of one request with stop strings: the text ends before the first stop string, and
    the last len(longest stop) - 1 characters are held back until they cannot start one."""

    def __init__(self, tokenizer: Tokenizer | None, prompt_ids: Sequence[int] = (), stop: Sequence[str] = (),
                 include_stop: bool = False):
        """include_stop: the text ends after the stop string instead (vLLM's include_stop_str_in_output)."""
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer is not None else None
        self._stop = tuple(stop)
        self._include_stop = include_stop
        self.stop_reason: str | None = None  # the stop string that ended the text
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        self._sent = 0
        self.stopped = False

    def push(self, token_ids: Sequence[int]) -> str:
        """Feed new tokens; returns the text that may be sent now (sets `stopped` on a stop string)."""
        if self._detok is None or self.stopped:
            return ""
        return self._extend(self._detok.add(token_ids))

    def _extend(self, new_text: str) -> str:
        old_len = len(self.text)
        self.text += new_text
        if self._stop and len(self.text) > old_len:
            start = max(old_len - self._hold, 0)
            hits = [(i, s) for i, s in ((self.text.find(s, start), s) for s in self._stop) if i >= 0]
            if hits:
                at, self.stop_reason = min(hits, key=lambda h: h[0])
                self.text = self.text[:at + (len(self.stop_reason) if self._include_stop else 0)]
                self.stopped = True
        upto = len(self.text) if self.stopped else len(self.text) - self._hold
        if upto <= self._sent:
            return ""
        delta = self.text[self._sent:upto]
        self._sent = upto
        return delta

    def flush(self) -> str:
        """The held-back rest, at the end of the stream (with the detokenizer's rest, stop strings applied)."""
        first = self._extend(self._detok.flush()) if self._detok is not None and not self.stopped else ""
        delta = first + self.text[self._sent:]
        self._sent = len(self.text)
        return delta
