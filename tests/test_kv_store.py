"""The KV store on a real local Ray: shard actors, routing, the client, sharing between replicas.

Eviction order and per-tier statistics are specified on one shard's tiers in test_kv_store_tiers.py;
here the same behaviours are checked end to end through the actors, once. Ray is the session's shared
local instance (`ray_cluster` in conftest.py).
"""

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from pydantic import ValidationError

from rayfleet.actors.kv.block_hash import block_hashes
from rayfleet.actors.kv.store import KVStoreClient, KVStoreConfigMismatch, get_or_create_kv_store
from rayfleet.actors.kv.store_config import KVStoreConfig

BLOCK_BYTES = 1024


def store_config(disk_dir: Path, **fields) -> KVStoreConfig:
    return KVStoreConfig(name=f"kv-test-{uuid.uuid4().hex[:8]}", disk_dir=disk_dir, **fields)


@pytest.fixture(scope="module")
def store(ray_cluster, tmp_path_factory):
    """A three-shard store shared by the tests below; each test writes under its own namespace."""
    client = get_or_create_kv_store(
        store_config(tmp_path_factory.mktemp("kv"), num_shards=3, memory_bytes=1 << 20, disk_bytes=1 << 20)
    )
    yield client
    client.shutdown()


def chain(num_blocks: int, namespace: str):
    """Hashes of a prompt of `num_blocks` full blocks of 4 tokens."""
    return block_hashes(range(num_blocks * 4), 4, namespace)


def block(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, BLOCK_BYTES, dtype=np.uint8)


def held_bytes(blocks) -> list[bytes | None]:
    return [None if b is None else bytes(b) for b in blocks]


def test_put_get_round_trip_is_byte_exact_across_shards(store):
    hashes = chain(24, "round-trip")
    blocks = [block(i) for i in range(24)]
    store.put(hashes, blocks)
    assert held_bytes(store.get(hashes)) == [bytes(b) for b in blocks]


def test_a_block_may_be_bytes_an_array_or_a_tensor_of_any_dtype(store):
    hashes = chain(3, "value-types")
    tensor = torch.randn(2, 3, 8, dtype=torch.bfloat16)  # e.g. one block across 2 layers
    values = [b"raw bytes", np.arange(6, dtype=np.float32), tensor]
    store.put(hashes, values)
    got = store.get(hashes)
    assert bytes(got[0]) == b"raw bytes"
    assert np.array_equal(got[1].view(np.float32), values[1])
    assert torch.equal(torch.from_numpy(got[2].copy()).view(torch.bfloat16).view(2, 3, 8), tensor)


def test_sharding_spreads_blocks_over_every_shard(store):
    before = [shard.memory_blocks for shard in store.stats()]
    store.put(chain(30, "spread"), [block(i) for i in range(30)])
    added = [shard.memory_blocks - held for shard, held in zip(store.stats(), before)]
    assert sum(added) == 30 and all(count > 0 for count in added), added


def test_contains_prefix_stops_at_the_first_missing_block(store):
    hashes = chain(10, "prefix")
    store.put(hashes[:5] + hashes[6:], [block(i) for i in range(9)])
    assert store.contains_prefix(hashes) == 5
    assert store.contains_prefix(hashes[:4]) == 4
    assert store.contains_prefix(chain(10, "prefix-of-another-model")) == 0
    assert store.contains_prefix([]) == 0


def test_get_answers_none_for_blocks_the_store_lacks(store):
    hashes = chain(4, "partly-missing")
    misses_before = sum(shard.misses for shard in store.stats())
    store.put(hashes[:2], [block(0), block(1)])
    assert held_bytes(store.get(hashes)) == [bytes(block(0)), bytes(block(1)), None, None]
    assert sum(shard.misses for shard in store.stats()) - misses_before == 2


@ray.remote(num_cpus=0)
class Replica:
    """Stands in for an LLMReplica's KV connector: it holds only a client passed to it."""

    def __init__(self, store: KVStoreClient) -> None:
        self.store = store

    def offload(self, token_ids: list[int], blocks: list[np.ndarray]) -> None:
        self.store.put(block_hashes(token_ids, 4, "replicas"), blocks)

    def load_prefix(self, token_ids: list[int]) -> list[bytes]:
        hashes = block_hashes(token_ids, 4, "replicas")
        return [bytes(b) for b in self.store.get(hashes[: self.store.contains_prefix(hashes)])]


def test_a_block_written_by_one_replica_is_readable_by_another(store):
    replica_a, replica_b = Replica.remote(store), Replica.remote(store)
    prompt = list(range(100, 118))  # 4 full blocks and 2 tokens
    ray.get(replica_a.offload.remote(prompt, [block(i) for i in range(4)]))
    # B's prompt shares A's first 3 blocks, then diverges.
    assert ray.get(replica_b.load_prefix.remote([*prompt[:12], 0, 0, 0, 0])) == [bytes(block(i)) for i in range(3)]


