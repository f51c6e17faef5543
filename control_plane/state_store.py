"""Durable controller state: Redis in production, in-process memory for the embedded default.

The controller keeps what it must not forget across a restart here (the applied spec, desired replica
counts, the replica registry, migration history). Values are JSON documents under string keys, and lists
are capped logs; that is all the controller needs, so the interface stays that small.

`DurableState` is how the controller uses a store: it never fails the controller because Redis is down. It
connects when it can (a controller restarted while Redis is down still starts), keeps the latest value of
every key it wrote, and writes them all again once the store is back or comes back empty (a Redis restarted
without persistence).

The embedded `memory://` store lives in the controller's process: it does not survive a controller restart
(Ray re-creates the controller, which then re-adopts its replicas by their actor names, but forgets runtime
scaling and the migration history) nor anything worse.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Protocol

from rayfleet.control_plane.spec import redact_url

logger = logging.getLogger("rayfleet.state")


class StateStore(Protocol):
    def put(self, key: str, value: Any) -> None: ...
    def get(self, key: str, default: Any = None) -> Any: ...
    def delete(self, key: str) -> None: ...
    def append(self, key: str, value: Any, keep: int = 1000) -> None: ...
    def tail(self, key: str, count: int = 100) -> list[Any]: ...


class MemoryStateStore:
    def __init__(self) -> None:
        self._values: dict[str, str] = {}
        self._logs: dict[str, list[str]] = {}

    def put(self, key: str, value: Any) -> None:
        self._values[key] = json.dumps(value)

    def get(self, key: str, default: Any = None) -> Any:
        raw = self._values.get(key)
        return default if raw is None else json.loads(raw)

    def delete(self, key: str) -> None:
        self._values.pop(key, None)

    def append(self, key: str, value: Any, keep: int = 1000) -> None:
        log = self._logs.setdefault(key, [])
        log.append(json.dumps(value))
        del log[:-keep]

    def tail(self, key: str, count: int = 100) -> list[Any]:
        return [json.loads(raw) for raw in self._logs.get(key, [])[-count:]]


class RedisStateStore:
    """Keys live under a per-fleet prefix so several fleets can share one Redis."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5)
        self._redis.ping()  # fail at start-up, with the URL in the error, not on the first write
        self._prefix = prefix

    def _key(self, key: str) -> str:
        return f"{self._prefix}:{key}"

    def put(self, key: str, value: Any) -> None:
        self._redis.set(self._key(key), json.dumps(value))

    def get(self, key: str, default: Any = None) -> Any:
        raw = self._redis.get(self._key(key))
        return default if raw is None else json.loads(raw)

    def delete(self, key: str) -> None:
        self._redis.delete(self._key(key))

    def append(self, key: str, value: Any, keep: int = 1000) -> None:
        pipe = self._redis.pipeline()
        pipe.rpush(self._key(key), json.dumps(value))
        pipe.ltrim(self._key(key), -keep, -1)
        pipe.execute()

    def tail(self, key: str, count: int = 100) -> list[Any]:
        return [json.loads(raw) for raw in self._redis.lrange(self._key(key), -count, -1)]


class StateStoreUnavailable(ConnectionError):
    """The state store cannot be reached; the message never holds its credentials."""


def open_state_store(url: str, fleet_name: str) -> StateStore:
    if url == "memory://":
        return MemoryStateStore()
    try:
        return RedisStateStore(url, prefix=f"rayfleet:{fleet_name}")
    except Exception as error:
        # The URL may carry a password, and so may the client's error text: neither goes into the message.
        raise StateStoreUnavailable(f"state_store: cannot reach {redact_url(url)} ({type(error).__name__})") from None


class DurableState:
    """The controller's store, tolerant of the store being down (see the module's docstring)."""

    SENTINEL = "spec"  # always written first: a store without it has lost our keys
    RETRY_S = 2.0  # between connection attempts while the store cannot be reached

    def __init__(self, url: str, fleet_name: str):
        self.url, self.fleet_name = url, fleet_name
        self.store: StateStore | None = None
        self.latest: dict[str, Any] = {}
        self.down_since: float | None = None
        self._next_attempt = 0.0

    @property
    def connected(self) -> bool:
        return self.store is not None and self.down_since is None

    def connect(self) -> bool:
        """Open the store if it is not open yet; False (and a log line) while it cannot be reached."""
        if self.store is not None:
            return True
        if time.monotonic() < self._next_attempt:
            return False
        try:
            self.store = open_state_store(self.url, self.fleet_name)
        except StateStoreUnavailable as error:
            self._next_attempt = time.monotonic() + self.RETRY_S
            logger.warning("%s; retrying every %.0f s", error, self.RETRY_S)
            return False
        return True

    def get(self, key: str, default: Any = None) -> Any:
        return self.store.get(key, default)

    def put(self, key: str, value: Any) -> None:
        self.latest[key] = value
        self._write(lambda store: store.put(key, value))

    def append(self, key: str, value: Any, keep: int = 1000) -> None:
        self._write(lambda store: store.append(key, value, keep))

    def tail(self, key: str, count: int = 100) -> list[Any]:
        """A list's last entries; empty while the store is down (what was appended then is not kept)."""
        if not self.connected:
            return []
        try:
            return self.store.tail(key, count)
        except Exception as error:
            self._mark_down(error)
            return []

    def delete(self, key: str) -> None:
        self.latest.pop(key, None)
        self._write(lambda store: store.delete(key))

    def heal(self, now: float) -> None:
        """Once a tick: reconnect, and rewrite every key when the store was down or has lost them."""
        if not self.connect():
            return
        try:
            if self.down_since is not None or (self.latest and self.store.get(self.SENTINEL) is None):
                for key in sorted(self.latest, key=lambda k: k != self.SENTINEL):
                    self.store.put(key, self.latest[key])
                if self.down_since is not None:
                    logger.info("state store %s is back after %.1f s; state rewritten", redact_url(self.url),
                                now - self.down_since)
                self.down_since = None
        except Exception as error:
            self._mark_down(error)

    def _write(self, operation) -> None:
        if self.store is None or self.down_since is not None:
            return  # heal() writes the latest values once the store is back
        try:
            operation(self.store)
        except Exception as error:
            self._mark_down(error)

    def _mark_down(self, error: Exception) -> None:
        if self.down_since is None:
            self.down_since = time.time()
            logger.warning("state store %s unreachable (%s); the controller keeps running and rewrites its state "
                           "when it is back", redact_url(self.url), type(error).__name__)
