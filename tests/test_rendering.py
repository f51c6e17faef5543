"""Render once per request: a request `model=auto` sends to another pool of the same model family keeps the
render it got, named for that pool, and it is exactly what that pool's own renderer makes of it; a pool that
renders differently renders the request again under the same id. Derendered text, streamed and whole, is what
plain vLLM's engine client decodes from the same tokens. Real vLLM renderers over the trained task models (one
tokenizer, chat template and generation config; three sizes) and a demo model of another tokenizer."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from rayfleet.control_plane.serving.rendering import PoolRenderer, rendered_for

TASK_MODELS = Path(os.environ["RAYFLEET_TASK_MODELS"])
BODY = {"model": "auto", "messages": [{"role": "user", "content": "Spell this word backward (example: sun -> nus): "
                                                                 "garden"}],
        "max_tokens": 12, "temperature": 0.5, "stop": ["!"], "logprobs": True, "top_logprobs": 2}


async def started(*renderers: PoolRenderer) -> None:
    await asyncio.gather(*(r.start() for r in renderers))


def same_request(a, b) -> bool:
    """Equal renders apart from the random ids a renderer gives each request."""
    return (a.pool == b.pool and a.generate.model_dump(exclude={"request_id"}) == b.generate.model_dump(
        exclude={"request_id"}) and a.openai_request.model_dump(exclude={"request_id"})
        == b.openai_request.model_dump(exclude={"request_id"}))


async def test_a_request_moved_to_a_pool_of_the_same_family_keeps_its_render_and_equals_that_pool_s_own():
    small = PoolRenderer("task-small", str(TASK_MODELS / "task-small"), {})
    large = PoolRenderer("task-large", str(TASK_MODELS / "task-large"), {})
    await started(small, large)
    assert large.renders_like(small)
    renders = []

    async def render(renderer):
        renders.append(renderer.pool)
        return await renderer.render("chat", BODY)

    first = await small.render("chat", BODY)
    [moved] = await rendered_for(large, small, first, render)
    assert renders == [], "rendered again though the pools render alike"
    assert moved.request_id == first[0].request_id  # the id the router knows
    assert moved.openai_request.model == "task-large"
    [own] = await large.render("chat", BODY)
    assert same_request(moved, own)


async def test_a_request_moved_to_a_pool_that_renders_differently_is_rendered_again_under_its_id(demo_models):
    small = PoolRenderer("task-small", str(TASK_MODELS / "task-small"), {})
    short = PoolRenderer("short", str(TASK_MODELS / "task-small"), {"max_model_len": 64})  # a shorter limit
    other = PoolRenderer("tiny-a", str(demo_models / "tiny-llama-a"), {})  # another tokenizer
    await started(small, short, other)
    assert small.signature is not None
    assert not short.renders_like(small)
    assert not other.renders_like(small)

    first = await small.render("chat", BODY)
    [moved] = await rendered_for(other, small, first, lambda renderer: renderer.render("chat", BODY))
    assert moved.request_id == first[0].request_id
    [own] = await other.render("chat", BODY)
    assert same_request(moved, own)
    assert moved.prompt_token_ids != first[0].prompt_token_ids  # the other tokenizer's ids, not the first render's


# ---------------------------------------------------------------- derender: the text a client reads
TEXTS = ["héllo wörld 日本語 🎉 naïve café", "plain ascii text, 12+34=46."]


def plain_vllm_text(tokenizer, prompt_ids: list[int], ids: list[int], skip_special_tokens: bool) -> str:
    """What plain vLLM's engine client makes of these output tokens (its output processor's detokenizer)."""
    from types import SimpleNamespace

    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.detokenizer import IncrementalDetokenizer

    request = SimpleNamespace(request_id="r", prompt_token_ids=prompt_ids,
                              sampling_params=SamplingParams(skip_special_tokens=skip_special_tokens))
    detokenizer = IncrementalDetokenizer.from_new_request(tokenizer, request)
    detokenizer.update(ids, stop_terminated=False)
    return detokenizer.get_next_output_text(finished=True, delta=False)


async def streamed_and_whole(renderer: PoolRenderer, kind: str, body: dict, ids: list[int], chunk_sizes: list[int]):
    from vllm.entrypoints.scale_out.token_in_token_out.protocol import (
        GenerateTokensChoice,
        GenerateTokensStreamChoice,
    )

    [rendered] = await renderer.render(kind, {**body, "stream": True})
    deltas, start = [], 0
    for size in chunk_sizes * len(ids):
        if start >= len(ids):
            break
        part, start = ids[start:start + size], start + size
        finish = None if start < len(ids) else "length"
        choice = GenerateTokensStreamChoice(index=0, token_ids=part, finish_reason=finish)
        [out] = (await renderer.derender_stream_choice(rendered, choice)).choices
        deltas.append((out.delta.content if kind == "chat" else out.text) or "")
    whole = await renderer.derender_full([rendered], [[GenerateTokensChoice(index=0, token_ids=ids,
                                                                            finish_reason="length")]])
    [choice] = whole.choices
    return "".join(deltas), (choice.message.content if kind == "chat" else choice.text), rendered.prompt_token_ids


async def test_streamed_and_whole_responses_read_exactly_as_plain_vllm_decodes_the_same_tokens(demo_models):
    """Multi-byte characters split across tokens, bytes that are not valid UTF-8 and special tokens (the random
    models of the demo emit all three), a token at a time and in uneven deltas, chat and completions, with and
    without skip_special_tokens."""
    import random

    rng = random.Random(7)
    for model in (TASK_MODELS / "task-small", demo_models / "tiny-llama-a"):
        renderer = PoolRenderer("p", str(model), {})
        await renderer.start()
        assert renderer.decodes_in_rust  # fast tokenizers, no reasoning or tool parser
        tokenizer = renderer.state.online_renderer.renderer.get_tokenizer()
        special = tokenizer.all_special_ids + [i for i, t in tokenizer.added_tokens_decoder.items() if t.special]
        sequences = [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
        sequences += [[rng.randrange(len(tokenizer)) for _ in range(40)] + [rng.choice(special)] + [65, 66]
                      for _ in range(6)]
        for ids in sequences:
            for kind, body in (("chat", {"messages": [{"role": "user", "content": "hi"}]}),
                               ("completion", {"prompt": "hi there"})):
                for skip in (True, False):
                    for sizes in ([1], [3, 1, 5]):
                        streamed, whole, prompt_ids = await streamed_and_whole(
                            renderer, kind, {**body, "skip_special_tokens": skip}, ids, sizes)
                        expected = plain_vllm_text(tokenizer, prompt_ids, ids, skip)
                        assert streamed == expected, (model.name, kind, skip, sizes, ids)
                        assert whole == expected, (model.name, kind, skip, ids)
