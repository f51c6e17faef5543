"""The rollout pool as the RL job sees it: the fleet's replicas of one pool, their weight versions, and the
transport that runs a rollout on them through the token ledger.

Membership comes from the FleetController (`fleet_view`): replicas it replaces after a failure join here, and
take a rollout only once the job has synced them (a fresh engine's weights are the checkpoint on disk, not the
trainer's). Each rollout is one engine request followed by `serving.ledger.follow`, the same code that keeps a
client's stream whole: a replica that dies mid-generation costs a replay of prompt + tokens so far elsewhere
(a seeded rollout continues from a seed derived from its own: its tokens stay samples of the policy, with
their logprobs, where a client's seeded request would be refused a continuation that differs).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from rayfleet.actors.replica.protocol import GenerateCall
from rayfleet.actors.rl.rollout import Completion, label_versions
from rayfleet.control_plane.serving.ledger import Placement, TokenLedger, follow
from rayfleet.control_plane.serving.replica_streams import ReplicaStreams
from rayfleet.policies.base import NoReplicaAvailable

logger = logging.getLogger("rayfleet.rl.pool")


class RolloutPool:
    def __init__(self, controller, pool: str, max_replays: int = 2, place_timeout_s: float = 120.0) -> None:
        self.controller = controller
        self.pool = pool
        self.max_replays = max_replays
        self.place_timeout_s = place_timeout_s
        self.handles: dict[str, Any] = {}  # READY replicas of the pool, by id
        self.versions: dict[str, int] = {}  # replicas the job has synced: their weight version
        self.in_flight: dict[str, int] = {}
        self.replays = 0
        self.changed = asyncio.Event()  # membership or versions changed
        self.streams = ReplicaStreams()  # one multiplexed stream per replica, as the ingress reads them

    async def refresh(self) -> None:
        snapshot, handles = await self.controller.fleet_view.remote()
        pool = snapshot.pools.get(self.pool)
        if pool is None:
            raise ValueError(f"the fleet has no pool '{self.pool}' (pools: {', '.join(snapshot.pools)}); add a pool "
                             "with `rollout: true` to the fleet spec")
        ready = {r.replica_id: handles[r.replica_id] for r in pool.routable_replicas if r.replica_id in handles}
        if ready.keys() != self.handles.keys():
            gone = self.handles.keys() - ready.keys()
            for replica_id in gone:
                self.versions.pop(replica_id, None)
            self.handles = ready
            self.changed.set()

    async def wait_ready(self, replicas: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            await self.refresh()
            if len(self.handles) >= replicas:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"rollout pool '{self.pool}' has {len(self.handles)} of {replicas} replicas "
                                   f"ready after {timeout_s:.0f} s")
            await asyncio.sleep(0.5)

    def unsynced(self, version: int) -> dict[str, Any]:
        """Replicas not on `version` (new ones included)."""
        return {rid: h for rid, h in self.handles.items() if self.versions.get(rid) != version}

    def mark_synced(self, replica_ids, version: int) -> None:
        for replica_id in replica_ids:
            if replica_id in self.handles:
                self.versions[replica_id] = version
        self.changed.set()

    def forget(self, replica_ids) -> None:
        """Replicas found dead: no rollout goes there, even before the controller notices."""
        for replica_id in replica_ids:
            self.handles.pop(replica_id, None)
            self.versions.pop(replica_id, None)
        self.changed.set()

    @property
    def version(self) -> int:
        """The oldest weights among the synced replicas (-1 before the first sync)."""
        return min(self.versions.values(), default=-1)

    # ------------------------------------------------------------------ the transport (RolloutTransport)
    async def place(self, call: GenerateCall, exclude: frozenset[str], version_floor: int) -> Placement:
        """The synced replica (at least `version_floor`) with the fewest of this job's rollouts in flight; waits
        (bounded) for one, e.g. for the controller's replacement of a lost replica."""
        deadline = time.monotonic() + self.place_timeout_s
        while True:
            candidates = [rid for rid, v in self.versions.items() if v >= version_floor and rid not in exclude]
            if candidates:
                chosen = min(candidates, key=lambda rid: self.in_flight.get(rid, 0))
                self.in_flight[chosen] = self.in_flight.get(chosen, 0) + 1
                return Placement(chosen, self.handles[chosen])
            if time.monotonic() > deadline:
                raise NoReplicaAvailable(f"no synced replica of pool '{self.pool}' for {call.request_id} after "
                                         f"{self.place_timeout_s:.0f} s (excluded: {sorted(exclude)})")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), 1.0)
            except asyncio.TimeoutError:
                await self.refresh()

    async def complete(self, call: GenerateCall, version_floor: int) -> Completion:
        ledger = TokenLedger(call, reseed_replays=True)  # a lost replica costs a replay, not the sample

        async def place(replay: GenerateCall, exclude: frozenset[str]) -> Placement:
            return await self.place(replay, exclude, version_floor)

        tokens: list[int] = []
        logprobs: list[float] = []
        segments: list[tuple[int, list]] = []  # (first token, the engine's version spans) per engine request
        hops, segment_start, finish_reason = 0, 0, None
        try:
            async for choice in follow(ledger, place, self.streams, self.max_replays):
                if len(ledger.hops) != hops:  # a new engine request (replay): its spans count from here
                    hops, segment_start = len(ledger.hops), len(tokens)
                tokens += choice.token_ids or []
                logprobs += [entry.logprob for entry in (choice.logprobs.content or [])] if choice.logprobs else []
                if choice.weight_versions:
                    segments.append((segment_start, choice.weight_versions))
                finish_reason = choice.finish_reason or finish_reason
        finally:
            if ledger.placement is not None:
                self.in_flight[ledger.placement.replica_id] -= 1
        self.replays += ledger.replays
        if len(logprobs) != len(tokens):
            raise RuntimeError(f"rollout {call.request_id}: {len(tokens)} tokens but {len(logprobs)} logprobs (a "
                               "rollout pool must not live-migrate requests)")
        return Completion(token_ids=tuple(tokens), logprobs=tuple(logprobs),
                          token_versions=tuple(label_versions(len(tokens), segments, version_floor)),
                          finish_reason=finish_reason or "stop", replays=ledger.replays)
