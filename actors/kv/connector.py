"""rayfleet's vLLM v1 KV connector: one connector, two uses of "KV beyond the local prefix hit".

Loaded by module path (``kv_transfer_config.kv_connector_module_path``), so stock vLLM runs it unpatched
(`engine_migrator.migration_engine_kwargs` builds the config). vLLM installs one connector per engine, and
both uses need the same hooks (claim external tokens at admission, load before the forward, act after it),
so this class only dispatches each hook to the halves of:

* live migration (`migration_state.py`): export a running request's blocks, stage them at the destination,
  resume it there with one token computed;
* the fleet KV store (`prefix_store.py`), when ``kv_connector_extra_config`` names one: load prefix blocks
  another replica computed, and put every block this engine computes.

Two processes, one channel each way: scheduler -> worker through `RayfleetConnectorMetadata` (every step),
worker -> scheduler through ``get_finished`` / ``get_block_ids_with_load_errors``. The outside world reaches
the worker half through ``AsyncLLM.collective_rpc`` into `worker_extension.KVMigrationWorkerExtension`.
Protocol and limits: ``docs/kv_connector.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from rayfleet.actors.kv.continuation import GrammarContinuation
from rayfleet.actors.kv.metadata import RayfleetConnectorMetadata
from rayfleet.actors.kv.migration_state import SchedulerKVMigrationState, WorkerKVMigrationState, rayfleet_params
from rayfleet.actors.kv.prefix_store import SchedulerPrefixStore, WorkerPrefixStore, connect_store, store_settings
from rayfleet.kernels import KVCacheLayers

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class RayfleetKVConnector(KVConnectorBase_V1):
    """KV connector for live migration and, when ``kv_connector_extra_config`` names a KV store, prefix
    reuse across replicas and offload (``prefix_store.py``). Migration loads are synchronous, store loads
    asynchronous (``KVStoreConfig.async_loads``); single KV cache group, world size 1."""

    _cache_hit_source = CacheHitSource.P2P

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config, role, kv_cache_config)
        if vllm_config.parallel_config.world_size > 1:
            raise NotImplementedError("rayfleet KV connector: tensor/pipeline parallelism (world size > 1) "
                                      "is not supported; the RPCs and block exports assume one worker")
        self.scheduler_state: SchedulerKVMigrationState | None = None
        self.worker_state: WorkerKVMigrationState | None = None
        self.store_scheduler: SchedulerPrefixStore | None = None
        self.store_worker: WorkerPrefixStore | None = None
        self.continuation: GrammarContinuation | None = None
        store = store_settings(vllm_config)
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler_state = SchedulerKVMigrationState(vllm_config.cache_config.block_size)
            self.continuation = GrammarContinuation()
            if store is not None:
                config, namespace = store
                self.store_scheduler = SchedulerPrefixStore(
                    connect_store(config), namespace, vllm_config.cache_config.block_size, config,
                    pipelined=bool(vllm_config.scheduler_config.async_scheduling))
        else:
            self.worker_state = WorkerKVMigrationState(vllm_config, kv_cache_config)
            if store is not None:
                self.store_worker = WorkerPrefixStore(connect_store(store[0]), store[0])

    # -- worker side ---------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        # Built once for the engine's life: the kernels derive the layout (any vLLM layout) and addresses.
        cache = KVCacheLayers(list(kv_caches.values()))
        self.worker_state.register_cache(cache)
        if self.store_worker is not None:
            self.store_worker.register(cache)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, RayfleetConnectorMetadata)
        self.worker_state.bind(connector_metadata)
        if self.store_worker is not None:
            self.store_worker.bind(connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        # Migration loads (and store loads with async_loads off) are synchronous: the scheduler sets
        # has_sync_kv_loads, so this runs before the forward. Async store loads only start here.
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
        loaded = self.store_worker.take_finished_loads() if self.store_worker is not None else None
        return self.worker_state.take_finished_sending(), loaded

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
            if self._uses_store(request):
                self.store_scheduler.ask_ahead(request)

    def _uses_store(self, request: Request) -> bool:
        return self.store_scheduler is not None and not self.scheduler_state.is_migration_load(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        self.continuation.advance(request, rayfleet_params(request))  # before its first step here
        if self._uses_store(request):
            tokens = self.store_scheduler.get_num_new_matched_tokens(request, num_computed_tokens)
            return tokens, bool(tokens) and self.store_scheduler.async_loads
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

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        # Migration loads are synchronous: every async load finished here is a store load.
        if self.store_scheduler is not None and connector_output.finished_recving:
            self.store_scheduler.loads_finished(connector_output.finished_recving)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self.continuation.forget(request.request_id)
        if self.store_scheduler is not None:
            self.store_scheduler.request_finished(request)
        return self.scheduler_state.request_finished(request, block_ids)

    def has_pending_push_work(self) -> bool:
        return self.scheduler_state is not None and self.scheduler_state.has_pending_push_work()
