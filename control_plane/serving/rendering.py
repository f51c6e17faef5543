"""OpenAI <-> tokens for one pool, with vLLM's own renderer and derenderer, in the ingress process.

vLLM's "disaggregated everything" setup renders a request into token ids and sampling params on a
GPU-less front end (`ServingRender`) and turns token chunks back into OpenAI responses
(`ServingDerender`), carrying a `DerenderStreamState` between chunks. rayfleet uses the same classes
in-process, built the way `vllm launch render` builds them, so chat templates, validation, error
messages, stop handling and logprob formatting are vLLM's and not a copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from starlette.datastructures import State
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.scale_out.token_in_token_out.protocol import (
    DerenderChatRequest,
    DerenderCompletionRequest,
    DerenderStreamState,
    GenerateRequest,
    GenerateTokensChoice,
    GenerateTokensResponse,
    GenerateTokensStreamChoice,
    GenerateTokensStreamResponse,
)
from pydantic import PrivateAttr, ValidationError
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.renderers.online_derenderer import _decode_params
from vllm.sampling_params import SamplingParams
from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer, uses_fast_detokenizer

logger = logging.getLogger("rayfleet.rendering")

# Engine args that change how a prompt is tokenized or bounded; the rest only matter to the engine.
RENDER_ARGS = ("tokenizer", "tokenizer_mode", "max_model_len", "trust_remote_code", "revision",
               "tokenizer_revision", "dtype", "generation_config", "hf_overrides")


class RenderError(Exception):
    """A request vLLM's renderer or derenderer rejected; carries vLLM's OpenAI error body."""

    def __init__(self, response: ErrorResponse):
        super().__init__(response.error.message)
        self.response = response

    @property
    def status_code(self) -> int:
        return int(self.response.error.code)


@dataclass
class RenderedRequest:
    """One engine request of an OpenAI call: tokens, params, and what derendering needs back."""

    kind: str  # "chat" or "completion"
    pool: str
    generate: GenerateRequest
    openai_request: ChatCompletionRequest | CompletionRequest
    stream_states: dict[int, DerenderStreamState | None] = field(default_factory=dict)
    stop_guard: StopStringGuard | None = None

    def __post_init__(self) -> None:
        params = self.generate.sampling_params
        self.stop_guard = StopStringGuard(params.stop, params.include_stop_str_in_output)

    @property
    def request_id(self) -> str:
        return self.generate.request_id

    def for_pool(self, pool: str) -> "RenderedRequest":
        """The same render named for `pool`, whose renderer renders like this one's (`PoolRenderer.signature`)."""
        return dataclasses.replace(
            self, pool=pool, stream_states={},
            generate=self.generate.model_copy(update={"model": pool}) if self.generate.model else self.generate,
            openai_request=self.openai_request.model_copy(update={"model": pool}))

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.generate.token_ids


class StopStringGuard:
    """Keeps stop strings out of derendered text, as vLLM's coupled server does.

    The engine matches stop strings on its own detokenized text, but the token-out protocol carries token
    ids, and derendering re-decodes the tokens that contain the stop string (vLLM documents this for its
    scale-out path). Streams hold back the last `len(longest stop) - 1` characters of each choice until the
    next chunk shows they are not the start of a stop string; the final chunk is cut at the stop string.
    """

    def __init__(self, stops: list[str] | None, include_in_output: bool):
        self.stops = [] if include_in_output else [s for s in (stops or []) if s]
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.pending: dict[int, str] = {}

    @staticmethod
    def cut(text: str, stop_reason) -> str:
        if isinstance(stop_reason, str) and stop_reason:
            position = text.find(stop_reason)
            if position >= 0:
                return text[:position]
        return text

    def trim_full(self, text: str | None, stop_reason) -> str | None:
        return text if text is None or not self.stops else self.cut(text, stop_reason)

    def trim_delta(self, index: int, text: str | None, finished: bool, stop_reason) -> str | None:
        if not self.stops:
            return text
        buffered = self.pending.pop(index, "") + (text or "")
        if finished:
            return self.cut(buffered, stop_reason)
        if self.holdback == 0:
            return buffered
        emit, self.pending[index] = buffered[: -self.holdback], buffered[-self.holdback:]
        return emit


