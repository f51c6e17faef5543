"""Token deltas over a local socket: a reader on the replica's node gets every batch there, in order, while the
Ray stream carries only heartbeats; a reader elsewhere gets them on the Ray stream; either way a request's tokens
are whole, and the reader's socket leaves nothing behind. Requests start over the socket's way back once the
replica opens it, each call answered; a call left unanswered fails with the stream, one that finds no replica at
the socket goes as a Ray call. Real fleet, real engines, real ZMQ."""

from __future__ import annotations

import asyncio
import os
import pickle
import time
import uuid

import pytest
import ray

import zmq
import zmq.asyncio

from rayfleet.actors.replica.local_deltas import HEARTBEAT_S, CallsOpen, DeltaInbox, LocalEndpoint, SubmitReply, dumps
from rayfleet.actors.replica.protocol import DeltaBatch, ReplicaNotAccepting, portable_error
from rayfleet.control_plane.serving.ledger import Placement, TokenLedger, follow
from rayfleet.control_plane.serving.replica_streams import ReplicaStreams, SubmitBatcher
from test_batched_streams import token_call
from test_live_migration import replica_handle

pytestmark = pytest.mark.engines


async def tokens_by_transport(replica, endpoint: LocalEndpoint, inbox: DeltaInbox | None, max_tokens: int):
    """Open the replica's stream for a fresh reader with `endpoint`, start one request there, and collect its
    tokens from each transport until it ends: (tokens from the socket, tokens from the Ray stream, how many
    Ray items came, seconds it took)."""
    subscriber = f"test-{uuid.uuid4().hex[:8]}"
    stream = replica.deltas.options(num_returns="streaming").remote(subscriber, endpoint)
    call = token_call(f"local-{uuid.uuid4().hex[:8]}", 3, max_tokens)
    assert await replica.submit.remote([call], subscriber) == [None]
    got = {"socket": [], "ray": [], "ray_items": 0}
    done = asyncio.Event()

    def take(batch, transport: str) -> None:
        for delta in batch.deltas:
            assert delta.request_id == call.request_id and delta.error is None
            if delta.chunk is None:
                done.set()
            else:
                got[transport] += [t for choice in delta.chunk.choices for t in choice.token_ids or []]

    async def from_ray() -> None:
        async for ref in stream:
            got["ray_items"] += 1
            take(await ref, "ray")

    async def from_socket() -> None:
        async for message in inbox.messages():
            if isinstance(message, DeltaBatch):
                take(message, "socket")

    began = time.monotonic()
    readers = [asyncio.create_task(from_ray())] + ([asyncio.create_task(from_socket())] if inbox else [])
    try:
        await asyncio.wait_for(done.wait(), timeout=120)
    finally:
        for reader in readers:
            reader.cancel()
        ray.cancel(stream)
    return got["socket"], got["ray"], got["ray_items"], time.monotonic() - began


async def test_a_reader_on_the_replicas_node_gets_every_token_over_its_socket_and_only_heartbeats_over_ray(fleet):
    replica = replica_handle(fleet.replicas("tiny-b")[0]["replica_id"])
    inbox = DeltaInbox(ray.get_runtime_context().get_node_id())
    try:
        socket_tokens, ray_tokens, ray_items, seconds = await tokens_by_transport(replica, inbox.endpoint, inbox, 40)
    finally:
        inbox.close()
    assert len(socket_tokens) == 40 and ray_tokens == []
    # Heartbeats only: one a second while the request ran, not one per engine step.
    assert ray_items <= seconds / HEARTBEAT_S + 2, f"{ray_items} Ray items in {seconds:.1f} s"
    assert not os.path.exists(inbox.directory), "the socket's directory outlived its inbox"


async def test_a_reader_on_another_node_gets_its_batches_on_the_ray_stream(fleet):
    replica = replica_handle(fleet.replicas("tiny-b")[0]["replica_id"])
    elsewhere = LocalEndpoint(node_id="another-node", address="ipc:///nonexistent/in")
    socket_tokens, ray_tokens, ray_items, _ = await tokens_by_transport(replica, elsewhere, None, 40)
    assert socket_tokens == [] and len(ray_tokens) == 40 and ray_items >= 2


@pytest.mark.parametrize("local", [True, False], ids=["socket", "ray-stream"])
async def test_concurrent_requests_through_the_ledger_are_whole_over_either_transport(fleet, local):
    """Sixteen requests at once through the ledger, on one replica's shared stream: each gets exactly its
    tokens, and the same ones over the socket as over the Ray stream (greedy)."""
    replica_id = fleet.replicas("tiny-b")[0]["replica_id"]
    replica = replica_handle(replica_id)
    streams = ReplicaStreams(local=local)

    async def nowhere(_call, _exclude):
        raise AssertionError("a request was replayed")

    async def run(i: int) -> list[int]:
        call = token_call(f"whole-{local}-{i}-{time.monotonic_ns()}", i, 24)
        ledger = TokenLedger(call, placement=Placement(replica_id, replica))
        return [t async for choice in follow(ledger, nowhere, streams, max_replays=0) for t in choice.token_ids or []]

    before = await replica.delta_stats.remote()
    results = await asyncio.gather(*(run(i) for i in range(16)))
    assert all(len(tokens) == 24 for tokens in results)
    reference = await asyncio.gather(*(run(i) for i in (0, 5)))
    assert reference == [results[0], results[5]], "the same greedy request gave other tokens"
    after = await replica.delta_stats.remote()
    over_socket = after["socket_submits"] - before["socket_submits"]
    over_ray = after["submit_calls"] - before["submit_calls"] - over_socket
    if local:  # the first call may beat the replica's `CallsOpen` and go as a Ray call; the rest do not
        assert over_socket >= 1 and over_ray <= 1, f"{over_socket} calls over the socket, {over_ray} over Ray"
    else:
        assert over_socket == 0 and over_ray >= 1
    stream = streams.streams[replica_id]
    stream.reader.cancel()
    await asyncio.gather(stream.reader, return_exceptions=True)


