"""A driver that Ray's Jobs API starts keeps its lead over Ray's workers for the CPU
(`control_plane/cli/driver_priority.py`): real processes in sessions of their own, as Ray's job supervisor starts
them, and the kernel's own autogroup file."""

from __future__ import annotations

import os
import subprocess
import sys

from rayfleet.control_plane.cli.driver_priority import DRIVER_GROUP_NICENESS, JOBS_API_DRIVER_ENV, in_root_cpu_cgroup

PROBE = ("from rayfleet.control_plane.cli.driver_priority import keep_driver_priority; "
         "done = keep_driver_priority(); print(done, (open('/proc/self/autogroup').read().split() or ['none'])[-1])")


def driver_in_new_session(as_jobs_api_driver: bool, **extra_env: str) -> tuple[bool, int | None]:
    """Runs the probe as the job supervisor does (`start_new_session=True`): its own autogroup, not this one."""
    env = {k: v for k, v in os.environ.items() if k != JOBS_API_DRIVER_ENV} | extra_env
    if as_jobs_api_driver:
        env[JOBS_API_DRIVER_ENV] = '{"runtime_env": {}, "metadata": {}}'
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, start_new_session=True, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    return out[0] == "True", None if out[1] == "none" else int(out[1])


def a_new_session_can_raise_its_group() -> bool:
    """Does autogroup schedule a process in a session of its own here, and may it raise its group? Asked in a
    throwaway session: this process' session may be the kernel's default group (a container's init session) while
    a new one gets a group of its own, and root alone is not enough (a container's root often lacks CAP_SYS_NICE)."""
    probe = ("from rayfleet.control_plane.cli.driver_priority import autogroup_schedules_this_process; "
             "assert autogroup_schedules_this_process(); "
             f"open('/proc/self/autogroup', 'w').write('{DRIVER_GROUP_NICENESS}')")
    return subprocess.run([sys.executable, "-c", probe], start_new_session=True, capture_output=True,
                          timeout=60).returncode == 0


def own_group_niceness() -> int | None:
    """None where the kernel shows no group: a session in its default group (a container's init session, as on the
    CI machine), which is the root task group, not an autogroup."""
    with open("/proc/self/autogroup") as autogroup:
        fields = autogroup.read().split()
    return int(fields[-1]) if fields else None


def test_a_jobs_api_driver_in_a_session_of_its_own_gives_its_group_a_drivers_weight():
    before = own_group_niceness()
    done, niceness = driver_in_new_session(as_jobs_api_driver=True)
    if a_new_session_can_raise_its_group():  # the machines this suite runs on
        assert done and niceness == DRIVER_GROUP_NICENESS
    else:  # no autogroup here, or no right to raise a group: the driver is left as it was, with a warning
        assert not done and niceness in (0, None)
    assert own_group_niceness() == before  # the group of the session that started it (here: Ray's) is untouched


def test_a_driver_not_started_by_the_jobs_api_is_left_as_it_is():
    assert driver_in_new_session(as_jobs_api_driver=False) in ((False, 0), (False, None))


def test_a_jobs_api_driver_in_a_kubernetes_pod_is_left_as_it_is():
    """The pod's CPU cgroup schedules it, not autogroup (a cgroup namespace may show that group as `/`)."""
    assert driver_in_new_session(as_jobs_api_driver=True, KUBERNETES_SERVICE_HOST="10.0.0.1") in ((False, 0),
                                                                                                  (False, None))


def test_only_the_root_cpu_cgroup_is_scheduled_by_autogroup():
    assert in_root_cpu_cgroup(["1:cpu,cpuacct:/", "4:memory:/process_api/x", "0::/"])
    assert in_root_cpu_cgroup(["0::/"])
    assert not in_root_cpu_cgroup(["0::/kubepods.slice/kubepods-burstable.slice/pod1"])  # a KubeRay pod (v2)
    assert not in_root_cpu_cgroup(["2:cpu,cpuacct:/kubepods/burstable/pod1/abc", "0::/"])  # cgroup v1


def test_a_session_in_the_kernels_default_group_is_not_taken_for_an_autogroup(tmp_path, monkeypatch):
    """The kernel shows an empty /proc/self/autogroup for a session in its default group (the root task group:
    a container's init session, as on the CI machine); writing there cannot raise anything."""
    from rayfleet.control_plane.cli import driver_priority

    enabled, cgroups, autogroup = tmp_path / "enabled", tmp_path / "cgroup", tmp_path / "autogroup"
    enabled.write_text("1\n")
    cgroups.write_text("0::/\n")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    for name, path in (("AUTOGROUP_ENABLED", enabled), ("CGROUPS", cgroups), ("AUTOGROUP", autogroup)):
        monkeypatch.setattr(driver_priority, name, path)
    autogroup.write_text("/autogroup-7 nice 0\n")
    assert driver_priority.autogroup_schedules_this_process()
    autogroup.write_text("")
    assert not driver_priority.autogroup_schedules_this_process()
