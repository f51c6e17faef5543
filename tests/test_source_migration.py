"""The source side of a live migration (`SourceMigration`) around its stop, with stand-ins for the engine's
migrator and the destination replica.

Stand-ins because the case under test is a race on real engines: the stop's abort reaches the engine while a step
runs, and whether that step's token is in the export but not yet with the reader depends on which of the step's
output and the front end's abort comes first (one probe on the session fleet found one such token, another none).
Here the export holds one, every time. The engines' own behaviour is tested end to end in
`tests/test_live_migration.py` and `tests/test_replica_kv_moves.py`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from vllm import SamplingParams

from rayfleet.actors.kv.engine_migrator import FinalKV
from rayfleet.actors.replica.active_request import ActiveRequest
from rayfleet.actors.replica.live_migration import SourceMigration
from rayfleet.actors.replica.protocol import Destination, GenerateCall, MigrationLimits

PROMPT = list(range(100, 164))  # two blocks of 32
STREAMED = [7, 8]  # what the reader has had before the stop
IN_FLIGHT = 9  # the token of the step running when the stop's abort arrived


@dataclass
class Chunk:
    num_blocks: int = 3
    nbytes: int = 3 * 4096


class SourceEngine:
    """The source's migrator: its export holds the streamed tokens and the one of the step in flight."""

    async def layout(self):
        return "layout"

    async def stop_and_export(self, request_id, first_block, transport="host"):
        return FinalKV(Chunk(), PROMPT + STREAMED + [IN_FLIGHT], len(PROMPT) + len(STREAMED) + 1)

    async def release(self, chunks, recycle=False):
        pass


class Remote:
    def __init__(self, answer):
        self.answer = answer

    def remote(self, *args):
        async def call():
            return self.answer(*args)
        return call()


class DestinationReplica:
    """Accepts the move; when asked to resume, notes what the reader had been sent by then."""

    def __init__(self, request: ActiveRequest):
        self.request = request
        self.queued_at_resume: list[int] | None = None
        self.can_accept = Remote(lambda blocks, layout: (True, ""))
        self.drop_migration = Remote(lambda migration_id: None)
        self.resume_migrated = Remote(self._resume)

    def _resume(self, migration_id, call, final, generated, timeout_s):
        deltas = list(self.request.queue._queue)
        self.queued_at_resume = [t for d in deltas for c in d.chunk.choices for t in c.token_ids]
        return self.request.last_token_wall + 0.05, 1  # the destination's first token, 50 ms after the last


def stopped_request() -> ActiveRequest:
    call = GenerateCall(request_id="r", prompt_token_ids=PROMPT,
                        sampling_params=SamplingParams(max_tokens=64, temperature=0))
    request = ActiveRequest(call=call, prompt_len=len(PROMPT), max_tokens=64)
    request.output_tokens, request.output_token_ids, request.last_token_wall = 2, list(STREAMED), 1000.0
    return request


def test_the_token_of_the_step_in_flight_at_the_stop_goes_to_the_reader_before_the_destination_resumes():
    request = stopped_request()
    destination = DestinationReplica(request)
    migration = SourceMigration(request, SourceEngine(), 32, "src", "node", None,
                                Destination("dst", destination, "node"), "mig-1", "stop_and_copy",
                                MigrationLimits())
    result = asyncio.run(migration.run())

    assert result.record["outcome"] == "migrated" and result.handoff is not None
    assert destination.queued_at_resume == [IN_FLIGHT]
    assert request.output_tokens == 3 and request.output_token_ids == STREAMED + [IN_FLIGHT]
    # The client's gap is counted from that token (the destination answered 50 ms after it), not from the stop.
    assert abs(result.record["downtime_s"] - 0.05) < 1e-6
    assert list(result.handoff.all_token_ids) == PROMPT + STREAMED + [IN_FLIGHT]
