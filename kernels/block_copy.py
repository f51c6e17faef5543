"""Gather KV blocks into one staging tensor and scatter them back: the API, one for every device.

A cache on a CUDA device is copied by the fused Triton kernel (all blocks of all layers in one
launch, on the current stream, asynchronously); any other cache by the torch fallback
(per-layer index_select / index_copy_, synchronously). The staging format is described by
`KVLayout`: `[len(block_ids), block_bytes]` uint8, each row one block, ordered
`[layer][segment][segment bytes]` inside the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch

from . import torch_copy
from .layout import KVCacheLayers, alignment_of

BlockIds = Sequence[int] | torch.Tensor


def _implementation(cache: KVCacheLayers) -> ModuleType:
    if cache.device.type == "cuda":
        # Imported here so that hosts without a GPU (CI) never need Triton.
        from . import triton_copy

        return triton_copy
    return torch_copy


def checked_block_ids(cache: KVCacheLayers, block_ids: BlockIds) -> torch.Tensor:
    """`block_ids` as a one-dimensional int64 tensor, range-checked unless it lives on a GPU.

    Checking ids that live on a GPU would synchronize with it, so those are trusted: an id out of
    range there is an out-of-bounds access, not an exception.
    """
    ids = torch.as_tensor(block_ids, dtype=torch.int64)
    if ids.dim() != 1:
        raise ValueError(f"block_ids must be one-dimensional, got shape {tuple(ids.shape)}")
    if ids.device.type == "cpu" and len(ids) and not (0 <= int(ids.min()) and int(ids.max()) < cache.layout.num_blocks):
        raise IndexError(f"block ids must lie in [0, {cache.layout.num_blocks}), got {ids.tolist()}")
    return ids


def block_ids_on_device(cache: KVCacheLayers, block_ids: BlockIds) -> torch.Tensor:
    """`checked_block_ids` on the cache's device, copied on the current stream without blocking the
    host (through pinned memory), so that issuing a copy never waits for the GPU."""
    ids = checked_block_ids(cache, block_ids)
    if ids.device == cache.device:
        return ids
    if cache.device.type == "cuda":
        ids = ids.pin_memory()
    return ids.to(cache.device, non_blocking=True)


def _staging_alignment(cache: KVCacheLayers, staging: torch.Tensor, num_rows: int) -> int:
    """Check `staging` against the cache and return the alignment both sides share."""
    expected = (num_rows, cache.layout.block_bytes)
    if staging.dtype != torch.uint8 or tuple(staging.shape) != expected or not staging.is_contiguous():
        raise ValueError(
            f"staging must be a contiguous uint8 tensor of shape {expected}, "
            f"got {staging.dtype} {tuple(staging.shape)}"
        )
    on_host = staging.device.type == "cpu" and cache.device.type == "cuda"
    if staging.device != cache.device and not (on_host and staging.is_pinned()):
        raise ValueError(f"staging on {staging.device} cannot be reached from a cache on {cache.device}")
    return alignment_of(cache.alignment, staging.data_ptr())


def gather_blocks(cache: KVCacheLayers, block_ids: BlockIds, out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy blocks `block_ids` of every layer into row i = block i of a staging tensor and return it.

    `out` (optional) is the staging tensor to fill; for a CUDA cache it may be pinned host memory,
    which the kernel then writes through PCIe. On a CUDA cache the copy is queued on the current
    stream and this returns at once.
    """
    ids = block_ids_on_device(cache, block_ids)
    staging = out if out is not None else torch.empty(
        (len(ids), cache.layout.block_bytes), dtype=torch.uint8, device=cache.device
    )
    if len(ids):  # an empty stage (no new complete block) is legal: its rows are empty
        alignment = _staging_alignment(cache, staging, len(ids))
        _implementation(cache).copy_blocks(cache, staging, ids, gather=True, alignment=alignment)
    return staging


def scatter_blocks(cache: KVCacheLayers, staging: torch.Tensor, block_ids: BlockIds) -> None:
    """Copy row i of `staging` into block `block_ids[i]` of every layer.

    Ids must be distinct (two rows written to one block race). On a CUDA cache the copy is queued on
    the current stream; `staging` may be pinned host memory.
    """
    ids = block_ids_on_device(cache, block_ids)
    if len(ids):
        alignment = _staging_alignment(cache, staging, len(ids))
        _implementation(cache).copy_blocks(cache, staging, ids, gather=False, alignment=alignment)


def gather_to_host(cache: KVCacheLayers, block_ids: BlockIds) -> torch.Tensor:
    """`gather_blocks` into host memory (pinned when the cache is on a GPU, which the kernel writes directly):
    the rows a process hands to another one, e.g. through Ray's object store."""
    ids = checked_block_ids(cache, block_ids)
    if cache.device.type == "cpu":
        return gather_blocks(cache, ids)
    out = torch.empty((len(ids), cache.layout.block_bytes), dtype=torch.uint8, pin_memory=True)
    gather_blocks(cache, ids, out=out)
    torch.cuda.current_stream(cache.device).synchronize()
    return out


def stack_rows(rows: Sequence[object], pinned: bool = False) -> torch.Tensor:
    """Per-block rows (anything with the buffer protocol: numpy arrays, bytes; e.g. a KV store's values) as
    one contiguous `[len(rows), row_bytes]` uint8 host tensor: the staging `scatter_blocks` takes.

    `pinned` (for a scatter into a GPU cache): the rows land in page-locked memory from PyTorch's caching host
    allocator, which the scatter kernel reads directly; stacked into pageable memory, the scatter would lock it
    for the copy and unlock it after, which costs more than the copy."""
    arrays = [np.frombuffer(row, dtype=np.uint8) for row in rows]
    if not pinned:
        return torch.from_numpy(np.stack(arrays))
    out = torch.empty((len(arrays), arrays[0].size if arrays else 0), dtype=torch.uint8, pin_memory=True)
    np.stack(arrays, out=out.numpy())
    return out
