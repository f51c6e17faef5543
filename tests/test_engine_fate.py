"""A replica's engine processes die with it, even when it is killed outright and nothing else cleans up.

Inside a Ray cluster the raylet usually kills a dead worker's children, but not when the raylet goes too
(`ray stop --force`): then vLLM's engine core lingered, and its worker spun at half a core (seen after RL
runs). The test starts a real vLLM CPU engine (AsyncLLM, its engine core and worker processes) in a plain
subprocess with the environment an `LLMReplica` gives its engine, kills that process with SIGKILL, and
requires its engine processes to be gone: no Ray, nothing but the kernel and rayfleet's vLLM plugin
(`actors/replica/engine_fate.py`) to end them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from rayfleet.actors.replica.engine_fate import ENV

ENGINE_SCRIPT = """
import sys, time
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.v1.engine.async_llm import AsyncLLM
engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=sys.argv[1], max_model_len=256, dtype="float32",
    enforce_eager=True, gpu_memory_utilization=0.3, block_size=32, disable_log_stats=True))
print("engine ready", flush=True)
time.sleep(600)
"""

pytestmark = pytest.mark.engines


def test_a_replicas_engine_processes_die_when_it_is_killed_outright(demo_models):
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
        front.kill()  # SIGKILL: no shutdown code runs, and no raylet is there to reap the children
        front.wait(10)
        _, alive = psutil.wait_procs(engine_processes, timeout=30)
        assert not alive, f"engine processes outlived their replica: {[title(p) for p in alive]}"
    finally:
        front.kill()
        for process in engine_processes:
            if process.is_running():
                process.kill()


def title(process: psutil.Process) -> str:
    """The process title vLLM sets (`VLLM::EngineCore`, `VLLM::Worker`), or its command line."""
    try:
        return " ".join(process.cmdline()).strip()
    except psutil.NoSuchProcess:
        return ""
