"""The state of one KV transfer, seen from its receiver, and the errors of the transfer path.

    prepared --> pulling --> filled --> committed
        \\           \\          \\
         +-----------+----------+--> failed | cancelled

prepared: the receiver referenced the prefix it already holds and reserved pages for the rest; pulling: the
block is on its way (a device_put in process, a pull from the sender's transfer server across processes);
filled: the KV is written into the reserved pages (not yet indexed); committed: indexed (transfer_with_insert)
and handed over. failed / cancelled: every page the transfer took is freed, nothing half-received was indexed.
Any other transition raises `IllegalTransition`.
"""

from __future__ import annotations

import enum


class TransferError(RuntimeError):
    """A KV transfer failed or timed out; whatever it allocated has been freed."""


class IllegalTransition(RuntimeError):
    """A transfer was asked to move to a state it cannot reach from where it is."""


class State(enum.Enum):
    PREPARED = "prepared"
    PULLING = "pulling"
    FILLED = "filled"
    COMMITTED = "committed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (State.COMMITTED, State.FAILED, State.CANCELLED)


_NEXT = {
    State.PREPARED: {State.PULLING, State.FAILED, State.CANCELLED},
    State.PULLING: {State.FILLED, State.FAILED, State.CANCELLED},
    State.FILLED: {State.COMMITTED, State.FAILED, State.CANCELLED},
    State.COMMITTED: set(),
    State.FAILED: set(),
    State.CANCELLED: set(),
}


class TransferState:
    """A transfer's position in the state machine above; `to(state)` moves it or raises IllegalTransition."""

    def __init__(self, name: str = ""):
        self.name = name
        self.state = State.PREPARED
        self.history = [State.PREPARED]

    def to(self, state: State) -> None:
        if state not in _NEXT[self.state]:
            raise IllegalTransition(f"transfer {self.name}: {self.state.value} -> {state.value} is not allowed")
        self.state = state
        self.history.append(state)

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    def __repr__(self) -> str:
        return f"TransferState({self.name!r}, {self.state.value})"
