"""Which requests can continue on another replica without changing what the client would have received.

A request moves by live migration (its KV moves; the destination computes one token) or by replay (prompt
plus the tokens already sent, recomputed elsewhere). Both continue from the engine's view "prompt = everything
so far", which is exact for the sampling state that is a function of the tokens alone (greedy, temperature /
top-p / top-k without a seed, logit bias, stop conditions, repetition penalty over prompt and output alike).
It is not exact for state the engine keeps beside the tokens, and NVIDIA Dynamo refuses all of these:
- a structured-output grammar (its automaton would restart at the beginning of the output), unless the
  engines run rayfleet's KV connector, which advances it over the tokens already generated
  (`actors/kv/continuation.py`): then such requests move like any other,
- a seeded random generator (it would restart from its seed),
- frequency and presence penalties (they count output tokens only; moved ones would count as prompt),
- `n > 1` (several sequences share one engine request).
Such a request is pinned: migration refuses it, drains wait for it, and if its replica dies after tokens were
sent its stream ends with an error that says so, never with a continuation that differs from an undisturbed run.
"""

from __future__ import annotations

import zlib
from typing import Any


def why_pinned(params: Any, grammar_continues: bool, reseeds: bool = False) -> str | None:
    """Why a request with these vLLM `SamplingParams` cannot move, or None if it can. `grammar_continues`:
    the engines it would move between advance a structured-output grammar (rayfleet's connector is in them).
    `reseeds`: its caller wants samples of the model, not one seed's exact stream (RL rollouts: every token's
    logprob is recorded), and continues a seeded request from a new seed."""
    if (params.n or 1) > 1:
        return "n > 1"
    if getattr(params, "structured_outputs", None) is not None and not grammar_continues:
        return "structured output (the grammar's state stays with the engine)"
    if params.seed is not None and params.temperature > 0 and not reseeds:
        return "seeded sampling (the generator's state stays with the engine)"
    if params.frequency_penalty or params.presence_penalty:
        return "frequency or presence penalty (they count output tokens only)"
    return None


def derived_seed(*parts: object) -> int:
    """A 32-bit sampling seed determined by `parts` (e.g. a request's seed and its prefix length): a rerun that
    reaches the same point draws the same seed, in any process (Python's `hash` of a str differs per process)."""
    return zlib.crc32("/".join(map(str, parts)).encode())
