"""Shared-memory staging files a GPU writer keeps page-locked from one export to the next.

A GPU gathers KV into host rows fastest when they are page-locked: the gather kernel then writes them through
PCIe itself (50 GB/s on an H100 against a 55 GB/s pinned-copy ceiling). Locking them per export cost far more
than the copy: for 512 MiB, ~290 ms in a fresh file (its pages touched, zeroed and pinned) and 50-100 ms in a
warm one from the writer's pool (mapping it populated, `cudaHostRegister`, and undoing both afterwards),
against an 11 ms copy (`benchmarks/probe_gpu_host_staging.py`, `docs/benchmarks-gpu-migration.md`).

So a writer on a GPU keeps, per staging file it wrote, one mapping of the whole file, registered with CUDA
once. The pool hands the same files back (`shared_rows.SharedRows.recycle`), and their next export finds them
locked already. A reader on a GPU (the destination's worker) does the same for the files it loads from: the
writers' pools send the same few files round. Three rules keep that correct:
- **No resize.** Truncating a file whose pages are pinned would detach them from it (a writer would fill
  pages no reader sees, a reader would read pages no writer fills). A GPU writer's files ("slabs", `-slab-` in
  their names) are made in multiples of `SLAB_BYTES` and taken from its pool only when large enough; the rows
  occupy the file's first bytes. Only slabs are kept locked by readers: a CPU writer resizes its pool files.
- **Keyed by inode, dropped once unnamed.** A held mapping keeps its inode alive, so a key never names another
  file; an entry whose file no name reaches any more (unlinked instead of recycled, or swept) is unregistered
  and dropped at the next use of the set, unless an export is writing it.
- **Bounded.** Beyond `max_bytes` locked, the least recently used entries whose files wait in a pool are
  dropped; rows in flight (named with `in_flight_prefix`: exported, staged, not loaded yet) stay locked, since
  their transfer reads them next (dropping a 4 GiB stage at the next, small one made its load register it again
  inside the pause: 0.9 s). A reader's rows whose entry was dropped are still mapped, and
  `shared_rows.page_locked` registers them for their scatter as before.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

SLAB_BYTES = 64 << 20


def slab_size(nbytes: int) -> int:
    """The size of a staging file for `nbytes` of rows: whole slabs, so files are reused without a resize."""
    return -(-nbytes // SLAB_BYTES) * SLAB_BYTES


class LockedStaging:
    """This process's page-locked mappings of the staging files it writes or reads (one per file, by inode)."""

    def __init__(self, shm_dir: Path, prefix: str, in_flight_prefix: str, max_bytes: int) -> None:
        self._shm_dir = shm_dir
        self._prefix = prefix  # every staging file's name starts with it (rows and pool files)
        self._in_flight_prefix = in_flight_prefix  # rows of a transfer, not a pool's
        self._max_bytes = max_bytes
        self._mappings: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()  # least recently used first
        self._writing: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def writing(self, path: Path, nbytes: int) -> Iterator[torch.Tensor]:
        """The first `nbytes` of the file at `path`, page-locked, while the caller writes them."""
        with self._lock:
            key, mapping = self._take(path)
            self._writing[key] = self._writing.get(key, 0) + 1
        try:
            yield mapping[:nbytes]
        finally:
            with self._lock:
                self._writing[key] -= 1
                if not self._writing[key]:
                    del self._writing[key]

    def reading(self, path: Path, nbytes: int) -> torch.Tensor:
        """The first `nbytes` of the file at `path`, page-locked while its entry lasts (see the third rule)."""
        with self._lock:
            return self._take(path)[1][:nbytes]

    def held_bytes(self) -> int:
        with self._lock:
            return self._held()

    def _held(self) -> int:
        return sum(mapping.numel() for mapping in self._mappings.values())

    def _take(self, path: Path) -> tuple[tuple[int, int], torch.Tensor]:
        key = _inode(path)
        names = {_inode(named): named.name for named in self._shm_dir.glob(f"{self._prefix}*")}
        self._drop_unnamed(names, keep=key)
        mapping = self._mappings.get(key)
        if mapping is None:
            mapping = self._mappings[key] = _lock(path)
        self._mappings.move_to_end(key)
        self._drop_beyond_bound(names, keep=key)
        return key, mapping

    def _drop_unnamed(self, names: dict[tuple[int, int], str], keep: tuple[int, int]) -> None:
        for key in [k for k in self._mappings if k not in names and k != keep and k not in self._writing]:
            self._drop(key)

    def _drop_beyond_bound(self, names: dict[tuple[int, int], str], keep: tuple[int, int]) -> None:
        held = self._held()
        for key in [k for k in self._mappings if k != keep and k not in self._writing]:  # oldest first
            if held <= self._max_bytes:
                return
            if not names.get(key, "").startswith(self._in_flight_prefix):
                held -= self._mappings[key].numel()
                self._drop(key)

    def _drop(self, key: tuple[int, int]) -> None:
        unregister(self._mappings.pop(key))


def _inode(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except FileNotFoundError:  # unlinked between the listing and the stat: no key to keep
        return (-1, -1)
    return stat.st_dev, stat.st_ino


def _lock(path: Path) -> torch.Tensor:
    """The whole file mapped, every page present, and registered with CUDA."""
    mapping = map_populated(path, path.stat().st_size)
    register(mapping)
    return mapping


def map_populated(path: Path, nbytes: int) -> torch.Tensor:
    """The first `nbytes` of an existing file mapped shared, every page mapped up front (for pages that exist,
    one call costs a fraction of faulting them in one by one); the tensor keeps the mapping alive."""
    fd = os.open(path, os.O_RDWR)
    try:
        mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    finally:
        os.close(fd)
    return torch.frombuffer(mapping, dtype=torch.uint8)


def register(rows: torch.Tensor) -> None:
    """Page-lock a host tensor's memory with CUDA (cudaHostRegister); `unregister` undoes it."""
    nbytes = rows.numel() * rows.element_size()
    status = torch.cuda.cudart().cudaHostRegister(rows.data_ptr(), nbytes, 0)
    if int(status) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {int(status)}")


def unregister(rows: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(rows.data_ptr())
