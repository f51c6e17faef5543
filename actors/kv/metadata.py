"""The messages between the two halves of rayfleet's KV connector, one `RayfleetConnectorMetadata` per step.

vLLM runs the connector's scheduler half in the EngineCore process and its worker half in the worker process;
the only channel from the first to the second is the metadata object `build_connector_meta` returns each step
(vLLM pickles it to the worker). Migration (`migration_state.py`) and the KV store (`prefix_store.py`) each
add their part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from rayfleet.actors.kv.block_hash import BlockHash


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
    keep_staged: bool = False  # a write-ahead: the resume still needs the staging afterwards


@dataclass
class StoreLoad:
    """Copy the store's blocks ``hashes`` into ``block_ids`` (same length) of request ``internal_id``."""

    internal_id: str
    hashes: list[BlockHash]
    block_ids: list[int]
    is_async: bool = False  # the request waits in WAITING_FOR_REMOTE_KVS; the worker reports it in get_finished


@dataclass
class StoreSave:
    """Put blocks ``block_ids`` (complete after this step's forward) under ``hashes``."""

    internal_id: str
    hashes: list[BlockHash]
    block_ids: list[int]


@dataclass
class RayfleetConnectorMetadata(KVConnectorMetadata):
    tracked: list[TrackedRequest] = field(default_factory=list)
    finished: list[tuple[str, str]] = field(default_factory=list)  # (internal id, external id), normal finish
    finals: list[FinalRequest] = field(default_factory=list)
    loads: list[LoadJob] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)  # migration ids whose staged data is no longer needed
    num_free_blocks: int = -1  # scheduler's free KV blocks when this step was scheduled
    # KV store (prefix reuse and offload, prefix_store.py); empty when the store is off.
    store_loads: list[StoreLoad] = field(default_factory=list)
    store_saves: list[StoreSave] = field(default_factory=list)
    store_counts: dict[str, int] = field(default_factory=dict)  # admission lookups since the last step
