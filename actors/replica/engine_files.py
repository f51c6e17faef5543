"""The files a replica's engine leaves on its host, and their removal once the replica is gone.

vLLM's engine processes talk over ZMQ IPC sockets, files named by a fresh uuid in `VLLM_RPC_BASE_PATH` (the
system's temp folder unless set), and share ring buffers through POSIX shared memory (`/dev/shm/psm_*`,
named at random). A clean shutdown removes them; an engine whose replica is killed outright (a stuck replica
replaced by the health check, `ray stop --force`, the OOM killer) leaves them behind for good: after a day
of test runs on the project's machine, 6,023 sockets in `/tmp` and 472 segments in `/dev/shm`, with nothing
to say whose they were.

So each replica gives its engine a folder of its own, `<temp>/rayfleet-engine-<pid>` (the replica's pid), as
`VLLM_RPC_BASE_PATH`, and once the engine has started it lists there the shared-memory segments its engine
processes have mapped. The next replica to start on the host removes the folders of replicas whose process
is gone, and the segments they list (as `kernels.sweep_orphans` does for KV rows); a replica that shuts down
cleanly removes its own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil

from rayfleet.kernels.shared_rows import SHM_DIR

PREFIX = "rayfleet-engine-"
SEGMENTS = "shm-segments"  # the manifest: one segment name per line
VLLM_ENV = "VLLM_RPC_BASE_PATH"


@dataclass(frozen=True)
class Swept:
    folders: int
    segments: int


def folder_of(pid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"{PREFIX}{pid}"


def claim() -> Path:
    """This process's folder, made and named to vLLM; call before building the engine (its processes inherit
    the variable)."""
    folder = folder_of(os.getpid())
    folder.mkdir(mode=0o700, exist_ok=True)
    os.environ[VLLM_ENV] = str(folder)
    return folder


def record_segments() -> list[str]:
    """List in this process's folder the shared-memory segments its child processes (the engine's) map now;
    call once the engine has started. Returns the names."""
    names: set[str] = set()
    for child in psutil.Process().children(recursive=True):
        names |= _mapped_segments(child.pid)
    listed = sorted(names)
    (folder_of(os.getpid()) / SEGMENTS).write_text("".join(f"{name}\n" for name in listed))
    return listed


def release() -> None:
    """Remove this process's folder and the segments it lists (after a clean engine shutdown, which normally
    removed them already)."""
    _remove(folder_of(os.getpid()))


def sweep() -> Swept:
    """Remove the folders, and the segments they list, of replicas whose process no longer exists here."""
    folders = segments = 0
    for folder in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        pid = folder.name[len(PREFIX):]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            segments += _remove(folder)
            folders += 1
    return Swept(folders, segments)


def _remove(folder: Path) -> int:
    removed = 0
    try:
        listed = (folder / SEGMENTS).read_text().split()
    except OSError:  # no manifest: the engine never started, or its folder is half removed
        listed = []
    for name in listed:
        if "/" not in name and (SHM_DIR / name).exists():
            (SHM_DIR / name).unlink(missing_ok=True)
            removed += 1
    shutil.rmtree(folder, ignore_errors=True)
    return removed


def _mapped_segments(pid: int) -> set[str]:
    try:
        maps = psutil.Process(pid).memory_maps()
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone, or not ours to read
        return set()
    return {Path(m.path).name for m in maps
            if m.path.startswith(f"{SHM_DIR}/psm_") and not m.path.endswith("(deleted)")}
