"""rayfleet's vLLM v1 KV connector: move a running request and its KV cache between engines.

Loaded by module path (``kv_transfer_config.kv_connector_module_path``), so stock vLLM runs it unpatched.
The mechanism is the one verified in ``/work/shared/facts/vllm-kv-connector-migration.md``; the protocol
and its limits are in ``docs/kv_connector.md``. In short:

* A request is *migratable* when its ``SamplingParams.extra_args["kv_transfer_params"]["rayfleet"]``
  names its external request id (vLLM 0.32 reads ``kv_transfer_params`` in ``v1/request.py``).
* The scheduler-side instance (EngineCore process) tracks those requests and every step tells the
  worker-side instance (worker process) their block ids and how many tokens have KV after the step.
* Source: the worker exports complete blocks while the request runs (pre-copy); on abort the
  scheduler side delays the free (``request_finished -> (True, None)``) and hands the worker the final
  token list; the worker keeps the blocks until the final export (or a deadline), then reports the
  request in ``finished_sending`` so the scheduler frees them.
* Destination: staged blocks are claimed as an external prefix hit of ``min(n, num_tokens - 1)``
  tokens (a synchronous load), copied into the freshly allocated blocks before the forward, and
  exactly one token is computed.

Two processes, one channel each way: scheduler -> worker through :class:`RayfleetConnectorMetadata`
(every step), worker -> scheduler through ``get_finished`` / ``get_block_ids_with_load_errors``.
The outside world reaches the worker side through ``AsyncLLM.collective_rpc`` into
:class:`rayfleet.actors.kv.worker_extension.KVMigrationWorkerExtension`, which calls the public
methods of :class:`WorkerKVMigrationState`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger
from vllm.v1.metrics.cache_hit_source import CacheHitSource
from vllm.v1.request import RequestStatus

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

    from rayfleet.actors.kv.prefix_store import SchedulerPrefixStore, StoreLoad, StoreSave, WorkerPrefixStore

logger = init_logger(__name__)

# Key of rayfleet's entry inside a request's kv_transfer_params.
RAYFLEET_PARAMS_KEY = "rayfleet"
# How many normally finished external ids the worker remembers, so a stop that races a normal finish
# is answered "finished" instead of waiting for its deadline.
_FINISHED_MEMORY = 4096


# ---------------------------------------------------------------------------------------------------
# Layout and data movers
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVLayoutDescriptor:
    """What must match for a raw block copy between two engines to be valid.

    Raw bytes of whole blocks are exchanged, so source and destination need the same attention
    backend layout, dtype, block size, per-block shape (kv heads x tokens x head size) and layer count.
    """

    kv_layout: str  # vLLM KVCacheLayout name, e.g. "LBHNC" (the only one CPU attention supports)
    dtype: str  # e.g. "torch.float32"
    block_size: int  # tokens per block
    num_layers: int
    block_shape: tuple[int, ...]  # per layer and block, e.g. (num_kv_heads, block_size, 2 * head_size)
    layer_block_bytes: int  # bytes of one block of one layer

    @property
    def bytes_per_block(self) -> int:
        """Bytes moved per block (all layers)."""
        return self.layer_block_bytes * self.num_layers

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> KVLayoutDescriptor:
        return cls(**{**wire, "block_shape": tuple(wire["block_shape"])})


def gather_blocks(layers: list[torch.Tensor], block_ids: list[int]) -> torch.Tensor:
    """Copy whole blocks out of the paged cache into staging rows: ``[len(block_ids), bytes_per_block]`` uint8.

    Row ``i`` is block ``block_ids[i]`` of every layer, ordered ``[layer][layer_block_bytes]`` (the row
    format of ``rayfleet.kernels``). ``layers`` are per-layer ``[num_blocks, layer_block_bytes]`` uint8
    views of the KV cache. This and :func:`scatter_blocks` are the connector's only data movers: plain
    torch indexing, to be replaced by the fused movers of ``rayfleet.kernels``.
    """
    device = layers[0].device
    rows = torch.empty((len(block_ids), len(layers), layers[0].shape[1]), dtype=torch.uint8, device=device)
    if block_ids:
        index = torch.tensor(block_ids, dtype=torch.long, device=device)
        for i, layer in enumerate(layers):
            rows[:, i] = layer.index_select(0, index)
    return rows.view(len(block_ids), len(layers) * layers[0].shape[1])


def scatter_blocks(layers: list[torch.Tensor], block_ids: list[int], rows: torch.Tensor) -> None:
    """Write staging rows (``[len(block_ids), bytes_per_block]`` uint8) into blocks ``block_ids``."""
    if not block_ids:
        return
    device = layers[0].device
    index = torch.tensor(block_ids, dtype=torch.long, device=device)
    per_layer = rows.to(device).view(len(block_ids), len(layers), -1)
    for i, layer in enumerate(layers):
        layer.index_copy_(0, index, per_layer[:, i])


def _as_block_bytes(kv_layer: torch.Tensor) -> torch.Tensor:
    """View one layer's cache as ``[num_blocks, layer_block_bytes]`` uint8 rows (dimension 0 indexes blocks).

    Supported: block-compact layouts, where one block of one layer is a single contiguous run of bytes,
    whatever the order of heads and tokens inside it: vLLM 0.32's ``LBHNC`` (the CPU backend's only
    layout) and ``LBNHC`` (FlashAttention's default). Refused: layouts that split a block into several
    runs, e.g. a leading K/V dimension or head-outer ``LHBNC``.
    """
    itemsize = kv_layer.element_size()
    inner = sorted((stride, size) for size, stride in zip(kv_layer.shape[1:], kv_layer.stride()[1:]) if size > 1)
    run = 1
    for stride, size in inner:
        if stride != run:
            raise NotImplementedError(
                f"rayfleet KV connector: a block of the KV cache layer with shape {tuple(kv_layer.shape)} and "
                f"strides {kv_layer.stride()} is not one contiguous run of bytes (unsupported layout)")
        run *= size
    storage = torch.empty(0, dtype=torch.uint8, device=kv_layer.device).set_(kv_layer.untyped_storage())
    return storage.as_strided((kv_layer.shape[0], run * itemsize), (kv_layer.stride(0) * itemsize, 1),
                              kv_layer.storage_offset() * itemsize)


# ---------------------------------------------------------------------------------------------------
# Scheduler -> worker metadata
# ---------------------------------------------------------------------------------------------------


@dataclass
class TrackedRequest:
    """State of a live migratable request after this step's forward."""

    internal_id: str
    external_id: str
    num_computed_tokens: int  # tokens whose KV is written once this step has run
    block_ids: list[int] | None  # None: unchanged since last sent


@dataclass
class FinalRequest:
    """An aborted migratable request whose blocks the scheduler keeps until the worker releases them."""

    internal_id: str
    external_id: str
    block_ids: list[int]  # blocks covering num_computed_tokens (the partial last block included)
    num_computed_tokens: int
    all_token_ids: list[int]


@dataclass
class LoadJob:
    """Copy staged blocks [first_block, first_block + len(block_ids)) of a migration into block_ids."""

    migration_id: str
    first_block: int
    block_ids: list[int]
    num_tokens: int  # tokens claimed from the connector


@dataclass
class RayfleetConnectorMetadata(KVConnectorMetadata):
    tracked: list[TrackedRequest] = field(default_factory=list)
    finished: list[tuple[str, str]] = field(default_factory=list)  # (internal id, external id), normal finish
    finals: list[FinalRequest] = field(default_factory=list)
    loads: list[LoadJob] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)  # migration ids whose staged data is no longer needed
    num_free_blocks: int = -1  # scheduler's free KV blocks when this step was scheduled
    # KV store (prefix reuse and offload, kv_prefix_store.py); empty when the store is off.
    store_loads: list[StoreLoad] = field(default_factory=list)
    store_saves: list[StoreSave] = field(default_factory=list)
    store_counts: dict[str, int] = field(default_factory=dict)  # admission lookups since the last step


