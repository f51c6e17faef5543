"""Llumnix-style live migration of one running request, driven by its source replica.

Multi-stage pre-copy (Llumnix, OSDI'24 §4.2): copy the request's complete KV blocks to the destination while
the source keeps decoding; repeat for the blocks completed meanwhile; once few enough are left (or after
`max_stages`), stop the request on the source, copy the remainder, and resume it on the destination, which
computes exactly one token (no prefill recompute). `stop_and_copy` skips the pre-copy rounds.

Safety: the destination is asked first whether it has room and the same KV layout, and requests whose
sampling state is not in their tokens are refused (`continuity.why_pinned`). Every chunk sent is also kept
here, so when the destination fails, dies or times out after the source stopped, the request resumes on the
source from its own KV (a local "migration"), and the client's stream never notices. If the source's own
stop fails midway, the request is declared lost on the source, and the ingress replays it from the tokens
the client has. A request that finishes during the migration simply finishes. Either way the destination's
staged blocks are dropped and no KV leaks.

A `SourceMigration` sees its replica only through what it is given (the request, the engine's migrator, the
block size) and decides; the replica carries out the outcome (`MigrationResult`): hand the client's stream
to the destination, or resume the request locally.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from rayfleet.actors.kv.engine_migrator import EngineKVMigrator, FinalKV, KVChunk, KVRequestNotFoundError
from rayfleet.actors.replica.active_request import ActiveRequest
from rayfleet.actors.replica.continuity import why_pinned
from rayfleet.actors.replica.protocol import Destination, Handoff, MigrationLimits

logger = logging.getLogger("rayfleet.migration")
DESTINATION_GRACE_S = 10.0  # beyond the destination's own resume timeout, before the source stops waiting

__all__ = ["Destination", "LocalResume", "MigrationOutcome", "MigrationResult", "SourceMigration"]


@dataclass(frozen=True)
class LocalResume:
    """The request stopped here and stays: send the client the tokens it has not seen, then continue from KV
    staged under `migration_id` (None: its token budget is spent, it ends here)."""

    final: FinalKV
    migration_id: str | None


@dataclass(frozen=True)
class MigrationResult:
    record: dict[str, Any]  # a MigrationRecord's fields
    handoff: Handoff | None = None  # the request moved: end the client's stream here with it
    local_resume: LocalResume | None = None
    lost: bool = False  # stopped here, and neither side can continue it: the ingress replays it


class MigrationOutcome(Exception):
    """Ends a migration early with a recorded outcome (refused, finished_on_source...)."""

    def __init__(self, outcome: str, reason: str):
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


class SourceMigration:
    """One migration of `request` from this replica (`src_id`, on `src_node_id`) to `dst`."""

    def __init__(self, request: ActiveRequest, migrator: EngineKVMigrator, block_size: int, src_id: str,
                 src_node_id: str, src_gpu_uuid: str | None, dst: Destination, migration_id: str, mode: str,
                 limits: MigrationLimits, trace_headers: dict[str, str] | None = None):
        self.request = request
        self.migrator = migrator
        self.block_size = block_size
        self.src_id = src_id
        self.src_node_id = src_node_id
        self.dst = dst
        # GPU to GPU by CUDA IPC when the destination sees the source's GPU; else host-staged rows, which
        # travel by name on one node and by value to another.
        self.transport = "device" if src_gpu_uuid is not None and src_gpu_uuid in dst.gpu_uuids else "host"
        self.migration_id = migration_id
        self.mode = mode
        self.limits = limits
        self.trace_headers = trace_headers  # the destination continues the request's trace under these
        self.chunks: list[KVChunk] = []
        self.stages = 0
        self.started = time.time()

    @property
    def request_id(self) -> str:
        return self.request.call.request_id

    def record(self, outcome: str, reason: str = "", downtime_s: float = 0.0, recomputed_tokens: int = 0,
               last_stage_blocks: int = 0) -> dict[str, Any]:
        return dict(migration_id=self.migration_id, request_id=self.request_id, src=self.src_id,
                    dst=self.dst.replica_id, mode=self.mode, outcome=outcome, reason=reason, stages=self.stages,
                    blocks_moved=sum(c.num_blocks for c in self.chunks), last_stage_blocks=last_stage_blocks,
                    bytes_moved=sum(c.nbytes for c in self.chunks), downtime_s=downtime_s,
                    recomputed_tokens=recomputed_tokens,
                    total_s=time.time() - self.started, started_at=self.started)

    async def run(self) -> MigrationResult:
        result = None
        try:
            result = await self._run()
            return result
        finally:
            # Every stage that maps the chunks' rows has returned by now (the engines hold mappings). After a
            # handoff the destination has scattered them (its first token is out), so their pages can serve
            # the next export; otherwise a local resume may still read them.
            await self.migrator.release(self.chunks, recycle=result is not None and result.handoff is not None)

    async def _run(self) -> MigrationResult:
        try:
            await self._check_destination()
            if self.mode == "precopy":
                await self._precopy()
        except MigrationOutcome as early:
            await self._drop_destination()
            return MigrationResult(self.record(early.outcome, early.reason))
        except Exception as error:  # destination lost, or a pre-copy failed, before the stop: nothing to undo
            await self._drop_destination()
            return MigrationResult(self.record("aborted", f"before the stop: {type(error).__name__}: {error}"))
        try:
            final = await self._stop()
        except MigrationOutcome as early:
            await self._drop_destination()
            return MigrationResult(self.record(early.outcome, early.reason))
        except Exception as error:  # the source's own stop failed midway: its KV is gone or unknown
            logger.warning("migration %s: stopping %s on the source failed (%s); the ingress replays it",
                           self.migration_id, self.request_id, error)
            await self.migrator.abort(self.request_id)
            await self._drop_destination()
            return MigrationResult(self.record("aborted", f"stop failed: {type(error).__name__}: {error}"), lost=True)
        if self._tokens_left(final) <= 0:  # the stop raced the last token: nothing is left to move
            await self.migrator.release([final.chunk])
            await self._drop_destination()
            return MigrationResult(self.record("finished_on_source", "no tokens left to generate"),
                                   local_resume=LocalResume(final, None))
        # A token of the step in flight at the stop may be in the export but not with the reader (the abort
        # dropped its output): it goes out now, not with the handoff behind the destination's first step.
        self.request.deliver_committed(final.all_token_ids)
        try:
            self.chunks.append(final.chunk)  # the destination stages it with the resume
            # Bounded here too: a destination that hangs (or whose death Ray has not noticed yet) must not
            # hold the stopped request; the destination itself gives up after resume_timeout_s.
            call = dataclasses.replace(self.request.call, trace_headers=self.trace_headers)
            first_token_at, recomputed = await asyncio.wait_for(self.dst.handle.resume_migrated.remote(
                self.migration_id, call, dataclasses.replace(final, chunk=self._wire(final.chunk)),
                len(final.all_token_ids) - self.request.prompt_len, self.limits.resume_timeout_s),
                self.limits.resume_timeout_s + DESTINATION_GRACE_S)
        except Exception as error:  # destination refused, died or timed out: the source takes it back
            logger.warning("migration %s: destination %s failed (%s); resuming %s on the source",
                           self.migration_id, self.dst.replica_id, error, self.request_id)
            await self._drop_destination()
            record = self.record("aborted", f"destination failed: {type(error).__name__}: {error}")
            try:
                return MigrationResult(record, local_resume=await self._stage_locally(final))
            except Exception as local_error:  # cannot even stage here: only the client's tokens are left
                logger.warning("migration %s: staging on the source failed too (%s)", self.migration_id,
                               local_error)
                return MigrationResult(record, lost=True)
        handoff = Handoff(replica_id=self.dst.replica_id, replica=self.dst.handle,
                          all_token_ids=tuple(final.all_token_ids))
        # The client's gap: from the source's last token (none streams after the stop but the one sent above).
        downtime = max(first_token_at - (self.request.last_token_wall or self.started), 0.0)
        return MigrationResult(self.record("migrated", downtime_s=downtime, recomputed_tokens=recomputed,
                                           last_stage_blocks=final.chunk.num_blocks),
                               handoff=handoff)

    def _tokens_left(self, final: FinalKV) -> float:
        max_tokens = self.request.call.sampling_params.max_tokens
        if max_tokens is None:
            return math.inf
        return max_tokens - (len(final.all_token_ids) - self.request.prompt_len)

    async def _check_destination(self) -> None:
        pinned = why_pinned(self.request.call.sampling_params, grammar_continues=True)  # both run the connector
        if pinned:
            raise MigrationOutcome("refused", f"a request with {pinned} cannot move without changing its output")
        needed = math.ceil((self.request.prompt_len + self.request.output_tokens + 1) / self.block_size)
        ok, reason = await self.dst.handle.can_accept.remote(needed + self.limits.headroom_blocks,
                                                             await self.migrator.layout())
        if not ok:
            raise MigrationOutcome("refused", reason)

    async def _precopy(self) -> None:
        sent = 0
        for _ in range(self.limits.max_stages):
            try:
                chunk = await self.migrator.export_complete_blocks(self.request_id, sent, self.transport)
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
        sent = self.chunks[-1].end_block if self.chunks else 0
        final = await self.migrator.stop_and_export(self.request_id, sent, transport=self.transport)
        if final is None:
            self.request.leaving = False
            raise MigrationOutcome("finished_on_source", "the request finished before the final stage")
        self.stages += 1
        return final

    async def _send(self, chunk: KVChunk, write_ahead: list[int] | None = None) -> None:
        """Stage a pre-copied chunk on the destination (it writes the chunk ahead when `write_ahead` is given)."""
        self.chunks.append(chunk)
        if chunk.num_blocks:
            await asyncio.wait_for(self.dst.handle.stage_kv.remote(self.migration_id, self._wire(chunk), write_ahead),
                                   self.limits.resume_timeout_s)

    def _wire(self, chunk: KVChunk) -> KVChunk:
        """A chunk as it travels to the destination: by name on this node, by value (Ray's object store) elsewhere."""
        return chunk if self.dst.node_id == self.src_node_id else chunk.inline()

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
