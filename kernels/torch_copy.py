"""Block gather/scatter with plain torch indexing: the CPU implementation, and the reference the
Triton kernel is measured against on a GPU.

One `index_select` / `index_copy_` per layer over a `[num_blocks, num_segments, segment_words]`
view of the layer's memory (or, for a gather of large pages, one copy per block straight into the staging
rows), so any dtype and any layout `KVLayout` can describe is copied byte-exact.
"""

from __future__ import annotations

import torch

from .layout import KVCacheLayers, word_dtype


# From this size of one block in one layer on, a gather copies block by block straight into the staging
# rows: `index_select` would first copy into a temporary (two copies; ~15% slower for 64 KiB pages here),
# and the per-block call overhead (a few microseconds) is small next to the bytes.
DIRECT_GATHER_PAGE_BYTES = 16 << 10


def copy_blocks(cache: KVCacheLayers, staging: torch.Tensor, block_ids: torch.Tensor, gather: bool, alignment: int) -> None:
    """Gather (`gather=True`: cache -> staging) or scatter (staging -> cache) the rows of `staging`,
    a `[len(block_ids), block_bytes]` uint8 tensor, from or to `block_ids` of every layer."""
    word = word_dtype(alignment)
    layout = cache.layout
    rows = staging.view(word).view(len(block_ids), layout.num_layers, layout.num_segments, -1)
    direct = gather and cache.device.type == "cpu" and layout.page_bytes >= DIRECT_GATHER_PAGE_BYTES
    ids = block_ids.tolist() if direct else None
    for layer, view in enumerate(cache.byte_views(word)):
        if direct:
            for row, block in enumerate(ids):
                rows[row, layer].copy_(view[block])
        elif gather:
            rows[:, layer] = view.index_select(0, block_ids)
        else:
            view.index_copy_(0, block_ids, rows[:, layer])
