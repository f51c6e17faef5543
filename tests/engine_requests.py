"""Requests straight to an AsyncLLM engine, shared by the engine-level connector and store tests."""

from __future__ import annotations

import random


def random_prompt(seed: int, length: int) -> list[int]:
    """Token ids from the demo models' ordinary vocabulary (10..499), reproducible by seed."""
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(length)]


async def generate_to_end(engine, prompt: list[int], params, request_id: str):
    """Run a request to the end; return (generated token ids, last RequestOutput)."""
    last = None
    async for output in engine.generate({"prompt_token_ids": prompt}, params, request_id):
        last = output
    return list(last.outputs[0].token_ids), last
