"""KV in flight between engines: the layout both ends must share, and chunks of whole blocks.

A chunk's rows are staging rows in the kernels' format (`rayfleet.kernels`: one row per block, all layers).
On one node they stay in a shared-memory file and only the file's name travels (the source's gather writes
them, the destination's scatter reads them: two copies in all). To another node the rows travel by value
(`KVChunk.inline`), through Ray's object store, and the receiving side writes them into a file of its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from rayfleet.kernels import KVCacheLayers, SharedRows


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

    @classmethod
    def of(cls, cache: KVCacheLayers, kv_layout: str, block_size: int) -> KVLayoutDescriptor:
        first = cache.layers[0]
        return cls(kv_layout=kv_layout, dtype=str(first.dtype), block_size=block_size,
                   num_layers=cache.layout.num_layers, block_shape=tuple(first.shape[1:]),
                   layer_block_bytes=cache.layout.page_bytes)

    @property
    def bytes_per_block(self) -> int:
        """Bytes moved per block (all layers): one staging row."""
        return self.layer_block_bytes * self.num_layers

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> KVLayoutDescriptor:
        return cls(**{**wire, "block_shape": tuple(wire["block_shape"])})


class KVLayoutMismatchError(ValueError):
    """The chunk's KV layout differs from the destination engine's: a raw block copy would be wrong."""


@dataclass(frozen=True)
class KVChunk:
    """Whole KV blocks ``[first_block, first_block + num_blocks)`` of one request, all layers.

    Block ``i`` holds the KV of tokens ``[i * block_size, (i + 1) * block_size)``. The rows are in
    ``shared`` (a file on the node that wrote them) or, after ``inline()``, in ``data`` (a
    ``[num_blocks, bytes_per_block]`` uint8 array carried by value).
    """

    first_block: int
    num_blocks: int
    layout: KVLayoutDescriptor
    shared: SharedRows | None = None
    data: np.ndarray | None = None

    @property
    def end_block(self) -> int:
        """First block a following export should start at."""
        return self.first_block + self.num_blocks

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.layout.bytes_per_block

    def rows(self) -> torch.Tensor:
        """The rows as a ``[num_blocks, bytes_per_block]`` uint8 tensor, without a copy."""
        if self.data is not None:
            return torch.from_numpy(self.data)
        return self.shared.map()

    def inline(self) -> KVChunk:
        """This chunk carrying its rows by value, for a process on another node (Ray ships the array)."""
        if self.data is not None:
            return self
        return replace(self, shared=None, data=self.shared.map().numpy())

    def release(self) -> None:
        """Unlink the chunk's shared rows (its owner, once every stage that maps them has returned)."""
        if self.shared is not None:
            self.shared.unlink()

    def recycle(self) -> None:
        """Release the rows once no engine will read them again (the destination has scattered them): the
        file's warm pages go to the writer's next gather (`SharedRows.recycle`)."""
        if self.shared is not None:
            self.shared.recycle()

    def to_wire(self) -> dict[str, Any]:
        """What crosses vLLM's RPCs (msgpack and pickle): the name of the rows, never their bytes."""
        if self.shared is None:
            raise ValueError("only chunks in shared memory cross the engine's RPCs; stage inline chunks first")
        return {"first_block": self.first_block, "num_blocks": self.num_blocks, "rows": self.shared.name,
                "layout": self.layout.to_wire()}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> KVChunk:
        layout = KVLayoutDescriptor.from_wire(wire["layout"])
        shared = SharedRows(wire["rows"], wire["num_blocks"], layout.bytes_per_block)
        return cls(wire["first_block"], wire["num_blocks"], layout, shared=shared)
