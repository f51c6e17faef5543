"""Logging inside the fleet's Ray actors: rayfleet's loggers at the spec's level, in Ray's format.

An actor never calls `logging.basicConfig`: that would put every library's INFO lines on the root logger
of a process Ray configures. When the job set a `ray.LoggingConfig` (text or JSON), Ray has put its handler
on the root logger of each worker and rayfleet's records go through it. Otherwise rayfleet's logger gets
one handler of its own with Ray's text formatter and context filter (job, worker, actor and task ids), so
an actor's log file reads like the rest of Ray's.
"""

from __future__ import annotations

import logging


def configure_actor_logging(level: str) -> None:
    rayfleet = logging.getLogger("rayfleet")
    rayfleet.setLevel(level)
    if logging.getLogger().handlers or rayfleet.handlers:
        return
    from ray._common.filters import CoreContextFilter
    from ray._common.formatters import TextFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(TextFormatter())
    handler.addFilter(CoreContextFilter())
    rayfleet.addHandler(handler)
