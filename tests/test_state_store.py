"""The controller's durable state against a real redis-server that goes away and comes back empty."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import redis

from conftest import free_port
from rayfleet.control_plane.state_store import DurableState, StateStoreUnavailable, open_state_store


def start_redis(port: int) -> subprocess.Popen:
    server = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                               "--requirepass", "pw-secret", "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password="pw-secret")
    for _ in range(200):
        try:
            client.ping()
            return server
        except redis.ConnectionError:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=10)


def stored(port: int, key: str):
    return redis.Redis(port=port, password="pw-secret").get(f"rayfleet:f:{key}")


def test_unreachable_store_error_names_no_password():
    with pytest.raises(StateStoreUnavailable) as error:
        open_state_store(f"redis://:pw-secret@127.0.0.1:{free_port()}/0", "f")
    assert "pw-secret" not in str(error.value) and "***" in str(error.value)


def test_writes_while_redis_is_down_land_once_it_is_back_and_a_restart_empty_is_rewritten():
    port = free_port()
    state = DurableState(f"redis://:pw-secret@127.0.0.1:{port}/0", "f")
    state.RETRY_S = 0.0
    assert not state.connect()  # not started yet: the controller keeps going
    state.put("spec", {"name": "f"})
    state.put("desired", {"a": 2})
    server = start_redis(port)
    try:
        state.heal(time.time())
        assert state.connected and stored(port, "desired") == b'{"a": 2}'
        stop(server)
        state.put("desired", {"a": 3})  # fails quietly, kept
        assert not state.connected
        server = start_redis(port)  # back, empty (no persistence)
        state.heal(time.time())
        assert state.connected
        assert stored(port, "desired") == b'{"a": 3}' and stored(port, "spec") == b'{"name": "f"}'
        server.kill()
        server.wait()
        server = start_redis(port)  # gone and back between two ticks, no write failed meanwhile
        state.heal(time.time())
        assert stored(port, "spec") == b'{"name": "f"}', "a store that lost the keys must be rewritten"
    finally:
        stop(server)
