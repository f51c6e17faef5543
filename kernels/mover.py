"""Asynchronous block transfers between a paged KV cache and host memory, beside decode.

On a GPU, transfers run on the mover's own streams and are ordered after the work already queued on
the caller's stream, which is never blocked. Two ways to move a block, chosen per cache:

- **DMA** (when `KVCacheLayers.run_pitch` is set, i.e. a block's runs are equally spaced: vLLM's
  LBHNC, LBNHC, LHBNC and block-outer layouts): one `cudaMemcpy2DAsync` per block between the KV
  cache and pinned host memory. No SM is used and HBM is touched once per byte; on an H100 a save
  beside a bandwidth-bound decode slowed it by 1.8%, the staged path by 12% (docs/kernels.md).
- **Staged** (any layout): the Triton kernel gathers blocks into a fixed two-slot device staging ring
  and the copy engine drains each slot to pinned host memory, chunk k+1 being gathered while chunk k
  crosses PCIe (loads run the same pipeline backwards: host -> slot -> scatter). The kernel runs on a
  capped grid: it only has to outpace PCIe.

On a CPU the same calls run the torch fallback synchronously and return completed transfers.
"""

from __future__ import annotations

from collections import deque

import torch

from . import dma
from .block_copy import BlockIds, block_ids_on_device, checked_block_ids, gather_blocks, scatter_blocks
from .layout import KVCacheLayers

