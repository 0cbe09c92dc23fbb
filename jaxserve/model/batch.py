"""`AttentionBatch`: where one packed engine step's tokens write their K/V and which keys each sequence sees."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np


class AttentionBatch(NamedTuple):
    """One packed step of T tokens over S sequence slots (a pytree of int32 arrays, numpy or jax).

    Query i of sequence s sits at position kv_lens[s] - q_len[s] + i, where
    q_len[s] = cu_q_lens[s + 1] - cu_q_lens[s].
    """

    slot_pages: Any    # i32[T] page each token's new K/V goes to; padding tokens -> page 0 (sink)
    slot_offsets: Any  # i32[T] offset within that page; padding tokens -> 0
    kv_lens: Any       # i32[S] keys per sequence, this step's tokens included; 0 for empty slots
    page_indices: Any  # i32[S, pages_per_seq] each sequence's page table
    cu_q_lens: Any     # i32[S + 1] prefix sums of query counts
    num_seqs: Any      # i32[1] live sequences (the first num_seqs slots)


def make_attention_batch(q_lens: Sequence[int], kv_lens: Sequence[int], page_tables: Sequence[Sequence[int]], *,
                         page_size: int, num_tokens: int | None = None, max_seqs: int | None = None,
                         pages_per_seq: int | None = None) -> tuple[AttentionBatch, np.ndarray]:
    """Host-side packing of live sequences into a padded step.

    Sequence s contributes `q_lens[s]` tokens at positions kv_lens[s] - q_lens[s] ... kv_lens[s] - 1, whose K/V
    land in `page_tables[s]`. Returns the batch (numpy int32) and the positions i32[num_tokens]; padding
    tokens get position 0 and write to sink page 0.
    """
    num_live = len(q_lens)
    if not (len(kv_lens) == len(page_tables) == num_live):
        raise ValueError(f"q_lens, kv_lens and page_tables must have one entry per sequence; got {num_live}, "
                         f"{len(kv_lens)}, {len(page_tables)}")
    total_q = int(sum(q_lens))
    num_tokens = total_q if num_tokens is None else num_tokens
    max_seqs = max(num_live, 1) if max_seqs is None else max_seqs
    needed_pages = max([-(-kv // page_size) for kv in kv_lens] + [1])
    pages_per_seq = needed_pages if pages_per_seq is None else pages_per_seq
    if total_q > num_tokens or num_live > max_seqs or needed_pages > pages_per_seq:
        raise ValueError(f"step does not fit: {total_q} tokens > {num_tokens}, {num_live} seqs > {max_seqs}, or "
                         f"{needed_pages} pages > {pages_per_seq}")

    slot_pages = np.zeros(num_tokens, np.int32)
    slot_offsets = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    kv_lens_arr = np.zeros(max_seqs, np.int32)
    page_indices = np.zeros((max_seqs, pages_per_seq), np.int32)
    cu_q_lens = np.full(max_seqs + 1, total_q, np.int32)
    cu_q_lens[0] = 0
    start = 0
    for s, (q_len, kv_len, table) in enumerate(zip(q_lens, kv_lens, page_tables)):
        if q_len > kv_len:
            raise ValueError(f"sequence {s}: q_len {q_len} exceeds kv_len {kv_len}")
        if len(table) < -(-kv_len // page_size):
            raise ValueError(f"sequence {s}: {len(table)} pages cannot hold {kv_len} tokens of page_size {page_size}")
        pos = np.arange(kv_len - q_len, kv_len)
        table = np.asarray(table, np.int32)
        positions[start:start + q_len] = pos
        slot_pages[start:start + q_len] = table[pos // page_size]
        slot_offsets[start:start + q_len] = pos % page_size
        kv_lens_arr[s] = kv_len
        kept = table[:pages_per_seq]
        page_indices[s, :len(kept)] = kept
        start += q_len
        cu_q_lens[s + 1] = start
    batch = AttentionBatch(slot_pages, slot_offsets, kv_lens_arr, page_indices, cu_q_lens,
                           np.array([num_live], np.int32))
    return batch, positions
