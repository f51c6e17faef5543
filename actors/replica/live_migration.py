"""Llumnix-style live migration of one running request, driven by its source replica.

Multi-stage pre-copy (Llumnix, OSDI'24 §4.2): copy the request's complete KV blocks to the destination while
the source keeps decoding; repeat for the blocks completed meanwhile; once few enough are left (or after
`max_stages`), stop the request on the source, copy the remainder, and resume it on the destination, which
computes exactly one token (no prefill recompute). `stop_and_copy` skips the pre-copy rounds.

Safety: the destination is asked first whether it has room; every chunk sent is also kept here, so when the
destination refuses, fails or times out after the source stopped, the request resumes on the source from
its own KV (a local "migration"), and the client's stream never notices. A request that finishes during
the migration simply finishes. Either way the destination's staged blocks are dropped and no KV leaks.

A `SourceMigration` sees its replica only through what it is given (the request, the engine's migrator, the
block size) and decides; the replica carries out the outcome (`MigrationResult`): hand the client's stream
to the destination, or resume the request locally.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from rayfleet.actors.kv.engine_migrator import EngineKVMigrator, FinalKV, KVChunk, KVRequestNotFoundError
from rayfleet.actors.replica.active_request import ActiveRequest
from rayfleet.actors.replica.protocol import Destination, Handoff, MigrationLimits

logger = logging.getLogger("rayfleet.migration")

__all__ = ["Destination", "LocalResume", "MigrationOutcome", "MigrationResult", "SourceMigration"]


@dataclass(frozen=True)
class LocalResume:
    """The destination failed after the source stopped: continue here from KV staged under `migration_id`."""

    final: FinalKV
    migration_id: str


@dataclass(frozen=True)
class MigrationResult:
    record: dict[str, Any]  # a MigrationRecord's fields
    handoff: Handoff | None = None  # the request moved: end the client's stream here with it
    local_resume: LocalResume | None = None


class MigrationOutcome(Exception):
    """Ends a migration early with a recorded outcome (refused, finished_on_source...)."""

    def __init__(self, outcome: str, reason: str):
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


class SourceMigration:
    """One migration of `request` from this replica (`src_id`, on `src_node_id`) to `dst`."""

    def __init__(self, request: ActiveRequest, migrator: EngineKVMigrator, block_size: int, src_id: str,
                 src_node_id: str, dst: Destination, migration_id: str, mode: str, limits: MigrationLimits):
        self.request = request
        self.migrator = migrator
        self.block_size = block_size
        self.src_id = src_id
        self.src_node_id = src_node_id
        self.dst = dst
        self.migration_id = migration_id
        self.mode = mode
        self.limits = limits
        self.chunks: list[KVChunk] = []
        self.stages = 0
        self.started = time.time()
        self.last_source_token_at: float | None = None

    @property
    def request_id(self) -> str:
        return self.request.call.request_id

    def record(self, outcome: str, reason: str = "", downtime_s: float = 0.0,
               recomputed_tokens: int = 0) -> dict[str, Any]:
        return dict(migration_id=self.migration_id, request_id=self.request_id, src=self.src_id,
                    dst=self.dst.replica_id, mode=self.mode, outcome=outcome, reason=reason, stages=self.stages,
                    blocks_moved=sum(c.num_blocks for c in self.chunks),
                    bytes_moved=sum(c.nbytes for c in self.chunks), downtime_s=downtime_s,
                    recomputed_tokens=recomputed_tokens,
                    total_s=time.time() - self.started, started_at=self.started)

    async def run(self) -> MigrationResult:
        try:
            return await self._run()
        finally:
            # Every stage that maps the chunks' rows has returned by now (the engines hold mappings).
            for chunk in self.chunks:
                chunk.release()

    async def _run(self) -> MigrationResult:
        try:
            await self._check_destination()
            if self.mode == "precopy":
                await self._precopy()
            final = await self._stop()
        except MigrationOutcome as early:
            await self._drop_destination()
            return MigrationResult(self.record(early.outcome, early.reason))
        except Exception as error:  # destination lost before the source stopped: nothing to undo here
            self.request.leaving = False
            await self._drop_destination()
            return MigrationResult(self.record("aborted", f"before the stop: {type(error).__name__}: {error}"))
        try:
            first_token_at, recomputed = await self.dst.handle.resume_migrated.remote(
                self.migration_id, self.request.call, final, self.request.output_tokens,
                self.limits.resume_timeout_s)
        except Exception as error:  # destination refused, died or timed out: the source takes it back
            logger.warning("migration %s: destination %s failed (%s); resuming %s on the source",
                           self.migration_id, self.dst.replica_id, error, self.request_id)
            await self._drop_destination()
            local = await self._stage_locally(final)
            return MigrationResult(self.record("aborted", f"destination failed: {type(error).__name__}: {error}"),
                                   local_resume=local)
        handoff = Handoff(replica_id=self.dst.replica_id, replica=self.dst.handle,
                          all_token_ids=tuple(final.all_token_ids))
        downtime = max(first_token_at - (self.last_source_token_at or self.started), 0.0)
        return MigrationResult(self.record("migrated", downtime_s=downtime, recomputed_tokens=recomputed),
                               handoff=handoff)

    async def _check_destination(self) -> None:
        if self.request.call.sampling_params.n > 1:
            raise MigrationOutcome("refused", "requests with n > 1 are not migratable")
        needed = math.ceil((self.request.prompt_len + self.request.output_tokens + 1) / self.block_size)
        ok, reason = await self.dst.handle.can_accept.remote(needed + self.limits.headroom_blocks)
        if not ok:
            raise MigrationOutcome("refused", reason)

    async def _precopy(self) -> None:
        sent = 0
        for _ in range(self.limits.max_stages):
            try:
                chunk = await self.migrator.export_complete_blocks(self.request_id, sent)
            except KVRequestNotFoundError:
                raise MigrationOutcome("finished_on_source", "the request finished during pre-copy") from None
            self.stages += 1
            if chunk.num_blocks:
                await self._send(chunk, self._write_ahead_tokens(chunk))
                sent = chunk.end_block
            computed = self.request.prompt_len + self.request.output_tokens
            if computed // self.block_size - sent <= self.limits.last_stage_max_blocks:
                break

    async def _stop(self) -> FinalKV:
        self.request.leaving = True
        self.last_source_token_at = self.request.last_token_wall
        sent = self.chunks[-1].end_block if self.chunks else 0
        final = await self.migrator.stop_and_export(self.request_id, sent)
        if final is None:
            self.request.leaving = False
            raise MigrationOutcome("finished_on_source", "the request finished before the final stage")
        self.stages += 1
        await self._send(final.chunk)
        return final

    async def _send(self, chunk: KVChunk, write_ahead: list[int] | None = None) -> None:
        """Stage a chunk on the destination: by name on this node, by value (Ray's object store) elsewhere."""
        self.chunks.append(chunk)
        if chunk.num_blocks:
            wire = chunk if self.dst.node_id == self.src_node_id else chunk.inline()
            await self.dst.handle.stage_kv.remote(self.migration_id, wire, write_ahead)

    def _write_ahead_tokens(self, chunk: KVChunk) -> list[int] | None:
        """The tokens a pre-copied chunk's blocks hold, plus the next one (the destination computes it when
        it writes the blocks ahead); None when write-ahead is off or that token is not known here yet."""
        needed = chunk.end_block * self.block_size + 1
        tokens = self.request.call.prompt_token_ids + self.request.output_token_ids
        return tokens[:needed] if self.limits.write_ahead and len(tokens) >= needed else None

    async def _stage_locally(self, final: FinalKV) -> LocalResume:
        local_id = f"{self.migration_id}-back"
        for chunk in self.chunks:
            await self.migrator.stage(local_id, chunk)
        return LocalResume(final, local_id)

    async def _drop_destination(self) -> None:
        try:
            await self.dst.handle.drop_migration.remote(self.migration_id)
        except Exception:  # a dead destination holds nothing any more
            logger.debug("drop of %s on %s skipped: destination unreachable", self.migration_id,
                         self.dst.replica_id)