# Device staging for the two ring slots together; 64 MiB is 32 blocks of the 7B layout
# (2 MiB per block), enough per chunk to hide the gather behind the copy engine.
STAGING_BYTES = 64 * 1024 * 1024
# Grid cap for the staged path's gather/scatter kernel: 16 programs still gather ~700 GB/s on an
# H100, over ten times what PCIe drains, and leave the other SMs to decode (docs/kernels.md).
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

    Transfers run in the order they are issued. `use_dma` picks the path (None: DMA where the layout
    allows it); `staging_bytes` sizes the staged path's device ring and `max_programs` caps its
    kernel's grid (None: one program per unit of work).
    """

    def __init__(
        self,
        cache: KVCacheLayers,
        use_dma: bool | None = None,
        staging_bytes: int = STAGING_BYTES,
        max_programs: int | None = TRANSFER_PROGRAMS,
    ) -> None:
        self.cache = cache
        self.use_dma = cache.device.type == "cuda" and (cache.run_pitch is not None if use_dma is None else use_dma)
        if self.use_dma and cache.run_pitch is None:
            raise ValueError("this cache's layout has no single pitch between a block's runs: DMA cannot move its blocks")
        self.max_programs = max_programs
        # Host buffers of transfers in flight: raw 2D copies are invisible to torch's pinned-memory
        # allocator, so the mover keeps the buffers alive until their transfers are done.
        self._in_flight: deque[Transfer] = deque()
        if cache.device.type != "cuda":
            return
        self._copy_stream = torch.cuda.Stream(cache.device)
        self._kernel_stream = torch.cuda.Stream(cache.device)
        self._rows_per_slot = max(1, staging_bytes // 2 // cache.layout.block_bytes)
        self._slots: list[torch.Tensor] = []
        self._slot_released: list[torch.cuda.Event | None] = [None, None]
        self._next_slot = 0

    def host_buffer(self, num_blocks: int) -> torch.Tensor:
        """Staging rows in host memory for `num_blocks` blocks, pinned when the cache is on a GPU."""
        return torch.empty(
            (num_blocks, self.cache.layout.block_bytes), dtype=torch.uint8, pin_memory=self.cache.device.type == "cuda"
        )

    def save(self, block_ids: BlockIds, host: torch.Tensor | None = None) -> Transfer:
        """Copy blocks `block_ids` of every layer into `host` (or a new host buffer), row i = block i.

        On the DMA path, ids given as a GPU tensor are first read back (a synchronization), and each
        block is one queued copy: the driver's queue is finite, so a very large save (or many queued
        at once) can block the caller until the copy engine catches up; issue those from a
        background thread or in pieces."""
        ids = checked_block_ids(self.cache, block_ids)
        return self._transfer(ids, self.host_buffer(len(ids)) if host is None else host, save=True)

    def load(self, host: torch.Tensor, block_ids: BlockIds) -> Transfer:
        """Copy row i of `host` (pinned on a GPU) into block `block_ids[i]` of every layer; ids distinct."""
        return self._transfer(checked_block_ids(self.cache, block_ids), host, save=False)

    def _transfer(self, ids: torch.Tensor, host: torch.Tensor, save: bool) -> Transfer:
        if self.cache.device.type != "cuda":
            if save:
                gather_blocks(self.cache, ids, out=host)
            else:
                scatter_blocks(self.cache, host, ids)
            return Transfer(host, None)
        expected = (len(ids), self.cache.layout.block_bytes)
        if host.dtype != torch.uint8 or tuple(host.shape) != expected or not host.is_contiguous() or not host.is_pinned():
            raise ValueError(f"host rows must be pinned contiguous uint8 of shape {expected}, got {host.dtype} {tuple(host.shape)}")
        while self._in_flight and self._in_flight[0].done():
            self._in_flight.popleft()
        queued = torch.cuda.current_stream(self.cache.device).record_event()
        move = self._dma if self.use_dma else self._staged
        transfer = Transfer(host, move(ids, host, save, queued))
        self._in_flight.append(transfer)
        return transfer

    def _dma(self, ids: torch.Tensor, host: torch.Tensor, save: bool, queued: torch.cuda.Event) -> torch.cuda.Event:
        """One 2D copy per block: its runs, `run_pitch` apart in the cache, are back to back in a row."""
        layout, pitch, stream = self.cache.layout, self.cache.run_pitch, self._copy_stream
        height = layout.num_layers * layout.num_segments
        stream.wait_event(queued)
        for row, block in enumerate(ids.tolist()):
            device = self.cache.layer_addresses[0] + block * layout.block_stride
            staged = host.data_ptr() + row * layout.block_bytes
            if save:
                dma.copy_2d(staged, layout.segment_bytes, device, pitch, layout.segment_bytes, height, stream)
            else:
                dma.copy_2d(device, pitch, staged, layout.segment_bytes, layout.segment_bytes, height, stream)
        return stream.record_event()

    def _staged(self, ids: torch.Tensor, host: torch.Tensor, save: bool, queued: torch.cuda.Event) -> torch.cuda.Event:
        """Saves fill a ring slot with the kernel and drain it with the copy engine; loads the reverse."""
        self._kernel_stream.wait_event(queued)
        with torch.cuda.stream(self._kernel_stream):
            ids = block_ids_on_device(self.cache, ids)
        self._copy_stream.wait_event(queued)
        fill, drain = (self._kernel_stream, self._copy_stream) if save else (self._copy_stream, self._kernel_stream)
        finished = queued
        for start in range(0, len(ids), self._rows_per_slot):
            stop = min(start + self._rows_per_slot, len(ids))
            slot = self._next_slot
            self._next_slot ^= 1
            staging, rows, chunk_ids = self._slot(slot)[: stop - start], host[start:stop], ids[start:stop]
            if (released := self._slot_released[slot]) is not None:
                fill.wait_event(released)
            with torch.cuda.stream(fill):
                if save:
                    self._copy_blocks(staging, chunk_ids, gather=True)
                else:
                    staging.copy_(rows, non_blocking=True)
            drain.wait_event(fill.record_event())
            with torch.cuda.stream(drain):
                if save:
                    rows.copy_(staging, non_blocking=True)
                else:
                    self._copy_blocks(staging, chunk_ids, gather=False)
            finished = self._slot_released[slot] = drain.record_event()
        return finished

    def _slot(self, index: int) -> torch.Tensor:
        """Ring slot `index`, allocated on first use so that DMA-only movers hold no device staging."""
        if not self._slots:
            shape = (self._rows_per_slot, self.cache.layout.block_bytes)
            self._slots = [torch.empty(shape, dtype=torch.uint8, device=self.cache.device) for _ in range(2)]
            for slot in self._slots:
                # Used on both streams: should the mover be dropped mid-transfer, the allocator waits for them.
                slot.record_stream(self._kernel_stream)
                slot.record_stream(self._copy_stream)
        return self._slots[index]

    def _copy_blocks(self, staging: torch.Tensor, ids: torch.Tensor, gather: bool) -> None:
        from . import triton_copy

        # Slots are allocator-aligned and hold whole blocks, so the cache's alignment holds for them.
        triton_copy.copy_blocks(
            self.cache, staging, ids, gather=gather, alignment=self.cache.alignment, max_programs=self.max_programs
        )
