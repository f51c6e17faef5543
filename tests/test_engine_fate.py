"""A replica's engine processes die with it, even when it is killed outright and nothing else cleans up, and
the files they leave (IPC sockets, shared-memory segments) go at the next replica's start.

Inside a Ray cluster the raylet usually kills a dead worker's children, but not when the raylet goes too
(`ray stop --force`): then vLLM's engine core lingered, and its worker spun at half a core (seen after RL
runs). The test starts a real vLLM CPU engine (AsyncLLM, its engine core and worker processes) in a plain
subprocess with the environment an `LLMReplica` gives its engine, kills that process with SIGKILL, and
requires its engine processes to be gone: no Ray, nothing but the kernel and rayfleet's vLLM plugin
(`actors/replica/engine_fate.py`) to end them. The same engine then shows where its files went
(`actors/replica/engine_files.py`): into the replica's folder, and out with the next sweep.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from rayfleet.actors.replica import engine_files
from rayfleet.actors.replica.engine_fate import ENV

# What `LLMReplica.start` does around its engine, in a plain process.
ENGINE_SCRIPT = """
import sys, time
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.v1.engine.async_llm import AsyncLLM
from rayfleet.actors.replica import engine_files
engine_files.claim()
engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=sys.argv[1], max_model_len=256, dtype="float32",
    enforce_eager=True, gpu_memory_utilization=0.3, block_size=32, disable_log_stats=True))
engine_files.record_segments()
print("engine ready", flush=True)
time.sleep(600)
"""

pytestmark = pytest.mark.engines


@contextlib.contextmanager
def engine_front(demo_models: Path) -> Iterator[tuple[subprocess.Popen, list[psutil.Process]]]:
    """A process that built a real engine as a replica does; yields it and the engine's processes."""
    env = {**os.environ, ENV: "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    front = subprocess.Popen([sys.executable, "-c", ENGINE_SCRIPT, str(demo_models / "tiny-llama-a")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    engine_processes = []
    try:
        for line in front.stdout:  # vLLM's own output goes to stderr
            if line.startswith("engine ready"):
                break
        assert front.poll() is None, "the engine did not start"
        engine_processes = [p for p in psutil.Process(front.pid).children(recursive=True) if title(p).startswith("VLLM::")]
        assert any(title(p).startswith("VLLM::EngineCore") for p in engine_processes), "no engine core process"
        yield front, engine_processes
    finally:
        front.kill()
        for process in engine_processes:
            if process.is_running():
                process.kill()
        engine_files._remove(engine_files.folder_of(front.pid))


def test_a_replica_killed_outright_takes_its_engine_processes_along_and_the_next_sweep_removes_its_files(
        demo_models):
    """SIGKILL of the replica's process: no shutdown code runs and no raylet reaps its children, yet its engine
    processes end (rayfleet's vLLM plugin); what they leave (IPC sockets, shared-memory segments) is in the
    replica's folder and goes with the next sweep. One engine for both promises: an engine start is most of
    this test's time."""
    with engine_front(demo_models) as (front, engine_processes):
        folder = engine_files.folder_of(front.pid)
        sockets = {c.laddr for p in [psutil.Process(front.pid), *engine_processes]
                   for c in p.net_connections(kind="unix") if c.laddr.startswith(tempfile.gettempdir())}
        assert sockets, "the engine listens on no IPC socket in the temp folder"
        stray = [path for path in sockets if Path(path).parent != folder]
        assert not stray, f"engine sockets outside the replica's folder {folder}: {stray}"
        segments = (folder / engine_files.SEGMENTS).read_text().split()
        assert segments, "no shared-memory segment listed for the engine"
        assert all((engine_files.SHM_DIR / name).exists() for name in segments)

        # Python's resource tracker (a child of the front, not an engine process) would unlink the segments the
        # engine core created; a raylet killing the dead worker's process tree takes it too. It goes first, so
        # the files are left for the sweep; the engine processes themselves are left to end on their own.
        for process in psutil.Process(front.pid).children(recursive=True):
            if process not in engine_processes:
                process.kill()
        front.kill()
        front.wait(10)
        _, alive = psutil.wait_procs(engine_processes, timeout=30)
        assert not alive, f"engine processes outlived their replica: {[title(p) for p in alive]}"
        assert all(Path(path).exists() for path in sockets), "the killed engine's sockets were removed by another"
        assert all((engine_files.SHM_DIR / name).exists() for name in segments), "segments removed by another"

        swept = engine_files.sweep()
        assert not folder.exists(), "the sweep left the dead replica's folder"
        assert not [path for path in sockets if Path(path).exists()]
        kept = [name for name in segments if (engine_files.SHM_DIR / name).exists()]
        assert not kept, f"shared-memory segments of the dead engine left: {kept}"
        assert swept.folders >= 1 and swept.segments >= len(segments)


def test_the_sweep_keeps_the_files_of_replicas_still_running(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv(engine_files.VLLM_ENV, "restored after the test")
    mine = engine_files.claim()
    (mine / engine_files.SEGMENTS).write_text("psm_not_a_real_segment\n")
    assert engine_files.sweep() == engine_files.Swept(0, 0)
    assert mine.exists()
    engine_files.release()
    assert not mine.exists()


def title(process: psutil.Process) -> str:
    """The process title vLLM sets (`VLLM::EngineCore`, `VLLM::Worker`), or its command line."""
    try:
        return " ".join(process.cmdline()).strip()
    except psutil.NoSuchProcess:
        return ""
