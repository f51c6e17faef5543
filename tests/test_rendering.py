"""Render once per request: a request `model=auto` sends to another pool of the same model family keeps the
render it got, named for that pool, and it is exactly what that pool's own renderer makes of it; a pool that
renders differently renders the request again under the same id. Real vLLM renderers over the trained task
models (one tokenizer, chat template and generation config; three sizes) and a demo model of another tokenizer."""

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
