"""Block gather/scatter on a GPU: one Triton launch for all blocks of all layers.

Work is cut into units of `BLOCK` words: (staging row, layer, segment, chunk of the segment). A
program copies one unit per loop trip and strides over units by the grid size, so the same kernel
runs with one program per unit (full speed, for `gather_blocks`/`scatter_blocks`) or with a few
programs that leave the rest of the GPU to decode (the staged host transfers, which only have to
stay ahead of PCIe). Layers are reached through a table of int64 addresses, so they may be views of
one buffer or separate allocations alike; the table costs one scalar load per unit of 16 KiB.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import KVCacheLayers, word_dtype

# On an H100 80GB HBM3 every unit from 8 to 128 KiB with 4 to 16 warps ran at 97-98% of the copy
# ceiling (docs/kernels.md); 16 KiB and 8 warps (eight 16-byte loads in flight per thread) is kept.
UNIT_BYTES = 16 * 1024
NUM_WARPS = 8


@triton.jit
def _copy_blocks_kernel(
    layer_addresses,  # int64[num_layers]: byte address of block 0, run 0 of each layer
    block_ids,  # int64[num_rows]
    staging,  # word[num_rows * num_layers * num_segments * segment_words]
    num_units,
    num_layers,
    num_segments,
    chunks_per_segment,
    block_stride,  # in words, like every size below
    segment_stride,
    segment_words,
    ALIGNMENT: tl.constexpr,  # power of two (<= 16) dividing every run address: the vector-width hint
    WORD_BYTES: tl.constexpr,
    BLOCK: tl.constexpr,
    GATHER: tl.constexpr,
):
    offsets = tl.arange(0, BLOCK)
    for unit in range(tl.program_id(0), num_units, tl.num_programs(0)):
        chunk = unit % chunks_per_segment
        row_layer_segment = unit // chunks_per_segment  # = (row * num_layers + layer) * num_segments + segment
        segment = row_layer_segment % num_segments
        row_layer = row_layer_segment // num_segments
        layer = row_layer % num_layers
        row = row_layer // num_layers
        block_id = tl.load(block_ids + row)
        run = tl.load(layer_addresses + layer) + (block_id * block_stride + segment.to(tl.int64) * segment_stride) * WORD_BYTES
        in_segment = chunk * BLOCK + offsets
        mask = in_segment < segment_words
        cache_words = tl.multiple_of(run.to(staging.dtype), ALIGNMENT) + in_segment
        staging_words = staging + row_layer_segment.to(tl.int64) * segment_words + in_segment
        if GATHER:
            tl.store(staging_words, tl.load(cache_words, mask=mask), mask=mask)
        else:
            tl.store(cache_words, tl.load(staging_words, mask=mask), mask=mask)


def copy_blocks(
    cache: KVCacheLayers,
    staging: torch.Tensor,
    block_ids: torch.Tensor,
    gather: bool,
    alignment: int,
    max_programs: int | None = None,
    unit_bytes: int = UNIT_BYTES,
    num_warps: int = NUM_WARPS,
) -> None:
    """Gather (`gather=True`: cache -> staging) or scatter (staging -> cache) on the current stream.

    `staging` is `[len(block_ids), block_bytes]` uint8 in device memory or pinned host memory (then
    the kernel reads or writes the host through PCIe itself). `alignment` divides the addresses and
    strides of both sides. `max_programs` caps the grid; `unit_bytes` and `num_warps` are tuning knobs.
    """
    layout = cache.layout
    if len(block_ids) == 0:
        return
    word = word_dtype(alignment)
    word_bytes = word.itemsize
    segment_words = layout.segment_bytes // word_bytes
    block = min(triton.next_power_of_2(segment_words), max(unit_bytes // word_bytes, 1))
    chunks_per_segment = triton.cdiv(segment_words, block)
    num_units = len(block_ids) * layout.num_layers * layout.num_segments * chunks_per_segment
    grid = (min(num_units, max_programs or num_units),)
    _copy_blocks_kernel[grid](
        cache.address_table,
        block_ids,
        staging.view(word),
        num_units,
        layout.num_layers,
        layout.num_segments,
        chunks_per_segment,
        layout.block_stride // word_bytes,
        layout.segment_stride // word_bytes,
        segment_words,
        ALIGNMENT=alignment,
        WORD_BYTES=word_bytes,
        BLOCK=block,
        GATHER=gather,
        num_warps=num_warps,
    )
