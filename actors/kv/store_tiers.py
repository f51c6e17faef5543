"""One shard's storage: a host-memory tier spilling to a disk tier, both LRU within a byte capacity.

Tiers are exclusive: a block lives in exactly one of them. A block evicted from memory is written to disk
(a spill); a disk hit moves the block back into memory (a promotion), which may spill others. A block
evicted from disk is gone. Blocks are opaque flat uint8 arrays: the store never interprets them.

Why LRU: the consumers are prefix reuse and offload, whose hot set is the recently used prefixes (system
prompts, multi-turn conversations). LRU is what vLLM's own prefix cache evicts by (its free-block queue),
so the store ranks blocks the way the engines do, at O(1) per operation with an `OrderedDict`. Its known
weakness, a burst of one-off blocks (a long unique prompt) flushing the hot set, costs less here: the burst
demotes hot blocks to disk rather than dropping them, and their next hit promotes them back. Scan-resistant
policies (2Q, ARC) are the next step if measured hit rates call for them.

Prefix order: a block is useful only while every block before it in its chain is held, since a lookup stops
at the first missing one. So a batch is applied last block first, leaving the chain's head the most recent:
like vLLM, which frees a request's blocks tail first, a chain is evicted from its tail and never leaves a
tail stranded behind an evicted head.

This module has no Ray in it: `kv_store.py` turns `TieredBlockStore` into the `KVStore` actor.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from rayfleet.actors.kv.block_hash import BlockHash


class LRUIndex:
    """Sizes of the blocks one tier holds, least recently used first, kept within a byte capacity."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._sizes: OrderedDict[BlockHash, int] = OrderedDict()

    def __contains__(self, block_hash: BlockHash) -> bool:
        return block_hash in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def size_of(self, block_hash: BlockHash) -> int:
        return self._sizes[block_hash]

    def touch(self, block_hash: BlockHash) -> None:
        self._sizes.move_to_end(block_hash)

    def add(self, block_hash: BlockHash, nbytes: int) -> list[BlockHash]:
        """Adds a block as most recently used; returns the blocks evicted to stay within capacity.

        A block larger than the whole capacity evicts itself (it is last in line, so it goes last).
        """
        self._sizes[block_hash] = nbytes
        self.used_bytes += nbytes
        evicted = []
        while self.used_bytes > self.capacity_bytes:
            victim, size = self._sizes.popitem(last=False)
            self.used_bytes -= size
            evicted.append(victim)
        return evicted

    def remove(self, block_hash: BlockHash) -> None:
        self.used_bytes -= self._sizes.pop(block_hash)


def _torch_if_cuda() -> ModuleType | None:
    """torch, where CUDA is available. Without an NVIDIA driver there is no CUDA, and a shard on a CPU
    node skips importing torch: ~1 s of start-up and ~180 MiB resident per shard process."""
    if not Path("/proc/driver/nvidia/version").exists():
        return None
    import torch

    # `is_available` does not create a CUDA context; the first pinned allocation does.
    return torch if torch.cuda.is_available() else None


class MemoryTier:
    """Blocks in host memory, page-locked ("pinned") when asked and CUDA exists, so that a device copy
    from them is a DMA; plain pageable memory otherwise."""

    def __init__(self, capacity_bytes: int, pin_memory: bool) -> None:
        self._index = LRUIndex(capacity_bytes)
        self._blocks: dict[BlockHash, np.ndarray] = {}
        self._torch = _torch_if_cuda() if pin_memory else None

    @property
    def pinned(self) -> bool:
        return self._torch is not None

    @property
    def index(self) -> LRUIndex:
        return self._index

    def allocate(self, nbytes: int) -> np.ndarray:
        """A fresh host buffer. A pinned one comes from torch's caching host allocator, so evicting and
        refilling same-size blocks reuses allocations; its numpy view keeps the tensor alive."""
        if self._torch is None:
            return np.empty(nbytes, dtype=np.uint8)
        return self._torch.empty(nbytes, dtype=self._torch.uint8, pin_memory=True).numpy()

    def get(self, block_hash: BlockHash) -> np.ndarray | None:
        block = self._blocks.get(block_hash)
        if block is not None:
            self._index.touch(block_hash)
        return block

    def add(self, block_hash: BlockHash, block: np.ndarray) -> list[tuple[BlockHash, np.ndarray]]:
        """Adds a block allocated by `allocate`; returns the evicted blocks with their contents."""
        self._blocks[block_hash] = block
        return [(victim, self._blocks.pop(victim)) for victim in self._index.add(block_hash, block.nbytes)]


