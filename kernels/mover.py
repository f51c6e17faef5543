"""Asynchronous block transfers between a paged KV cache and host memory, beside decode.

On a GPU a save gathers blocks into a small device staging ring with the Triton kernel and copies
each filled slot to pinned host memory with the copy engine; a load runs the same pipeline the other
way (host -> slot -> scatter). Kernels and copies run on two dedicated streams, so chunk k+1 is
gathered while chunk k crosses PCIe, the device staging stays a fixed size however many blocks move,
and the engine's own stream is never blocked. The gather/scatter kernel runs on a capped grid: it only
has to outpace PCIe (~50 GB/s against ~3 TB/s of HBM), and a small grid leaves the SMs to decode.

On a CPU the same calls run the torch fallback synchronously and return completed transfers.
"""

from __future__ import annotations

import torch

from .block_copy import BlockIds, block_ids_on_device, gather_blocks, scatter_blocks
from .layout import KVCacheLayers

# Device staging for the two ring slots together; 64 MiB is 32 blocks of the 7B layout
# (2 MiB per block), enough chunks in flight to hide the gather behind the copy engine.
STAGING_BYTES = 64 * 1024 * 1024
# Grid cap for the gather/scatter kernel of a transfer (docs/kernels.md measures the trade-off).
TRANSFER_PROGRAMS = 16


class Transfer:
    """A save or load in flight; `host` holds the staging rows (`[num_blocks, block_bytes]` uint8).

    For a save, `host` is valid once `done()`; for a load, the cache blocks are written once
    `done()`, and a GPU stream that reads them must first `wait_stream` (or the host `wait`).
    """

    def __init__(self, host: torch.Tensor, finished: torch.cuda.Event | None) -> None:
        self.host = host
        self._finished = finished

    def done(self) -> bool:
        """Whether the transfer has completed; never blocks."""
        return self._finished is None or self._finished.query()

    def wait(self) -> None:
        """Block the calling thread until the transfer has completed."""
        if self._finished is not None:
            self._finished.synchronize()

    def wait_stream(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make `stream` (default: the current one) wait for the transfer without blocking the host."""
        if self._finished is not None:
            (stream or torch.cuda.current_stream(self._finished.device)).wait_event(self._finished)


class BlockMover:
    """Saves blocks of one engine's KV cache to host memory and loads them back.

    Calls may be issued back to back; each transfer is ordered after the work already queued on the
    caller's current stream (so a save sees the KV written by the last forward) and transfers run in
    the order they were issued. `staging_bytes` is the device memory used for the staging ring;
    `max_programs` caps the kernel's grid during transfers (None: one program per unit of work).
    """

    def __init__(
        self, cache: KVCacheLayers, staging_bytes: int = STAGING_BYTES, max_programs: int | None = TRANSFER_PROGRAMS
    ) -> None:
        self.cache = cache
        self.max_programs = max_programs
        if cache.device.type != "cuda":
            return
        block_bytes = cache.layout.block_bytes
        self._rows_per_slot = max(1, staging_bytes // 2 // block_bytes)
        self._kernel_stream = torch.cuda.Stream(cache.device)
        self._copy_stream = torch.cuda.Stream(cache.device)
        self._slots = [
            torch.empty((self._rows_per_slot, block_bytes), dtype=torch.uint8, device=cache.device) for _ in range(2)
        ]
        for slot in self._slots:
            # Slots are used on both streams; tell the allocator, should the mover be dropped mid-transfer.
            slot.record_stream(self._kernel_stream)
            slot.record_stream(self._copy_stream)
        self._slot_released: list[torch.cuda.Event | None] = [None, None]
        self._next_slot = 0

    def host_buffer(self, num_blocks: int) -> torch.Tensor:
        """Staging rows in host memory for `num_blocks` blocks, pinned when the cache is on a GPU."""
        return torch.empty(
            (num_blocks, self.cache.layout.block_bytes), dtype=torch.uint8, pin_memory=self.cache.device.type == "cuda"
        )

    def save(self, block_ids: BlockIds, host: torch.Tensor | None = None) -> Transfer:
        """Copy blocks `block_ids` of every layer into `host` (or a new host buffer), row i = block i."""
        ids = block_ids_on_device(self.cache, block_ids)
        host = self.host_buffer(len(ids)) if host is None else host
        return self._transfer(ids, host, save=True)

    def load(self, host: torch.Tensor, block_ids: BlockIds) -> Transfer:
        """Copy row i of `host` into block `block_ids[i]` of every layer (ids distinct)."""
        return self._transfer(block_ids_on_device(self.cache, block_ids), host, save=False)

    def _transfer(self, ids: torch.Tensor, host: torch.Tensor, save: bool) -> Transfer:
        if self.cache.device.type != "cuda":
            gather_blocks(self.cache, ids, out=host) if save else scatter_blocks(self.cache, host, ids)
            return Transfer(host, None)
        expected = (len(ids), self.cache.layout.block_bytes)
        if host.dtype != torch.uint8 or tuple(host.shape) != expected or not host.is_contiguous() or not host.is_pinned():
            raise ValueError(f"host rows must be pinned contiguous uint8 of shape {expected}, got {host.dtype} {tuple(host.shape)}")
        queued = torch.cuda.current_stream(self.cache.device).record_event()
        self._kernel_stream.wait_event(queued)
        self._copy_stream.wait_event(queued)
        ids.record_stream(self._kernel_stream)
        # Saves fill a slot with the kernel and drain it with the copy engine; loads the reverse.
        fill, drain = (self._kernel_stream, self._copy_stream) if save else (self._copy_stream, self._kernel_stream)
        finished = queued
        for start in range(0, len(ids), self._rows_per_slot):
            stop = min(start + self._rows_per_slot, len(ids))
            slot = self._next_slot
            self._next_slot ^= 1
            staging, rows = self._slots[slot][: stop - start], host[start:stop]
            if (released := self._slot_released[slot]) is not None:
                fill.wait_event(released)
            with torch.cuda.stream(fill):
                self._copy_blocks(staging, ids[start:stop], True) if save else staging.copy_(rows, non_blocking=True)
            drain.wait_event(fill.record_event())
            with torch.cuda.stream(drain):
                rows.copy_(staging, non_blocking=True) if save else self._copy_blocks(staging, ids[start:stop], False)
            finished = self._slot_released[slot] = drain.record_event()
        return Transfer(host, finished)

    def _copy_blocks(self, staging: torch.Tensor, ids: torch.Tensor, gather: bool) -> None:
        from . import triton_copy

        # Slots are allocator-aligned and hold whole blocks, so the cache's alignment holds for them.
        triton_copy.copy_blocks(
            self.cache, staging, ids, gather=gather, alignment=self.cache.alignment, max_programs=self.max_programs
        )