def rayfleet_params(request: Request) -> dict[str, Any] | None:
    params = request.kv_transfer_params
    if not params:
        return None
    return params.get(RAYFLEET_PARAMS_KEY)


# ---------------------------------------------------------------------------------------------------
# Scheduler side (EngineCore process)
# ---------------------------------------------------------------------------------------------------


class SchedulerKVMigrationState:
    """Tracks migratable requests and plans loads; produces one metadata object per step."""

    def __init__(self, block_size: int):
        self._block_size = block_size
        self._kv_cache_manager = None
        self._tracked: dict[str, Request] = {}
        self._sent: dict[str, list[int]] = {}  # last block ids sent per tracked request
        self._announce: set[str] = set()  # tracked requests the worker has not heard of yet
        self._pending_loads: dict[str, tuple[str, int]] = {}  # internal id -> (migration id, tokens)
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
            self._pending_loads[request.request_id] = (str(params["load"]), int(params["num_tokens"]))

    def is_migration_load(self, request: Request) -> bool:
        """Whether the request resumes a migration (its KV comes from staging, not the store)."""
        return request.request_id in self._pending_loads

    def _load_target(self, request: Request) -> int:
        """Tokens the staged KV covers, leaving at least one token to compute."""
        _, num_tokens = self._pending_loads[request.request_id]
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
        migration_id, _ = self._pending_loads.pop(request.request_id)
        if num_external_tokens == 0:
            # The local prefix cache covers the staged KV (or nothing was staged): free the staging.
            self._meta.drops.append(migration_id)
            return
        # The local hit handed to get_num_new_matched_tokens is block aligned, so loading starts on a
        # block boundary; the partial last block is copied whole.
        first_block = (target - num_external_tokens) // self._block_size
        end_block = math.ceil(target / self._block_size)
        block_ids = blocks.get_block_ids()[0][first_block:end_block]
        self._meta.loads.append(
            LoadJob(migration_id, first_block, list(block_ids), num_external_tokens)
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
        if pending_load is not None:
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
# Worker side (worker process)
# ---------------------------------------------------------------------------------------------------


@dataclass
class _LiveRequest:
    internal_id: str
    block_ids: list[int]
    num_computed_tokens: int


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
        self._layers: list[torch.Tensor] = []
        self._layout: KVLayoutDescriptor | None = None
        self._live: dict[str, _LiveRequest] = {}  # by external id
        self._finals: dict[str, FinalRequest] = {}  # held for a final export, by external id
        self._expected: dict[str, float] = {}  # external id -> monotonic deadline of its final export
        self._finished: OrderedDict[str, None] = OrderedDict()  # recently finished normally
        self._release: set[str] = set()  # internal ids to report in finished_sending
        self._staged: dict[str, _StagedMigration] = {}
        self._loads: list[LoadJob] = []
        self._load_errors: set[int] = set()
        # Until the first step reports it: everything but vLLM's reserved null block (no step, no allocation).
        self._num_free_blocks = self._num_blocks - 1
        self._counters: Counter[str] = Counter()

    # -- engine hooks --------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        first = next(iter(kv_caches.values()))
        self._layers = [_as_block_bytes(kv) for kv in kv_caches.values()]
        self._layout = KVLayoutDescriptor(
            kv_layout=self._kv_layout,
            dtype=str(first.dtype),
            block_size=self._block_size,
            num_layers=len(self._layers),
            block_shape=tuple(first.shape[1:]),
            layer_block_bytes=self._layers[0].shape[1],
        )
        if any(layer.shape[1] != self._layout.layer_block_bytes for layer in self._layers):
            raise NotImplementedError("rayfleet KV connector: layers with different block sizes (use one KV group)")

    def bind(self, meta: RayfleetConnectorMetadata) -> None:
        for tracked in meta.tracked:
            live = self._live.get(tracked.external_id)
            if live is None or live.internal_id != tracked.internal_id:
                live = self._live[tracked.external_id] = _LiveRequest(tracked.internal_id, [], 0)
                self._finished.pop(tracked.external_id, None)  # an id reused (e.g. resumed here): live again
            if tracked.block_ids is not None:
                live.block_ids = tracked.block_ids
            live.num_computed_tokens = tracked.num_computed_tokens
        for internal_id, external_id in meta.finished:
            self._forget_live(internal_id, external_id)
            self._finished[external_id] = None
            while len(self._finished) > _FINISHED_MEMORY:
                self._finished.popitem(last=False)
        for final in meta.finals:
            self._forget_live(final.internal_id, final.external_id)
            if self._expected.get(final.external_id, -math.inf) >= time.monotonic():
                self._finals[final.external_id] = final
            else:
                self._release.add(final.internal_id)  # a client abort: free the blocks now
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
            staged = self._staged.pop(job.migration_id, None)
            covered = [False] * len(job.block_ids)
            for first, data in (staged.chunks.items() if staged is not None else ()):
                lo = max(first, job.first_block)
                hi = min(first + data.shape[0], job.first_block + len(job.block_ids))
                if lo >= hi:
                    continue
                scatter_blocks(self._layers, job.block_ids[lo - job.first_block:hi - job.first_block],
                               data[lo - first:hi - first])
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
        release, self._release = self._release, set()
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

    def export_blocks(self, external_id: str, first_block: int) -> dict[str, Any]:
        """Complete blocks ``[first_block, num_computed_tokens // block_size)`` of a live request."""
        live = self._live.get(external_id)
        if live is None:
            return {"status": "finished" if external_id in self._finished else "unknown"}
        end = min(live.num_computed_tokens // self._block_size, len(live.block_ids))
        chunk = self._export(live.block_ids[first_block:end], first_block)  # empty if nothing new
        self._counters["precopy_exports"] += 1
        return {"status": "live", "num_computed_tokens": live.num_computed_tokens, **chunk}

    def expect_final(self, external_id: str, timeout_s: float) -> bool:
        """Hold the request's blocks for a final export if it is aborted within ``timeout_s``."""
        self._expected[external_id] = time.monotonic() + timeout_s
        return external_id in self._live

    def export_final(self, external_id: str, first_block: int) -> dict[str, Any]:
        """Blocks from ``first_block`` on (the partial last one included), the token list, and a release.

        Status "pending" until the worker has seen the abort; "finished" when the request ended
        normally first; "expired" when no final export was expected (or its deadline passed).
        """
        final = self._finals.pop(external_id, None)
        if final is not None:
            self._expected.pop(external_id, None)
            chunk = self._export(final.block_ids[first_block:], first_block)
            self._release.add(final.internal_id)
            self._counters["final_exports"] += 1
            return {"status": "ready", "all_token_ids": final.all_token_ids,
                    "num_computed_tokens": final.num_computed_tokens, **chunk}
        if external_id in self._finished:
            self._expected.pop(external_id, None)
            return {"status": "finished"}
        deadline = self._expected.get(external_id)
        if deadline is None:
            return {"status": "expired"}
        if deadline < time.monotonic():
            self._expire(external_id)
            return {"status": "expired"}
        return {"status": "pending"}

    def _export(self, block_ids: list[int], first_block: int) -> dict[str, Any]:
        data = gather_blocks(self._layers, block_ids)
        self._counters["blocks_exported"] += len(block_ids)
        self._counters["bytes_exported"] += data.numel()
        # bytes, not a tensor: AsyncLLM decodes collective_rpc results without type information, so a
        # tensor would arrive as [dtype, shape, <index of a buffer that is gone>] (see docs).
        return {"first_block": first_block, "num_blocks": len(block_ids), "data": data.cpu().numpy().tobytes(),
                "layout": self._layout.to_wire()}

    def stage(self, migration_id: str, first_block: int, num_blocks: int, data: bytes,
              layout: dict[str, Any]) -> None:
        theirs = KVLayoutDescriptor.from_wire(layout)
        if theirs != self._layout:
            raise ValueError(f"rayfleet: KV layout mismatch for migration {migration_id}: "
                             f"staged {theirs}, this engine {self._layout}")
        expected = num_blocks * theirs.bytes_per_block
        if len(data) != expected:
            raise ValueError(f"rayfleet: staged chunk of {len(data)} bytes, expected {expected} "
                             f"({num_blocks} blocks x {theirs.bytes_per_block})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: only ever a copy source
            tensor = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        staged = self._staged.setdefault(migration_id, _StagedMigration(theirs))
        staged.chunks[first_block] = tensor.view(num_blocks, theirs.bytes_per_block)
        self._counters["chunks_staged"] += 1
        self._counters["bytes_staged"] += len(data)

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
        }


_COUNTERS = (
    "precopy_exports", "final_exports", "blocks_exported", "bytes_exported",
    "chunks_staged", "bytes_staged", "staged_dropped_by_engine",
    "loads", "tokens_loaded", "blocks_imported", "bytes_imported", "load_errors",
    "aborts_released", "finals_expired",
)


# ---------------------------------------------------------------------------------------------------
# The connector: one instance per role, delegating to the state of its side
# ---------------------------------------------------------------------------------------------------


class RayfleetKVConnector(KVConnectorBase_V1):
    """KV connector for live migration and, when ``kv_connector_extra_config`` names a KV store, prefix
    reuse across replicas and offload (``kv_prefix_store.py``). Synchronous loads, single KV cache
    group, world size 1."""

    _cache_hit_source = CacheHitSource.P2P

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config, role, kv_cache_config)
        if vllm_config.parallel_config.world_size > 1:
            raise NotImplementedError("rayfleet KV connector: tensor/pipeline parallelism (world size > 1) "
                                      "is not supported; the RPCs and block exports assume one worker")
        from rayfleet.actors.kv.prefix_store import (
            SchedulerPrefixStore, WorkerPrefixStore, connect_store, store_settings,
        )

        self.scheduler_state: SchedulerKVMigrationState | None = None
        self.worker_state: WorkerKVMigrationState | None = None
        self.store_scheduler: SchedulerPrefixStore | None = None
        self.store_worker: WorkerPrefixStore | None = None
        store = store_settings(vllm_config)
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler_state = SchedulerKVMigrationState(vllm_config.cache_config.block_size)
            if store is not None:
                config, namespace = store
                self.store_scheduler = SchedulerPrefixStore(connect_store(config), namespace,
                                                            vllm_config.cache_config.block_size)
        else:
            self.worker_state = WorkerKVMigrationState(vllm_config, kv_cache_config)
            if store is not None:
                self.store_worker = WorkerPrefixStore(connect_store(store[0]))

    # -- worker side ---------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker_state.register_kv_caches(kv_caches)
        if self.store_worker is not None:
            self.store_worker.register([_as_block_bytes(kv) for kv in kv_caches.values()])

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, RayfleetConnectorMetadata)
        self.worker_state.bind(connector_metadata)
        if self.store_worker is not None:
            self.store_worker.bind(connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        # Loads are synchronous: the scheduler sets has_sync_kv_loads, so this runs before the forward.
        self.worker_state.start_load()
        if self.store_worker is not None:
            self.store_worker.load()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        return  # exports read the paged cache on demand, between steps

    def wait_for_save(self) -> None:
        # After the forward, before the scheduler can free or reuse this step's blocks.
        if self.store_worker is not None:
            self.store_worker.save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.worker_state.take_finished_sending(), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors = self.worker_state.take_load_errors()
        if self.store_worker is not None:
            errors |= self.store_worker.take_load_errors()
        return errors

    # -- scheduler side ------------------------------------------------------------------------------

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self.scheduler_state.bind_kv_cache_manager(kv_cache_manager)
        if self.store_scheduler is not None:
            self.store_scheduler.bind_kv_cache_manager(kv_cache_manager)

    def on_new_request(self, request: Request) -> None:
        self.scheduler_state.on_new_request(request)
        if self.store_scheduler is not None:
            self.store_scheduler.on_new_request(request)

    def _uses_store(self, request: Request) -> bool:
        return self.store_scheduler is not None and not self.scheduler_state.is_migration_load(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._uses_store(request):
            return self.store_scheduler.get_num_new_matched_tokens(request, num_computed_tokens), False
        return self.scheduler_state.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if self._uses_store(request):
            self.store_scheduler.update_state_after_alloc(request, blocks, num_external_tokens)
        else:
            self.scheduler_state.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = self.scheduler_state.build_connector_meta(scheduler_output)
        if self.store_scheduler is not None:
            self.store_scheduler.add_to_meta(meta, scheduler_output)
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self.store_scheduler is not None:
            self.store_scheduler.request_finished(request)
        return self.scheduler_state.request_finished(request, block_ids)

    def has_pending_push_work(self) -> bool:
        return self.scheduler_state is not None and self.scheduler_state.has_pending_push_work()