class DiskTier:
    """Blocks as files `<hash hex>.kv` in a directory the tier owns.

    A file is written under a temporary name and renamed, so a crash never leaves a truncated block.
    Files already in the directory are adopted at start, oldest first, so the disk tier outlives the actor
    that wrote it. A file's mtime is its LRU rank (a disk block is never touched in place: a hit or a new
    put moves it to memory); the tier stamps it itself because the file system's clock ticks coarsely
    (~4 ms on Linux), which would tie the blocks of one spill.
    """

    _SUFFIX = ".kv"

    def __init__(self, directory: Path, capacity_bytes: int) -> None:
        self._directory = directory
        self._index = LRUIndex(capacity_bytes)
        self._last_stamp_ns = 0
        directory.mkdir(parents=True, exist_ok=True)
        for partial in directory.glob("*.tmp"):
            partial.unlink()
        for path in sorted(directory.glob(f"*{self._SUFFIX}"), key=lambda p: p.stat().st_mtime_ns):
            stat = path.stat()
            self._last_stamp_ns = stat.st_mtime_ns  # new stamps rank after adopted ones, whatever the clock
            self._delete(self._index.add(BlockHash(bytes.fromhex(path.stem)), stat.st_size))

    @property
    def index(self) -> LRUIndex:
        return self._index

    def write(self, block_hash: BlockHash, block: np.ndarray) -> int:
        """Stores a block as most recently used; returns how many blocks were evicted for it (itself
        included when it is larger than the whole tier: then it is dropped unwritten)."""
        evicted = self._index.add(block_hash, block.nbytes)
        self._delete([victim for victim in evicted if victim != block_hash])
        if block_hash not in evicted:
            path = self._path(block_hash)
            partial = path.with_suffix(".tmp")
            try:
                with open(partial, "wb") as f:
                    f.write(memoryview(block))
                self._last_stamp_ns = max(time.time_ns(), self._last_stamp_ns + 1)
                os.utime(partial, ns=(self._last_stamp_ns, self._last_stamp_ns))
                partial.replace(path)
            except OSError:  # a full or failing disk: the index must not list a block it cannot read
                self._index.remove(block_hash)
                partial.unlink(missing_ok=True)
                raise
        return len(evicted)

    def take(self, block_hash: BlockHash, into: np.ndarray) -> np.ndarray:
        """Reads a block into `into` (sized by `index.size_of`) and removes it from this tier."""
        path = self._path(block_hash)
        with open(path, "rb") as f:
            if f.readinto(memoryview(into)) != into.nbytes:
                raise OSError(f"short read of KV block file {path}")
        self.remove(block_hash)
        return into

    def remove(self, block_hash: BlockHash) -> None:
        self._index.remove(block_hash)
        self._path(block_hash).unlink()

    def _delete(self, block_hashes: list[BlockHash]) -> None:
        for block_hash in block_hashes:
            self._path(block_hash).unlink()

    def _path(self, block_hash: BlockHash) -> Path:
        return self._directory / f"{block_hash.hex()}{self._SUFFIX}"


@dataclass(frozen=True)
class KVStoreStats:
    """Counters since the shard started, and what it holds now."""

    pinned: bool
    memory_blocks: int
    memory_bytes: int
    memory_capacity_bytes: int
    disk_blocks: int
    disk_bytes: int
    disk_capacity_bytes: int
    hits_memory: int
    hits_disk: int
    misses: int
    evictions_memory: int  # left memory for lack of room: spilled to disk, or dropped without a disk tier
    evictions_disk: int  # left disk for lack of room: gone for good


@dataclass
class _Counters:
    hits_memory: int = 0
    hits_disk: int = 0
    misses: int = 0
    evictions_memory: int = 0
    evictions_disk: int = 0


class TieredBlockStore:
    """A memory tier over an optional disk tier, addressed by block hash."""

    def __init__(self, memory_bytes: int, disk_dir: Path | None, disk_bytes: int, pin_memory: bool) -> None:
        self._memory = MemoryTier(memory_bytes, pin_memory)
        self._disk = DiskTier(disk_dir, disk_bytes) if disk_dir is not None else None
        self._counters = _Counters()

    def contains(self, block_hashes: Sequence[BlockHash]) -> list[bool]:
        """Which blocks are held in any tier. A lookup neither counts as a hit nor refreshes recency:
        only a `get` (the load that follows a successful lookup) does."""
        return [h in self._memory.index or self._on_disk(h) for h in block_hashes]

    def put(self, block_hashes: Sequence[BlockHash], blocks: Sequence[np.ndarray]) -> None:
        """Stores flat uint8 blocks as most recently used, head of the chain last; a block already held
        is only refreshed (same hash, same content)."""
        for block_hash, block in reversed(list(zip(block_hashes, blocks, strict=True))):
            if block_hash in self._memory.index:
                self._memory.index.touch(block_hash)
                continue
            if self._on_disk(block_hash):
                self._disk.remove(block_hash)  # the caller hands us the bytes: keep them in memory
            # Copy out of the Ray object store: holding its zero-copy view would pin the caller's
            # argument in shared memory for as long as the block stays here.
            copy = self._memory.allocate(block.nbytes)
            copy[:] = block
            self._admit(block_hash, copy)

    def get(self, block_hashes: Sequence[BlockHash]) -> list[np.ndarray | None]:
        """The blocks in order, None for a miss. A disk hit is promoted to memory. Recency is refreshed
        tail first, like `put`."""
        found: list[np.ndarray | None] = []
        for block_hash in reversed(block_hashes):
            block = self._memory.get(block_hash)
            if block is not None:
                self._counters.hits_memory += 1
            elif self._on_disk(block_hash):
                into = self._memory.allocate(self._disk.index.size_of(block_hash))
                block = self._disk.take(block_hash, into)
                self._admit(block_hash, block)
                self._counters.hits_disk += 1
            else:
                self._counters.misses += 1
            found.append(block)
        return found[::-1]

    def stats(self) -> KVStoreStats:
        memory, disk = self._memory.index, self._disk.index if self._disk is not None else LRUIndex(0)
        return KVStoreStats(
            pinned=self._memory.pinned,
            memory_blocks=len(memory),
            memory_bytes=memory.used_bytes,
            memory_capacity_bytes=memory.capacity_bytes,
            disk_blocks=len(disk),
            disk_bytes=disk.used_bytes,
            disk_capacity_bytes=disk.capacity_bytes,
            **vars(self._counters),
        )

    def _admit(self, block_hash: BlockHash, block: np.ndarray) -> None:
        """Puts a block in memory, spilling the least recently used ones to disk."""
        for victim, victim_block in self._memory.add(block_hash, block):
            self._counters.evictions_memory += 1
            if self._disk is not None:
                self._counters.evictions_disk += self._disk.write(victim, victim_block)

    def _on_disk(self, block_hash: BlockHash) -> bool:
        return self._disk is not None and block_hash in self._disk.index
