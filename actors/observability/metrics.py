"""Gauges that stay exported while their value does not change.

Ray evicts a gauge series that its process has not set for two metrics report intervals (20 s by default,
`ray/_private/telemetry/open_telemetry_metric_recorder.py`): an idle admission queue's 0 or an untouched KV
store's usage would turn into "no data". A `SteadyGauge` re-sets its last values from one daemon thread per
process. Use it for series that live as long as the process (per pool, per tier), not per replica or per
request: those must age out when their subject goes.
"""

from __future__ import annotations

import threading
import time

from ray.util.metrics import Gauge

REFRESH_S = 5.0  # well inside the eviction window of two report intervals

_lock = threading.Lock()
_gauges: list[SteadyGauge] = []
_refresher: threading.Thread | None = None


class SteadyGauge:
    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...]) -> None:
        self._gauge = Gauge(name, description, tag_keys=tag_keys)
        self._values: dict[tuple[tuple[str, str], ...], float] = {}
        with _lock:
            _gauges.append(self)
            _start_refresher()

    def set(self, value: float, tags: dict[str, str]) -> None:
        with _lock:
            self._values[tuple(sorted(tags.items()))] = value
        self._gauge.set(value, tags=tags)

    def _republish(self) -> None:
        with _lock:
            values = list(self._values.items())
        for tags, value in values:
            self._gauge.set(value, tags=dict(tags))


def _start_refresher() -> None:
    global _refresher
    if _refresher is None:
        _refresher = threading.Thread(target=_refresh_forever, name="rayfleet-steady-gauges", daemon=True)
        _refresher.start()


def _refresh_forever() -> None:
    while True:
        time.sleep(REFRESH_S)
        with _lock:
            gauges = list(_gauges)
        for gauge in gauges:
            gauge._republish()
