"""Instance.GenerateMany: many requests' token streams on one gRPC call (the scheduler keeps one per instance).

With Generate, every running request is its own call, so every engine step sends one gRPC message per request
(~50-60 us of CPU each through grpc.aio on this project's CPU boxes, on both ends): at batch 32 that is a few
ms per step, on the cores the engine computes on. Here a step's events for every stream on the call leave as
one MuxResponse: the engine thread hands a step's events over in one loop callback (`engine_loop.deliver`),
each stream's sink appends its item, and one flush scheduled behind them writes the message.

Semantics per stream are Generate's: the same InstanceGenerateResponses (tokens, then the last one with
finish_reason and usage), and an error ends the stream with a status code and message instead of ending the
call. An abort request, or the call ending (scheduler gone, cancelled), aborts the stream's request (all of
them), which frees its pages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from jaxserve.instance.engine_loop import Sink
from jaxserve.instance.pd_common import event_response, sampling_params
from jaxserve.proto.v1 import instance_pb2

log = logging.getLogger("jaxserve.instance")


class _StreamSink(Sink):
    """One stream's events into its mux's next message (on the mux's event loop)."""

    def __init__(self, mux: "Mux", stream_id: int):
        self.mux, self.stream_id = mux, stream_id

    def _put(self, event: tuple) -> None:
        self.mux.add(self.stream_id, event)

    def stage(self, event: tuple):
        return self.mux.loop, self._put

    def push(self, event: tuple) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self.mux.loop.call_soon_threadsafe(self._put, event)


class Mux:
    """The state of one GenerateMany call: live streams (stream id -> internal request id) and the items of
    the next message."""

    def __init__(self, server, context):
        self.server, self.context = server, context
        self.loop = asyncio.get_running_loop()
        self.live: dict[int, str] = {}
        self.items: list = []
        self.out: asyncio.Queue = asyncio.Queue()
        self._flush_scheduled = False

    # ------------------------------------------------------------------------------------------ events
    def add(self, stream_id: int, event: tuple) -> None:
        if stream_id not in self.live:
            return  # aborted meanwhile
        if event[0] in ("tokens", "finish"):
            item = instance_pb2.MuxItem(stream_id=stream_id, response=event_response(event))
            if event[0] == "finish":
                del self.live[stream_id]
        else:  # ("error", code, message)
            del self.live[stream_id]
            item = self.error_item(stream_id, event[1], f"instance {self.server.instance_id}: {event[2]}")
        self.items.append(item)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)  # after the rest of this step's events

    @staticmethod
    def error_item(stream_id: int, code: grpc.StatusCode, message: str) -> instance_pb2.MuxItem:
        return instance_pb2.MuxItem(stream_id=stream_id, error_code=code.value[0], error_message=message)

    def send_error(self, stream_id: int, code: grpc.StatusCode, message: str) -> None:
        self.items.append(self.error_item(stream_id, code, message))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.items:
            self.out.put_nowait(instance_pb2.MuxResponse(items=self.items))
            self.items = []

    # ---------------------------------------------------------------------------------------- requests
    def start(self, stream_id: int, request: instance_pb2.InstanceGenerateRequest) -> None:
        server = self.server
        if stream_id in self.live:
            self.send_error(stream_id, grpc.StatusCode.INVALID_ARGUMENT, f"stream {stream_id} is already live")
            return
        if server.draining or server._stopped:  # noqa: SLF001 - the servicer's own state
            self.send_error(stream_id, grpc.StatusCode.UNAVAILABLE, f"instance {server.instance_id} is draining")
            return
        if server.loop_thread.broken:
            self.send_error(stream_id, grpc.StatusCode.UNAVAILABLE,
                            f"instance {server.instance_id}: the engine is broken ({server.loop_thread.broken})")
            return
        try:
            params = sampling_params(request)
        except ValueError as e:
            self.send_error(stream_id, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return
        internal_id = f"{request.request_id}#{next(server._ids)}"  # noqa: SLF001
        self.live[stream_id] = internal_id
        server.loop_thread.add(internal_id, request.request_id, request.prompt_token_ids,
                               request.generated_token_ids, params, _StreamSink(self, stream_id),
                               time.perf_counter(), cache_salt=request.cache_salt)

    def abort(self, stream_id: int) -> None:
        internal_id = self.live.pop(stream_id, None)
        if internal_id is not None:
            self.server.loop_thread.abort(internal_id)

    def abort_all(self) -> None:
        for stream_id in list(self.live):
            self.abort(stream_id)


async def generate_many(server, request_iterator, context):
    """The GenerateMany handler (`InstanceServer.GenerateMany` delegates here): yields MuxResponses."""
    mux = Mux(server, context)

    async def read():
        try:
            async for msg in request_iterator:
                for one in msg.batch or (msg,):  # a batch is one level deep: its members' own batch is ignored
                    if one.abort:
                        mux.abort(one.stream_id)
                    elif one.HasField("generate"):
                        mux.start(one.stream_id, one.generate)
        finally:
            mux.out.put_nowait(None)  # the caller is done sending: the call ends when its streams have

    reader = asyncio.get_running_loop().create_task(read())
    closing = False
    try:
        while True:
            resp = await mux.out.get()
            if resp is None:
                closing = True
            else:
                yield resp
            if closing and not mux.live and not mux.items and mux.out.empty():
                return
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        mux.abort_all()
