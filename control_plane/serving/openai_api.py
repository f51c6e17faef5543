"""The OpenAI HTTP routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`.

Per request: authenticate; render with vLLM's renderer for the pool (`model` names a pool, or `auto`);
admit and route; open one token ledger per prompt and follow it across replicas; derender token chunks back
into OpenAI responses with vLLM's derenderer. Replicas never see OpenAI JSON, and the client never sees which
replica produced a token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionStreamResponse
from vllm.entrypoints.openai.completion.protocol import CompletionStreamResponse
from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateLogProbs, GenerateTokensChoice
from vllm.entrypoints.serve.engine.protocol import UsageInfo

from rayfleet.actors.replica.protocol import GenerateCall
from rayfleet.control_plane.serving.auth import Principal
from rayfleet.control_plane.serving.errors import OpenAIHTTPError
from rayfleet.control_plane.serving.gateway import FleetGateway, logger
from rayfleet.control_plane.serving.ledger import ReplayImpossible, TokenLedger
from rayfleet.control_plane.serving.rendering import PoolRenderer, RenderError, RenderedRequest, rendered_for
from rayfleet.control_plane.serving.request_limits import check_prompt_tokens, check_request, read_json_body
from rayfleet.control_plane.serving.request_telemetry import ClientRequest
from rayfleet.policies.base import RequestInfo

router = APIRouter()

HTTP_KEY_HINT = "'Authorization: Bearer <key>'"
# Per-request routing objective (Chimera): lambda in quality points per second, or a latency SLO.
LATENCY_WEIGHT_HEADER = "x-rayfleet-latency-weight"
LATENCY_SLO_HEADER = "x-rayfleet-latency-slo-ms"
ROUTE_HEADER = "x-rayfleet-route"  # response header: the pool that answered and why the router chose it


CLIENT_CLOSED = 499  # the status nginx records for a client that went away before its response ended


def error_status(error: Exception) -> int:
    """The HTTP status the ingress answers `error` with (see the handlers in `ingress.py`)."""
    if isinstance(error, OpenAIHTTPError):
        return error.status
    if isinstance(error, RenderError):
        return error.status_code
    return 500


def authenticate(gateway: FleetGateway, request: Request) -> Principal:
    return gateway.authenticate(request.headers.get("authorization", ""), HTTP_KEY_HINT)


def header_number(request: Request, name: str) -> float | None:
    """A non-negative number from a request header; a 400 naming the header otherwise."""
    raw = request.headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise OpenAIHTTPError(400, f"header {name} must be a finite number >= 0, got {raw!r}",
                              "invalid_request_error", param=name)
    return value


def embedding_text(body: dict[str, Any]) -> str:
    """What the router embeds: the last user message of a chat request, or a completion's prompt."""
    if isinstance(body.get("prompt"), str):
        return body["prompt"]
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts: their text
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return content if isinstance(content, str) else ""
    return ""