class StreamDecoder:
    """One streamed choice's incremental detokenizer: vLLM's `FastIncrementalDetokenizer`, the `tokenizers`
    library's Rust `DecodeStream` primed with the prompt, which plain vLLM's engine client runs for every request.

    vLLM's stateless derenderer instead re-runs its Python `detokenize_incrementally` on a window of token strings
    it copies into a fresh pydantic state per token, because its state must survive a round trip through a client
    (the scale-out protocol). The ingress keeps each stream's state in memory for the stream's life, migrations
    and replays included (the ledger hands it each token once, in order), so it can keep the Rust decoder instead:
    a streamed token's derender fell from 39.9 to 25.6 us (docs/profiles/README.md). Built on the first delta,
    from the decode parameters vLLM's derenderer passes (`_decode_params`, the engine's rules).
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int]):
        self.request_id, self.prompt_token_ids = request_id, prompt_token_ids
        self.detokenizer = None

    def decode(self, tokenizer, token_ids: list[int], skip_special_tokens: bool,
               spaces_between_special_tokens: bool) -> str:
        if self.detokenizer is None:
            # The detokenizer reads only these three fields of the engine request it is built for.
            params = SamplingParams(skip_special_tokens=skip_special_tokens,
                                    spaces_between_special_tokens=spaces_between_special_tokens)
            request = _DecodedRequest(self.request_id, self.prompt_token_ids, params)
            self.detokenizer = FastIncrementalDetokenizer(tokenizer, request)
        return "".join([self.detokenizer.decode_next(token) for token in token_ids])


@dataclass
class _DecodedRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any


class DecodedStreamState(DerenderStreamState):
    """vLLM's per-choice derender state, carrying the choice's `StreamDecoder` (in memory only, never serialized;
    `model_copy`, which the derenderer applies per chunk, keeps the same decoder)."""

    _decoder: StreamDecoder | None = PrivateAttr(default=None)

    @classmethod
    def seeded(cls, decoder: StreamDecoder) -> "DecodedStreamState":
        state = cls()
        state._decoder = decoder
        return state


def detokenize_stream_deltas_inline(serving_derender) -> None:
    """Detokenize stream deltas on the event loop instead of vLLM's tokenizer thread pool, with the stream's
    `StreamDecoder` where its state carries one (vLLM's own delta decoding otherwise).

    vLLM's derenderer sends every stream delta's detokenization to a thread pool to keep its loop free for
    large payloads; a stream delta is a few tokens, and the hop (a thread wake-up, two future callbacks, the
    GIL handed back and forth) cost the ingress several times the decode itself at saturation (profile in
    docs/profiles/serving-before). Whole responses and chat parsing replays keep vLLM's executor.
    """
    derenderer = getattr(serving_derender, "online_derenderer", None)
    detokenize = getattr(derenderer, "_detokenize_delta", None)
    if detokenize is None or not hasattr(derenderer, "_detokenize_delta_async"):
        logger.warning("vLLM's derenderer changed shape; stream deltas stay on its thread pool")
        return

    async def detokenize_delta(tokenizer, delta_token_ids, state, skip_special_tokens: bool = True,
                               spaces_between_special_tokens: bool = True):
        decoder = state._decoder if isinstance(state, DecodedStreamState) else None
        if decoder is None:
            return detokenize(tokenizer, delta_token_ids, state, skip_special_tokens=skip_special_tokens,
                              spaces_between_special_tokens=spaces_between_special_tokens)
        text = decoder.decode(tokenizer, delta_token_ids, skip_special_tokens, spaces_between_special_tokens)
        return text, state

    derenderer._detokenize_delta_async = detokenize_delta


async def rendered_for(renderer: PoolRenderer, first: PoolRenderer, rendered: list[RenderedRequest],
                       render: Callable[[PoolRenderer], Awaitable[list[RenderedRequest]]]) -> list[RenderedRequest]:
    """`rendered` (by `first`) as `renderer`'s pool needs it: the same render named for that pool where the two
    render alike, else `render(renderer)` under the same request ids (the router's and the client's)."""
    if renderer.renders_like(first):
        return [r.for_pool(renderer.pool) for r in rendered]
    again = await render(renderer)
    for r, before in zip(again, rendered):
        r.generate.request_id = before.request_id
    return again


def render_signature(model_config, tokenizer) -> str | None:
    """A digest of everything a text render depends on beyond the request: the whole tokenizer (vocabulary,
    normalization, special tokens) and its chat template, the model's default sampling params (its generation
    config), the context length and the vocabulary size the checks use. Pools of one model family (the demo's task
    models, fine-tunes of one base) share it, so a request `model=auto` sends to another pool of the family keeps
    its render. None where the tokenizer cannot be serialized or the model takes images: render per pool."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or model_config.is_multimodal_model:
        return None
    parts = {"tokenizer": backend.to_str(), "chat_template": getattr(tokenizer, "chat_template", None),
             "special_tokens": getattr(tokenizer, "special_tokens_map", None),
             "sampling_defaults": model_config.get_diff_sampling_param(),
             "max_model_len": model_config.max_model_len, "vocab_size": model_config.get_vocab_size()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()


def _ok(result):
    if isinstance(result, ErrorResponse):
        raise RenderError(result)
    return result


class PoolRenderer:
    """Renders and derenders for one pool's model; cheap to build (no engine, no weights)."""

    def __init__(self, pool: str, model: str, engine_args: dict[str, Any]):
        self.pool = pool
        self.model = model
        self.engine_args = engine_args
        self.state = State()
        self.max_model_len = 0
        self.signature: str | None = None  # pools whose renderers share one render each other's requests
        self.decodes_in_rust = False  # stream deltas through a `StreamDecoder` (set by start)

    async def start(self) -> None:
        import vllm.envs as envs
        from vllm.config import VllmConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.entrypoints.launchers.render.app_state import init_render_app_state
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        args = make_arg_parser(FlexibleArgumentParser()).parse_args(
            ["--model", self.model, "--served-model-name", self.pool]
        )
        for name in RENDER_ARGS:
            if name in self.engine_args:
                setattr(args, name, self.engine_args[name])
        engine_args = AsyncEngineArgs.from_cli_args(args)
        model_config = engine_args.create_model_config()
        # A render front end needs no quantized kernels and no KV cache (as `vllm launch render`).
        model_config.quantization = None
        envs.VLLM_CPU_KVCACHE_SPACE = 0
        vllm_config = VllmConfig(
            model_config=model_config,
            logging_config=engine_args.create_logging_config(),
            structured_outputs_config=engine_args.create_structured_outputs_config(),
        )
        await init_render_app_state(vllm_config, self.state, args)
        self.vllm_config = vllm_config
        detokenize_stream_deltas_inline(self.state.serving_derender)
        self.max_model_len = model_config.max_model_len
        tokenizer = self.state.online_renderer.renderer.get_tokenizer()
        self.signature = render_signature(model_config, tokenizer)
        # A reasoning or tool parser replays its own state per chunk; a slow tokenizer has no Rust decoder.
        self.decodes_in_rust = (uses_fast_detokenizer(tokenizer)
                                and self.state.serving_derender.online_derenderer.parser is None)
        logger.info("renderer for pool %s ready (max_model_len %d)", self.pool, self.max_model_len)

    def renders_like(self, other: "PoolRenderer") -> bool:
        """Whether a request rendered by `other` is what this renderer would make of it (the pool's name aside)."""
        return self.signature is not None and self.signature == other.signature

    # ---------------------------------------------------------------- render
    async def render(self, kind: str, body: dict[str, Any]) -> list[RenderedRequest]:
        body = {**body, "model": self.pool}
        try:
            if kind == "chat":
                request = ChatCompletionRequest.model_validate(body)
                generates = [_ok(await self.state.serving_render.render_chat_request(request))]
            else:
                request = CompletionRequest.model_validate(body)
                generates = _ok(await self.state.serving_render.render_completion_request(request))
        except (RenderError, ValidationError):
            raise
        except Exception as error:
            # vLLM raises its validation errors (e.g. prompt longer than the context) rather than returning
            # them; its own mapping gives the status and message `vllm serve` would.
            response = create_error_response(error)
            if response.error.code >= 500:
                raise
            raise RenderError(response) from None
        return [RenderedRequest(kind=kind, pool=self.pool, generate=g, openai_request=request) for g in generates]

    def verify(self, sampling_params, prompt_token_ids: list[int]) -> None:
        """vLLM's own checks of a request that its server makes only in the engine (prompt token ids and
        sampling params' token ids in the vocabulary, logprob bounds, structured-output schemas), made here:
        a 400 before any stream starts, not an error after the 200 of a stream."""
        params = sampling_params.clone()  # verify() records choices (the grammar backend)
        vocab = self.vllm_config.model_config.get_vocab_size()
        outside = [t for t in (min(prompt_token_ids, default=0), max(prompt_token_ids, default=0)) if not 0 <= t < vocab]
        if outside:
            raise RenderError(create_error_response(ValueError(
                f"Token id {outside[0]} is out of vocabulary (size {vocab})")))
        try:
            params.verify(self.vllm_config.model_config, None, self.vllm_config.structured_outputs_config,
                          self.state.online_renderer.renderer.get_tokenizer())
        except Exception as error:  # vLLM's errors map to its own status codes, as its server maps them
            response = create_error_response(error)
            if response.error.code >= 500:
                raise
            raise RenderError(response) from None

    # ---------------------------------------------------------------- derender
    async def derender_stream_choice(self, rendered: RenderedRequest, choice: GenerateTokensStreamChoice):
        """One streamed choice delta -> one OpenAI stream chunk (the per-choice state is carried here).

        Calls vLLM's `OnlineDerenderer` (what `ServingDerender` wraps) directly: the wrapper exists for an
        untrusted caller and, per delta, validates a request model holding the whole prompt's token ids and
        re-checks them against the model; here prompt, model and chunk are the ingress' own (rendered and
        checked once, and produced by its engine), and that per-token pydantic work was ~8% of the
        ingress' CPU at saturation (docs/profiles).
        """
        chunk = GenerateTokensStreamResponse.model_construct(request_id=rendered.request_id, choices=[choice])
        derenderer = self.state.serving_derender.online_derenderer
        state = rendered.stream_states.get(choice.index)
        if state is None and self.decodes_in_rust:
            state = DecodedStreamState.seeded(StreamDecoder(rendered.request_id, rendered.prompt_token_ids))
        common = dict(model=self.pool, generate_chunk=chunk, state=state,
                      prompt_tokens=len(rendered.prompt_token_ids), prompt_token_ids=rendered.prompt_token_ids)
        try:
            if rendered.kind == "chat":
                out, state = await derenderer.derender_chat_stream(chat_request=rendered.openai_request, **common)
            else:
                out, state = await derenderer.derender_completion_stream(
                    completion_request=rendered.openai_request, **common)
        except ValueError as error:  # as ServingDerender maps them
            raise RenderError(create_error_response(error)) from None
        rendered.stream_states[choice.index] = state
        for c in out.choices:
            finished = choice.finish_reason is not None
            if rendered.kind == "chat":
                c.delta.content = rendered.stop_guard.trim_delta(c.index, c.delta.content, finished, choice.stop_reason)
            else:
                c.text = rendered.stop_guard.trim_delta(c.index, c.text, finished, choice.stop_reason) or ""
        return out

    async def derender_full(self, rendered: list[RenderedRequest], choices: list[list[GenerateTokensChoice]]):
        """Whole outputs -> one OpenAI response (completions may carry several prompts)."""
        responses = [
            GenerateTokensResponse(request_id=r.request_id, choices=c, prompt_token_ids=r.prompt_token_ids)
            for r, c in zip(rendered, choices)
        ]
        first = rendered[0]
        if first.kind == "chat":
            result = await self.state.serving_derender.derender_chat_response(DerenderChatRequest(
                model=self.pool, generate_response=responses[0], prompt_tokens=len(first.prompt_token_ids),
                prompt_token_ids=first.prompt_token_ids, chat_request=first.openai_request))
        else:
            result = await self.state.serving_derender.derender_completion_response(DerenderCompletionRequest(
                model=self.pool, generate_responses=responses,
                prompt_tokens=[len(r.prompt_token_ids) for r in rendered],
                prompt_token_ids=[r.prompt_token_ids for r in rendered],
                completion_request=first.openai_request))
        response = _ok(result)
        # vLLM's derender above decoded the text too; it is replaced here, once per response (not per token),
        # because its path decodes with a state it builds itself and offers no hook for the stream's decoder.
        if self.decodes_in_rust:
            for c, text in zip(response.choices, self._decoded_in_rust(rendered, choices)):
                if first.kind == "chat":
                    c.message.content = text
                else:
                    c.text = text
        guard = first.stop_guard  # every prompt of one request shares its sampling params
        for c in response.choices:
            if first.kind == "chat":
                c.message.content = guard.trim_full(c.message.content, c.stop_reason)
            else:
                c.text = guard.trim_full(c.text, c.stop_reason)
        return response

    def _decoded_in_rust(self, rendered: list[RenderedRequest], choices: list[list[GenerateTokensChoice]]) -> list[str]:
        """Each choice's whole text as a stream of it decodes (`StreamDecoder`), in the response's choice order
        (prompt by prompt, then choice by choice): a stream and the whole response of the same tokens read the same,
        as in plain vLLM, whose engine client decodes both alike."""
        tokenizer = self.state.online_renderer.renderer.get_tokenizer()
        skip_special, spaces_between = _decode_params(tokenizer, rendered[0].openai_request)
        return [StreamDecoder(r.request_id, r.prompt_token_ids).decode(tokenizer, c.token_ids, skip_special,
                                                                       spaces_between)
                for r, request_choices in zip(rendered, choices) for c in request_choices]
