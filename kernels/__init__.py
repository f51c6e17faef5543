"""Data movers for vLLM's paged KV cache: gather scattered blocks of every layer into one staging
buffer, scatter them back, and stream staging rows to and from host memory beside decode.

    cache = KVCacheLayers(list(kv_caches.values()))        # once, in register_kv_caches
    rows = gather_blocks(cache, block_ids)                  # [len(block_ids), cache.layout.block_bytes] uint8
    scatter_blocks(other_cache, rows, other_block_ids)
    mover = BlockMover(cache)
    transfer = mover.save(block_ids)                        # async on a GPU; poll done() or wait()
    mover.load(transfer.host, other_block_ids).wait_stream()

See docs/kernels.md for the staging format, the layouts covered and measured bandwidth.
"""

from .block_copy import BlockIds, gather_blocks, scatter_blocks
from .layout import KVCacheLayers, KVLayout, KVLayoutError
from .mover import BlockMover, Transfer

__all__ = [
    "BlockIds",
    "BlockMover",
    "KVCacheLayers",
    "KVLayout",
    "KVLayoutError",
    "Transfer",
    "gather_blocks",
    "scatter_blocks",
]