async def test_the_deployed_ingress_reads_its_replicas_deltas_over_the_socket(fleet, async_client):
    """The fleet's own ingress (a Serve replica on this node) takes its replica's batches over a socket."""
    completion = await async_client.chat.completions.create(
        model="tiny-a", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0)
    assert completion.usage.completion_tokens == 8
    replica = replica_handle(fleet.replicas("tiny-a")[0]["replica_id"])
    assert (await replica.delta_stats.remote())["local_readers"] >= 1


async def opened_inbox(batcher: SubmitBatcher, connect_calls: bool = True):
    """An inbox whose replica end is two bare sockets this test drives: it says `CallsOpen` and then answers
    (or does not) by hand. Returns the inbox, the replica's delta socket and its calls socket (connected to the
    inbox only with `connect_calls`)."""
    inbox = DeltaInbox("this-node")
    context = zmq.asyncio.Context.instance()
    deltas, calls = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    deltas.connect(inbox.endpoint.address)
    if connect_calls:
        calls.connect(inbox.endpoint.calls_address)
    await deltas.send(dumps(CallsOpen()))
    assert isinstance(await asyncio.wait_for(anext(inbox.messages()), 10), CallsOpen)
    batcher.calls_open(inbox)
    return inbox, deltas, calls


async def test_a_call_over_the_socket_gets_its_own_answer_and_one_left_unanswered_fails_with_the_stream():
    batcher = SubmitBatcher(replica=None, subscriber="test")  # no Ray fallback here: every call must go by socket
    inbox, deltas, calls = await opened_inbox(batcher)
    try:
        refused = asyncio.create_task(batcher.submit(token_call("refused", 1, 4)))
        number, sent = pickle.loads(await asyncio.wait_for(calls.recv(), 10))
        assert [c.request_id for c in sent] == ["refused"]
        batcher.answered(SubmitReply(number + 1000, [None]))  # someone else's answer changes nothing
        await asyncio.sleep(0)
        assert not refused.done()
        batcher.answered(SubmitReply(number, [ValueError("request id refused is already running")]))
        with pytest.raises(ValueError, match="already running"):
            await asyncio.wait_for(refused, 10)

        lost = asyncio.create_task(batcher.submit(token_call("lost", 2, 4)))
        await asyncio.wait_for(calls.recv(), 10)  # it reached the replica, which dies before answering
        batcher.fail(ReplicaNotAccepting("replica r closed its stream"))
        with pytest.raises(ReplicaNotAccepting, match="closed its stream"):
            await asyncio.wait_for(lost, 10)
        assert batcher.inbox is None and not batcher.replies
    finally:
        deltas.close(linger=0)
        calls.close(linger=0)
        inbox.close()


async def test_a_call_that_finds_no_replica_at_the_socket_goes_as_a_ray_call(fleet):
    replica = replica_handle(fleet.replicas("tiny-b")[0]["replica_id"])
    subscriber = f"test-{uuid.uuid4().hex[:8]}"
    stream = replica.deltas.options(num_returns="streaming").remote(subscriber, None)  # where its tokens go
    batcher = SubmitBatcher(replica, subscriber)
    inbox, deltas, calls = await opened_inbox(batcher, connect_calls=False)  # no replica at the calls socket
    try:
        before = await replica.delta_stats.remote()
        await asyncio.wait_for(batcher.submit(token_call(f"fallback-{uuid.uuid4().hex[:8]}", 3, 4)), 60)
        after = await replica.delta_stats.remote()
        assert after["submit_calls"] - before["submit_calls"] == 1
        assert after["socket_submits"] == before["socket_submits"]
    finally:
        ray.cancel(stream)  # the reader leaves: the replica closes its outbox and aborts what is left
        deltas.close(linger=0)
        calls.close(linger=0)
        inbox.close()


class NeedsTwoArguments(Exception):
    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"{what}: {why}")


def test_an_error_another_process_cannot_unpickle_travels_as_its_name_and_message():
    """A refusal or a request's error rides a batch to the reader's process: one that would not unpickle there
    (its `__init__` wants more than its `args`) would break the whole batch, so it travels as its text."""
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(NeedsTwoArguments("prompt", "too long")))
    odd = portable_error(NeedsTwoArguments("prompt", "too long"))
    assert type(odd) is RuntimeError and str(odd) == "NeedsTwoArguments: prompt: too long"
    assert pickle.loads(pickle.dumps(odd)).args == odd.args
    refused = ValueError("request id x is already running")
    assert portable_error(refused) is refused
