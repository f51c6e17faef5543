"""Staging rows in named shared memory: one gather writes them, any process on the node maps them, one
scatter reads them.

A migrating request's KV leaves the source engine's worker process, passes through the engine core, the
replica actors and the destination's engine core, and enters the destination's worker process. Carried as
bytes, every hop copies it (msgpack, pickle, Ray's object store); carried as the *name* of a shared-memory
file, the rows are written once by the source's gather and read once by the destination's scatter,
whichever processes relay the name (docs/kv_connector.md, "Data path").

Files live in /dev/shm (tmpfs: memory, never disk). The process that asked for the rows owns them and
unlinks them when done; a mapping stays valid after the unlink, so a process that mapped the rows may keep
reading them. A file's name carries the pid of the process that wrote it, so `sweep_orphans` can remove the
files of a process that died before its owner unlinked them.

Fresh tmpfs pages cost more than the copy into them: the kernel allocates and zeroes each 4 KiB page on its
first write fault (a gather into a new file ran at ~1 GB/s here, into pages already allocated at ~3 GB/s;
MAP_POPULATE only moves that cost into mmap). So an owner that knows no process will read the rows again
`recycle`s the file instead of unlinking it: it is renamed into its writer's pool, and the writer's next
`allocate` renames it back under a new name, pages still allocated, and maps it with MAP_POPULATE: for pages
that exist, mapping them all in one call costs a fraction of faulting them in one by one during the gather (a
64 MiB gather of 64 KiB pages: ~31 ms -> ~16 ms here). The pool is bounded per writer process
(`RAYFLEET_KV_POOL_BYTES`, 0 disables it; by default 512 MiB for a CPU writer's files and, for a GPU writer's
slabs, 8 GiB or a sixteenth of the host's memory if less: a 16k-token request of an 8B model is 2 GiB of KV, and
a slab that does not fit is made, faulted in and locked again for each export, 1.1 GB/s instead of 25 on an H200;
beyond the bound the oldest files go, and the newest stays whatever its size), and pool files of a dead writer are
swept like any other orphan.

On a GPU the rows are page-locked for the gather and scatter kernels, and locking them costs more than the
copy; a GPU writer's files are slabs that stay locked from one migration to the next (`locked_staging.py`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .block_copy import BlockIds, checked_block_ids, gather_blocks, scatter_blocks
from .layout import KVCacheLayers
from .locked_staging import SLAB_BYTES, LockedStaging, map_populated, register, slab_size, unregister

SHM_DIR = Path("/dev/shm")
PREFIX = "rayfleet-kv-"
POOL_PREFIX = "rayfleet-kvpool-"  # free files with warm pages, `POOL_PREFIX<writer pid>-<id>`
_HOST_BYTES = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
POOL_BYTES = int(os.environ.get("RAYFLEET_KV_POOL_BYTES", str(512 << 20)))  # a CPU writer's
SLAB_POOL_BYTES = int(os.environ.get("RAYFLEET_KV_POOL_BYTES", str(min(8 << 30, _HOST_BYTES // 16))))  # a GPU writer's
SLAB_MARK = "-slab-"  # in the names of a GPU writer's rows: never resized (locked_staging.py)
# Per process: a writer's pool and the files in flight, and a reader's files from its writers' pools.
_LOCKED = LockedStaging(SHM_DIR, "rayfleet-kv", PREFIX, max_bytes=2 * SLAB_POOL_BYTES)  # a prefix of both prefixes


@dataclass(frozen=True)
class SharedRows:
    """`num_rows` staging rows of `row_bytes` each, in the shared-memory file `name` (picklable: a name)."""

    name: str
    num_rows: int
    row_bytes: int

    @classmethod
    def named(cls, num_rows: int, row_bytes: int, slab: bool = False) -> SharedRows:
        """A fresh name for rows this process will write (no file yet: `create`, or with `slab` a GPU gather,
        makes it)."""
        return cls(f"{PREFIX}{os.getpid()}{SLAB_MARK if slab else '-'}{uuid.uuid4().hex[:16]}", num_rows, row_bytes)

    @property
    def slab(self) -> bool:
        return SLAB_MARK in self.name

    @classmethod
    def allocate(cls, num_rows: int, row_bytes: int) -> tuple[SharedRows, torch.Tensor]:
        """A new file of rows and its mapping, `[num_rows, row_bytes]` uint8 (contents undefined)."""
        rows = cls.named(num_rows, row_bytes)
        return rows, rows.create()

    def create(self) -> torch.Tensor:
        """Make this name's file (from the writer's pool when it has one) and map it for writing."""
        if self.nbytes == 0:
            return torch.empty((0, self.row_bytes), dtype=torch.uint8)
        if self.slab:
            raise ValueError(f"rows {self.name} are a slab: a gather on a GPU makes its file (gather_to_shared)")
        if _take_pooled(self.path, self.nbytes):
            return map_populated(self.path, self.nbytes).view(self.num_rows, self.row_bytes)
        return _map(self.path, self.nbytes).view(self.num_rows, self.row_bytes)

    @property
    def path(self) -> Path:
        return SHM_DIR / self.name

    @property
    def nbytes(self) -> int:
        return self.num_rows * self.row_bytes

    def map(self, locked: bool = False) -> torch.Tensor:
        """The rows, `[num_rows, row_bytes]` uint8, mapped from the file without a copy; with `locked` (a reader
        on a GPU), a slab's rows come page-locked, from a mapping this process keeps for the file's next time."""
        if self.nbytes == 0:
            return torch.empty((0, self.row_bytes), dtype=torch.uint8)
        if not self.path.exists():
            raise FileNotFoundError(f"shared KV rows {self.name} are gone (unlinked by their owner, or another node's)")
        size = self.path.stat().st_size
        # Exact, or whole slabs holding at least the rows: a GPU writer's files (locked_staging.py).
        if size != self.nbytes and (size < self.nbytes or size % SLAB_BYTES):
            slabs = f" or whole slabs of {SLAB_BYTES >> 20} MiB holding them" if size > self.nbytes else ""
            raise ValueError(f"shared KV rows {self.name} hold {size} bytes, expected {self.nbytes}{slabs}")
        if locked and self.slab:
            return _LOCKED.reading(self.path, self.nbytes).view(self.num_rows, self.row_bytes)
        return _map(self.path, self.nbytes).view(self.num_rows, self.row_bytes)

    def unlink(self) -> None:
        """Remove the file; mappings already made stay readable until dropped."""
        if self.nbytes:
            self.path.unlink(missing_ok=True)

    def recycle(self) -> None:
        """Give the file to its writer's pool for its next export (warm pages). The pool keeps its newest files
        within its bound (`SLAB_POOL_BYTES` for slabs, else `POOL_BYTES`), unlinking the oldest to make room, and
        always the newest whatever its size: a writer whose exports outgrow the bound would otherwise make, fault
        in and lock a fresh file for each. Only when no process will read these rows again: the next gather
        overwrites them."""
        bound = SLAB_POOL_BYTES if self.slab else POOL_BYTES
        if not self.nbytes or not bound:
            self.unlink()
            return
        writer = self.name[len(PREFIX):].split("-", 1)[0]
        pooled = sorted((SHM_DIR / name for name in live_files(f"{POOL_PREFIX}{writer}-")), key=_pooled_at)
        held, room = sum(_size(path) for path in pooled), bound - _size(self.path)
        for oldest in pooled:
            if held <= room:
                break
            held -= _size(oldest)
            oldest.unlink(missing_ok=True)  # one its writer takes meanwhile is simply not there any more
        mark = SLAB_MARK if self.slab else "-"  # a slab stays one in the pool: only a GPU gather takes it back
        try:
            os.rename(self.path, SHM_DIR / f"{POOL_PREFIX}{writer}{mark}{uuid.uuid4().hex[:16]}")
        except FileNotFoundError:  # already unlinked
            pass


def _pooled(slab: bool) -> list[Path]:
    """This process's free files: its slabs, or the files the CPU path resizes."""
    return [SHM_DIR / name for name in live_files(f"{POOL_PREFIX}{os.getpid()}-") if (SLAB_MARK in name) == slab]


