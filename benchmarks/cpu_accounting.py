"""CPU time spent by each process this benchmark started, grouped by role, between two snapshots.

On a 2-core machine a serving stack's overhead is CPU taken from the engine: dividing each role's CPU seconds
by the tokens served says where it goes. Only descendants of this process count (its Ray cluster, its plain
server, their engine cores) plus this process itself (the load generator), so other people's work on the
shared machine is left out of the split, though not out of the wall-clock numbers.
"""

from __future__ import annotations

import os

import psutil


def role(proc: psutil.Process) -> str:
    if proc.pid == os.getpid():
        return "load generator + driver"
    try:
        args = proc.cmdline()
    except psutil.Error:
        return "?"
    title = args[0] if args else proc.name()
    if title.startswith("ray::"):
        name = title[5:].split(".")[0].split(" ")[0]
        if name.startswith("ServeReplica:"):  # ServeReplica:<app>:<deployment>[:<model id>]
            return "Serve replica " + ":".join(name.split(":")[2:])
        return {"IDLE": "ray idle workers"}.get(name, name)
    if title.startswith("VLLM::"):
        return "vLLM " + title[6:].split(" ")[0]
    joined = " ".join(args)
    if "vllm.entrypoints.openai.api_server" in joined:
        return "vLLM api_server"
    for infra in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py"):
        if infra in joined:
            return "ray infrastructure"
    return proc.name()


def snapshot() -> dict[int, tuple[str, float]]:
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    out = {}
    for proc in procs:
        try:
            times = proc.cpu_times()
            out[proc.pid] = (role(proc), times.user + times.system)
        except psutil.Error:
            continue
    return out


def cpu_seconds_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per role between two snapshots (a process born in between counts from zero)."""
    totals: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        spent = cpu - before[pid][1] if pid in before else cpu
        if spent > 0:
            totals[name] = totals.get(name, 0.0) + spent
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))
