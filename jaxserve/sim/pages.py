"""Page ids for the cluster simulator: to keep long prompts cheap, a simulated "token" is one KV page, named by
a hash chain over the page's content (which segments, which offsets), so two prompts share a page id exactly
when they share that page and everything before it."""

from __future__ import annotations

from typing import Sequence

from jaxserve.bench.workloads import Segment


class PageHasher:
    """Page ids of a segment sequence: full pages plus the trailing partial page's content."""

    def __init__(self, page_size: int):
        self.page_size = page_size

    def empty(self):
        return ((), (), 0, 0)  # full page ids, pieces of the partial page, partial length, last full id

    def extend(self, state, seg: Segment):
        pages, pieces, plen, last = state
        pages = list(pages)
        ps = self.page_size
        key = (seg.key, seg.namespace)
        off = 0
        while off < seg.length:
            n = min(ps - plen, seg.length - off)
            pieces = pieces + ((key, off, off + n),)
            plen += n
            off += n
            if plen == ps:
                last = hash((last, pieces))
                pages.append(last)
                pieces, plen = (), 0
        return (tuple(pages), pieces, plen, last)

    def extend_all(self, state, segs: Sequence[Segment]):
        for s in segs:
            state = self.extend(state, s)
        return state

    @staticmethod
    def prompt_ids(state) -> tuple:
        pages, pieces, plen, last = state
        return pages + ((hash((last, pieces, "partial")),) if plen else ())


def common_pages(a: Sequence, b: Sequence) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
