"""The ingress' end of the replicas' multiplexed streams: one Ray stream per replica for all its requests.

Each ingress process opens one `LLMReplica.deltas` stream per replica it uses, the first time it uses it, and
starts requests there with `submit` (or follows a migrated one with `attach_to`). A reader task per stream
hands each `RequestDelta` to the queue of its request; the ledger reads a request's chunks from that queue as
it read them from a per-request Ray stream before (`chunks` has the same shape), so migration and replay work
unchanged. A stream that fails (the replica died) fails every request on it with the error, which the ledger
treats as a lost replica; the next request to that replica opens a new stream.

Why: a Ray stream item costs tens of microseconds on each side, per request and token; here it is one item
per engine step for all of this ingress' requests on the replica, and from a replica on this node not a Ray
item at all but a message on a local socket (`local_deltas.py`), with the Ray stream kept for liveness.
Starting requests is batched the same way (`SubmitBatcher`): one `submit` call carries every request that
became ready while the previous call was on its way, so a lone request goes out at once and a burst of hundreds
costs a few calls, not hundreds (which queued the replica's calls, weight updates and health checks included,
for seconds); to a replica on this node the call is a message on the local socket's way back, not a Ray call.
The queue is registered before the request is handed to the batcher, so no delta can arrive for a request
nobody listens to yet.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import os
import uuid
from typing import AsyncIterator, Awaitable, Callable

import ray
import zmq

from rayfleet.actors.replica.delta_stream import read_chunks
from rayfleet.actors.replica.local_deltas import CallsOpen, DeltaInbox, SubmitReply
from rayfleet.actors.replica.protocol import DeltaBatch, GenerateCall, ReplicaChunk, ReplicaNotAccepting, RequestDelta

logger = logging.getLogger("rayfleet.ingress")


MAX_SUBMIT_BATCH = 64  # requests per `submit` call: the replica starts them in one go on its event loop


class SubmitBatcher:
    """Starts requests on one replica with at most one `submit` call on the way: what arrives meanwhile
    goes in the next call (no batching window, so an idle replica gets a request without delay). A Ray call,
    or a message on the local calls socket once the replica has opened it (`local_deltas.py`)."""

    def __init__(self, replica, subscriber: str) -> None:
        self.replica, self.subscriber = replica, subscriber
        self.pending: list[tuple[GenerateCall, asyncio.Future]] = []
        self.sender: asyncio.Task | None = None
        self.inbox: DeltaInbox | None = None  # the replica takes calls over this inbox's socket
        self.replies: dict[int, asyncio.Future] = {}  # calls batch number -> its refusals, once answered
        self.numbers = itertools.count()

    def calls_open(self, inbox: DeltaInbox) -> None:
        self.inbox = inbox

    def answered(self, reply: SubmitReply) -> None:
        waiting = self.replies.pop(reply.batch, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(reply.refusals)

    def fail(self, error: BaseException) -> None:
        """The replica's stream ended: calls not answered yet never will be (as a Ray call to a dead actor)."""
        self.inbox = None
        for waiting in self.replies.values():
            if not waiting.done():
                waiting.set_exception(error)
        self.replies.clear()

    async def _call(self, calls: list[GenerateCall]) -> list[Exception | None]:
        if self.inbox is not None:
            number = next(self.numbers)
            answer = self.replies[number] = asyncio.get_running_loop().create_future()
            try:
                await self.inbox.send_calls(number, calls)
            except zmq.Again:  # no connection yet (or any more): a Ray call reaches the replica or says it is gone
                self.replies.pop(number, None)
            else:
                return await answer
        return await self.replica.submit.remote(calls, self.subscriber)

    async def submit(self, call: GenerateCall) -> None:
        """Returns once the replica started `call`; raises what the replica refused it with."""
        started = asyncio.get_running_loop().create_future()
        self.pending.append((call, started))
        if self.sender is None or self.sender.done():
            # A fresh context, for the reason the stream's reader has one: a batch carries many requests.
            self.sender = asyncio.create_task(self._send(), context=contextvars.Context())
        await started

    async def _send(self) -> None:
        while self.pending:
            # A caller that left before its call went out (a client disconnect) is dropped, not started.
            batch = [(call, started) for call, started in self.pending[:MAX_SUBMIT_BATCH] if not started.done()]
            del self.pending[:MAX_SUBMIT_BATCH]
            if not batch:
                continue
            try:
                refusals = await self._call([call for call, _ in batch])
            except Exception as error:  # the replica is unreachable: every request in the call is lost there
                refusals = [error] * len(batch)
            for (_, started), refusal in zip(batch, refusals):
                if started.done():
                    continue
                if refusal is None:
                    started.set_result(None)
                else:
                    started.set_exception(refusal)


