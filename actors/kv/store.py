"""The fleet's KV store: shard actors holding KV blocks by content address, and the client that routes to them.

A block is one engine KV block across all layers, as an opaque byte array, addressed by the chained hash
of its token prefix (`block_hash.block_hashes`). Each `KVStore` actor is one shard (a memory tier over a
disk tier, `store_tiers.TieredBlockStore`); `KVStoreClient` routes every hash to one shard by jump
consistent hashing and batches: each call makes at most one round trip per shard involved, in parallel.
Values travel through Ray's object store, so any replica on any node reads what another wrote.

See docs/kv_store.md for the design and how the KV connector uses it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import ray

from rayfleet.actors.kv.block_hash import BlockHash
from rayfleet.actors.kv.store_config import KVStoreConfig
from rayfleet.actors.kv.store_metrics import StoreMetrics
from rayfleet.actors.kv.store_tiers import KVStoreStats, TieredBlockStore

if TYPE_CHECKING:
    import torch

    # What a caller may store as a block: any contiguous bytes-like object, or a tensor (any dtype, device).
    BlockValue: TypeAlias = bytes | bytearray | memoryview | np.ndarray | torch.Tensor


class KVStoreConfigMismatch(ValueError):
    """A store of this name exists with another configuration; sharing it would misroute blocks."""


@ray.remote
class KVStore(TieredBlockStore):
    """One shard of the store. Method calls run one at a time, so the tiers need no locks."""

    def __init__(self, config: KVStoreConfig, shard: int) -> None:
        super().__init__(config.memory_bytes, config.shard_disk_dir(shard), config.disk_bytes, config.pin_memory)
        self._config = config
        self._metrics = StoreMetrics(config.name, shard)
        self._metrics.observe(self.stats())

    def put(self, block_hashes: Sequence[BlockHash], blocks: Sequence[np.ndarray]) -> None:
        super().put(block_hashes, blocks)
        self._metrics.observe(self.stats())

    def get(self, block_hashes: Sequence[BlockHash]) -> list[np.ndarray | None]:
        blocks = super().get(block_hashes)
        self._metrics.observe(self.stats())
        return blocks

    def config(self) -> KVStoreConfig:
        return self._config


def shard_of(block_hash: BlockHash, num_shards: int) -> int:
    """Jump consistent hash (Lamping & Veach, 2014, arXiv:1406.2294) of the hash's first 8 bytes.

    Growing a store from n to n+1 shards moves only 1/(n+1) of the keys (hash mod n would move n/(n+1),
    turning the whole store cold), with perfect balance and no ring or virtual nodes. Rendezvous hashing
    would also allow removing a middle shard, but costs one hash per shard per key; shards are numbered
    and only appended, which is exactly jump hashing's case.
    """
    key = int.from_bytes(block_hash[:8], "little")
    bucket, jump = -1, 0
    while jump < num_shards:
        bucket = jump
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        jump = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket


def as_block_array(block: BlockValue) -> np.ndarray:
    """A block as the flat uint8 array the store keeps: numpy travels through Ray's object store without
    a pickle copy. A tensor is reinterpreted byte for byte (bfloat16 too) and copied to the host if needed."""
    # Only a process that imported torch holds tensors; the shards and clients without torch never load it.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(block, torch.Tensor):
        return block.detach().contiguous().view(torch.uint8).reshape(-1).cpu().numpy()
    return np.frombuffer(block, dtype=np.uint8)


STORE_CALL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class KVStoreClient:
    """Handles to a store's shards. Picklable: pass it to any Ray actor or task, on any node, to share the
    store. A process outside Ray (vLLM's engine-core and worker processes, where the KV connector runs)
    connects first, `ray.init(address=<the cluster's GCS address>)`, then calls `get_or_create_kv_store`."""

    shards: tuple[Any, ...]  # KVStore actor handles, index = shard number

    def contains_prefix(self, block_hashes: Sequence[BlockHash], timeout_s: float | None = None) -> int:
        """How many leading blocks of the chain the store holds: the prefix a replica can load instead
        of computing. It may shrink before the `get` that follows if another client's puts evict.
        `timeout_s`: raise `ray.exceptions.GetTimeoutError` past it (a slow or restarting shard)."""
        present = self.contains(block_hashes, timeout_s)
        return next((i for i, held in enumerate(present) if not held), len(present))

    def contains(self, block_hashes: Sequence[BlockHash], timeout_s: float | None = None) -> list[bool]:
        """Which of the blocks the store holds, in order (hashes only travel)."""
        return self._gather(block_hashes, lambda shard: shard.contains, timeout_s)

    def put(self, block_hashes: Sequence[BlockHash], blocks: Sequence[BlockValue]) -> None:
        """Stores blocks (one per hash); returns once every shard holds them, so any replica reads them."""
        if len(block_hashes) != len(blocks):
            raise ValueError(f"{len(block_hashes)} block hashes for {len(blocks)} blocks")
        arrays = [as_block_array(block) for block in blocks]

        def put_on(shard: Any, positions: list[int]) -> ray.ObjectRef:
            return shard.put.remote([block_hashes[i] for i in positions], [arrays[i] for i in positions])

        self._call_shards(block_hashes, put_on)

    def get(self, block_hashes: Sequence[BlockHash], timeout_s: float | None = None) -> list[np.ndarray | None]:
        """The blocks in order as flat uint8 arrays, None where the store has none. The arrays are read-only
        views of Ray's object store: copy them into the KV cache rather than writing to them."""
        return self._gather(block_hashes, lambda shard: shard.get, timeout_s)

    def stats(self) -> list[KVStoreStats]:
        """Each shard's statistics, index = shard number."""
        return ray.get([shard.stats.remote() for shard in self.shards])

    def shutdown(self) -> None:
        """Kills the shards. Memory tiers are lost; disk tiers stay and a store of the same config adopts them."""
        for shard in self.shards:
            ray.kill(shard, no_restart=True)

    def _call_shards(
        self, block_hashes: Sequence[BlockHash], call: Callable[[Any, list[int]], ray.ObjectRef],
        timeout_s: float | None = None,
    ) -> list[tuple[list[int], Any]]:
        """One call per shard involved, all in flight at once: (positions in `block_hashes`, reply) each."""
        by_shard: dict[int, list[int]] = {}
        for position, block_hash in enumerate(block_hashes):
            by_shard.setdefault(shard_of(block_hash, len(self.shards)), []).append(position)
        # Bounded: these calls may run inside an engine step, which a stuck shard must not hold up (the
        # callers treat a timeout as a miss: the engine computes the blocks itself).
        replies = ray.get([call(self.shards[shard], positions) for shard, positions in by_shard.items()],
                          timeout=STORE_CALL_TIMEOUT_S if timeout_s is None else timeout_s)
        return list(zip(by_shard.values(), replies, strict=True))

    def _gather(self, block_hashes: Sequence[BlockHash], method: Callable[[Any], Any],
                timeout_s: float | None = None) -> list:
        """Calls `method(shard)` with each shard's hashes; its per-hash replies back in `block_hashes` order."""
        replies = self._call_shards(
            block_hashes, lambda shard, positions: method(shard).remote([block_hashes[i] for i in positions]),
            timeout_s,
        )
        results: list = [None] * len(block_hashes)
        for positions, reply in replies:
            for position, value in zip(positions, reply, strict=True):
                results[position] = value
        return results


def get_or_create_kv_store(config: KVStoreConfig) -> KVStoreClient:
    """Starts the store's shards, or finds them by name if they exist (from any driver or node).

    Raises KVStoreConfigMismatch if a store of this name runs with another configuration.
    """

    def shard_actor(shard: int):
        return KVStore.options(
            name=config.shard_name(shard),
            namespace=config.ray_namespace,
            get_if_exists=True,  # atomic in the GCS: concurrent callers get the same actor
            lifetime="detached" if config.detached else None,
            num_cpus=config.shard_num_cpus,
            # Reserve the memory tier in Ray's memory resource so shards land where it fits.
            memory=config.memory_bytes,
            # A store is a cache: restarting a crashed shard (cold memory, disk adopted) beats routing
            # a share of every prefix to a dead actor.
            max_restarts=-1,
            # Spread shards over nodes so the memory tiers add up across the cluster.
            scheduling_strategy="SPREAD",
        ).remote(config, shard)

    # Shard 0 is the store's identity: check it before starting any other shard under a wrong config.
    first = shard_actor(0)
    existing: KVStoreConfig = ray.get(first.config.remote())
    differing = sorted(field for field in KVStoreConfig.model_fields
                       if field not in KVStoreConfig.CLIENT_FIELDS and getattr(existing, field) != getattr(config, field))
    if differing:
        raise KVStoreConfigMismatch(f"KV store {config.name!r} runs with other values of: {', '.join(differing)}")
    return KVStoreClient((first, *(shard_actor(shard) for shard in range(1, config.num_shards))))
