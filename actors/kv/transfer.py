"""KV in flight between engines: the layout both ends must share, and chunks of whole blocks.

A chunk's rows are staging rows in the kernels' format (`rayfleet.kernels`: one row per block, all layers),
held in one of three places:
- host-staged: a shared-memory file on the node (`SharedRows`); only its name travels, the source's gather
  writes the rows and the destination's scatter reads them (two copies in all);
- on a GPU: a device buffer of the source engine's worker (`DeviceRows`), opened by CUDA IPC by a destination
  that sees that GPU; scattered device to device;
- by value (`KVChunk.inline`), to another node, through Ray's object store; the receiving side writes the
  rows into a file of its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from rayfleet.kernels import DeviceRows, KVCacheLayers, SharedRows


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
    ``shared`` (a file on the node that wrote them), ``device`` (a GPU buffer of the exporting worker) or,
    after ``inline()``, ``data`` (a ``[num_blocks, bytes_per_block]`` uint8 array carried by value).
    """

    first_block: int
    num_blocks: int
    layout: KVLayoutDescriptor
    shared: SharedRows | None = None
    data: np.ndarray | None = None
    device: DeviceRows | None = None

    @property
    def end_block(self) -> int:
        """First block a following export should start at."""
        return self.first_block + self.num_blocks

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.layout.bytes_per_block

    def rows(self, locked: bool = False) -> torch.Tensor:
        """The rows as a ``[num_blocks, bytes_per_block]`` uint8 tensor, without a copy (`locked`: for a reader
        on a GPU, page-locked where the writer allows it, `SharedRows.map`)."""
        if self.data is not None:
            return torch.from_numpy(self.data)
        if self.device is not None:
            return self.device.open()
        return self.shared.map(locked=locked)

    def inline(self) -> KVChunk:
        """This chunk carrying its rows by value, for a process on another node (Ray ships the array)."""
        if self.data is not None:
            return self
        if self.device is not None:
            raise ValueError("device rows do not leave their node; export host-staged rows for another node")
        return replace(self, shared=None, data=self.shared.map().numpy())

    def release(self) -> None:
        """Unlink the chunk's shared rows (its owner, once every stage that maps them has returned). Device
        rows are released by their exporting engine (`EngineKVMigrator.release`)."""
        if self.shared is not None:
            self.shared.unlink()

    def recycle(self) -> None:
        """`release`, once no engine will read the rows again (the destination has scattered them): the
        file's warm pages go to the writer's next gather (`SharedRows.recycle`)."""
        if self.shared is not None:
            self.shared.recycle()

    @property
    def rows_name(self) -> str:
        return self.device.name if self.device is not None else self.shared.name

    def to_wire(self) -> dict[str, Any]:
        """What crosses vLLM's RPCs (msgpack and pickle): the name or IPC handle of the rows, never their bytes."""
        if self.data is not None:
            raise ValueError("chunks carried by value do not cross the engine's RPCs; stage them into shared rows")
        wire = {"first_block": self.first_block, "num_blocks": self.num_blocks, "rows": self.rows_name,
                "layout": self.layout.to_wire()}
        if self.device is not None:
            wire["device"] = self.device.to_wire()
        return wire

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> KVChunk:
        layout = KVLayoutDescriptor.from_wire(wire["layout"])
        first, num, name = wire["first_block"], wire["num_blocks"], wire["rows"]
        if "device" in wire:
            return cls(first, num, layout, device=DeviceRows.from_wire(name, num, layout.bytes_per_block,
                                                                       wire["device"]))
        return cls(first, num, layout, shared=SharedRows(name, num, layout.bytes_per_block))
