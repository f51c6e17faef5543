"""Staging rows in GPU memory, shared with another process through a CUDA IPC handle.

The GPU counterpart of `shared_rows`: a source engine's worker gathers a migration's blocks into a device
buffer and hands out an IPC handle (torch's `_share_cuda_`, what `torch.multiprocessing` and vLLM's IPC weight
transfer use); the destination's worker opens it (no copy) and scatters from it, device to device. The handle
is plain ints and bytes, so it crosses vLLM's msgpack RPCs. The exporter keeps the buffer alive until its owner
releases the rows; torch's IPC reference counting keeps the memory valid while a receiver still maps it.

The receiver must see the GPU that holds the rows (same physical device, or a peer it can reach: on one host
with the GPUs visible to both processes). The handle names that GPU by UUID; `open` refuses a GPU it cannot see,
and callers then use host-staged rows (`shared_rows`) instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .block_copy import BlockIds, gather_blocks
from .layout import KVCacheLayers


@dataclass(frozen=True)
class DeviceRows:
    """`num_rows` rows of `row_bytes` on the GPU `gpu_uuid`, reachable through `ipc` (ints and bytes)."""

    name: str
    num_rows: int
    row_bytes: int
    gpu_uuid: str
    ipc: tuple[Any, ...]  # UntypedStorage._share_cuda_(), minus its device index

    @classmethod
    def share(cls, name: str, rows: torch.Tensor) -> DeviceRows:
        """IPC handle of `rows` (a contiguous `[n, row_bytes]` uint8 CUDA tensor the caller keeps alive)."""
        if rows.storage_offset() or not rows.is_contiguous():
            raise ValueError("shared device rows must be a whole contiguous tensor")
        _, *ipc = rows.untyped_storage()._share_cuda_()
        return cls(name, rows.shape[0], rows.shape[1], gpu_uuid(rows.device), tuple(ipc))

    def open(self) -> torch.Tensor:
        """The rows, mapped into this process on the GPU that holds them (no copy)."""
        device = device_of_uuid(self.gpu_uuid)
        if device is None:
            raise RuntimeError(f"KV rows {self.name} live on GPU {self.gpu_uuid}, which this process cannot see")
        torch.cuda._lazy_init()
        storage = torch.UntypedStorage._new_shared_cuda(device.index, *self.ipc)
        rows = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
        return rows.view(self.num_rows, self.row_bytes)

    def to_wire(self) -> dict[str, Any]:
        return {"gpu_uuid": self.gpu_uuid, "ipc": list(self.ipc)}

    @classmethod
    def from_wire(cls, name: str, num_rows: int, row_bytes: int, wire: dict[str, Any]) -> DeviceRows:
        return cls(name, num_rows, row_bytes, wire["gpu_uuid"], tuple(wire["ipc"]))


def gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def visible_gpu_uuids(own: torch.device) -> list[str]:
    """UUIDs of the GPUs this process sees, `own` first (empty on a CPU): what a peer's rows may live on."""
    if own.type != "cuda":
        return []
    others = [torch.device("cuda", i) for i in range(torch.cuda.device_count()) if i != own.index]
    return [gpu_uuid(device) for device in (own, *others)]


def device_of_uuid(uuid: str) -> torch.device | None:
    for index in range(torch.cuda.device_count()):
        if gpu_uuid(torch.device("cuda", index)) == uuid:
            return torch.device("cuda", index)
    return None


def gather_to_device(cache: KVCacheLayers, block_ids: BlockIds) -> torch.Tensor:
    """Gather blocks into a fresh device buffer and wait for the kernel: once this returns, another process
    may read the rows through their IPC handle."""
    rows = gather_blocks(cache, block_ids)
    torch.cuda.current_stream(cache.device).synchronize()
    return rows
