"""The streaming sample store: sharded Ray actors between rollout producers and trainer consumers.

Producers put single samples as they finish, or a group's samples in one call; a shard assembles them into
groups by group id (every sample of a group lands on the same shard, chosen by a stable hash of the id).
Consumers take complete groups as soon as enough exist, oldest weight version first, with no barrier across
producers or consumers:

    store = SampleStore.create(num_shards=2, capacity_groups=64)
    await store.put(sample)                          # waits while the shard is full (backpressure)
    await store.put_group(samples)                   # the same for each, in one actor call
    groups = await store.take(4, trainer_version=7, k=1, timeout_s=60)

A take is two steps: each shard names its oldest usable complete groups (`oldest`), the client keeps the
globally oldest and claims them (`claim`). A shard actor runs one call at a time on its event loop, so a claim
hands a group to exactly one consumer; a group claimed by another consumer in between is simply not returned,
and the client asks again. Groups whose version the staleness bound no longer allows are dropped at the shard
and counted (`policies.rl.StalenessBound`). Nothing is copied between shards.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from dataclasses import dataclass

import ray

from rayfleet.actors.rl.samples import Sample, SampleGroup
from rayfleet.policies.rl import StalenessBound


class StoreFull(TimeoutError):
    """A producer waited `timeout_s` for room in a shard: the consumers are not keeping up."""


class DuplicateSample(ValueError):
    """The same (group id, index) was put twice."""


@dataclass(frozen=True)
class ShardStats:
    pending_groups: int  # groups with some but not all samples
    complete_groups: int  # ready to take
    samples_put: int
    groups_taken: int
    groups_dropped_stale: int
    put_waits: int  # puts that had to wait for room (backpressure engaged)
    oldest_version: int | None  # of the complete groups


class SampleStoreShard:
    """One shard (a Ray actor with an event loop: its calls interleave only at awaits)."""

    def __init__(self, capacity_groups: int) -> None:
        if capacity_groups < 1:
            raise ValueError("capacity_groups must be >= 1")
        self.capacity = capacity_groups
        self.pending: dict[str, dict[int, Sample]] = {}
        self.complete: dict[str, SampleGroup] = {}
        self.changed = asyncio.Condition()
        self.samples_put = self.taken = self.dropped = self.put_waits = 0

    async def put(self, sample: Sample, timeout_s: float = 300.0) -> None:
        async with self.changed:
            if sample.group_id in self.complete:
                raise DuplicateSample(f"group {sample.group_id} is already complete")
            if sample.group_id not in self.pending:
                # Only a new group needs room: samples of a started group always complete it.
                if len(self.pending) + len(self.complete) >= self.capacity:
                    self.put_waits += 1
                    # Another sample of this group may get the room first: then this one needs none.
                    def admitted() -> bool:
                        return sample.group_id in self.pending or self._has_room()
                    try:
                        await asyncio.wait_for(self.changed.wait_for(admitted), timeout_s)
                    except asyncio.TimeoutError:
                        raise StoreFull(f"no room for group {sample.group_id} within {timeout_s:.0f} s "
                                        f"({self.capacity} groups held)") from None
                self.pending.setdefault(sample.group_id, {})
                self.changed.notify_all()  # its other samples may be waiting for the room it took
            group = self.pending[sample.group_id]
            if sample.index in group:
                raise DuplicateSample(f"sample {sample.index} of group {sample.group_id} was put twice")
            group[sample.index] = sample
            self.samples_put += 1
            if len(group) == sample.group_size:
                del self.pending[sample.group_id]
                self.complete[sample.group_id] = SampleGroup(sample.group_id, tuple(group[i] for i in sorted(group)))
                self.changed.notify_all()

    async def put_many(self, samples: list[Sample], timeout_s: float = 300.0) -> None:
        """`put` each, in order: one actor call for a group's samples."""
        for sample in samples:
            await self.put(sample, timeout_s)

    def _has_room(self) -> bool:
        return len(self.pending) + len(self.complete) < self.capacity

    async def oldest(self, count: int, trainer_version: int, k: int) -> list[tuple[int, str]]:
        """(version, group id) of up to `count` complete groups usable at `trainer_version`, oldest first;
        unusable ones are dropped now."""
        bound = StalenessBound(k)
        stale = [gid for gid, group in self.complete.items() if not bound.usable(group.version, trainer_version)]
        if stale:
            async with self.changed:
                for gid in stale:
                    del self.complete[gid]
                self.dropped += len(stale)
                self.changed.notify_all()
        return sorted((group.version, gid) for gid, group in self.complete.items())[:count]

    async def claim(self, group_ids: list[str]) -> list[SampleGroup]:
        """Take these groups; ones already taken by another consumer are left out."""
        async with self.changed:
            claimed = [self.complete.pop(gid) for gid in group_ids if gid in self.complete]
            self.taken += len(claimed)
            if claimed:
                self.changed.notify_all()
        return claimed

    async def restore(self, group: SampleGroup) -> None:
        """A group a consumer claimed but could not use (its take timed out) comes back as it was."""
        async with self.changed:
            self.complete[group.group_id] = group
            self.taken -= 1
            self.changed.notify_all()

    async def wait_complete(self, timeout_s: float) -> bool:
        """True as soon as a complete group is here (False after `timeout_s`)."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: bool(self.complete)), timeout_s)
            except asyncio.TimeoutError:
                return False
        return True

    def stats(self) -> ShardStats:
        return ShardStats(
            pending_groups=len(self.pending), complete_groups=len(self.complete), samples_put=self.samples_put,
            groups_taken=self.taken, groups_dropped_stale=self.dropped, put_waits=self.put_waits,
            oldest_version=min((g.version for g in self.complete.values()), default=None))


@dataclass(frozen=True)
class StoreStats:
    shards: tuple[ShardStats, ...]

    def total(self, field: str) -> int:
        return sum(getattr(shard, field) for shard in self.shards)

    @property
    def buffered_groups(self) -> int:
        """Groups put in part or in full and not yet taken or dropped."""
        return self.total("pending_groups") + self.total("complete_groups")


class SampleStore:
    """The client over the shards; picklable (a list of actor handles), so producers and consumers in any
    process share one store."""

    WAIT_SLICE_S = 0.5  # a take re-checks every shard at least this often

    def __init__(self, shards: list) -> None:
        if not shards:
            raise ValueError("a sample store needs at least one shard")
        self.shards = list(shards)

    @classmethod
    def create(cls, num_shards: int = 1, capacity_groups: int = 64) -> SampleStore:
        """`capacity_groups` is per shard."""
        actor = ray.remote(SampleStoreShard).options(num_cpus=0, max_concurrency=1000)
        return cls([actor.remote(capacity_groups) for _ in range(num_shards)])

    def shard_of(self, group_id: str):
        return self.shards[zlib.crc32(group_id.encode()) % len(self.shards)]

    async def put(self, sample: Sample, timeout_s: float = 300.0) -> None:
        await self.shard_of(sample.group_id).put.remote(sample, timeout_s)

    async def put_group(self, samples: list[Sample], timeout_s: float = 300.0) -> None:
        """Samples of one group in one call (a producer that waits for its whole group: one actor call, not G)."""
        if len({sample.group_id for sample in samples}) != 1:
            raise ValueError(f"put_group takes samples of one group, got {sorted({s.group_id for s in samples})}")
        await self.shard_of(samples[0].group_id).put_many.remote(samples, timeout_s)

    async def take(self, count: int, trainer_version: int, k: int, timeout_s: float) -> list[SampleGroup]:
        """`count` complete groups, oldest version first; raises TimeoutError with fewer after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        taken: list[SampleGroup] = []
        while True:
            need = count - len(taken)
            offers = await asyncio.gather(*(s.oldest.remote(need, trainer_version, k) for s in self.shards))
            best = sorted((version, gid, index) for index, offer in enumerate(offers) for version, gid in offer)[:need]
            by_shard: dict[int, list[str]] = {}
            for _, gid, index in best:
                by_shard.setdefault(index, []).append(gid)
            claims = await asyncio.gather(*(self.shards[i].claim.remote(gids) for i, gids in by_shard.items()))
            taken += [group for claim in claims for group in claim]
            if len(taken) >= count:
                return sorted(taken, key=lambda g: g.version)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Nothing is lost: what this take held goes back.
                await asyncio.gather(*(self.shard_of(g.group_id).restore.remote(g) for g in taken))
                raise TimeoutError(f"{len(taken)} of {count} groups complete after {timeout_s:.0f} s")
            waits = [asyncio.ensure_future(s.wait_complete.remote(min(self.WAIT_SLICE_S, remaining)))
                     for s in self.shards]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)

    async def stats(self) -> StoreStats:
        return StoreStats(tuple(await asyncio.gather(*(s.stats.remote() for s in self.shards))))
