"""Tokenizers: a byte-level one (demo and test models) and a wrapper of a Hugging Face `tokenizer.json`.

`load_tokenizer(folder)` picks the kind by the files present; `Tokenizer.save(folder)` writes them. No jax
here: the model layer and the jax-free scheduler share this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"
SPECIAL_IDS_FILE = "special_token_ids.json"  # our record of an HF tokenizer's bos/eos ids, beside tokenizer.json


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, folder: str | os.PathLike) -> None: ...


class ByteTokenizer:
    """Token i < 256 is byte i; 256 is BOS and 257 EOS; ids up to `vocab_size` beyond those are padding that
    decodes to nothing (so a model's vocab can be rounded up)."""

    NUM_BYTES = 256

    def __init__(self, vocab_size: int = 258, add_bos: bool = True):
        if vocab_size < self.NUM_BYTES + 2:
            raise ValueError(f"ByteTokenizer needs vocab_size >= 258 (256 bytes + BOS + EOS), got {vocab_size}")
        self.vocab_size = vocab_size
        self.add_bos = add_bos
        self.bos_token_id = self.NUM_BYTES
        self.eos_token_ids = (self.NUM_BYTES + 1,)

    def encode(self, text: str) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if self.add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < self.NUM_BYTES).decode("utf-8", errors="replace")

    def save(self, folder: str | os.PathLike) -> None:
        Path(folder, BYTE_TOKENIZER_FILE).write_text(json.dumps(
            {"type": "byte", "vocab_size": self.vocab_size, "add_bos": self.add_bos}))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ByteTokenizer":
        spec = json.loads(Path(path).read_text())
        return cls(vocab_size=int(spec.get("vocab_size", 258)), add_bos=bool(spec.get("add_bos", True)))


def _token_content(token) -> str | None:
    """tokenizer_config.json spells special tokens as a string or as {"content": ...}."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from `tokenizer.json`. BOS/EOS come from, in order of trust:
    our special_token_ids.json, tokenizer_config.json, generation_config.json and config.json (EOS ids of
    all of them are merged: chat models often list several)."""

    def __init__(self, folder: str | os.PathLike):
        from tokenizers import Tokenizer as _RustTokenizer  # only HF-tokenizer users pay for the import

        folder = Path(folder)
        path = folder / HF_TOKENIZER_FILE
        if not path.exists():
            raise FileNotFoundError(f"no {HF_TOKENIZER_FILE} in {folder} (looked for {path})")
        self._tokenizer = _RustTokenizer.from_file(str(path))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token_id, self.eos_token_ids = self._special_ids(folder)

    def _special_ids(self, folder: Path) -> tuple[int | None, tuple[int, ...]]:
        def read(name):
            path = folder / name
            return json.loads(path.read_text()) if path.exists() else {}

        ours = read(SPECIAL_IDS_FILE)
        if ours:
            return ours.get("bos_token_id"), tuple(ours.get("eos_token_ids", ()))
        bos: int | None = None
        eos: list[int] = []
        tok_config = read("tokenizer_config.json")
        for key, is_bos in (("bos_token", True), ("eos_token", False)):
            content = _token_content(tok_config.get(key))
            token_id = self._tokenizer.token_to_id(content) if content else None
            if token_id is not None:
                if is_bos:
                    bos = token_id
                else:
                    eos.append(token_id)
        for name in ("generation_config.json", "config.json"):
            d = read(name)
            eos.extend(_as_id_list(d.get("eos_token_id")))
            if bos is None and _as_id_list(d.get("bos_token_id")):
                bos = _as_id_list(d.get("bos_token_id"))[0]
        return bos, tuple(dict.fromkeys(eos))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, folder: str | os.PathLike) -> None:
        self._tokenizer.save(str(Path(folder, HF_TOKENIZER_FILE)))
        Path(folder, SPECIAL_IDS_FILE).write_text(json.dumps(
            {"bos_token_id": self.bos_token_id, "eos_token_ids": list(self.eos_token_ids)}))


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """`tokenizer.json` -> HFTokenizer; `byte_tokenizer.json` -> ByteTokenizer."""
    folder = Path(folder)
    if (folder / HF_TOKENIZER_FILE).exists():
        return HFTokenizer(folder)
    if (folder / BYTE_TOKENIZER_FILE).exists():
        return ByteTokenizer.from_file(folder / BYTE_TOKENIZER_FILE)
    raise FileNotFoundError(f"no tokenizer in {folder}: expected {HF_TOKENIZER_FILE} or {BYTE_TOKENIZER_FILE}")
