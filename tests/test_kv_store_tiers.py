"""One shard's tiers without Ray: LRU spill from memory to disk, promotion, eviction, statistics."""

import numpy as np
import pytest
import torch

from rayfleet.actors.kv.block_hash import block_hashes
from rayfleet.actors.kv.store_tiers import TieredBlockStore

BLOCK_BYTES = 1024


def chain(num_blocks: int):
    return block_hashes(range(num_blocks * 4), 4, "test-model")


def block(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, BLOCK_BYTES, dtype=np.uint8)


def held_bytes(blocks) -> list[bytes | None]:
    return [None if b is None else bytes(b) for b in blocks]


@pytest.fixture
def make_tiers(tmp_path):
    def make(memory_blocks: int, disk_blocks: int) -> TieredBlockStore:
        disk_dir = tmp_path / "disk" if disk_blocks else None
        return TieredBlockStore(memory_blocks * BLOCK_BYTES, disk_dir, disk_blocks * BLOCK_BYTES, pin_memory=True)

    return make


def put_one_by_one(store: TieredBlockStore, hashes) -> None:
    for i, h in enumerate(hashes):
        store.put([h], [block(i)])


def test_exceeding_memory_spills_the_least_recently_used_blocks_to_disk(make_tiers):
    store = make_tiers(memory_blocks=3, disk_blocks=8)
    b0, b1, b2, b3, b4 = chain(5)
    put_one_by_one(store, [b0, b1, b2])
    store.get([b0])  # b0 is now more recent than b1 and b2
    store.put([b3, b4], [block(3), block(4)])  # spills b1 and b2

    stats = store.stats()
    assert (stats.memory_blocks, stats.disk_blocks, stats.evictions_memory, stats.evictions_disk) == (3, 2, 2, 0)
    assert (stats.memory_bytes, stats.disk_bytes) == (3 * BLOCK_BYTES, 2 * BLOCK_BYTES)
    assert held_bytes(store.get([b0])) == [bytes(block(0))]
    assert held_bytes(store.get([b1])) == [bytes(block(1))]
    stats = store.stats()
    assert (stats.hits_memory, stats.hits_disk, stats.misses) == (2, 1, 0)  # b0 twice from memory, b1 from disk


def test_a_disk_hit_is_promoted_to_memory(make_tiers):
    store = make_tiers(memory_blocks=2, disk_blocks=8)
    hashes = chain(3)
    store.put(hashes, [block(i) for i in range(3)])  # the tail block spills
    store.get(hashes[2:])  # a disk hit: back to memory, spilling the least recent block there
    store.get(hashes[2:])
    stats = store.stats()
    assert (stats.hits_disk, stats.hits_memory) == (1, 1)
    assert (stats.memory_blocks, stats.disk_blocks, stats.evictions_memory) == (2, 1, 2)


def test_a_chain_is_evicted_from_its_tail(make_tiers):
    # Blocks after a missing one are unreachable by a prefix lookup: the head must be the last to go.
    store = make_tiers(memory_blocks=3, disk_blocks=0)
    hashes = chain(5)
    store.put(hashes, [block(i) for i in range(5)])
    assert store.contains(hashes) == [True, True, True, False, False]
    store.put(chain(6)[5:], [block(5)])  # one more block evicts the chain's last held block, not its head
    assert store.contains(hashes) == [True, True, False, False, False]


def test_exceeding_the_disk_evicts_for_good(make_tiers):
    store = make_tiers(memory_blocks=1, disk_blocks=2)
    hashes = chain(4)
    put_one_by_one(store, hashes)  # memory keeps the newest, disk the two before it; the first is gone
    assert held_bytes(store.get(hashes[:1])) == [None]
    stats = store.stats()
    assert (stats.evictions_memory, stats.evictions_disk, stats.misses) == (3, 1, 1)
    assert (stats.memory_blocks, stats.disk_blocks) == (1, 2)


def test_without_a_disk_tier_memory_evictions_are_final(make_tiers):
    store = make_tiers(memory_blocks=2, disk_blocks=0)
    hashes = chain(3)
    put_one_by_one(store, hashes)
    assert held_bytes(store.get(hashes)) == [None, bytes(block(1)), bytes(block(2))]
    stats = store.stats()
    assert (stats.evictions_memory, stats.disk_blocks, stats.disk_capacity_bytes) == (1, 0, 0)


def test_a_block_larger_than_memory_goes_to_disk(make_tiers):
    store = make_tiers(memory_blocks=1, disk_blocks=4)
    (h,) = chain(1)
    big = np.random.default_rng(7).integers(0, 256, 2 * BLOCK_BYTES, dtype=np.uint8)
    store.put([h], [big])
    assert (store.stats().memory_blocks, store.stats().disk_blocks) == (0, 1)
    assert held_bytes(store.get([h])) == [bytes(big)]


def test_putting_a_held_block_again_stores_it_once(make_tiers):
    store = make_tiers(memory_blocks=1, disk_blocks=4)
    b0, b1 = chain(2)
    put_one_by_one(store, [b0, b1])  # b0 spilled
    store.put([b0], [block(0)])  # back in memory, not a second copy
    stats = store.stats()
    assert (stats.memory_blocks, stats.disk_blocks) == (1, 1)
    assert held_bytes(store.get([b0, b1])) == [bytes(block(0)), bytes(block(1))]


def test_a_new_store_adopts_the_disk_blocks_oldest_first(make_tiers):
    hashes = chain(4)
    put_one_by_one(make_tiers(memory_blocks=1, disk_blocks=4), hashes)  # three spill, the newest is lost
    restarted = make_tiers(memory_blocks=1, disk_blocks=2)  # a smaller disk keeps the two newest files
    assert restarted.contains(hashes) == [False, True, True, False]
    assert held_bytes(restarted.get(hashes[1:3])) == [bytes(block(1)), bytes(block(2))]
    assert restarted.stats().evictions_disk == 0  # adoption is not an eviction by this store


def test_memory_is_pinned_exactly_where_cuda_is_available(make_tiers):
    assert make_tiers(memory_blocks=1, disk_blocks=0).stats().pinned == torch.cuda.is_available()
