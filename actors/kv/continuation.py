"""A request that continues output generated elsewhere: its structured-output grammar is brought up to date.

A migrated request resumes, and a replayed one restarts, with everything generated so far as its prompt, and
vLLM compiles its grammar (JSON schema, regex, choice, EBNF) for an empty output: the rest would be
constrained from the grammar's start, a corrupted continuation. NVIDIA Dynamo refuses such requests. Here the
scheduler half of rayfleet's connector, when vLLM first asks it about the request (the grammar is compiled by
then: vLLM holds a request in WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR until it is), feeds the grammar the tokens
already generated, the last `continued` of the prompt, through vLLM's own `accept_tokens`. The request's first
step here is then constrained exactly as its next step on the first replica would have been.

The tag (`kv_transfer_params["rayfleet"]["continued"]`) is set by the replica (replays) and by
`EngineKVMigrator.resume` (migrations).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.logger import init_logger

if TYPE_CHECKING:
    from vllm.v1.request import Request

logger = init_logger(__name__)

CONTINUED_KEY = "continued"


class GrammarContinuation:
    """Scheduler side: advances each continued request's grammar once, before its first step."""

    def __init__(self) -> None:
        self._advanced: set[str] = set()

    def advance(self, request: Request, params: dict | None) -> None:
        continued = int((params or {}).get(CONTINUED_KEY) or 0)
        if not continued or request.request_id in self._advanced:
            return
        self._advanced.add(request.request_id)
        structured = request.structured_output_request
        grammar = structured.grammar if structured is not None else None
        if grammar is None or isinstance(grammar, Exception):
            return
        tokens = list(request.prompt_token_ids[-continued:])
        if not grammar.accept_tokens(request.request_id, tokens):
            # The tokens came out of this grammar on the first replica, so this cannot happen unless the two
            # engines compiled different grammars; the request then goes on unconstrained by a wrong state.
            logger.error("rayfleet: grammar of %s rejected the %d tokens it had generated", request.request_id,
                         continued)

    def forget(self, request_id: str) -> None:
        self._advanced.discard(request_id)
