"""The simulator's cluster-wide KV pool (issue 18): before a request joins an instance's queue, the prefix it
will reuse is brought to device — its host-tier part over the instance's PCIe link, and, where the routing
decision says so, a longer copy pulled from a peer over the pair's link (sharing each instance's link with
PD transfers). Pulled pages are indexed on arrival, so the peer's copy becomes a local one, as a served
pull with insert would."""

from __future__ import annotations

import dataclasses

from jaxserve.scheduler.kv_pool import TransferModel


def transfer_model(cost, instances) -> TransferModel:
    """The policy's transfer model in the simulator's units (a prompt-tree token is one page)."""
    ps = cost.page_size
    links = []
    if cost.node_size:
        for a in instances:
            for b in instances:
                if a is not b:
                    bw, lat = cost.link(a.number, b.number)
                    if (bw, lat) != (cost.transfer_bytes_s, cost.transfer_latency_s):
                        links.append((a.iid, b.iid, bw, lat))
    return TransferModel(kv_bytes_per_token=cost.kv_bytes_per_token * ps, link_bytes_s=cost.transfer_bytes_s,
                         link_latency_s=cost.transfer_latency_s, host_bytes_s=cost.host_bytes_s,
                         host_latency_s=cost.host_latency_s, links=tuple(links))


@dataclasses.dataclass
class Moves:
    """What bringing one request's prefix to device moved (tokens and bytes)."""

    host_tokens: int = 0
    peer_tokens: int = 0
    host_bytes: float = 0.0
    peer_bytes: float = 0.0


class PoolMoves:
    def __init__(self, sim):
        self.sim = sim

    def arrive(self, t: float, inst, r, decision) -> None:
        """r reaches inst (which computes its prompt): fetch what is worth fetching, then queue it."""
        sim, cost = self.sim, self.sim.cost
        ps = cost.page_size
        if inst.cache is None:
            return self._queue(inst, r, t)
        pages = r.target_pages
        cap = max((r.target_len - 1) // ps, 0)
        total, device = (min(x, cap) for x in inst.cache.tiers(pages))
        pull, src = 0, None
        if decision is not None and decision.pull_from is not None and sim.config.peer_fetch:
            src = sim.by_id[decision.pull_from.instance_id]
            if src.cache is not None:  # what the holder has now (it may have evicted since routing)
                pull = max(0, min(src.cache.tiers(pages)[0], cap) - total)
        end = t
        m = Moves()
        if total > device:  # swap-in over this instance's PCIe, one copy at a time
            m.host_tokens = (total - device) * ps
            m.host_bytes = m.host_tokens * cost.kv_bytes_per_token
            start = max(t, inst.pcie_free)
            inst.pcie_free = start + cost.host_latency_s + m.host_bytes / cost.host_bytes_s
            end = inst.pcie_free
        if pull:
            m.peer_tokens = pull * ps
            m.peer_bytes = m.peer_tokens * cost.kv_bytes_per_token
            end = max(end, sim._link(src, inst, t, m.peer_bytes))
        r.moves = m
        r.kv_bytes += m.peer_bytes
        if end <= t:
            return self._queue(inst, r, t)
        sim.push(end, "fetched", (inst, r, pages[:total + pull]))

    def fetched(self, t: float, inst, r, prefix: tuple) -> None:
        m = r.moves
        if m.peer_tokens:
            inst.index(prefix)  # the pulled pages, indexed (a host part under them is replaced by them)
        elif m.host_tokens:
            inst.cache.match(prefix)  # swapped in
            inst.cache.shrink(inst._free())
        self._queue(inst, r, t)

    @staticmethod
    def _queue(inst, r, t: float) -> None:
        inst.waiting.append(r)
        inst.kick(t)
