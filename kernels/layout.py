"""Where a KV block's bytes live in an engine's paged KV cache.

vLLM hands a KV connector one tensor per attention layer (`register_kv_caches`). In vLLM 0.32 every
such tensor is an `as_strided` view of one shared int8 buffer, logically `[num_blocks, num_kv_heads,
block_size, 2 * head_size]` with K and V side by side in the last dimension, and the resolved
`KVCacheLayout` (LBHNC on the CPU backend, LBNHC for FlashAttention, BL*/LH* variants on request)
only permutes the strides. Older FlashAttention caches are `[2, num_blocks, block_size, num_kv_heads,
head_size]`, with K and V of one block far apart.

All of these share one shape that the movers rely on: inside one layer, block `b` is `num_segments`
runs of `segment_bytes` contiguous bytes, run `s` starting at
`layer_address + b * block_stride + s * segment_stride`. Block-compact layouts have one run; the
`[2, num_blocks, ...]` form has two (K, V); head-outer layouts (LHBNC) have one per KV head. This
module derives that description from the tensors themselves, so no backend name is needed and any
layout vLLM can produce is covered, and rejects tensors it cannot describe that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

# The widest access the GPU kernel issues is 16 bytes (one 128-bit load per thread and step).
MAX_ALIGNMENT = 16


class KVLayoutError(ValueError):
    """The per-layer tensors do not form a paged KV cache that the movers can address."""


@dataclass(frozen=True)
class KVLayout:
    """Geometry of one engine's KV cache, in bytes, independent of dtype and attention backend.

    Staging buffers hold `block_bytes` per block, ordered `[block][layer][segment][segment bytes]`:
    the rows of a transfer are whole blocks, so a transfer can be split, stored or shipped per block
    (a KV store keyed by block hash keeps one row per block). Two caches can exchange staging rows when
    `num_layers`, `num_segments` and `segment_bytes` agree (same backend layout, dtype, block size,
    KV heads and tensor-parallel shard); their block strides and capacities may differ.
    """

    num_layers: int
    num_blocks: int  # valid block ids are 0 .. num_blocks - 1
    block_stride: int  # bytes from block b to block b + 1 inside one layer
    num_segments: int  # contiguous runs one block occupies inside one layer
    segment_stride: int  # bytes from one run of a block to the next
    segment_bytes: int

    @property
    def page_bytes(self) -> int:
        """Bytes one block occupies in one layer."""
        return self.num_segments * self.segment_bytes

    @property
    def block_bytes(self) -> int:
        """Bytes one block occupies across all layers: one staging row."""
        return self.num_layers * self.page_bytes


@dataclass(frozen=True)
class _LayerGeometry:
    num_blocks: int
    block_stride: int
    num_segments: int
    segment_stride: int
    segment_bytes: int


def _layer_geometry(layer: torch.Tensor, block_dim: int) -> _LayerGeometry:
    """Describe one layer's block as equal contiguous runs at a constant stride, or raise."""
    itemsize = layer.element_size()
    # The dimensions inside a block, outermost first in memory; size-1 dims do not move in memory.
    inner = sorted(
        ((size, stride * itemsize) for dim, (size, stride) in enumerate(zip(layer.shape, layer.stride()))
         if dim != block_dim and size > 1),
        key=lambda size_stride: size_stride[1],
        reverse=True,
    )
    # Innermost dims whose stride equals the bytes below them form one contiguous run.
    segment_bytes = itemsize
    while inner and inner[-1][1] == segment_bytes:
        segment_bytes *= inner.pop()[0]
    # What is left must step over the runs as one arithmetic progression.
    num_segments, segment_stride = 1, segment_bytes
    if inner:
        num_segments, segment_stride = inner.pop()
        if segment_stride < segment_bytes:
            raise KVLayoutError(f"layer of shape {tuple(layer.shape)} and strides {layer.stride()} overlaps itself")
    while inner:
        size, stride = inner.pop()
        if stride != num_segments * segment_stride:
            raise KVLayoutError(
                f"a block of a layer with shape {tuple(layer.shape)} and strides {layer.stride()} "
                "is not a set of equal contiguous runs at one stride"
            )
        num_segments *= size
    return _LayerGeometry(
        num_blocks=layer.shape[block_dim],
        block_stride=layer.stride(block_dim) * itemsize,
        num_segments=num_segments,
        segment_stride=segment_stride,
        segment_bytes=segment_bytes,
    )


