"""The streaming sample store on a real local Ray: groups assembled from single samples, taken oldest version
first, stale groups dropped and counted, producers held back when shards are full, and nothing lost or taken
twice with concurrent producers and consumers across shards."""

from __future__ import annotations

import asyncio
import random

import pytest

from rayfleet.actors.rl.sample_store import DuplicateSample, SampleStore, StoreFull
from rayfleet.actors.rl.samples import Sample


def sample(group: str, index: int, size: int, version: int = 0) -> Sample:
    return Sample(group_id=group, index=index, group_size=size, task_key=f"t/{group}", prompt_token_ids=(1, 2),
                  completion_token_ids=(5, 6), rollout_logprobs=(-0.5, -0.7), token_versions=(version, version + 1),
                  reward=float(index % 2))


async def put_group(store: SampleStore, group: str, size: int, version: int = 0) -> None:
    for index in range(size):
        await store.put(sample(group, index, size, version))


async def wait_for(predicate, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.fixture
def kill_store(ray_cluster):
    stores = []
    yield stores.append
    for store in stores:
        for shard in store.shards:
            ray_cluster.kill(shard)


async def test_groups_are_taken_oldest_version_first_across_shards(kill_store):
    store = SampleStore.create(num_shards=3, capacity_groups=8)
    kill_store(store)
    for group, version in [("a", 3), ("b", 1), ("c", 2), ("d", 1)]:
        await put_group(store, group, 2, version)
    await store.put(sample("partial", 0, 2, 0))
    groups = await store.take(4, trainer_version=3, k=2, timeout_s=10)
    assert [g.version for g in groups] == [1, 1, 2, 3]
    assert sorted(g.group_id for g in groups) == ["a", "b", "c", "d"]
    assert all(len(g.samples) == 2 and [s.index for s in g.samples] == [0, 1] for g in groups)
    stats = await store.stats()
    assert stats.total("pending_groups") == 1 and stats.total("groups_taken") == 4


async def test_stale_groups_are_dropped_and_counted_not_trained_on(kill_store):
    store = SampleStore.create(num_shards=2, capacity_groups=8)
    kill_store(store)
    await put_group(store, "old", 2, version=0)
    await put_group(store, "fresh", 2, version=2)
    await put_group(store, "future", 2, version=5)  # from a lineage the trainer left (resumed earlier)
    [group] = await store.take(1, trainer_version=3, k=1, timeout_s=10)
    assert group.group_id == "fresh"
    stats = await store.stats()
    assert stats.total("groups_dropped_stale") == 2 and stats.total("complete_groups") == 0


async def test_a_full_shard_holds_producers_back_until_a_consumer_takes(kill_store):
    store = SampleStore.create(num_shards=1, capacity_groups=2)
    kill_store(store)
    await put_group(store, "g1", 2)
    await put_group(store, "g2", 2)
    blocked = asyncio.ensure_future(put_group(store, "g3", 2))

    async def producer_waits():
        return (await store.stats()).total("put_waits") == 1
    await wait_for(producer_waits)
    assert not blocked.done()
    with pytest.raises(StoreFull, match="no room for group g4"):
        await store.put(sample("g4", 0, 2), timeout_s=0.2)
    taken = await store.take(1, trainer_version=0, k=0, timeout_s=10)
    await asyncio.wait_for(blocked, 10)  # the take made room
    rest = await store.take(2, trainer_version=0, k=0, timeout_s=10)
    assert sorted(g.group_id for g in taken + rest) == ["g1", "g2", "g3"]


async def test_a_sample_put_twice_is_refused(kill_store):
    store = SampleStore.create(num_shards=1, capacity_groups=4)
    kill_store(store)
    await store.put(sample("g", 0, 2))
    with pytest.raises(DuplicateSample, match="sample 0 of group g was put twice"):
        await store.put(sample("g", 0, 2))


async def test_a_group_put_in_one_call_is_taken_whole_and_refused_twice(kill_store):
    store = SampleStore.create(num_shards=2, capacity_groups=4)
    kill_store(store)
    await store.put_group([sample("g", index, 3, version=1) for index in (2, 0, 1)])
    with pytest.raises(DuplicateSample, match="group g is already complete"):
        await store.put_group([sample("g", 0, 3, version=1)])
    with pytest.raises(ValueError, match="one group"):
        await store.put_group([sample("a", 0, 2), sample("b", 1, 2)])
    [group] = await store.take(1, trainer_version=1, k=0, timeout_s=10)
    assert group.group_id == "g" and [s.index for s in group.samples] == [0, 1, 2]
    stats = await store.stats()
    assert stats.total("pending_groups") == 0 and stats.total("complete_groups") == 0  # nothing else was put


async def test_concurrent_producers_and_consumers_lose_nothing_and_take_nothing_twice(kill_store):
    store = SampleStore.create(num_shards=3, capacity_groups=3)  # small: backpressure engages
    kill_store(store)
    producers, groups_each, size = 4, 15, 4
    expected = {f"p{p}-g{g}" for p in range(producers) for g in range(groups_each)}

    async def produce(p: int) -> None:
        rng = random.Random(p)
        pending = [sample(f"p{p}-g{g}", i, size, version=g % 3) for g in range(groups_each) for i in range(size)]
        # Samples of a producer's groups interleave (rollouts finish in any order), two groups at a time.
        for start in range(0, len(pending), 2 * size):
            window = pending[start: start + 2 * size]
            rng.shuffle(window)
            await asyncio.gather(*(store.put(s) for s in window))

    taken: list = []
    produced = asyncio.Event()

    async def consume() -> None:
        while len(taken) < len(expected):
            try:
                # Micro-batches of 2 while producers run; single groups to drain the rest (two consumers each
                # holding one of the last two groups would otherwise hand them back and forth).
                taken.extend(await store.take(1 if produced.is_set() else 2, trainer_version=2, k=2, timeout_s=1))
            except TimeoutError:
                continue

    async def produce_all() -> None:
        await asyncio.gather(*(produce(p) for p in range(producers)))
        produced.set()

    await asyncio.wait_for(asyncio.gather(produce_all(), *(consume() for _ in range(3))), 120)
    ids = [g.group_id for g in taken]
    assert len(ids) == len(set(ids)), "a group was taken twice"
    assert set(ids) == expected, f"lost: {sorted(expected - set(ids))}"
    assert all(sorted(s.index for s in g.samples) == list(range(size)) for g in taken)
    stats = await store.stats()
    assert stats.total("samples_put") == len(expected) * size and stats.total("put_waits") > 0
    assert stats.buffered_groups == 0 and stats.total("groups_dropped_stale") == 0