def _take_pooled(path: Path, nbytes: int) -> bool:
    """Rename the largest free file of this process' pool to `path`, sized to `nbytes`; False if none."""
    if not _rename_first(sorted(_pooled(slab=False), key=_size, reverse=True), path):
        return False
    os.truncate(path, nbytes)  # a larger file would fail the reader's size check; growing adds fresh pages
    return True


def _rename_first(candidates: list[Path], path: Path) -> bool:
    """Rename the first of `candidates` that is still there to `path`; False if none was."""
    for candidate in candidates:
        try:
            os.rename(candidate, path)
            return True
        except FileNotFoundError:  # taken by another thread of this process
            continue
    return False


def _pooled_at(path: Path) -> int:
    """When a pool file was put there: its rename into the pool changed its inode (ctime)."""
    try:
        return path.stat().st_ctime_ns
    except FileNotFoundError:
        return 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _map(path: Path, nbytes: int) -> torch.Tensor:
    # MAP_SHARED: what one process writes, every process mapping the file sees; created when missing.
    return torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)


def gather_to_shared(cache: KVCacheLayers, block_ids: BlockIds, into: SharedRows | None = None) -> SharedRows:
    """Gather blocks `block_ids` of every layer into a new shared-memory file, row i = block i.

    `into` (from `SharedRows.named`) is the name to write, for a caller that hands the name out before the
    gather ends. On a GPU the file is page-locked, so the gather kernel writes host memory directly (one pass
    over the blocks), and it stays locked for this process's next gather into it (`locked_staging.py`); this
    returns once the rows are complete."""
    ids = checked_block_ids(cache, block_ids)
    rows = into if into is not None else SharedRows.named(len(ids), cache.layout.block_bytes,
                                                           slab=cache.device.type == "cuda")
    if (rows.num_rows, rows.row_bytes) != (len(ids), cache.layout.block_bytes):
        raise ValueError(f"rows {rows.name} hold {rows.num_rows} x {rows.row_bytes} bytes, the gather "
                         f"{len(ids)} x {cache.layout.block_bytes}")
    if rows.slab != (cache.device.type == "cuda"):  # a GPU's files stay locked: only slabs are never resized
        raise ValueError(f"rows {rows.name}: a gather from a {cache.device.type} cache writes "
                         f"{'slabs' if cache.device.type == 'cuda' else 'rows that are not slabs'} "
                         "(SharedRows.named(..., slab=...))")
    if cache.device.type == "cpu":
        gather_blocks(cache, ids, out=rows.create())
    elif len(ids):
        _create_slab(rows)
        with _LOCKED.writing(rows.path, rows.nbytes) as locked:
            gather_blocks(cache, ids, out=locked.view(rows.num_rows, rows.row_bytes))
            torch.cuda.current_stream(cache.device).synchronize()
    return rows


