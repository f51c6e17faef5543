"""The gRPC endpoint speaks vLLM's own gRPC protocol: the `VllmEngine` service of `smg-grpc-proto`.

That is the protocol `vllm serve --grpc` serves and that tokenizing gateways (SMG) call: tokens in, tokens
out. rayfleet serves it through Ray Serve's gRPC proxy on the same ingress deployment as HTTP, so a gRPC
request gets the same admission, routing, token ledger, live migration and failover as an HTTP one. Sampling
params are converted by vLLM's servicer's own function; this module only maps between the proto messages
and the fleet's token stream.

The service has no model field: the pool comes from the gRPC metadata key `rayfleet-pool` (optional when
the fleet has a single pool).
"""

from __future__ import annotations

import dataclasses

import grpc
from smg_grpc_proto.generated import vllm_engine_pb2 as pb
from vllm.exceptions import VLLMValidationError
from vllm.entrypoints.scale_out.token_in_token_out.protocol import (
    GenerateLogProbs,
    GenerateTokensChoice,
    GenerateTokensStreamChoice,
)

from rayfleet.actors.replica.protocol import GenerateCall
from rayfleet.control_plane.serving import grpc_registration  # noqa: F401 (aliases the message modules)
from rayfleet.control_plane.serving.auth import Principal
from rayfleet.control_plane.serving.errors import OpenAIHTTPError
from rayfleet.control_plane.serving.gateway import FleetGateway, logger
from rayfleet.control_plane.serving.ledger import ReplayImpossible
from rayfleet.control_plane.serving.rendering import RenderError
from rayfleet.control_plane.serving.request_limits import check_counts, check_prompt_tokens
from rayfleet.control_plane.serving.request_telemetry import ClientRequest

POOL_METADATA_KEY = "rayfleet-pool"
# HTTP statuses of the ingress' errors -> gRPC status codes
GRPC_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
               403: grpc.StatusCode.PERMISSION_DENIED, 409: grpc.StatusCode.ALREADY_EXISTS,
               413: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
               503: grpc.StatusCode.UNAVAILABLE}
# gRPC codes -> HTTP statuses, for the requests metric's label (the first status of a code wins)
HTTP_STATUS = {code: status for status, code in reversed(GRPC_STATUS.items())}


class GrpcRequestError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details

    def __reduce__(self):  # Serve ships it from the ingress to its gRPC proxy
        return type(self), (self.code, self.details)


def pool_from_metadata(metadata: list[tuple[str, str]], pools: list[str]) -> str:
    named = [value for key, value in metadata if key == POOL_METADATA_KEY]
    if not named:
        if len(pools) == 1:
            return pools[0]
        raise GrpcRequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"set gRPC metadata '{POOL_METADATA_KEY}' to one of: {', '.join(pools)}")
    if named[0] not in pools:
        raise GrpcRequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"unknown pool '{named[0]}' in '{POOL_METADATA_KEY}'; pools: {', '.join(pools)}")
    return named[0]


