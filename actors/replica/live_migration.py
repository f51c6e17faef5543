"""Llumnix-style live migration of one running request, driven by its source replica.

Multi-stage pre-copy (Llumnix, OSDI'24 §4.2): copy the request's complete KV blocks to the destination while
the source keeps decoding; repeat for the blocks completed meanwhile; once few enough are left (or after
`max_stages`), stop the request on the source, copy the remainder, and resume it on the destination, which
computes exactly one token (no prefill recompute). `stop_and_copy` skips the pre-copy rounds.

Safety: the destination is asked first whether it has room; every chunk sent is also kept here, so when the
destination refuses, fails or times out after the source stopped, the request resumes on the source from
its own KV (a local "migration"), and the client's stream never notices. A request that finishes during
the migration simply finishes. Either way the destination's staged blocks are dropped and no KV leaks.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

from rayfleet.actors.kv.engine_migrator import FinalKV, KVChunk, KVRequestNotFoundError
from rayfleet.actors.replica.protocol import Handoff, MigrationLimits

if TYPE_CHECKING:
    from rayfleet.actors.replica.llm_replica import ActiveRequest, LLMReplica

logger = logging.getLogger("rayfleet.migration")


class MigrationOutcome(Exception):
    """Ends a migration early with a recorded outcome (refused, finished_on_source...)."""

    def __init__(self, outcome: str, reason: str):
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


class SourceMigration:
    """One migration of `request` from `replica` (this actor) to the replica behind `dst`."""

    def __init__(self, replica: LLMReplica, request: ActiveRequest, dst: Any, dst_id: str, migration_id: str,
                 mode: str, limits: MigrationLimits):
        self.replica = replica
        self.request = request
        self.dst = dst
        self.dst_id = dst_id
        self.migration_id = migration_id
        self.mode = mode
        self.limits = limits
        self.chunks: list[KVChunk] = []
        self.stages = 0
        self.started = time.time()
        self.last_source_token_at: float | None = None

    @property
    def request_id(self) -> str:
        return self.request.call.request_id if self.request is not None else ""

    def record(self, outcome: str, reason: str = "", downtime_s: float = 0.0,
               recomputed_tokens: int = 0) -> dict[str, Any]:
        return dict(migration_id=self.migration_id, request_id=self.request_id, src=self.replica.replica_id,
                    dst=self.dst_id, mode=self.mode, outcome=outcome, reason=reason, stages=self.stages,
                    blocks_moved=sum(c.num_blocks for c in self.chunks),
                    bytes_moved=sum(c.nbytes for c in self.chunks), downtime_s=downtime_s,
                    recomputed_tokens=recomputed_tokens,
                    total_s=time.time() - self.started, started_at=self.started)

    async def run(self) -> dict[str, Any]:
        try:
            await self._check_destination()
            if self.mode == "precopy":
                await self._precopy()
            final = await self._stop()
        except MigrationOutcome as early:
            await self._drop_destination()
            return self.record(early.outcome, early.reason)
        except Exception as error:  # destination lost before the source stopped: nothing to undo here
            self.request.leaving = False
            await self._drop_destination()
            return self.record("aborted", f"before the stop: {type(error).__name__}: {error}")
        try:
            first_token_at, recomputed = await self._resume_on_destination(final)
        except Exception as error:  # destination refused, died or timed out: the source takes it back
            logger.warning("migration %s: destination %s failed (%s); resuming %s on the source",
                           self.migration_id, self.dst_id, error, self.request_id)
            await self._drop_destination()
            await self._resume_locally(final)
            return self.record("aborted", f"destination failed: {type(error).__name__}: {error}")
        handoff = Handoff(replica_id=self.dst_id, replica=self.dst, all_token_ids=tuple(final.all_token_ids))
        self.replica.hand_off(self.request, handoff)
        downtime = max(first_token_at - (self.last_source_token_at or self.started), 0.0)
        return self.record("migrated", downtime_s=downtime, recomputed_tokens=recomputed)

    async def _check_destination(self) -> None:
        if self.request.call.sampling_params.n > 1:
            raise MigrationOutcome("refused", "requests with n > 1 are not migratable")
        block_size = self.replica.kv_block_size
        needed = math.ceil((self.request.prompt_len + self.request.output_tokens + 1) / block_size)
        ok, reason = await self.dst.can_accept.remote(needed + self.limits.headroom_blocks)
        if not ok:
            raise MigrationOutcome("refused", reason)

    async def _precopy(self) -> None:
        migrator = self.replica.migrator
        sent = 0
        for _ in range(self.limits.max_stages):
            try:
                chunk = await migrator.export_complete_blocks(self.request_id, sent)
            except KVRequestNotFoundError:
                raise MigrationOutcome("finished_on_source", "the request finished during pre-copy") from None
            self.stages += 1
            if chunk.num_blocks:
                await self._send(chunk)
                sent = chunk.end_block
            computed = self.request.prompt_len + self.request.output_tokens
            if computed // self.replica.kv_block_size - sent <= self.limits.last_stage_max_blocks:
                break

    async def _stop(self) -> FinalKV:
        self.request.leaving = True
        self.last_source_token_at = self.request.last_token_wall
        sent = self.chunks[-1].end_block if self.chunks else 0
        final = await self.replica.migrator.stop_and_export(self.request_id, sent)
        if final is None:
            self.request.leaving = False
            raise MigrationOutcome("finished_on_source", "the request finished before the final stage")
        self.stages += 1
        await self._send(final.chunk)
        return final

    async def _send(self, chunk: KVChunk) -> None:
        self.chunks.append(chunk)
        if chunk.num_blocks:
            await self.dst.stage_kv.remote(self.migration_id, chunk)

    async def _resume_on_destination(self, final: FinalKV) -> tuple[float, int]:
        return await self.dst.resume_migrated.remote(self.migration_id, self.request.call, final,
                                                     self.request.output_tokens, self.limits.resume_timeout_s)

    async def _resume_locally(self, final: FinalKV) -> None:
        local_id = f"{self.migration_id}-back"
        for chunk in self.chunks:
            if chunk.num_blocks:
                await self.replica.migrator.stage(local_id, chunk)
        self.request.leaving = False
        self.replica.resume_request(self.request, final, local_id)

    async def _drop_destination(self) -> None:
        try:
            await self.dst.drop_migration.remote(self.migration_id)
        except Exception:  # a dead destination holds nothing any more
            logger.debug("drop of %s on %s skipped: destination unreachable", self.migration_id, self.dst_id)