def _create_slab(rows: SharedRows) -> None:
    """A GPU writer's file for `rows`: the smallest file of its pool that is large enough, kept at its size (its
    pages may be page-locked: a resize would detach them), or a new file of whole slabs."""
    if _rename_first(sorted((path for path in _pooled(slab=True) if _size(path) >= rows.nbytes), key=_size),
                     rows.path):
        return
    fd = os.open(rows.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, slab_size(rows.nbytes))
    finally:
        os.close(fd)


def share_rows(rows: torch.Tensor) -> SharedRows:
    """A copy of host rows (`[n, row_bytes]` uint8, e.g. received by value from another node) in a new
    shared-memory file, for another process on this node to map."""
    shared, tensor = SharedRows.allocate(rows.shape[0], rows.shape[1])
    tensor.copy_(rows)
    return shared


def scatter_rows(cache: KVCacheLayers, rows: torch.Tensor, block_ids: BlockIds) -> None:
    """Scatter rows into `block_ids`: host rows (a mapped `SharedRows`, any `[n, block_bytes]` uint8 tensor) or,
    on a GPU, rows on a device (an opened `DeviceRows`; a peer GPU's rows are first copied over the link)."""
    if cache.device.type == "cpu" or not len(rows):
        scatter_blocks(cache, rows, block_ids)
    elif rows.device.type == "cuda":
        scatter_blocks(cache, rows.to(cache.device), block_ids)
        torch.cuda.current_stream(cache.device).synchronize()
    else:  # host rows: the kernel reads them straight from page-locked memory
        with page_locked(rows):
            scatter_blocks(cache, rows, block_ids)
            torch.cuda.current_stream(cache.device).synchronize()


@contextmanager
def page_locked(rows: torch.Tensor) -> Iterator[None]:
    """Register a host tensor's memory with CUDA (cudaHostRegister) for the duration, unless already pinned."""
    if rows.is_pinned():
        yield
        return
    register(rows)
    try:
        yield
    finally:
        unregister(rows)


def live_files(prefix: str = PREFIX) -> list[str]:
    """Names of the shared-memory files of rows that exist now (leak checks, `sweep_orphans`)."""
    return sorted(path.name for path in SHM_DIR.glob(f"{prefix}*"))


def sweep_orphans() -> int:
    """Unlink row files whose writer process no longer exists on this host; returns how many.

    Rows are unlinked by their owner when a transfer ends; a process killed mid-transfer leaves its rows
    behind, and the next replica to start on the node removes them.
    """
    removed = 0
    for prefix in (PREFIX, POOL_PREFIX):
        for name in live_files(prefix):
            pid = name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                (SHM_DIR / name).unlink(missing_ok=True)
                removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
