"""Data movers for vLLM's paged KV cache: gather scattered blocks of every layer into one staging
buffer, scatter them back, and stream staging rows to and from host memory beside decode.

    cache = KVCacheLayers(list(kv_caches.values()))        # once, in register_kv_caches
    rows = gather_blocks(cache, block_ids)                  # [len(block_ids), cache.layout.block_bytes] uint8
    scatter_blocks(other_cache, rows, other_block_ids)
    mover = BlockMover(cache)
    transfer = mover.save(block_ids)                        # async on a GPU; poll done() or wait()
    mover.load(transfer.host, other_block_ids).wait_stream()
    shared = gather_to_shared(cache, block_ids)             # rows in /dev/shm: another process maps them
    scatter_rows(other_cache, shared.map(), other_block_ids)
    rows = gather_to_device(cache, block_ids)               # GPU: rows another process opens by CUDA IPC
    scatter_rows(other_cache, DeviceRows.share("r", rows).open(), other_block_ids)   # (in that process)

See docs/kernels.md for the staging format, the layouts covered and measured bandwidth.
"""

from .block_copy import BlockIds, gather_blocks, gather_to_host, scatter_blocks, stack_rows
from .device_rows import DeviceRows, gather_to_device, visible_gpu_uuids
from .layout import KVCacheLayers, KVLayout, KVLayoutError
from .mover import BlockMover, Transfer
from .shared_rows import (
    SharedRows,
    gather_to_shared,
    live_files,
    scatter_rows,
    share_rows,
    sweep_orphans,
)

__all__ = [
    "BlockIds",
    "BlockMover",
    "DeviceRows",
    "KVCacheLayers",
    "KVLayout",
    "KVLayoutError",
    "SharedRows",
    "Transfer",
    "gather_blocks",
    "gather_to_device",
    "gather_to_host",
    "gather_to_shared",
    "live_files",
    "scatter_blocks",
    "scatter_rows",
    "share_rows",
    "stack_rows",
    "sweep_orphans",
    "visible_gpu_uuids",
]