def word_dtype(alignment: int) -> torch.dtype:
    """The widest integer dtype (at most 8 bytes) whose size divides `alignment`: the unit of copies."""
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32}.get(alignment, torch.int64)


def alignment_of(*values: int) -> int:
    """Largest power of two up to MAX_ALIGNMENT dividing every value."""
    alignment = MAX_ALIGNMENT
    while any(value % alignment for value in values):
        alignment //= 2
    return alignment


def _run_pitch(layout: KVLayout, layer_addresses: Sequence[int]) -> int | None:
    """Bytes from one run of a block to the next in staging order ([layer][segment]), when that is
    one constant stride not shorter than a run: then one strided (2D) copy moves a whole block."""
    runs = [address + segment * layout.segment_stride for address in layer_addresses for segment in range(layout.num_segments)]
    pitch = runs[1] - runs[0] if len(runs) > 1 else layout.segment_bytes
    uniform = all(later - earlier == pitch for earlier, later in zip(runs, runs[1:]))
    return pitch if uniform and pitch >= layout.segment_bytes else None


class KVCacheLayers:
    """The per-layer KV tensors of one engine, with the geometry and addresses the movers need.

    Build it once per engine (e.g. in `register_kv_caches`) and reuse it for every transfer: the
    layout is derived once and, on a GPU, the table of layer addresses is uploaded once. Layers may be
    views of one buffer or separate allocations; they must share geometry and device.

    `alignment` is the largest power of two (up to 16) dividing every run address and stride;
    `run_pitch` the constant distance between a block's consecutive runs in staging order, or None.
    """

    def __init__(self, layers: Sequence[torch.Tensor], block_dim: int = 0) -> None:
        """`block_dim` is the dimension that indexes blocks: 0 for vLLM 0.32's per-layer views,
        1 for the legacy FlashAttention `[2, num_blocks, block_size, num_kv_heads, head_size]`."""
        if not layers:
            raise KVLayoutError("no KV layers given")
        self.layers: tuple[torch.Tensor, ...] = tuple(layers)
        self.device = self.layers[0].device
        geometries = {_layer_geometry(layer, block_dim) for layer in self.layers}
        if len(geometries) != 1:
            raise KVLayoutError(f"layers differ in block geometry: {sorted(map(str, geometries))}")
        if any(layer.device != self.device for layer in self.layers):
            raise KVLayoutError("layers are on different devices")
        geometry = geometries.pop()
        self.layout = KVLayout(num_layers=len(self.layers), **vars(geometry))
        # Address of block 0, run 0 of each layer: the element with all indices 0.
        self.layer_addresses: tuple[int, ...] = tuple(layer.data_ptr() for layer in self.layers)
        strides = (geometry.segment_stride,) if geometry.num_segments > 1 else ()
        self.alignment = alignment_of(geometry.segment_bytes, geometry.block_stride, *strides, *self.layer_addresses)
        self.run_pitch = _run_pitch(self.layout, self.layer_addresses)

    @cached_property
    def address_table(self) -> torch.Tensor:
        """int64 layer addresses on the cache's device, for kernels that index layers in one launch."""
        return torch.tensor(self.layer_addresses, dtype=torch.int64, device=self.device)

    def byte_views(self, word: torch.dtype) -> list[torch.Tensor]:
        """Per layer, a `[num_blocks, num_segments, segment_words]` view of the cache's memory in
        units of `word` (one of the integer dtypes dividing `alignment`)."""
        layout = self.layout
        views = []
        for layer in self.layers:
            storage = torch.empty(0, dtype=torch.uint8, device=self.device).set_(layer.untyped_storage())
            raw = storage.as_strided(
                (layout.num_blocks, layout.num_segments, layout.segment_bytes),
                (layout.block_stride, layout.segment_stride, 1),
                layer.storage_offset() * layer.element_size(),
            )
            views.append(raw.view(word))
        return views
