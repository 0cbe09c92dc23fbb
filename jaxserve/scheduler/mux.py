"""The scheduler's end of Instance.GenerateMany (jaxserve/instance/mux.py): one call per instance carries
every request the scheduler runs there, a message per engine step instead of one per request per step.

`InstanceMux.open(request, deadline)` returns a `MuxCall` that behaves like the `Generate` call it replaces
where `SchedulerCore` uses one: `read()` gives the next InstanceGenerateResponse (a failed stream raises
grpc.aio.AioRpcError with the instance's status code, so failures are classified and migrated as before) and
`cancel()` aborts the request on the instance. The deadline is enforced here (DEADLINE_EXCEEDED, and the
request is aborted). If the shared call fails, every open stream fails with its status, and the next `open`
starts a new call."""

from __future__ import annotations

import asyncio
import itertools
import time

import grpc

from jaxserve.proto.v1 import instance_pb2

_CODES = {c.value[0]: c for c in grpc.StatusCode}
_CANCELLED = object()  # queued by MuxCall.cancel


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class MuxCall:
    """One request's stream on an `InstanceMux` (the part of a unary-stream call that the scheduler uses)."""

    def __init__(self, mux: "InstanceMux", stream_id: int, deadline: float | None):
        self.mux, self.stream_id, self.deadline = mux, stream_id, deadline
        self.queue: asyncio.Queue = asyncio.Queue()
        self.done = False

    async def read(self):
        if self.deadline is None:
            item = await self.queue.get()
        else:
            try:
                async with asyncio.timeout_at(asyncio.get_running_loop().time()
                                              + max(self.deadline - time.monotonic(), 0.0)):
                    item = await self.queue.get()
            except TimeoutError:
                self.cancel()
                raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        if item is _CANCELLED:
            raise asyncio.CancelledError  # as a cancelled grpc call's read does
        if isinstance(item, grpc.aio.AioRpcError):
            self.done = True
            raise item
        if item.finish_reason:
            self.done = True
        return item

    def cancel(self) -> bool:
        """Aborts the request on the instance (unless it ended); a pending or later read raises
        CancelledError, as on a cancelled grpc call. Safe to call twice."""
        if self.done:
            return False
        self.done = True
        self.mux.abort(self.stream_id)
        self.queue.put_nowait(_CANCELLED)
        return True


class InstanceMux:
    """The GenerateMany call to one instance (started on first use, restarted after a failure)."""

    def __init__(self, stub):
        self.stub = stub
        self._call = None
        self._streams: dict[int, MuxCall] = {}
        self._ids = itertools.count(1)
        self._outbox: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []

    def open(self, request: instance_pb2.InstanceGenerateRequest, deadline: float | None) -> MuxCall:
        """deadline: time.monotonic() by which the request must be done (None: none)."""
        if self._call is None:
            self._start()
        stream = MuxCall(self, next(self._ids), deadline)
        self._streams[stream.stream_id] = stream
        self._outbox.put_nowait(instance_pb2.MuxRequest(stream_id=stream.stream_id, generate=request))
        return stream

    def abort(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is not None and self._outbox is not None:
            self._outbox.put_nowait(instance_pb2.MuxRequest(stream_id=stream_id, abort=True))

    def close(self) -> None:
        """Ends the call (its open streams fail CANCELLED)."""
        self._fail(_error(grpc.StatusCode.CANCELLED, "the scheduler closed the instance's stream"))

    # ------------------------------------------------------------------------------------------ the call
    def _start(self) -> None:
        outbox: asyncio.Queue = asyncio.Queue()
        self._outbox = outbox

        async def requests():
            while True:
                msg = await outbox.get()
                if msg is None:
                    return
                # grpc.aio has one write in flight at a time: what queued meanwhile (a burst's other requests)
                # goes in one message, so the instance sees it at once.
                batch, end = [msg], False
                while not outbox.empty():
                    more = outbox.get_nowait()
                    if more is None:
                        end = True
                        break
                    batch.append(more)
                yield msg if len(batch) == 1 else instance_pb2.MuxRequest(batch=batch)
                if end:
                    return

        call = self._call = self.stub.GenerateMany(requests())
        self._tasks = [asyncio.get_running_loop().create_task(self._read(call))]

    async def _read(self, call) -> None:
        try:
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise _error(grpc.StatusCode.UNAVAILABLE, "the instance ended the GenerateMany call")
                streams = self._streams
                for item in resp.items:
                    stream = streams.get(item.stream_id)
                    if stream is None:
                        continue  # aborted here meanwhile
                    if item.error_code:
                        del streams[item.stream_id]
                        stream.queue.put_nowait(_error(_CODES.get(item.error_code, grpc.StatusCode.UNKNOWN),
                                                       item.error_message))
                    else:
                        if item.response.finish_reason:
                            del streams[item.stream_id]
                        stream.queue.put_nowait(item.response)
        except grpc.aio.AioRpcError as e:
            if self._call is call:
                self._fail(e)
        except asyncio.CancelledError:
            if self._call is call:
                self._fail(_error(grpc.StatusCode.CANCELLED, "the scheduler closed the instance's stream"))
            raise

    def _fail(self, error: grpc.aio.AioRpcError) -> None:
        call, self._call = self._call, None
        streams, self._streams = self._streams, {}
        if self._outbox is not None:
            self._outbox.put_nowait(None)
            self._outbox = None
        if call is not None:
            call.cancel()
        for stream in streams.values():
            stream.queue.put_nowait(error)


def open_generate(record, request, deadline: float | None, timeout: float | None, shared: bool = True):
    """The instance's token stream for `request`: a stream on its shared GenerateMany call when it serves
    one (and `shared`), else a Generate call of its own (`timeout` seconds)."""
    if shared and record.generate_many:
        if record.mux is None:
            record.mux = InstanceMux(record.stub)
        return record.mux.open(request, deadline)
    return record.stub.Generate(request, timeout=timeout)

