"""The OpenAI HTTP routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`.

Per request: authenticate; render with vLLM's renderer for the pool (`model` names a pool, or `auto`);
admit and route; open one token ledger per prompt and follow it across replicas; derender token chunks back
into OpenAI responses with vLLM's derenderer. Replicas never see OpenAI JSON, and the client never sees which
replica produced a token.
"""

from __future__ import annotations

import asyncio
import json
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
from rayfleet.control_plane.serving.errors import OpenAIHTTPError
from rayfleet.control_plane.serving.gateway import FleetGateway, logger
from rayfleet.control_plane.serving.request_telemetry import ClientRequest
from rayfleet.control_plane.serving.ledger import TokenLedger
from rayfleet.control_plane.serving.rendering import PoolRenderer, RenderError, RenderedRequest
from rayfleet.policies.base import RequestInfo

router = APIRouter()

HTTP_KEY_HINT = "'Authorization: Bearer <key>'"


CLIENT_CLOSED = 499  # the status nginx records for a client that went away before its response ended


def error_status(error: Exception) -> int:
    """The HTTP status the ingress answers `error` with (see the handlers in `ingress.py`)."""
    if isinstance(error, OpenAIHTTPError):
        return error.status
    if isinstance(error, RenderError):
        return error.status_code
    return 500


def authenticate(gateway: FleetGateway, request: Request) -> None:
    gateway.authenticate(request.headers.get("authorization", ""), HTTP_KEY_HINT)


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OpenAIHTTPError(400, f"request body is not valid JSON: {error}", "invalid_request_error")
    if not isinstance(body, dict):
        raise OpenAIHTTPError(400, "request body must be a JSON object", "invalid_request_error")
    return body


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
        authenticate(self, request)
        body = await json_body(request)
        pool = self._pool_for(body.get("model"))
        client.pool = pool or "auto"
        await self.ensure_renderers()
        renderer = self.renderers[pool or self.spec.pools[0].name]
        try:
            rendered = await renderer.render(kind, body)
        except ValidationError as error:
            first = error.errors()[0]
            raise OpenAIHTTPError(400, f"{'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}",
                                  "invalid_request_error", param=".".join(map(str, first["loc"])) or None)
        info = self._request_info(rendered[0], pool, request, body)
        client.span.set_attribute("rayfleet.request_id", info.request_id)
        placement, chosen_pool = await self.admit_and_place(info, client.trace)
        client.pool = chosen_pool
        if chosen_pool != renderer.pool:  # model=auto picked another pool: render with its tokenizer
            renderer = self.renderers[chosen_pool]
            rendered = await renderer.render(kind, body)
        # Ledgers open now, not when the stream starts: admission of the next request must count this one.
        ledgers = [self.open_ledger(self._call(r, info), placement if i == 0 else None, client)
                   for i, r in enumerate(rendered)]
        if rendered[0].generate.stream:
            return StreamingResponse(self._stream(renderer, rendered, ledgers, client),
                                     media_type="text/event-stream")
        response = JSONResponse((await self._complete(renderer, rendered, ledgers)).model_dump(exclude_none=True))
        self.telemetry.end(client, 200)
        return response

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
            priority=int(body.get("priority") or 0),
            workflow_id=request.headers.get("x-rayfleet-workflow-id"),
            workflow_stage=request.headers.get("x-rayfleet-workflow-stage"),
        )

    @staticmethod
    def _call(rendered: RenderedRequest, info: RequestInfo) -> GenerateCall:
        return GenerateCall(request_id=rendered.request_id, prompt_token_ids=rendered.prompt_token_ids,
                            sampling_params=rendered.generate.sampling_params, priority=info.priority,
                            workflow_id=info.workflow_id)

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
