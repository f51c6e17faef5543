"""A Ray driver's lead over Ray's workers for the CPU, kept when Ray's Jobs API starts it in a session of its own.

Ray starts its workers at niceness 15 (`RAY_worker_niceness`) so that a driver, at niceness 0, runs first when it
wakes on a busy node. Linux's autogroup (`kernel.sched_autogroup_enabled`, on in most distributions' kernels, for
processes in the root CPU cgroup) schedules each session as one group, and niceness only orders processes within
a group. A driver started from the shell that started Ray shares the workers' group and keeps its lead; the Jobs
API's supervisor starts the entrypoint in a new session, whose group then competes with the group of all of Ray's
workers as an equal. An RL job's driver wakes for every rollout's tokens and every sample it stores; measured on
2026-12-05 (2-core machine, the test fleet, `chain_sum` for 8-20 steps): 122-178 samples/s submitted through the
Jobs API against 313-352 started from the shell, with the same environment, working directory and job config, and
256 samples/s once the Jobs driver's group was given niceness -10 (docs/rl.md).

So a driver the Jobs API started gives its session's group the weight Ray means it to have over its workers.
In a Kubernetes pod (KubeRay) processes sit in the pod's CPU cgroup, where autogroup does not apply: nothing to do.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger("rayfleet.driver_priority")

AUTOGROUP = Path("/proc/self/autogroup")
AUTOGROUP_ENABLED = Path("/proc/sys/kernel/sched_autogroup_enabled")
CGROUPS = Path("/proc/self/cgroup")
# A group at niceness -15 weighs ~28x a group at 0: the ratio between a nice-0 driver and nice-15 workers that Ray
# sets up inside one group.
DRIVER_GROUP_NICENESS = -15
JOBS_API_DRIVER_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the entrypoint


def keep_driver_priority() -> bool:
    """Raise this Jobs API driver's session group to a driver's weight; True if it was needed and done."""
    if JOBS_API_DRIVER_ENV not in os.environ or not autogroup_schedules_this_process():
        return False
    try:
        AUTOGROUP.write_text(str(DRIVER_GROUP_NICENESS))
    except OSError as error:
        logger.warning("this job's driver runs in a scheduling group of its own (Linux autogroup: Ray's Jobs API "
                       "starts it in a new session), where it competes with all of Ray's workers as an equal "
                       "instead of before them, and could not raise the group's priority (%s); an RL job can run "
                       "2x slower. Give the Ray head CAP_SYS_NICE, or set kernel.sched_autogroup_enabled=0.", error)
        return False
    logger.info("this job's driver runs in a scheduling group of its own (Ray's Jobs API started it in a new "
                "session): group niceness set to %d, so it keeps its lead over Ray's workers", DRIVER_GROUP_NICENESS)
    return True


def autogroup_schedules_this_process() -> bool:
    if in_kubernetes_pod():
        return False
    try:
        enabled = AUTOGROUP_ENABLED.read_text().strip() == "1"
        cgroups = CGROUPS.read_text().splitlines()
        # Empty for a session in the kernel's default group (a container's init session): no group of its own.
        own_group = AUTOGROUP.read_text().strip() != ""
    except OSError:  # not Linux, or no autogroup in this kernel
        return False
    return enabled and own_group and in_root_cpu_cgroup(cgroups)


def in_kubernetes_pod() -> bool:
    """A pod's processes sit in its CPU cgroup even where a cgroup namespace shows that group as `/`. (Not
    `/.dockerenv`: VMs booted from Docker images have it, this project's machines among them, and autogroup
    schedules them.)"""
    return "KUBERNETES_SERVICE_HOST" in os.environ  # set in every pod by the kubelet


def in_root_cpu_cgroup(cgroup_lines: list[str]) -> bool:
    """`/proc/self/cgroup`'s lines: v1 names the `cpu` controller's group, v2 has one unified `0::` line."""
    for line in cgroup_lines:
        _, controllers, path = line.split(":", 2)
        if ("cpu" in controllers.split(",") or controllers == "") and path != "/":
            return False
    return True
