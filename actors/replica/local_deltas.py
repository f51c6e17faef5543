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
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from typing import AsyncIterator

import zmq
import zmq.asyncio

from rayfleet.actors.replica.delta_stream import Outbox
from rayfleet.actors.replica.protocol import DeltaBatch

HEARTBEAT_S = 1.0  # how often the Ray stream carries an empty batch: how soon a replica notices its reader left


@dataclass(frozen=True)
class LocalEndpoint:
    """Where a reader takes batches over ZMQ, and the Ray node it is on (only a replica there pushes to it)."""

    node_id: str
    address: str


class DeltaInbox:
    """The reader's end: a PULL socket at a fresh private `ipc://` path."""

    def __init__(self, node_id: str) -> None:
        self.directory = tempfile.mkdtemp(prefix="rayfleet-deltas-")  # mode 0700
        # A process that exits without closing its streams still removes its directories.
        self._cleanup = atexit.register(functools.partial(shutil.rmtree, self.directory, True))
        self.endpoint = LocalEndpoint(node_id, f"ipc://{self.directory}/in")
        self.socket = zmq.asyncio.Context.instance().socket(zmq.PULL)
        self.socket.bind(self.endpoint.address)

    async def batches(self) -> AsyncIterator[DeltaBatch]:
        while True:
            yield pickle.loads(await self.socket.recv())

    def close(self) -> None:
        self.socket.close(linger=0)
        shutil.rmtree(self.directory, ignore_errors=True)
        atexit.unregister(self._cleanup)


async def push_batches(outbox: Outbox, address: str) -> None:
    """The replica's end: every batch of `outbox`, in order, until cancelled."""
    socket = zmq.asyncio.Context.instance().socket(zmq.PUSH)
    socket.connect(address)
    try:
        async for batch in outbox.batches():
            await socket.send(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        socket.close(linger=0)


async def heartbeats_while_pushing(outbox: Outbox, address: str) -> AsyncIterator[DeltaBatch]:
    """Push `outbox` to `address`, yielding an empty batch for the Ray stream every HEARTBEAT_S; raises what
    stopped the pushing."""
    pusher = asyncio.create_task(push_batches(outbox, address))
    try:
        while True:
            done, _ = await asyncio.wait({pusher}, timeout=HEARTBEAT_S)
            if done:
                pusher.result()
                return
            yield DeltaBatch([])
    finally:
        pusher.cancel()
