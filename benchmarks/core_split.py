"""Emulate devices of their own on one CPU machine: while a `CoreSplit` is open, an RL job's trainer runs on some
cores and its rollout engines on the others.

Async RL pays where the trainer and the rollout engines run on hardware of their own (AsyncFlow, verl's fully
async mode: disjoint GPUs), against a synchronous baseline that time-shares all of it. On one 2-core machine both
sides otherwise float over both cores and every overlap competes for them. Ray reserves logical CPUs but pins
nothing, so this sets the Linux CPU affinity of every thread of the processes below the driver (Ray's head
processes, its workers and their vLLM engines are all started below it), by their Ray titles: the trainer actor
(`ray::TrainerActor...`) on `trainer_cores`, each rollout replica (`ray::LLMReplica...`) with its vLLM engine
processes on `rollout_cores`. The rest (Ray's own processes, the sample store, the job's driver: a node's host
side) keeps floating, or with `host_with_rollouts` joins the rollouts, leaving the trainer's cores to it alone. Threads
inherit their creator's affinity, and the scan repeats while open, so threads and actors started later are placed
too. On close every process below the driver gets all cores back.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import psutil

SIDES = ("ray::TrainerActor", "ray::LLMReplica")  # trainer, rollouts


def below_driver() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def title(process: psutil.Process) -> str:
    try:
        cmdline = process.cmdline()
    except psutil.Error:
        return ""
    return cmdline[0] if cmdline else ""


def pin(process: psutil.Process, cores: set[int]) -> int:
    """Set the affinity of every thread of `process`; the number of its threads."""
    threads = 0
    for task in Path(f"/proc/{process.pid}/task").glob("*"):
        try:
            if os.sched_getaffinity(int(task.name)) != cores:
                os.sched_setaffinity(int(task.name), cores)
            threads += 1
        except (ProcessLookupError, PermissionError):
            pass  # a thread or process that ended between the listing and the call
    return threads


class CoreSplit:
    """Keep the trainer on `trainer_cores` and the rollout engines on `rollout_cores` while open."""

    def __init__(self, trainer_cores: set[int], rollout_cores: set[int], host_with_rollouts: bool = False,
                 period_s: float = 0.5) -> None:
        self.cores = dict(zip(SIDES, (trainer_cores, rollout_cores), strict=True))
        self.host_cores = rollout_cores if host_with_rollouts else None
        self.period_s = period_s
        self.threads_placed = dict.fromkeys(SIDES, 0)  # the most seen at once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name="core-split", daemon=True)

    def __enter__(self) -> CoreSplit:
        if self.host_cores:
            pin(psutil.Process(), self.host_cores)  # the driver (its threads started later inherit it)
        self._place()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        everything = set(range(os.cpu_count() or 1))
        for process in [psutil.Process(), *below_driver()]:
            pin(process, everything)

    def _keep(self) -> None:
        while not self._stop.wait(self.period_s):
            self._place()

    def _place(self) -> None:
        placed = dict.fromkeys(SIDES, 0)
        sided: set[int] = set()
        for root in below_driver():
            side = next((s for s in SIDES if title(root).startswith(s)), None)
            if side is None:
                continue
            try:
                tree = [root, *root.children(recursive=True)]  # a replica's vLLM engine processes
            except psutil.Error:
                continue
            sided.update(process.pid for process in tree)
            placed[side] += sum(pin(process, self.cores[side]) for process in tree)
        if self.host_cores:
            for process in below_driver():
                if process.pid not in sided:
                    pin(process, self.host_cores)
        self.threads_placed = {side: max(n, self.threads_placed[side]) for side, n in placed.items()}
