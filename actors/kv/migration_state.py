"""Live migration's two halves inside vLLM: which requests can move, their blocks, and the KV they carry.

* Scheduler half (EngineCore process), `SchedulerKVMigrationState`: tracks requests tagged migratable
  (``SamplingParams.extra_args["kv_transfer_params"]["rayfleet"]`` names their external id; vLLM 0.32 reads
  ``kv_transfer_params`` in ``v1/request.py``); every step tells the worker their block ids and how many tokens
  have KV after the step. On abort it delays the free (``request_finished -> (True, None)``) and hands the
  worker the final token list. At a destination it claims staged KV as an external prefix hit of
  ``min(n, num_tokens - 1)`` tokens (a synchronous load), so exactly one token is computed.
* Worker half (worker process), `WorkerKVMigrationState`: exports complete blocks while a request runs
  (pre-copy) and the rest once it is stopped, holding its blocks until that final export (or a deadline) and
  then reporting it in ``finished_sending`` so the scheduler frees them; stages incoming chunks and copies
  them into the freshly allocated blocks before the forward.

Every byte moves through `rayfleet.kernels`: exports gather into shared rows (`gather_to_shared`), staging maps
them, loads scatter them (`scatter_rows`). The mechanism is the one verified in
``shared/facts/vllm-kv-connector-migration.md``; protocol and limits in ``docs/kv_connector.md``.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.logger import init_logger
from vllm.v1.request import RequestStatus

from rayfleet.actors.kv.metadata import FinalRequest, LoadJob, RayfleetConnectorMetadata, TrackedRequest
from rayfleet.actors.kv.transfer import KVChunk, KVLayoutDescriptor, KVLayoutMismatchError
from rayfleet.kernels import (
    DeviceRows,
    KVCacheLayers,
    SharedRows,
    gather_to_device,
    gather_to_shared,
    scatter_rows,
    visible_gpu_uuids,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger(__name__)

# Key of rayfleet's entry inside a request's kv_transfer_params.
RAYFLEET_PARAMS_KEY = "rayfleet"
# How many normally finished (and, apart, client-aborted) external ids the worker remembers, so a stop that
# races a finish or an abort is answered at once instead of waiting for its deadline.
_FINISHED_MEMORY = 4096
# Device rows an owner never released are freed after this long (a migration takes seconds at most).
DEVICE_EXPORT_TTL_S = 300.0


def rayfleet_params(request: Request) -> dict[str, Any] | None:
    params = request.kv_transfer_params
    if not params:
        return None
    return params.get(RAYFLEET_PARAMS_KEY)


# ---------------------------------------------------------------------------------------------------
# Scheduler half (EngineCore process)
# ---------------------------------------------------------------------------------------------------


class SchedulerKVMigrationState:
    """Tracks migratable requests and plans loads; produces one metadata object per step."""

    def __init__(self, block_size: int):
        self._block_size = block_size
        self._kv_cache_manager = None
        self._tracked: dict[str, Request] = {}
        self._sent: dict[str, list[int]] = {}  # last block ids sent per tracked request
        self._announce: set[str] = set()  # tracked requests the worker has not heard of yet
        self._pending_loads: dict[str, tuple[str, int, bool]] = {}  # internal id -> (migration id, tokens, keep)
        self._meta = RayfleetConnectorMetadata()
        self._reported_free_blocks = -1

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        self._kv_cache_manager = kv_cache_manager

    def _num_free_blocks(self) -> int:
        return self._kv_cache_manager.block_pool.get_num_free_blocks()

    def on_new_request(self, request: Request) -> None:
        params = rayfleet_params(request)
        if params is None:
            return
        self._tracked[request.request_id] = request
        self._announce.add(request.request_id)
        if params.get("load") is not None:
            self._pending_loads[request.request_id] = (str(params["load"]), int(params["num_tokens"]),
                                                       bool(params.get("keep_staged")))

    def is_migration_load(self, request: Request) -> bool:
        """Whether the request resumes a migration (its KV comes from staging, not the store)."""
        return request.request_id in self._pending_loads

    def _load_target(self, request: Request) -> int:
        """Tokens the staged KV covers, leaving at least one token to compute."""
        _, num_tokens, _ = self._pending_loads[request.request_id]
        return max(0, min(num_tokens, request.num_tokens - 1))

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        # Side-effect free: the scheduler may ask again (e.g. when allocation fails).
        if request.request_id not in self._pending_loads:
            return 0, False
        return max(0, self._load_target(request) - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if request.request_id not in self._pending_loads:
            return
        target = self._load_target(request)
        migration_id, _, keep = self._pending_loads.pop(request.request_id)
        if num_external_tokens == 0:
            # The local prefix cache covers the staged KV (or nothing was staged): free the staging,
            # unless a resume will still need it (this was a write-ahead).
            if not keep:
                self._meta.drops.append(migration_id)
            return
        # The local hit handed to get_num_new_matched_tokens is block aligned, so loading starts on a
        # block boundary; the partial last block is copied whole.
        first_block = (target - num_external_tokens) // self._block_size
        end_block = math.ceil(target / self._block_size)
        block_ids = blocks.get_block_ids()[0][first_block:end_block]
        self._meta.loads.append(
            LoadJob(migration_id, first_block, list(block_ids), num_external_tokens, keep_staged=keep)
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> RayfleetConnectorMetadata:
        scheduled = scheduler_output.num_scheduled_tokens
        preempted = scheduler_output.preempted_req_ids or set()
        for req_id in (set(scheduled) | preempted | self._announce) & self._tracked.keys():
            request = self._tracked[req_id]
            if req_id in preempted and req_id not in scheduled:
                block_ids: list[int] = []  # preemption freed them
                num_computed = 0
            else:
                block_ids = self._kv_cache_manager.get_block_ids(req_id)[0]
                # Called before _update_after_schedule: add this step's tokens, whose KV the forward writes.
                num_computed = request.num_computed_tokens + scheduled.get(req_id, 0)
            changed = self._sent.get(req_id) != block_ids
            if changed:
                self._sent[req_id] = list(block_ids)
            external_id = rayfleet_params(request)["request_id"]
            self._meta.tracked.append(
                TrackedRequest(req_id, external_id, num_computed, list(block_ids) if changed else None)
            )
        self._announce.clear()
        meta, self._meta = self._meta, RayfleetConnectorMetadata()
        meta.num_free_blocks = self._reported_free_blocks = self._num_free_blocks()
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        params = rayfleet_params(request)
        if params is None:
            return False, None
        req_id = request.request_id
        self._tracked.pop(req_id, None)
        self._sent.pop(req_id, None)
        self._announce.discard(req_id)
        pending_load = self._pending_loads.pop(req_id, None)
        if pending_load is not None and not pending_load[2]:  # a write-ahead's staging is the resume's
            self._meta.drops.append(pending_load[0])
        external_id = params["request_id"]
        if request.status != RequestStatus.FINISHED_ABORTED:
            self._meta.finished.append((req_id, external_id))
            return False, None
        # An abort is the stop of a migration, or a client abort: the worker decides which, and reports
        # the id in finished_sending once the blocks may be freed. The returned params of an abort are
        # discarded by vLLM, so the token list travels in the metadata.
        self._meta.finals.append(
            FinalRequest(req_id, external_id, list(block_ids), request.num_computed_tokens,
                         list(request.all_token_ids))
        )
        return True, None

    def has_pending_push_work(self) -> bool:
        # Keep the engine stepping until the worker has seen the current free-block count (frees that
        # happen after the last step, e.g. the release of held blocks, would otherwise go unreported).
        return self._kv_cache_manager is not None and self._reported_free_blocks != self._num_free_blocks()


# ---------------------------------------------------------------------------------------------------
# Worker half (worker process)
# ---------------------------------------------------------------------------------------------------


@dataclass
class _LiveRequest:
    internal_id: str
    block_ids: list[int]
    num_computed_tokens: int


@dataclass(frozen=True)
class _Gather:
    """A pre-copy gather running on the worker's gather thread: whose blocks, and where they start."""

    internal_id: str
    first_block: int
    block_ids: list[int]
    seconds: Future[float]  # the gather's own time, once it is done