def call_from_proto(request: pb.GenerateRequest, max_model_len: int, vocab_size: int) -> GenerateCall:
    """A validated engine call from a `GenerateRequest` (tokenized input only)."""
    from smg_grpc_servicer.vllm.servicer import VllmEngineServicer

    if request.WhichOneof("input") != "tokenized" or not request.tokenized.input_ids:
        raise GrpcRequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               "send tokenized input (input.tokenized.input_ids); text goes to the HTTP endpoint")
    prompt = list(request.tokenized.input_ids)
    if max(prompt) >= vocab_size:
        raise GrpcRequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"token id {max(prompt)} is outside the vocabulary (size {vocab_size})")
    try:  # vLLM's SamplingParams validate themselves (ranges, combinations) as they are built
        params = VllmEngineServicer._sampling_params_from_proto(request.sampling_params, stream=True)
    except (ValueError, TypeError, VLLMValidationError) as error:
        raise GrpcRequestError(grpc.StatusCode.INVALID_ARGUMENT, f"sampling_params: {error}") from None
    if params.max_tokens is None:
        params.max_tokens = max_model_len - len(prompt)
    if len(prompt) + params.max_tokens > max_model_len:
        raise GrpcRequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                               f"model's context length ({max_model_len})")
    if not request.request_id:
        raise GrpcRequestError(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
    return GenerateCall(request_id=request.request_id, prompt_token_ids=prompt, sampling_params=params)


def output_logprobs(logprobs: GenerateLogProbs | None) -> pb.OutputLogProbs | None:
    if logprobs is None or not logprobs.content:
        return None
    return pb.OutputLogProbs(
        token_logprobs=[entry.logprob for entry in logprobs.content],
        token_ids=[entry.token_id for entry in logprobs.content],
        top_logprobs=[pb.TopLogProbs(values=[t.logprob for t in entry.top_logprobs],
                                     token_ids=[t.token_id for t in entry.top_logprobs])
                      for entry in logprobs.content],
    )


def chunk_response(choice: GenerateTokensStreamChoice, prompt_tokens: int, cached_tokens: int) -> pb.GenerateResponse:
    return pb.GenerateResponse(chunk=pb.GenerateStreamChunk(
        token_ids=choice.token_ids or [], prompt_tokens=prompt_tokens, completion_tokens=len(choice.token_ids or []),
        cached_tokens=cached_tokens, output_logprobs=output_logprobs(choice.logprobs), index=choice.index))


def complete_response(index: int, output_ids: list[int], finish_reason: str, stop_reason, prompt_tokens: int,
                      cached_tokens: int, logprobs: GenerateLogProbs | None) -> pb.GenerateResponse:
    complete = pb.GenerateComplete(output_ids=output_ids, finish_reason=finish_reason, prompt_tokens=prompt_tokens,
                                   completion_tokens=len(output_ids), cached_tokens=cached_tokens,
                                   output_logprobs=output_logprobs(logprobs), index=index)
    if isinstance(stop_reason, str):
        complete.matched_stop_str = stop_reason
    elif isinstance(stop_reason, int):
        complete.matched_token_id = stop_reason
    return pb.GenerateResponse(complete=complete)


class GrpcServicer(FleetGateway):
    """Mixin of the Serve ingress: the `VllmEngine` RPCs, named as the service names them."""

    async def Generate(self, request, grpc_context):  # noqa: N802 (the RPC's name)
        """Tokens in, tokens out, through admission, routing and the ledger like HTTP requests."""
        metadata = grpc_context.invocation_metadata()
        client = self.telemetry.begin("grpc VllmEngine/Generate", dict(metadata))
        try:
            principal = self._grpc_authenticate(grpc_context)
            pool = pool_from_metadata(metadata, list(self.renderers))
            client.pool = pool
            await self.ensure_renderers()
            renderer = self.renderers[pool]
            config = renderer.state.vllm_config.model_config
            call = call_from_proto(request, config.max_model_len, config.get_vocab_size())
            limits = self.spec.ingress.limits
            check_counts(call.sampling_params.n, request.sampling_params.max_tokens or None, limits)
            check_prompt_tokens(len(call.prompt_token_ids), limits)
            renderer.verify(call.sampling_params, call.prompt_token_ids)
            # Request ids are the client's: scoped by its tenant, so no one else can reach (or abort) them.
            call = dataclasses.replace(call, request_id=principal.scoped_id(call.request_id))
            placement, _ = await self.admit_and_place(self.info_from_call(call, pool), client.trace)
            ledger = self.open_ledger(call, placement, principal, pool, client)
        except OpenAIHTTPError as error:
            self.telemetry.end(client, error.status, error)
            _fail(grpc_context, GRPC_STATUS.get(error.status, grpc.StatusCode.INTERNAL), error.message)
        except RenderError as error:
            self.telemetry.end(client, error.status_code, error)
            _fail(grpc_context, GRPC_STATUS.get(error.status_code, grpc.StatusCode.INTERNAL), str(error))
        except GrpcRequestError as error:
            self.telemetry.end(client, HTTP_STATUS.get(error.code, 400), error)
            _fail(grpc_context, error.code, error.details)
        async for response in self._generate(request, grpc_context, ledger, pool, client):
            yield response

    async def _generate(self, request, grpc_context, ledger, pool: str, client: ClientRequest):
        prompt_tokens = len(ledger.call.prompt_token_ids)
        outputs: dict[int, GenerateTokensChoice] = {}
        status, failure = 499, None  # until the stream ends one way or another
        try:
            async for choice in self.follow(ledger, pool):
                cached = ledger.num_cached_tokens or 0
                if request.stream and choice.finish_reason is None:
                    yield chunk_response(choice, prompt_tokens, cached)
                    continue
                total = outputs.setdefault(choice.index, GenerateTokensChoice(index=choice.index, token_ids=[]))
                total.token_ids.extend(choice.token_ids or [])
                if choice.finish_reason is not None:
                    ids = (choice.token_ids or []) if request.stream else total.token_ids
                    yield complete_response(choice.index, ids, choice.finish_reason, choice.stop_reason,
                                            prompt_tokens, cached, choice.logprobs)
            status = 200
        except ReplayImpossible as error:
            status, failure = 503, error
            _fail(grpc_context, grpc.StatusCode.UNAVAILABLE, str(error))
        except Exception as error:
            status, failure = 500, error
            logger.exception("gRPC stream of %s failed", ledger.request_id)
            _fail(grpc_context, grpc.StatusCode.INTERNAL,
                  f"generation failed ({type(error).__name__}); the request was aborted")
        finally:
            self.telemetry.end(client, status, failure)

    async def HealthCheck(self, request, grpc_context):  # noqa: N802
        snapshot, _ = await self.fleet_view()
        empty = self.unserved_pools(snapshot)
        return pb.HealthCheckResponse(healthy=not empty, message=f"no ready replica in: {', '.join(empty)}"
                                      if empty else "ok")

    async def Abort(self, request, grpc_context):  # noqa: N802
        principal = self._grpc_authenticate(grpc_context)
        for request_id in request.request_ids:
            ledger = self.ledgers.get(principal.scoped_id(request_id))
            if ledger is not None and ledger.placement is not None:
                await ledger.placement.replica.abort.remote(ledger.request_id)
        return pb.AbortResponse()

    async def GetModelInfo(self, request, grpc_context):  # noqa: N802
        pool = pool_from_metadata(grpc_context.invocation_metadata(), list(self.renderers))
        await self.ensure_renderers()
        config = self.renderers[pool].state.vllm_config.model_config
        return pb.GetModelInfoResponse(model_path=config.model, is_generation=True,
                                       max_context_length=config.max_model_len, vocab_size=config.get_vocab_size(),
                                       served_model_name=pool, tokenizer_path=config.tokenizer,
                                       max_req_input_len=config.max_model_len)

    def _grpc_authenticate(self, grpc_context) -> Principal:
        try:
            return self.authenticate(dict(grpc_context.invocation_metadata()).get("authorization", ""),
                                     "metadata 'authorization: Bearer <key>'")
        except OpenAIHTTPError as error:
            _fail(grpc_context, grpc.StatusCode.UNAUTHENTICATED, error.message)


def _fail(grpc_context, code: grpc.StatusCode, details: str):
    """Ray Serve sends the status set on the context when the handler raises."""
    grpc_context.set_code(code)
    grpc_context.set_details(details)
    raise GrpcRequestError(code, details)
