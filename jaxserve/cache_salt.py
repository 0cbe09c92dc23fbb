"""Tenant isolation of the prefix cache (vLLM's `cache_salt`): requests with different salts never share KV.

A salted request is indexed, in the instances' prompt indexes and in the scheduler's prompt trees, under its
"index tokens": its token ids with the first SALTED_TOKENS of them replaced by negative ids that depend on
the salt and on the token. Real token ids are never negative, so a salted sequence never matches an unsalted
one, and two salts share a page only if their hashes agree at every salted position (2**-176 for two given
salts). The map is injective in the tokens (the token is recoverable from its salted id), so a match can
never hand out KV of different tokens. The length is unchanged, so page alignment and counts (cached_tokens)
are the same as unsalted. Index events carry index tokens, so the scheduler's trees need no change: it
salts the prompt the same way before matching. No jax here: the scheduler uses it too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

SALTED_TOKENS = 16          # leading positions salted: the first page, or the first pages when pages are small
VOCAB_LIMIT = 1 << 20       # token ids must be below this for the salted ids to fit in int32
_HASH_BITS = 11             # per position: -(1 + token + VOCAB_LIMIT * h) >= -2**31 for h < 2**11
MAX_SALT_BYTES = 1024


def check_salt(salt: str) -> None:
    """ValueError naming the limit for a salt that is not a string or is too long (UTF-8)."""
    if not isinstance(salt, str):
        raise ValueError(f"cache_salt must be a string, got {type(salt).__name__}.")
    if len(salt.encode("utf-8", "surrogatepass")) > MAX_SALT_BYTES:
        raise ValueError(f"cache_salt must be at most {MAX_SALT_BYTES} bytes (UTF-8).")


def _position_hashes(salt: str) -> list[int]:
    digest = int.from_bytes(hashlib.sha256(salt.encode("utf-8", "surrogatepass")).digest(), "big")
    mask = (1 << _HASH_BITS) - 1
    return [(digest >> (_HASH_BITS * i)) & mask for i in range(SALTED_TOKENS)]


_cache: dict[str, list[int]] = {}


def salt_tokens(tokens: Sequence[int], salt: str) -> list[int] | Sequence[int]:
    """`tokens` as the prefix cache should key them for `salt`. No salt: `tokens` itself (not copied, so
    the caller must not mutate the result)."""
    if not salt:
        return tokens
    hashes = _cache.get(salt)
    if hashes is None:
        if len(_cache) > 4096:
            _cache.clear()
        hashes = _cache[salt] = _position_hashes(salt)
    toks = [int(t) for t in tokens[:SALTED_TOKENS]]
    for t in toks:
        if not 0 <= t < VOCAB_LIMIT:
            raise ValueError(f"cannot salt token id {t}: ids must be in [0, {VOCAB_LIMIT})")
    head = [-(1 + t + VOCAB_LIMIT * h) for t, h in zip(toks, hashes)]
    return head + [int(t) for t in tokens[SALTED_TOKENS:]]


def api_key_salt(api_key: str) -> str:
    """The salt of a tenant identified by its API key (a hash, so the key itself is never a cache key)."""
    return "key:" + hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()
