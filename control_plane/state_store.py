"""Durable controller state: Redis in production, in-process memory for the embedded default.

The controller keeps what it must not forget across a restart here (the applied spec, desired replica
counts, the replica registry, migration history). Values are JSON documents under string keys, and lists
are capped logs; that is all the controller needs, so the interface stays that small.
"""

from __future__ import annotations

import json
from typing import Any, Protocol


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

        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)
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


def open_state_store(url: str, fleet_name: str) -> StateStore:
    if url == "memory://":
        return MemoryStateStore()
    try:
        return RedisStateStore(url, prefix=f"rayfleet:{fleet_name}")
    except Exception as error:
        raise ConnectionError(f"state_store: cannot reach {url}: {error}") from None