def test_get_or_create_finds_the_running_store_by_name(store):
    hashes = chain(4, "found-by-name")
    store.put(hashes, [block(i) for i in range(4)])
    config = ray.get(store.shards[0].config.remote())
    assert held_bytes(get_or_create_kv_store(config).get(hashes)) == [bytes(block(i)) for i in range(4)]


def test_a_process_outside_ray_finds_the_store_by_its_config(store):
    # vLLM runs a KV connector in its engine-core and worker processes, which are not Ray workers.
    hashes = chain(2, "outside-ray")
    store.put(hashes, [block(0), block(1)])
    config = ray.get(store.shards[0].config.remote())
    script = f"""
import hashlib, ray
from rayfleet.actors.kv.block_hash import block_hashes
from rayfleet.actors.kv.store import get_or_create_kv_store
from rayfleet.actors.kv.store_config import KVStoreConfig
ray.init(log_to_driver=False)  # RAY_ADDRESS names the cluster
store = get_or_create_kv_store(KVStoreConfig.model_validate_json({config.model_dump_json()!r}))
print(*(hashlib.sha256(b).hexdigest() for b in store.get(block_hashes(range(8), 4, "outside-ray"))))
"""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [hashlib.sha256(block(i)).hexdigest() for i in range(2)]


def test_get_or_create_rejects_another_configuration_of_a_running_store(store):
    config = ray.get(store.shards[0].config.remote())
    with pytest.raises(KVStoreConfigMismatch, match="memory_bytes, num_shards"):
        get_or_create_kv_store(config.model_copy(update=dict(num_shards=4, memory_bytes=5)))


def test_a_store_spills_to_disk_and_its_disk_outlives_its_actors(ray_cluster, tmp_path):
    config = store_config(tmp_path, memory_bytes=2 * BLOCK_BYTES, disk_bytes=2 * BLOCK_BYTES)
    store = get_or_create_kv_store(config)
    hashes = chain(5, "restart")
    store.put(hashes, [block(i) for i in range(5)])  # memory keeps the head; the next two spill; the tail is gone
    (stats,) = store.stats()
    assert (stats.memory_blocks, stats.disk_blocks, stats.evictions_memory, stats.evictions_disk) == (2, 2, 3, 1)
    store.shutdown()

    restarted = get_or_create_kv_store(config)
    try:
        assert held_bytes(restarted.get(hashes)) == [None, None, bytes(block(2)), bytes(block(3)), None]
        (stats,) = restarted.stats()
        assert (stats.hits_memory, stats.hits_disk, stats.misses) == (0, 2, 3)
    finally:
        restarted.shutdown()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(num_shards=0), "num_shards"),
        (dict(memory_bytes=0), "memory_bytes"),
        (dict(disk_bytes=1 << 20), "disk_bytes"),  # no disk_dir
        (dict(disk_dir="/tmp/kv"), "disk_bytes"),  # no capacity
        (dict(disk_dir="relative/kv", disk_bytes=1), "disk_dir"),
        (dict(name="a/b"), "name"),
        (dict(memmory_bytes=1), "memmory_bytes"),
    ],
)
def test_config_errors_name_the_field(fields, field):
    with pytest.raises(ValidationError) as error:
        KVStoreConfig(**fields)
    assert [e["loc"] for e in error.value.errors()] == [(field,)]


def test_rayfleet_status_line_counts_what_the_shards_hold_and_loaded(ray_cluster):
    """`rayfleet status` renders the shards' own statistics (`FleetController.kv_store_stats` returns them)."""
    from dataclasses import asdict

    from rayfleet.control_plane.cli.launch import render_kv_store

    client = get_or_create_kv_store(KVStoreConfig(name=f"kv-test-{uuid.uuid4().hex[:8]}", num_shards=2,
                                                  memory_bytes=1 << 20))  # no disk tier
    try:
        hashes = chain(6, "status")
        client.put(hashes[:4], [block(i) for i in range(4)])
        assert sum(b is not None for b in client.get(hashes)) == 4  # 4 loaded, 2 missing
        line = render_kv_store([asdict(s) for s in client.stats()])
    finally:
        client.shutdown()
    assert line.startswith("  KV store: 2 shards, 4 blocks in memory (0.0 of 2 MiB)"), line
    assert "4 of 6 blocks loaded (67%; 4 from memory, 0 from disk)" in line, line
    assert "on disk (" not in line  # no disk tier configured: none reported
    assert line.endswith("evicted 0 from memory, 0 from disk"), line
