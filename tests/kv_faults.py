"""Fault injection for the KV path, by object: a transport that fails once at a chosen stage. Tests pass it
where production code takes a transport (MemPool.transfer*, DisaggregatedPair.transport); nothing in
jaxserve/ checks for faults."""

from jaxserve.mempool import transfer as tr


class FailingTransport(tr.InProcessTransport):
    """The in-process transport, failing once at `stage`: "send" (after the gather), "receive" (after the move)
    or "insert" (after the scatter, before the receiver indexes the pages)."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def _fail(self, stage: str) -> None:
        if self.stage == stage:
            self.stage = None
            raise tr.TransferError(f"injected failure at stage {stage!r}")

    def offer(self, pool, pages):
        block = super().offer(pool, pages)
        self._fail("send")
        return block

    def fetch(self, pool, offer):
        block = super().fetch(pool, offer)
        self._fail("receive")
        return block

    def write(self, pool, pages, block):
        super().write(pool, pages, block)
        self._fail("insert")