@dataclass
class _StagedMigration:
    layout: KVLayoutDescriptor
    chunks: dict[int, torch.Tensor] = field(default_factory=dict)  # first block -> staging rows

    @property
    def nbytes(self) -> int:
        return sum(chunk.numel() for chunk in self.chunks.values())


class WorkerKVMigrationState:
    """Worker-side tables, exports, staging and loads. Public methods are the RPC surface."""

    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None):
        self._block_size = vllm_config.cache_config.block_size
        self._num_blocks = kv_cache_config.num_blocks if kv_cache_config is not None else -1
        self._kv_layout = (kv_cache_config.kv_cache_layout if kv_cache_config is not None else None) or str(
            vllm_config.cache_config.kv_cache_layout
        )
        self._cache: KVCacheLayers | None = None
        self._layout: KVLayoutDescriptor | None = None
        self._live: dict[str, _LiveRequest] = {}  # by external id
        self._finals: dict[str, FinalRequest] = {}  # held for a final export, by external id
        self._expected: dict[str, float] = {}  # external id -> monotonic deadline of its final export
        self._finished: OrderedDict[str, None] = OrderedDict()  # recently finished normally
        self._released: OrderedDict[str, None] = OrderedDict()  # recently aborted with no final export expected
        self._release: set[str] = set()  # internal ids to report in finished_sending
        self._staged: dict[str, _StagedMigration] = {}
        # Device rows exported by CUDA IPC: kept alive until their owner releases them (or, as a backstop
        # against an owner that never does, until DEVICE_EXPORT_TTL_S after the export).
        self._device_exports: dict[str, tuple[torch.Tensor, float]] = {}
        # Host-staged pre-copy gathers run on their own thread while the engine steps (`export_blocks`), on a GPU
        # on a stream of their own: external id -> its gathers not yet joined.
        self._gather_thread: ThreadPoolExecutor | None = None
        self._gather_stream: torch.cuda.Stream | None = None
        self._gathering: dict[str, list[_Gather]] = {}
        self._loads: list[LoadJob] = []
        self._load_errors: set[int] = set()
        # Until the first step reports it: everything but vLLM's reserved null block (no step, no allocation).
        self._num_free_blocks = self._num_blocks - 1
        self._counters: Counter[str] = Counter()

    # -- engine hooks --------------------------------------------------------------------------------

    def register_cache(self, cache: KVCacheLayers) -> None:
        self._cache = cache
        self._layout = KVLayoutDescriptor.of(self._cache, self._kv_layout, self._block_size)

    def bind(self, meta: RayfleetConnectorMetadata) -> None:
        for tracked in meta.tracked:
            live = self._live.get(tracked.external_id)
            if live is None or live.internal_id != tracked.internal_id:
                live = self._live[tracked.external_id] = _LiveRequest(tracked.internal_id, [], 0)
                self._finished.pop(tracked.external_id, None)  # an id reused (e.g. resumed here): live again
                self._released.pop(tracked.external_id, None)
            if tracked.block_ids is not None:
                live.block_ids = tracked.block_ids
            live.num_computed_tokens = tracked.num_computed_tokens
        for internal_id, external_id in meta.finished:
            self._forget_live(internal_id, external_id)
            _remember(self._finished, external_id)
        for final in meta.finals:
            self._forget_live(final.internal_id, final.external_id)
            if self._expected.get(final.external_id, -math.inf) >= time.monotonic():
                self._finals[final.external_id] = final
            else:
                self._release.add(final.internal_id)  # a client abort: free the blocks now
                _remember(self._released, final.external_id)
                self._counters["aborts_released"] += 1
        for migration_id in meta.drops:
            if self._staged.pop(migration_id, None) is not None:
                self._counters["staged_dropped_by_engine"] += 1
        self._loads = meta.loads
        if meta.num_free_blocks >= 0:
            self._num_free_blocks = meta.num_free_blocks

    def _forget_live(self, internal_id: str, external_id: str) -> None:
        live = self._live.get(external_id)
        if live is not None and live.internal_id == internal_id:
            del self._live[external_id]

    def start_load(self) -> None:
        loads, self._loads = self._loads, []
        for job in loads:
            staged = self._staged.get(job.migration_id) if job.keep_staged else self._staged.pop(job.migration_id, None)
            self._counters["write_ahead_loads"] += job.keep_staged
            covered = [False] * len(job.block_ids)
            for first, data in (staged.chunks.items() if staged is not None else ()):
                lo = max(first, job.first_block)
                hi = min(first + data.shape[0], job.first_block + len(job.block_ids))
                if lo >= hi:
                    continue
                began = time.perf_counter()
                scatter_rows(self._cache, data[lo - first:hi - first],
                             job.block_ids[lo - job.first_block:hi - job.first_block])
                self._counters["load_s"] += time.perf_counter() - began
                covered[lo - job.first_block:hi - job.first_block] = [True] * (hi - lo)
            missing = [block for block, ok in zip(job.block_ids, covered) if not ok]
            if missing:
                logger.error("rayfleet: migration %s is missing %d of %d blocks; reporting load errors",
                             job.migration_id, len(missing), len(job.block_ids))
                self._load_errors.update(missing)
                self._counters["load_errors"] += 1
            loaded = len(job.block_ids) - len(missing)
            self._counters["loads"] += 1
            self._counters["tokens_loaded"] += job.num_tokens if not missing else 0
            self._counters["blocks_imported"] += loaded
            self._counters["bytes_imported"] += loaded * self._layout.bytes_per_block

    def take_finished_sending(self) -> set[str] | None:
        now = time.monotonic()
        for external_id, deadline in list(self._expected.items()):
            if deadline < now:
                self._expire(external_id)
        for name, (_, exported_at) in list(self._device_exports.items()):
            if now - exported_at > DEVICE_EXPORT_TTL_S:
                logger.warning("rayfleet: device rows %s were never released; freeing them", name)
                del self._device_exports[name]
        release, self._release = self._release, set()
        for external_id in [e for e, gathers in self._gathering.items()
                            if any(gather.internal_id in release for gather in gathers) or e not in self._live]:
            self._join_gathers(external_id)  # their blocks are freed once released: the reads end first
        return release or None

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def _expire(self, external_id: str) -> None:
        del self._expected[external_id]
        final = self._finals.pop(external_id, None)
        if final is not None:
            logger.warning("rayfleet: final export of %s not taken before its deadline; freeing", external_id)
            self._release.add(final.internal_id)
            self._counters["finals_expired"] += 1

    # -- RPC surface (through KVMigrationWorkerExtension) ----------------------------------------------

    def layout(self) -> dict[str, Any]:
        return self._layout.to_wire()

    def export_blocks(self, external_id: str, first_block: int, transport: str = "host") -> dict[str, Any]:
        """Complete blocks ``[first_block, num_computed_tokens // block_size)`` of a live request.

        ``transport`` is "host" (rows in a shared-memory file) or "device" (a GPU buffer shared by CUDA IPC).
        Host rows are gathered on a thread of their own while the engine keeps stepping (in the engine's loop,
        the gather of a 4k-token request stalled a CPU engine's decoding for tens of ms, and a 32k-token one a
        GPU engine's for ~85 ms at 25 GB/s, seconds into a fresh file): with ``landed`` False, the rows may be
        read only once `export_landed` says the request is still live."""
        live = self._live.get(external_id)
        if live is None:
            return {"status": "finished" if external_id in self._finished else "unknown"}
        end = min(live.num_computed_tokens // self._block_size, len(live.block_ids))
        block_ids = live.block_ids[first_block:end]  # empty if nothing new
        background = bool(block_ids) and transport == "host"
        chunk = (self._export_in_background(external_id, live.internal_id, block_ids, first_block) if background
                 else self._export(block_ids, first_block, transport))
        self._counters["precopy_exports"] += 1
        return {"status": "live", "num_computed_tokens": live.num_computed_tokens, "chunk": chunk,
                "landed": not background}

    def _export_in_background(self, external_id: str, internal_id: str, block_ids: list[int],
                              first_block: int) -> dict[str, Any]:
        on_gpu = self._cache.device.type == "cuda"
        rows = SharedRows.named(len(block_ids), self._cache.layout.block_bytes, slab=on_gpu)
        if self._gather_thread is None:
            self._gather_thread = ThreadPoolExecutor(1, thread_name_prefix="rayfleet-precopy")
        written = None
        if on_gpu:  # the gather's stream starts after everything the engine queued so far (the blocks' writes)
            self._gather_stream = self._gather_stream or torch.cuda.Stream(self._cache.device)
            written = torch.cuda.current_stream(self._cache.device).record_event()
        seconds = self._gather_thread.submit(self._timed_gather, block_ids, rows, written)
        self._gathering.setdefault(external_id, []).append(_Gather(internal_id, first_block, block_ids, seconds))
        self._count_export(len(block_ids), rows.nbytes)
        return KVChunk(first_block, len(block_ids), self._layout, shared=rows).to_wire()

    def _timed_gather(self, block_ids: list[int], rows: SharedRows, written: torch.cuda.Event | None) -> float:
        began = time.perf_counter()
        if written is None:
            gather_to_shared(self._cache, block_ids, into=rows)
        else:
            with torch.cuda.stream(self._gather_stream):  # the current stream is this thread's own setting
                self._gather_stream.wait_event(written)
                gather_to_shared(self._cache, block_ids, into=rows)  # returns once its stream is done
        return time.perf_counter() - began

    def _join_gathers(self, external_id: str) -> list[_Gather]:
        """Wait for the request's background gathers (re-raising a failed one)."""
        joined = self._gathering.pop(external_id, [])
        for gather in joined:
            self._counters["export_s"] += gather.seconds.result()
        return joined

    def export_landed(self, external_id: str) -> dict[str, Any]:
        """Wait for the request's pre-copy gathers. "live": its blocks were its own throughout, the rows are
        good (RPCs run between steps, and a block freed by a finish or a preemption is reused only in a step
        whose `bind` tells this worker first); otherwise the rows hold nothing usable: "finished" or
        "unknown" like `export_blocks`, "moved" when preemption took the blocks."""
        joined = self._join_gathers(external_id)
        live = self._live.get(external_id)
        if live is None:
            return {"status": "finished" if external_id in self._finished else "unknown"}
        for gather in joined:
            end = gather.first_block + len(gather.block_ids)
            if gather.internal_id != live.internal_id or live.block_ids[gather.first_block:end] != gather.block_ids:
                return {"status": "moved"}
        return {"status": "live"}

    def expect_final(self, external_id: str, timeout_s: float) -> bool:
        """Hold the request's blocks for a final export if it is aborted within ``timeout_s``."""
        self._expected[external_id] = time.monotonic() + timeout_s
        return external_id in self._live

    def export_final(self, external_id: str, first_block: int, transport: str = "host") -> dict[str, Any]:
        """Blocks from ``first_block`` on (the partial last one included), the token list, and a release.

        Status "pending" until the worker has seen the abort; "finished" when the request ended
        normally first; "released" when its abort came with no final export expected (a client abort, or a stop
        whose expectation reached the engine after its abort), so its blocks are freed; "expired" when no final
        export was expected (or its deadline passed).
        """
        final = self._finals.pop(external_id, None)
        if final is not None:
            self._expected.pop(external_id, None)
            chunk = self._export(final.block_ids[first_block:], first_block, transport)
            self._release.add(final.internal_id)
            self._counters["final_exports"] += 1
            return {"status": "ready", "all_token_ids": final.all_token_ids,
                    "num_computed_tokens": final.num_computed_tokens, "chunk": chunk}
        if external_id in self._finished or external_id in self._released:
            self._expected.pop(external_id, None)
            return {"status": "finished" if external_id in self._finished else "released"}
        deadline = self._expected.get(external_id)
        if deadline is None:
            return {"status": "expired"}
        if deadline < time.monotonic():
            self._expire(external_id)
            return {"status": "expired"}
        return {"status": "pending"}

    def _export(self, block_ids: list[int], first_block: int, transport: str) -> dict[str, Any]:
        """Gather the blocks into rows the caller owns; only their name (or IPC handle) crosses the RPCs."""
        began = time.perf_counter()
        if transport == "device" and block_ids:
            if self._cache.device.type != "cuda":
                raise ValueError("device transport needs a KV cache on a GPU")
            rows = gather_to_device(self._cache, block_ids)
            name = f"kv-{uuid.uuid4().hex[:16]}"
            self._device_exports[name] = (rows, time.monotonic())
            chunk = KVChunk(first_block, len(block_ids), self._layout, device=DeviceRows.share(name, rows))
        else:
            chunk = KVChunk(first_block, len(block_ids), self._layout,
                            shared=gather_to_shared(self._cache, block_ids))
        self._counters["export_s"] += time.perf_counter() - began
        self._count_export(len(block_ids), chunk.nbytes)
        return chunk.to_wire()

    def _count_export(self, num_blocks: int, nbytes: int) -> None:
        self._counters["blocks_exported"] += num_blocks
        self._counters["bytes_exported"] += nbytes

    def gpu_uuids(self) -> list[str]:
        """The GPUs this worker sees, its KV cache's first (empty on a CPU): where it can open device rows."""
        return visible_gpu_uuids(self._cache.device)

    def release_rows(self, names: list[str]) -> int:
        """Free device rows this worker exported (their owner is done); returns how many were held."""
        return sum(self._device_exports.pop(name, None) is not None for name in names)

    def stage(self, migration_id: str, chunk_wire: dict[str, Any]) -> None:
        """Map a chunk's shared rows (no copy) and hold them until a request resumes ``migration_id``."""
        chunk = KVChunk.from_wire(chunk_wire)
        if chunk.layout != self._layout:
            raise KVLayoutMismatchError(f"rayfleet: KV layout mismatch for migration {migration_id}: "
                                        f"staged {chunk.layout}, this engine {self._layout}")
        rows = chunk.rows(locked=self._cache.device.type == "cuda")
        self._staged.setdefault(migration_id, _StagedMigration(chunk.layout)).chunks[chunk.first_block] = rows
        self._counters["chunks_staged"] += 1
        self._counters["bytes_staged"] += chunk.nbytes

    def drop_staged(self, migration_id: str) -> bool:
        return self._staged.pop(migration_id, None) is not None

    def stats(self) -> dict[str, Any]:
        return {
            **{name: self._counters[name] for name in _COUNTERS},
            "num_blocks": self._num_blocks,
            "num_free_blocks": self._num_free_blocks,
            "tracked_requests": len(self._live),
            "held_finals": len(self._finals),
            "staged_migrations": len(self._staged),
            "staged_bytes": sum(staged.nbytes for staged in self._staged.values()),
            "device_exports": len(self._device_exports),
        }


def _remember(recent: OrderedDict[str, None], external_id: str) -> None:
    recent[external_id] = None
    while len(recent) > _FINISHED_MEMORY:
        recent.popitem(last=False)


_COUNTERS = (
    "precopy_exports", "final_exports", "blocks_exported", "bytes_exported",
    "chunks_staged", "bytes_staged", "staged_dropped_by_engine",
    "loads", "tokens_loaded", "blocks_imported", "bytes_imported", "load_errors", "write_ahead_loads",
    "aborts_released", "finals_expired",
    "export_s", "load_s",  # seconds in the kernels' gather (exports) and scatter (loads): the data path itself
)