class OpenAIRoutes(FleetGateway):
    """Mixin of the Serve ingress: the OpenAI-compatible endpoint."""

    @router.get("/health")
    async def health(self) -> JSONResponse:
        snapshot, _ = await self.fleet_view()
        ready = {name: len(pool.routable_replicas) for name, pool in snapshot.pools.items()}
        status = 200 if not self.unserved_pools(snapshot) else 503
        return JSONResponse({"status": "ok" if status == 200 else "degraded", "ready_replicas": ready},
                            status_code=status)

    @router.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        authenticate(self, request)
        created = int(time.time())
        data = [{"id": pool.name, "object": "model", "created": created, "owned_by": "rayfleet",
                 "root": pool.model, "metadata": {"tags": pool.tags}} for pool in self.spec.pools]
        data.append({"id": "auto", "object": "model", "created": created, "owned_by": "rayfleet",
                     "root": "router:" + self.spec.policies.router.name})
        return JSONResponse({"object": "list", "data": data})

    @router.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve("chat", request)

    @router.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve("completion", request)

    def _pool_for(self, model: Any) -> str | None:
        """The pool a request names, or None for `auto`; unknown names are a 400 naming the choices."""
        if model == "auto":
            return None
        if model not in self.renderers:
            raise OpenAIHTTPError(400, f"The model `{model}` does not exist. Available: "
                                       f"{', '.join(['auto', *self.renderers])}.",
                                  err_type="invalid_request_error", param="model")
        return model

    async def _serve(self, kind: str, request: Request):
        """One OpenAI request under its root span; counted by pool and status when its response ends."""
        client = self.telemetry.begin(f"POST {request.url.path}", request.headers)
        try:
            return await self._serve_traced(kind, request, client)
        except Exception as error:
            self.telemetry.end(client, error_status(error), error)
            raise

    async def _serve_traced(self, kind: str, request: Request, client: ClientRequest):
        clock = self.telemetry.stage_clock()
        principal = authenticate(self, request)
        limits = self.spec.ingress.limits
        body = await read_json_body(request, limits)
        check_request(body, limits, principal)
        pool = self._pool_for(body["model"])
        client.pool = pool or "auto"
        await self.ensure_renderers()
        renderer = self.renderers[pool or self.spec.pools[0].name]
        embedding = await self._start_embedding(pool, body)
        try:
            rendered = await self._render(renderer, kind, body)
        except BaseException:
            if embedding is not None:
                embedding.cancel()
            raise
        clock.lap("render")
        info = self._request_info(rendered[0], pool, request, body)
        client.span.set_attribute("rayfleet.request_id", info.request_id)
        if embedding is not None:
            info = dataclasses.replace(info, embedding=await self.embedding_for(info.request_id, embedding))
            clock.lap("embedding_wait")
        placement, decision = await self.admit_and_place(info, client.trace)
        clock.lap("admission_and_routing")
        client.pool = decision.pool
        if decision.pool != renderer.pool:  # model=auto picked another pool
            first, renderer = renderer, self.renderers[decision.pool]
            rendered = await rendered_for(renderer, first, rendered, lambda r: self._render(r, kind, body))
            if not renderer.renders_like(first):
                clock.lap("rerender")
        # A request id the client chose is scoped by its tenant: no one can reach another tenant's request.
        scope = principal.scoped_id if "request_id" in body else str
        # Ledgers open now, not when the stream starts: admission of the next request must count this one.
        ledgers = [self.open_ledger(self._call(r, info, scope(r.request_id), decision.predicted_output_tokens),
                                    placement if i == 0 else None, principal, decision.pool, client)
                   for i, r in enumerate(rendered)]
        headers = {ROUTE_HEADER: f"{decision.pool}; {decision.reason}"}
        if rendered[0].generate.stream:
            return StreamingResponse(self._stream(renderer, rendered, ledgers, client),
                                     media_type="text/event-stream", headers=headers)
        response = JSONResponse((await self._complete(renderer, rendered, ledgers)).model_dump(exclude_none=True),
                                headers=headers)
        self.telemetry.end(client, 200)
        return response

    async def _start_embedding(self, pool: str | None, body: dict[str, Any]) -> asyncio.Task | None:
        """The prompt's embedding for a router that wants one, computed while the prompt renders."""
        if pool is not None or self.learning_router is None or not self.learning_router.needs_embeddings:
            return None
        await self.ensure_router()
        return self.start_embedding(embedding_text(body))

    async def _render(self, renderer: PoolRenderer, kind: str, body: dict[str, Any]) -> list[RenderedRequest]:
        """vLLM's rendering and, before any stream starts, the checks vLLM would otherwise make in the engine."""
        try:
            rendered = await renderer.render(kind, body)
        except ValidationError as error:
            first = error.errors()[0]
            raise OpenAIHTTPError(400, f"{'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}",
                                  "invalid_request_error", param=".".join(map(str, first["loc"])) or None)
        for r in rendered:
            check_prompt_tokens(len(r.prompt_token_ids), self.spec.ingress.limits)
            renderer.verify(r.generate.sampling_params, r.prompt_token_ids)
        return rendered

    @staticmethod
    def _request_info(rendered: RenderedRequest, pool: str | None, request: Request,
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
            priority=getattr(rendered.openai_request, "priority", 0) or 0,
            workflow_id=request.headers.get("x-rayfleet-workflow-id"),
            workflow_stage=request.headers.get("x-rayfleet-workflow-stage"),
            latency_weight=header_number(request, LATENCY_WEIGHT_HEADER),
            latency_slo_s=None if (slo_ms := header_number(request, LATENCY_SLO_HEADER)) is None else slo_ms / 1e3,
        )

    @staticmethod
    def _call(rendered: RenderedRequest, info: RequestInfo, request_id: str,
              predicted_output_tokens: int | None) -> GenerateCall:
        return GenerateCall(request_id=request_id, prompt_token_ids=rendered.prompt_token_ids,
                            sampling_params=rendered.generate.sampling_params, priority=info.priority,
                            workflow_id=info.workflow_id, predicted_output_tokens=predicted_output_tokens)

    async def _stream(self, renderer: PoolRenderer, rendered: list[RenderedRequest],
                      ledgers: list[TokenLedger], client: ClientRequest) -> AsyncIterator[str]:
        n = ledgers[0].call.sampling_params.n
        completion_tokens = 0
        status, failure = CLIENT_CLOSED, None  # until the stream ends one way or another
        try:
            for position, (r, ledger) in enumerate(zip(rendered, ledgers)):
                async for choice in self.follow(ledger, renderer.pool):
                    completion_tokens += len(choice.token_ids or [])
                    chunk = await renderer.derender_stream_choice(r, choice)
                    for c in chunk.choices:
                        c.index += position * n  # several prompts in one completion request
                    yield f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
            options = rendered[0].generate.stream_options
            if options is not None and options.include_usage:
                yield f"data: {self._usage_chunk(rendered, completion_tokens).model_dump_json(exclude_none=True)}\n\n"
            status = 200
        except RenderError as error:
            status, failure = error.status_code, error
            yield f"data: {error.response.model_dump_json()}\n\n"
        except ReplayImpossible as error:
            logger.warning("stream of %s ended: %s", rendered[0].request_id, error)
            status, failure = 503, error
            yield f"data: {OpenAIHTTPError(503, str(error)).body().model_dump_json()}\n\n"
        except Exception as error:
            logger.exception("stream of %s failed", rendered[0].request_id)
            status, failure = 500, error
            in_band = OpenAIHTTPError(500, f"generation failed ({type(error).__name__}); the request was aborted")
            yield f"data: {in_band.body().model_dump_json()}\n\n"
        finally:
            self.close_ledgers(ledgers)
            self.telemetry.end(client, status, failure)
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
            async for delta in self.follow(ledger, renderer.pool):
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
            self.close_ledgers(ledgers)
        return await renderer.derender_full(rendered, outputs)
