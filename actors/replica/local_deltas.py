"""A replica's delta batches to a reader on the same node, over a ZMQ socket instead of Ray stream items.

The multiplexed stream (`delta_stream.py`) sends one item per engine step to each reader. On the project's 2-core
machine a Ray stream item costs the two processes ~850 us of CPU and arrives ~0.6 ms after it is sent; the same
message through ZMQ (what vLLM's front end and engine talk over) ~130 us and ~0.14 ms
(`benchmarks/probe_ray_transport.py`, docs/benchmarks-serving.md). Where the reader and the replica share a node,
the reader binds a PULL socket at an `ipc://` path in a directory only its user may enter (the trust of Ray's own
workers on that node, which exchange pickles too), and the replica pushes its batches there in order.

The Ray stream stays open beside the socket and carries a heartbeat: its failure or end is still what tells the
reader that the replica is gone (every listening request replays), and its cancellation what tells the replica
that the reader is gone (it aborts the reader's requests). A batch still in the socket when the replica dies is
dropped with the stream; the ledger replays from the last token the client got, as it does for items in flight
on a Ray stream. Readers on another node, or with the ingress' `local_deltas: false`, get their batches as Ray
stream items.

Starting requests takes the same way back: the reader also binds a PUSH socket for `submit`s, the replica says
on the delta socket that it takes them (`CallsOpen`) and answers each batch of calls there (`SubmitReply`), in
order with the deltas. A Ray actor call costs the two processes ~1.4 ms of CPU and ~1.3 ms of round trip on the
2-core machine against ~0.3 ms each for the ZMQ pair, and a request's first token waits for it. The reader sends
without blocking (a replica that is gone has no peer socket: the calls fail at once and go elsewhere), and a
batch whose answer never comes fails with the Ray stream, as a Ray call to a dead actor fails.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import zmq
import zmq.asyncio

from rayfleet.actors.replica.delta_stream import Outbox
from rayfleet.actors.replica.protocol import DeltaBatch, GenerateCall

HEARTBEAT_S = 1.0  # how often the Ray stream carries an empty batch: how soon a replica notices its reader left


@dataclass(frozen=True)
class LocalEndpoint:
    """Where a reader takes batches over ZMQ (`address`) and gives calls (`calls_address`), and the Ray node it is
    on (only a replica there uses them)."""

    node_id: str
    address: str
    calls_address: str | None = None


@dataclass(frozen=True)
class CallsOpen:
    """The replica's first message on the delta socket: it takes `submit`s over the calls socket from now on."""


@dataclass(frozen=True)
class SubmitReply:
    """The answer to the calls batch numbered `batch`: per call, None when it started, else why it was refused."""

    batch: int
    refusals: list[Exception | None]


def dumps(message: object) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


class DeltaInbox:
    """The reader's end: a PULL socket for batches and a PUSH socket for calls, at fresh private `ipc://` paths."""

    def __init__(self, node_id: str) -> None:
        self.directory = tempfile.mkdtemp(prefix="rayfleet-deltas-")  # mode 0700
        # A process that exits without closing its streams still removes its directories.
        self._cleanup = atexit.register(functools.partial(shutil.rmtree, self.directory, True))
        self.endpoint = LocalEndpoint(node_id, f"ipc://{self.directory}/in", f"ipc://{self.directory}/calls")
        context = zmq.asyncio.Context.instance()
        self.socket = context.socket(zmq.PULL)
        self.socket.bind(self.endpoint.address)
        self.calls = context.socket(zmq.PUSH)
        self.calls.bind(self.endpoint.calls_address)

    async def messages(self) -> AsyncIterator[DeltaBatch | CallsOpen | SubmitReply]:
        while True:
            yield pickle.loads(await self.socket.recv())

    async def send_calls(self, batch: int, calls: list[GenerateCall]) -> None:
        """Hand a batch of calls to the replica; `zmq.Again` at once when no replica is connected."""
        await self.calls.send(dumps((batch, calls)), flags=zmq.NOBLOCK)

    def close(self) -> None:
        self.socket.close(linger=0)
        self.calls.close(linger=0)
        shutil.rmtree(self.directory, ignore_errors=True)
        atexit.unregister(self._cleanup)


StartCalls = Callable[[list[GenerateCall]], list[Exception | None]]


async def push_batches(outbox: Outbox, endpoint: LocalEndpoint, start_calls: StartCalls | None = None) -> None:
    """The replica's end: every batch of `outbox`, in order, until cancelled; with `start_calls`, also the
    reader's calls batches, each answered on the same socket."""
    context = zmq.asyncio.Context.instance()
    socket = context.socket(zmq.PUSH)
    socket.connect(endpoint.address)
    calls = None
    if start_calls is not None and endpoint.calls_address is not None:
        calls = context.socket(zmq.PULL)
        calls.connect(endpoint.calls_address)

    async def forward() -> None:
        if calls is not None:
            await socket.send(dumps(CallsOpen()))
        async for batch in outbox.batches():
            await socket.send(dumps(batch))

    async def answer() -> None:
        while True:
            batch, requested = pickle.loads(await calls.recv())
            await socket.send(dumps(SubmitReply(batch, start_calls(requested))))

    tasks = [asyncio.create_task(forward())] + ([asyncio.create_task(answer())] if calls is not None else [])
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # raise what stopped it
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        socket.close(linger=0)
        if calls is not None:
            calls.close(linger=0)


async def heartbeats_while_pushing(outbox: Outbox, endpoint: LocalEndpoint,
                                   start_calls: StartCalls | None = None) -> AsyncIterator[DeltaBatch]:
    """Push `outbox` to `endpoint` (and take its calls with `start_calls`), yielding an empty batch for the Ray
    stream every HEARTBEAT_S; raises what stopped the pushing."""
    pusher = asyncio.create_task(push_batches(outbox, endpoint, start_calls))
    try:
        while True:
            done, _ = await asyncio.wait({pusher}, timeout=HEARTBEAT_S)
            if done:
                pusher.result()
                return
            yield DeltaBatch([])
    finally:
        pusher.cancel()
