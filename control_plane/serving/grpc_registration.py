"""What Ray Serve's gRPC proxy imports to register vLLM's `VllmEngine` service: the generated code, and a relay
that makes a client's cancellation reach the ingress.

The proxy must answer Serve's readiness check within seconds of starting; importing the servicer itself
(`grpc_servicer.py`: vLLM, the gateway, the router's dependencies) takes longer than that on a busy host, and
Serve then kills the proxy as unhealthy. So the proxy imports this module (nothing Serve has not imported
already), and the ingress imports both.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable

from ray.serve._private.proxy_request_response import gRPCStreamingType
from smg_grpc_proto.generated import common_pb2, vllm_engine_pb2_grpc
from smg_grpc_proto.generated import vllm_engine_pb2 as pb

# The generated messages name their module `vllm_engine_pb2` (protoc's flat layout), and Ray Serve pickles
# requests from its gRPC proxy to the ingress: both processes import this module, which makes that name
# importable before any message crosses.
sys.modules.setdefault("vllm_engine_pb2", pb)
sys.modules.setdefault("common_pb2", common_pb2)

GRPC_SERVICER_FUNCTIONS = ["rayfleet.control_plane.serving.grpc_registration:add_servicer_to_server"]


def add_servicer_to_server(servicer, server) -> None:
    """What Serve's gRPC proxy registers (`grpc_servicer_functions`): vLLM's VllmEngine service.

    Serve's server builds each method's handler from its `service_handler_factory` as the service registers;
    the streaming ones are built through `cancellable_streams` (below) instead.
    """
    factory = getattr(server, "service_handler_factory", None)
    if factory is None:  # a plain gRPC server (not Serve's proxy): nothing to relay
        vllm_engine_pb2_grpc.add_VllmEngineServicer_to_server(servicer, server)
        return
    server.service_handler_factory = cancellable_streams(factory)
    try:
        vllm_engine_pb2_grpc.add_VllmEngineServicer_to_server(servicer, server)
    finally:
        server.service_handler_factory = factory


def cancellable_streams(factory: Callable) -> Callable:
    """Serve's handler factory, its server-streaming handlers relayed through `relay_until_the_call_ends`."""

    def build(service_method: str, streaming_type: gRPCStreamingType) -> Callable:
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        if streaming_type != gRPCStreamingType.UNARY_STREAM:
            return handler

        async def unary_stream(request_proto, context):
            stream = handler(request_proto, PeerReadUpFront(context))
            async for message in relay_until_the_call_ends(stream, context):
                yield message

        return unary_stream

    return build


async def relay_until_the_call_ends(stream: AsyncIterator, context) -> AsyncIterator:
    """`stream`'s messages, pulled by a task of their own that the call's end cancels.

    Serve's proxy cancels its request to the ingress (which aborts it in the engine) only when the client's
    cancellation lands while the proxy awaits the ingress' next message. One landing while the proxy writes a
    message to the client (always, once a client that stopped reading has filled its flow-control window) ends
    the call and leaves the request streaming to its last token (the gap ray-project/ray#42665 named; closed
    unmerged). The pulling task here never writes to the client, so the cancellation always finds it awaiting
    the ingress.
    """
    messages: asyncio.Queue = asyncio.Queue()  # unbounded: what Ray's stream would buffer for a slow client anyway
    puller = asyncio.ensure_future(_pull(stream, messages))
    puller.add_done_callback(lambda _: messages.put_nowait(_END))
    context.add_done_callback(lambda _: puller.cancel())
    try:
        while (message := await messages.get()) is not _END:
            yield message
    finally:
        puller.cancel()
    puller.result()  # what Serve's handler raised, if it did


class PeerReadUpFront:
    """A call's context with its peer read while the call lives.

    gRPC frees the call when the call ends; Serve's handler, pulled on past a cancellation by the relay, then
    asks the context for the peer for its access log, which on the freed call is a segfault of the proxy. What
    else the handler uses (metadata, code, details) stays readable after the call.
    """

    def __init__(self, context):
        self._context = context
        self._peer = context.peer()

    def peer(self) -> str:
        return self._peer

    def __getattr__(self, name: str):
        return getattr(self._context, name)


async def _pull(stream: AsyncIterator, messages: asyncio.Queue) -> None:
    async for message in stream:
        messages.put_nowait(message)


_END = object()
