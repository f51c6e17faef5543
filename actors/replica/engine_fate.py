"""A replica's engine processes die with it.

vLLM runs a replica's engine in child processes of the replica's Ray worker (the engine core, and its
workers). When that worker is killed outright (SIGKILL: `ray stop --force`, the OOM killer, a node agent),
no shutdown code runs and the engine core cannot tell that its front end is gone: it stays, holding its
memory, and each of its workers spins on its shared-memory queue (about half a core each on the CPU build)
until someone kills them by hand. Seen after RL runs on a 2-core box, where two such orphans took a core.

`die_with_parent` is a vLLM general plugin (vLLM loads those in every engine process as it starts): in an
engine process of a rayfleet replica (the replica sets `ENV` before it starts its engine; a plain vLLM
deployment is left as it is) it asks the kernel to SIGKILL the process when its parent dies
(`prctl(PR_SET_PDEATHSIG)`, what Ray does for its own children). The engine core then dies with the replica,
and its workers with the engine core.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys

logger = logging.getLogger("rayfleet.engine_fate")

ENV = "RAYFLEET_ENGINE_DIES_WITH_PARENT"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    parent = multiprocessing.parent_process()  # None in the replica's own process (a Ray worker, not a child)
    if os.environ.get(ENV) != "1" or parent is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("engine process %d cannot share its parent's fate (prctl: errno %d); it may outlive a "
                       "killed replica", os.getpid(), ctypes.get_errno())
    elif os.getppid() != parent.pid:  # the parent died before the request reached the kernel
        os.kill(os.getpid(), signal.SIGKILL)
