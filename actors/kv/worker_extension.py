"""RPC entry points into the worker-side KV connector, for ``AsyncLLM.collective_rpc``.

vLLM mixes this class into its worker class when the engine is built with
``worker_extension_cls="rayfleet.actors.kv.worker_extension.KVMigrationWorkerExtension"``; then
``await engine.collective_rpc("rayfleet_export_blocks", args=(...))`` runs the method in every worker
(one here: the connector refuses world size > 1) and returns the list of results. RPCs run between
engine steps, so they see the paged KV cache at a step boundary. Names carry a ``rayfleet_`` prefix
because vLLM refuses extension attributes that collide with the worker's own.

Arguments and results cross two process boundaries (AsyncLLM -> EngineCore by msgpack, EngineCore ->
worker by pickle): keep them to str/int/float/list/dict. KV itself never crosses them: chunks travel as the
names of shared-memory rows (`transfer.KVChunk.to_wire`). Use :mod:`rayfleet.actors.kv.engine_migrator`
rather than calling these directly.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

from rayfleet.actors.kv.connector import RayfleetKVConnector
from rayfleet.actors.kv.migration_state import WorkerKVMigrationState


def _connector() -> RayfleetKVConnector:
    if not has_kv_transfer_group():
        raise RuntimeError("rayfleet: this engine has no KV connector (kv_transfer_config not set)")
    connector = get_kv_transfer_group()
    if not isinstance(connector, RayfleetKVConnector):
        raise RuntimeError(f"rayfleet: the engine's KV connector is {type(connector).__name__}, "
                           "not RayfleetKVConnector")
    return connector


def _state() -> WorkerKVMigrationState:
    return _connector().worker_state


class KVMigrationWorkerExtension:
    def rayfleet_kv_layout(self) -> dict[str, Any]:
        return _state().layout()

    def rayfleet_export_blocks(self, external_id: str, first_block: int, transport: str) -> dict[str, Any]:
        return _state().export_blocks(external_id, first_block, transport)

    def rayfleet_export_landed(self, external_id: str) -> dict[str, Any]:
        return _state().export_landed(external_id)

    def rayfleet_expect_final(self, external_id: str, timeout_s: float) -> bool:
        return _state().expect_final(external_id, timeout_s)

    def rayfleet_export_final(self, external_id: str, first_block: int, transport: str) -> dict[str, Any]:
        return _state().export_final(external_id, first_block, transport)

    def rayfleet_gpu_uuids(self) -> list[str]:
        return _state().gpu_uuids()

    def rayfleet_release_rows(self, names: list[str]) -> int:
        return _state().release_rows(names)

    def rayfleet_stage(self, migration_id: str, chunk: dict[str, Any]) -> None:
        _state().stage(migration_id, chunk)

    def rayfleet_drop_staged(self, migration_id: str) -> bool:
        return _state().drop_staged(migration_id)

    def rayfleet_kv_stats(self) -> dict[str, Any]:
        """Migration counters, free blocks and, when the KV store is on, its ``store_*`` counters."""
        connector = _connector()
        store = connector.store_worker.stats() if connector.store_worker is not None else {}
        return {**connector.worker_state.stats(), **store}
