"""The OpenAI-compatible ingress: a Ray Serve deployment that owns each client's stream.

Per request: authenticate; render with vLLM's renderer for the pool (`model` names a pool, or `auto`);
admit and route with the spec's policies over the controller's fleet snapshot; open the request's token
ledger and follow it across replicas; derender token chunks back into OpenAI responses with vLLM's
derenderer. Replicas never see OpenAI JSON, and the client never sees which replica produced a token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from typing import Any, AsyncIterator

import grpc
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionStreamResponse
from vllm.entrypoints.openai.completion.protocol import CompletionStreamResponse
from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateLogProbs, GenerateTokensChoice
from vllm.entrypoints.serve.engine.protocol import UsageInfo

from rayfleet.actors.replica_protocol import GenerateCall
from rayfleet.control_plane import grpc_service
from rayfleet.control_plane.controller import CONTROLLER_NAME, NAMESPACE
from rayfleet.control_plane.errors import OpenAIHTTPError, error_response_json
from rayfleet.control_plane.ledger import Placement, TokenLedger, follow
from rayfleet.control_plane.rendering import PoolRenderer, RenderError, RenderedRequest
from rayfleet.control_plane.spec import FleetSpec, parse_spec
from rayfleet.policies import registry
from rayfleet.policies.base import (
    AdmissionVerdict,
    FleetSnapshot,
    NoReplicaAvailable,
    RequestInfo,
)

logger = logging.getLogger("rayfleet.ingress")

app = FastAPI(title="rayfleet", description="OpenAI-compatible endpoint of a rayfleet LLM fleet")
VIEW_TTL_S = 0.25  # the routing view is refreshed from the controller at most this often
QUEUE_WAIT_S = 0.05


@app.exception_handler(OpenAIHTTPError)
async def _openai_error(_: Request, error: OpenAIHTTPError) -> JSONResponse:
    return error.response()


@app.exception_handler(RenderError)
async def _render_error(_: Request, error: RenderError) -> JSONResponse:
    return error_response_json(error.response)


@app.exception_handler(Exception)
async def _internal_error(_: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error in the ingress")
    return OpenAIHTTPError(500, f"internal error ({type(error).__name__}); see the ingress log").response()


def overlay_local_load(snapshot: FleetSnapshot, ledgers: dict[str, TokenLedger]) -> FleetSnapshot:
    """The controller's view is up to one tick old; this ingress knows its own in-flight requests now."""
    tokens: dict[str, int] = {}
    requests: dict[str, int] = {}
    for ledger in ledgers.values():
        if ledger.placement is not None:
            rid = ledger.placement.replica_id
            tokens[rid] = tokens.get(rid, 0) + len(ledger.call.prompt_token_ids) + ledger.output_tokens
            requests[rid] = requests.get(rid, 0) + 1
    pools = {}
    for name, pool in snapshot.pools.items():
        replicas = tuple(
            dataclasses.replace(
                r,
                tokens_in_flight=max(r.tokens_in_flight, tokens.get(r.replica_id, 0)),
                num_running=max(r.num_running + r.num_waiting, requests.get(r.replica_id, 0)) - r.num_waiting,
            )
            for r in pool.replicas
        )
        pools[name] = dataclasses.replace(pool, replicas=replicas)
    return dataclasses.replace(snapshot, pools=pools)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2048)
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, spec: dict[str, Any]):
        self.spec: FleetSpec = parse_spec(spec)
        logging.basicConfig(level=self.spec.log_level)
        policies = self.spec.policies
        self.router = registry.create("router", policies.router.name, policies.router.params)
        self.admission = registry.create("admission", policies.admission.name, policies.admission.params)
        self.api_keys = set(self.spec.ingress.api_keys)
        if self.spec.ingress.api_keys_env:
            self.api_keys |= {k.strip() for k in os.environ.get(self.spec.ingress.api_keys_env, "").split(",")
                              if k.strip()}
        self.controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        self.renderers = {pool.name: PoolRenderer(pool.name, pool.model, pool.engine_args)
                          for pool in self.spec.pools}
        self._renderers_started = asyncio.Lock()
        self._started = False
        self._view: tuple[FleetSnapshot, dict[str, Any]] | None = None
        self._view_at = 0.0
        self.ledgers: dict[str, TokenLedger] = {}

    # ---------------------------------------------------------------- plumbing
    async def _ensure_renderers(self) -> None:
        if self._started:
            return
        async with self._renderers_started:
            if not self._started:
                await asyncio.gather(*(r.start() for r in self.renderers.values()))
                self._started = True

    async def _fleet_view(self, fresh: bool = False) -> tuple[FleetSnapshot, dict[str, Any]]:
        if fresh or self._view is None or time.monotonic() - self._view_at > VIEW_TTL_S:
            self._view = await self.controller.fleet_view.remote()
            self._view_at = time.monotonic()
        snapshot, handles = self._view
        return overlay_local_load(snapshot, self.ledgers), handles

    def _authenticate(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in self.api_keys:
            raise OpenAIHTTPError(401, "Incorrect API key provided. Send 'Authorization: Bearer <key>'.",
                                  err_type="invalid_request_error", param="authorization")

    async def _body(self, request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise OpenAIHTTPError(400, f"request body is not valid JSON: {error}", "invalid_request_error")
        if not isinstance(body, dict):
            raise OpenAIHTTPError(400, "request body must be a JSON object", "invalid_request_error")
        return body

    def _pool_for(self, model: Any) -> str | None:
        """The pool a request names, or None for `auto`; unknown names are a 400 naming the choices."""
        if model == "auto":
            return None
        if model not in self.renderers:
            raise OpenAIHTTPError(400, f"The model `{model}` does not exist. Available: "
                                       f"{', '.join(['auto', *self.renderers])}.",
                                  err_type="invalid_request_error", param="model")
        return model

    # ---------------------------------------------------------------- routes
    @app.get("/health")
    async def health(self) -> JSONResponse:
        snapshot, _ = await self._fleet_view()
        ready = {name: len(pool.routable_replicas) for name, pool in snapshot.pools.items()}
        status = 200 if not self._unserved_pools(snapshot) else 503
        return JSONResponse({"status": "ok" if status == 200 else "degraded", "ready_replicas": ready},
                            status_code=status)

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._authenticate(request)
        created = int(time.time())
        data = [{"id": pool.name, "object": "model", "created": created, "owned_by": "rayfleet",
                 "root": pool.model, "metadata": {"tags": pool.tags}} for pool in self.spec.pools]
        data.append({"id": "auto", "object": "model", "created": created, "owned_by": "rayfleet",
                     "root": "router:" + self.spec.policies.router.name})
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve("chat", request)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve("completion", request)

    @app.get("/v1/fleet/status")
    async def fleet_status(self, request: Request) -> JSONResponse:
        self._authenticate(request)
        return JSONResponse(await self.controller.status.remote())

    @app.post("/v1/fleet/scale")
    async def fleet_scale(self, request: Request) -> JSONResponse:
        """Admin: {"pool": name, "replicas": n}; same as `rayfleet scale`."""
        self._authenticate(request)
        body = await self._body(request)
        return JSONResponse(await self._control(self.controller.scale, body, ("pool", str), ("replicas", int)))

    @app.post("/v1/fleet/migrate")
    async def fleet_migrate(self, request: Request) -> JSONResponse:
        """Admin: {"request_id", "src", "dst", "mode"?}; same as `rayfleet migrate`. Returns the record."""
        self._authenticate(request)
        body = await self._body(request)
        body.setdefault("mode", "precopy")
        return JSONResponse(await self._control(self.controller.migrate, body, ("request_id", str), ("src", str),
                                                ("dst", str), ("mode", str)))

    @staticmethod
    async def _control(method, body: dict[str, Any], *fields: tuple[str, type]):
        args = []
        for name, kind in fields:
            value = body.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise OpenAIHTTPError(400, f"'{name}' must be a {kind.__name__}", "invalid_request_error", name)
            args.append(value)
        try:
            return await method.remote(*args)
        except ray.exceptions.RayTaskError as error:
            if type(error.cause).__name__ == "FleetError":
                raise OpenAIHTTPError(400, str(error.cause), "invalid_request_error") from None
            raise

    # ---------------------------------------------------------------- gRPC (vLLM's VllmEngine service)
    async def Generate(self, request, grpc_context):  # noqa: N802 (the RPC's name)
        """Tokens in, tokens out, through admission, routing and the ledger like HTTP requests."""
        try:
            self._grpc_authenticate(grpc_context)
            pool = grpc_service.pool_from_metadata(grpc_context.invocation_metadata(), list(self.renderers))
            await self._ensure_renderers()
            config = self.renderers[pool].state.vllm_config.model_config
            call = grpc_service.call_from_proto(request, config.max_model_len, config.get_vocab_size())
            info = self._info_from_call(call, pool)
            placement, _ = await self._admit_and_place(info)
        except OpenAIHTTPError as error:
            self._grpc_fail(grpc_context, grpc_service.GRPC_STATUS.get(error.status, grpc.StatusCode.INTERNAL),
                            error.message)
        except grpc_service.GrpcRequestError as error:
            self._grpc_fail(grpc_context, error.code, error.details)
        ledger = self._open_ledger(call, placement)
        prompt_tokens = len(call.prompt_token_ids)
        outputs: dict[int, GenerateTokensChoice] = {}
        async for choice in self._follow(ledger, pool):
            cached = ledger.num_cached_tokens or 0
            if request.stream and choice.finish_reason is None:
                yield grpc_service.chunk_response(choice, prompt_tokens, cached)
                continue
            total = outputs.setdefault(choice.index, GenerateTokensChoice(index=choice.index, token_ids=[]))
            total.token_ids.extend(choice.token_ids or [])
            if choice.finish_reason is not None:
                ids = (choice.token_ids or []) if request.stream else total.token_ids
                yield grpc_service.complete_response(choice.index, ids, choice.finish_reason, choice.stop_reason,
                                                     prompt_tokens, cached, choice.logprobs)

    async def HealthCheck(self, request, grpc_context):  # noqa: N802
        from smg_grpc_proto.generated import vllm_engine_pb2 as pb

        snapshot, _ = await self._fleet_view()
        empty = self._unserved_pools(snapshot)
        return pb.HealthCheckResponse(healthy=not empty, message=f"no ready replica in: {', '.join(empty)}"
                                      if empty else "ok")

    async def Abort(self, request, grpc_context):  # noqa: N802
        from smg_grpc_proto.generated import vllm_engine_pb2 as pb

        self._grpc_authenticate(grpc_context)
        for request_id in request.request_ids:
            ledger = self.ledgers.get(request_id)
            if ledger is not None and ledger.placement is not None:
                await ledger.placement.replica.abort.remote(request_id)
        return pb.AbortResponse()

    async def GetModelInfo(self, request, grpc_context):  # noqa: N802
        from smg_grpc_proto.generated import vllm_engine_pb2 as pb

        pool = grpc_service.pool_from_metadata(grpc_context.invocation_metadata(), list(self.renderers))
        await self._ensure_renderers()
        config = self.renderers[pool].state.vllm_config.model_config
        return pb.GetModelInfoResponse(model_path=config.model, is_generation=True,
                                       max_context_length=config.max_model_len, vocab_size=config.get_vocab_size(),
                                       served_model_name=pool, tokenizer_path=config.tokenizer,
                                       max_req_input_len=config.max_model_len)

    @staticmethod
    def _unserved_pools(snapshot: FleetSnapshot) -> list[str]:
        """Pools meant to run (desired > 0) with no ready replica: the fleet is degraded."""
        return [name for name, pool in snapshot.pools.items() if pool.desired_replicas and not pool.routable_replicas]

    def _grpc_authenticate(self, grpc_context) -> None:
        if not self.api_keys:
            return
        header = dict(grpc_context.invocation_metadata()).get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in self.api_keys:
            self._grpc_fail(grpc_context, grpc.StatusCode.UNAUTHENTICATED,
                            "missing or wrong API key: send metadata 'authorization: Bearer <key>'")

    @staticmethod
    def _grpc_fail(grpc_context, code, details: str):
        """Ray Serve sends the status set on the context when the handler raises."""
        grpc_context.set_code(code)
        grpc_context.set_details(details)
        raise grpc_service.GrpcRequestError(code, details)

    def _info_from_call(self, call: GenerateCall, pool: str) -> RequestInfo:
        return RequestInfo(request_id=call.request_id, pool=pool, prompt_tokens=len(call.prompt_token_ids),
                           max_tokens=call.sampling_params.max_tokens or 0, priority=call.priority,
                           workflow_id=call.workflow_id, prompt_token_ids=tuple(call.prompt_token_ids))

    # ---------------------------------------------------------------- serving
    async def _serve(self, kind: str, request: Request):
        self._authenticate(request)
        body = await self._body(request)
        pool = self._pool_for(body.get("model"))
        await self._ensure_renderers()
        renderer = self.renderers[pool or self.spec.pools[0].name]
        try:
            rendered = await renderer.render(kind, body)
        except ValidationError as error:
            first = error.errors()[0]
            raise OpenAIHTTPError(400, f"{'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}",
                                  "invalid_request_error", param=".".join(map(str, first["loc"])) or None)
        info = self._request_info(rendered[0], pool, request, body)
        placement, chosen_pool = await self._admit_and_place(info)
        if chosen_pool != renderer.pool:  # model=auto picked another pool: render with its tokenizer
            renderer = self.renderers[chosen_pool]
            rendered = await renderer.render(kind, body)
        # Ledgers open now, not when the stream starts: admission of the next request must count this one.
        ledgers = [self._open_ledger(self._call(r, info), placement if i == 0 else None)
                   for i, r in enumerate(rendered)]
        if rendered[0].generate.stream:
            return StreamingResponse(self._stream(renderer, rendered, ledgers), media_type="text/event-stream")
        return JSONResponse((await self._complete(renderer, rendered, ledgers)).model_dump(exclude_none=True))

    def _request_info(self, rendered: RenderedRequest, pool: str | None, request: Request,
                      body: dict[str, Any]) -> RequestInfo:
        params = rendered.generate.sampling_params
        text = body.get("prompt") if rendered.kind == "completion" else body.get("messages")
        return RequestInfo(
            request_id=rendered.request_id,
            pool=pool,
            prompt_tokens=len(rendered.prompt_token_ids),
            max_tokens=params.max_tokens or 0,
            prompt_text=text if isinstance(text, str) else json.dumps(text)[:8192],
            prompt_token_ids=tuple(rendered.prompt_token_ids),
            priority=int(body.get("priority") or 0),
            workflow_id=request.headers.get("x-rayfleet-workflow-id"),
            workflow_stage=request.headers.get("x-rayfleet-workflow-stage"),
        )

    @staticmethod
    def _call(rendered: RenderedRequest, info: RequestInfo) -> GenerateCall:
        return GenerateCall(request_id=rendered.request_id, prompt_token_ids=rendered.prompt_token_ids,
                            sampling_params=rendered.generate.sampling_params, priority=info.priority,
                            workflow_id=info.workflow_id)

    async def _admit_and_place(self, info: RequestInfo) -> tuple[Placement, str]:
        deadline = time.monotonic() + self.spec.ingress.request_timeout_s
        while True:
            snapshot, handles = await self._fleet_view()
            decision = self.admission.admit(info, snapshot)
            if decision.verdict is AdmissionVerdict.REJECT:
                status = 503 if "no ready replica" in decision.reason else 429
                raise OpenAIHTTPError(status, f"Request rejected: {decision.reason}.",
                                      err_type="ServiceUnavailableError" if status == 503 else "RateLimitError",
                                      retry_after_s=decision.retry_after_s)
            if decision.verdict is AdmissionVerdict.ADMIT:
                try:
                    return await self._place(info, frozenset(), snapshot, handles)
                except NoReplicaAvailable as error:
                    raise OpenAIHTTPError(503, f"{error}; retry later.", "ServiceUnavailableError",
                                          retry_after_s=5) from None
            if time.monotonic() > deadline:
                raise OpenAIHTTPError(429, "Request queued too long; retry later.", "RateLimitError",
                                      retry_after_s=5)
            await asyncio.sleep(QUEUE_WAIT_S)

    async def _place(self, info: RequestInfo, exclude: frozenset[str], snapshot=None, handles=None):
        if snapshot is None:
            snapshot, handles = await self._fleet_view(fresh=True)
        decision = self.router.route(dataclasses.replace(info, exclude_replicas=exclude), snapshot)
        handle = handles.get(decision.replica_id)
        if handle is None:
            raise NoReplicaAvailable(f"router chose {decision.replica_id}, which is no longer ready")
        return Placement(decision.replica_id, handle), decision.pool

    def _placer(self, info: RequestInfo):
        async def place(call: GenerateCall, exclude: frozenset[str]) -> Placement:
            placement, _ = await self._place(info, exclude)
            return placement
        return place

    def _open_ledger(self, call: GenerateCall, placement: Placement | None) -> TokenLedger:
        ledger = TokenLedger(call=call, placement=placement)
        self.ledgers[call.request_id] = ledger
        return ledger

    async def _follow(self, ledger: TokenLedger, pool: str):
        info = self._info_from_call(ledger.call, pool)
        try:
            async for choice in follow(ledger, self._placer(info)):
                yield choice
        finally:
            self.ledgers.pop(ledger.request_id, None)
            if ledger.migrations or ledger.replays:
                logger.info("request %s finished after %d migrations and %d replays over %s",
                            ledger.request_id, ledger.migrations, ledger.replays, " -> ".join(ledger.hops))

    async def _stream(self, renderer: PoolRenderer, rendered: list[RenderedRequest],
                      ledgers: list[TokenLedger]) -> AsyncIterator[str]:
        n = ledgers[0].call.sampling_params.n
        completion_tokens = 0
        try:
            for position, (r, ledger) in enumerate(zip(rendered, ledgers)):
                async for choice in self._follow(ledger, renderer.pool):
                    completion_tokens += len(choice.token_ids or [])
                    chunk = await renderer.derender_stream_choice(r, choice)
                    for c in chunk.choices:
                        c.index += position * n  # several prompts in one completion request
                    yield f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
            options = rendered[0].generate.stream_options
            if options is not None and options.include_usage:
                yield f"data: {self._usage_chunk(rendered, completion_tokens).model_dump_json(exclude_none=True)}\n\n"
        except RenderError as error:
            yield f"data: {error.response.model_dump_json()}\n\n"
        except Exception as error:
            logger.exception("stream of %s failed", rendered[0].request_id)
            failure = OpenAIHTTPError(500, f"generation failed ({type(error).__name__}); the request was aborted")
            yield f"data: {failure.body().model_dump_json()}\n\n"
        finally:
            for ledger in ledgers:
                self.ledgers.pop(ledger.request_id, None)
        yield "data: [DONE]\n\n"

    @staticmethod
    def _usage_chunk(rendered: list[RenderedRequest], completion: int):
        prompt = sum(len(r.prompt_token_ids) for r in rendered)
        usage = UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        response_type = ChatCompletionStreamResponse if rendered[0].kind == "chat" else CompletionStreamResponse
        return response_type(id=rendered[0].request_id, model=rendered[0].pool, choices=[], usage=usage)

    async def _complete(self, renderer: PoolRenderer, rendered: list[RenderedRequest], ledgers: list[TokenLedger]):
        async def collect(ledger: TokenLedger) -> list[GenerateTokensChoice]:
            choices: dict[int, GenerateTokensChoice] = {}
            async for delta in self._follow(ledger, renderer.pool):
                choice = choices.setdefault(delta.index, GenerateTokensChoice(index=delta.index, token_ids=[],
                                                                              finish_reason=None))
                choice.token_ids.extend(delta.token_ids or [])
                if delta.logprobs is not None:
                    choice.logprobs = choice.logprobs or GenerateLogProbs(content=[])
                    choice.logprobs.content.extend(delta.logprobs.content or [])
                if delta.finish_reason is not None:
                    choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
            return [choices[i] for i in sorted(choices)]

        try:
            outputs = await asyncio.gather(*(collect(ledger) for ledger in ledgers))
        finally:
            for ledger in ledgers:
                self.ledgers.pop(ledger.request_id, None)
        return await renderer.derender_full(rendered, outputs)