class ReplicaStream:
    """One replica's multiplexed stream to this process, and the requests listening on it. With `local`, a
    replica on this node sends the batches over a socket this stream binds (`local_deltas.py`)."""

    def __init__(self, replica_id: str, replica, local: bool = True) -> None:
        self.replica_id = replica_id
        self.replica = replica
        self.local = local
        self.subscriber = f"ingress-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.listeners: dict[str, asyncio.Queue[RequestDelta]] = {}
        self.batcher = SubmitBatcher(replica, self.subscriber)
        self.failure: BaseException | None = None
        # A fresh context: the stream must not belong to the request that happens to open it. Ray counts a
        # call made inside a request's actor task as that task's child, and Serve cancels a request whose
        # client left recursively, which would end the stream of every request on the replica.
        self.reader = asyncio.create_task(self._read(), context=contextvars.Context())

    def _deliver(self, batch: DeltaBatch) -> None:
        for delta in batch.deltas:
            listener = self.listeners.get(delta.request_id)
            if listener is not None:  # else the client left: the request was aborted
                listener.put_nowait(delta)

    def _open_inbox(self) -> DeltaInbox | None:
        if not self.local:
            return None
        try:
            return DeltaInbox(ray.get_runtime_context().get_node_id())
        except Exception as error:  # e.g. no writable temporary directory: the Ray stream carries the batches
            logger.warning("no local socket for replica %s's deltas (%r); they come as Ray stream items",
                           self.replica_id, error)
            return None

    async def _read_inbox(self, inbox: DeltaInbox) -> None:
        try:
            async for message in inbox.messages():
                if isinstance(message, SubmitReply):
                    self.batcher.answered(message)
                elif isinstance(message, CallsOpen):
                    self.batcher.calls_open(inbox)
                else:
                    self._deliver(message)
        except Exception:  # a batch that cannot be read: end the stream, so that its requests replay
            logger.exception("local deltas from replica %s failed", self.replica_id)
            self.reader.cancel()

    async def _read(self) -> None:
        inbox = self._open_inbox()
        inbox_reader = asyncio.create_task(self._read_inbox(inbox)) if inbox else None
        try:
            stream = self.replica.deltas.options(num_returns="streaming").remote(
                self.subscriber, inbox.endpoint if inbox else None)
            async for ref in stream:  # batches, or only heartbeats where the replica pushes to the inbox
                self._deliver(await ref)
            self.failure = ReplicaNotAccepting(f"replica {self.replica_id} closed its stream")
        except asyncio.CancelledError:
            self.failure = ReplicaNotAccepting(f"stream from replica {self.replica_id} was closed")
            raise
        except Exception as error:  # the replica died or its actor is unreachable: every listener replays
            self.failure = error
        finally:
            self.batcher.fail(self.failure)
            if inbox is not None:
                inbox_reader.cancel()  # nothing it has not delivered yet reaches a listener: the ledger replays it
                inbox.close()
            logger.info("stream from replica %s ended (%s)", self.replica_id, type(self.failure).__name__)
            for request_id, listener in self.listeners.items():
                listener.put_nowait(RequestDelta(request_id, error=self.failure))

    async def chunks(self, request_id: str, start: Callable[[], Awaitable[None]]) -> AsyncIterator[ReplicaChunk]:
        """The request's chunks on this replica; `start()` makes the replica send them here."""
        if self.failure is not None:
            raise self.failure
        listener = self.listeners[request_id] = asyncio.Queue()
        try:
            await start()
            async for chunk in read_chunks(listener):
                yield chunk
        finally:
            # A request that migrated away and back listens here again under a newer queue: keep that one.
            if self.listeners.get(request_id) is listener:
                del self.listeners[request_id]


class ReplicaStreams:
    """This process' streams, one per replica (by id); a failed one is replaced on next use. `local`: take the
    batches of replicas on this node over a socket (`local_deltas.py`) rather than as Ray stream items."""

    def __init__(self, local: bool = True) -> None:
        self.streams: dict[str, ReplicaStream] = {}
        self.local = local

    def stream(self, replica_id: str, replica) -> ReplicaStream:
        stream = self.streams.get(replica_id)
        if stream is None or stream.failure is not None:
            stream = self.streams[replica_id] = ReplicaStream(replica_id, replica, self.local)
        return stream

    def generate(self, replica_id: str, replica, call: GenerateCall) -> AsyncIterator[ReplicaChunk]:
        stream = self.stream(replica_id, replica)
        return stream.chunks(call.request_id, lambda: stream.batcher.submit(call))

    def attach(self, replica_id: str, replica, request_id: str) -> AsyncIterator[ReplicaChunk]:
        stream = self.stream(replica_id, replica)
        return stream.chunks(request_id, lambda: replica.attach_to.remote(request_id, stream.subscriber))
