"""Versioned weight sync from the trainer to rollout replicas, through Ray's object store.

The trainer publishes each version once: its parameters as numpy arrays in one object (`ray.put` by the trainer,
which owns it: a trainer that dies takes its versions along, and the job's restart republishes from the
checkpoint), and the object's ref in the `WeightStore` actor under the version number. A sync asks each replica to load a version (`LLMReplica.update_weights`, vLLM's
weight-update API with rayfleet's object-store backend, `weight_transfer.py`); the engine's worker reads the
arrays straight from the object store. Each call is bounded; a replica that fails, times out or reports another
version afterwards fails the sync with a `WeightSyncError` naming it (the RL job retries, then stops).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import ray

from rayfleet.actors.replica.protocol import WeightUpdate, WeightUpdateResult

WEIGHT_STORE_NAME = "rayfleet-rl-weights"


class WeightSyncError(RuntimeError):
    """A replica did not end up on the version it was asked to load."""


class WeightStore:
    """A Ray actor: version -> the object ref of that version's arrays; the newest `keep` versions stay."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.refs: dict[int, list] = {}

    def put(self, version: int, ref: list) -> None:
        """`ref` is `[ObjectRef]`: wrapped, so that Ray passes the reference instead of the arrays."""
        self.refs[version] = ref
        for old in sorted(self.refs)[: -self.keep]:
            del self.refs[old]

    def get(self, version: int) -> list:
        if version not in self.refs:
            raise KeyError(f"weight version {version} is not published (have {sorted(self.refs)})")
        return self.refs[version]

    def latest(self) -> int | None:
        return max(self.refs, default=None)


def get_or_create_weight_store(name: str = WEIGHT_STORE_NAME, namespace: str | None = None):
    return ray.remote(WeightStore).options(name=name, namespace=namespace, get_if_exists=True, num_cpus=0,
                                           lifetime="detached").remote()


def publish(store, version: int, arrays: dict[str, Any]) -> None:
    """Put one version's arrays into the object store and name it in the weight store."""
    ref = ray.put(arrays)
    ray.get(store.put.remote(version, [ref]))


@dataclass(frozen=True)
class SyncReport:
    version: int
    seconds: float  # the slowest replica's whole update, as the caller waited for it
    paused_s: float  # the longest generation pause
    interrupted: int  # requests running across the replicas when they paused
    replicas: tuple[str, ...]  # now on `version`
    lost: tuple[str, ...] = ()  # died before or during the update: gone, not failed (the controller replaces them)


class WeightSync:
    """Pushes published versions to replicas and checks that each one took it."""

    def __init__(self, store_name: str, namespace: str, interrupt: str = "keep", timeout_s: float = 60.0):
        if interrupt not in ("keep", "abort"):
            raise ValueError(f"interrupt must be 'keep' or 'abort', got '{interrupt}'")
        self.store_name = store_name
        self.namespace = namespace
        self.interrupt = interrupt
        self.timeout_s = timeout_s

    def update_for(self, version: int) -> WeightUpdate:
        init_info = {"ray_address": ray.get_runtime_context().gcs_address, "namespace": self.namespace}
        return WeightUpdate(version=version, update_info={"store": self.store_name, "version": version},
                            init_info=init_info, interrupt=self.interrupt, timeout_s=self.timeout_s)

    async def push(self, replicas: dict[str, Any], version: int) -> SyncReport:
        """Load `version` on every replica in `replicas` (id -> actor handle) at once."""
        update = self.update_for(version)
        started = time.monotonic()
        results = await asyncio.gather(*(self._one(rid, handle, update) for rid, handle in replicas.items()),
                                       return_exceptions=True)
        lost = [rid for rid, result in zip(replicas, results) if isinstance(result, ray.exceptions.RayActorError)]
        failures = [f"{rid}: {result}" for rid, result in zip(replicas, results)
                    if isinstance(result, Exception) and rid not in lost]
        if failures:
            raise WeightSyncError(f"sync to weight version {version} failed on {len(failures)} of {len(replicas)} "
                                  f"replicas: " + "; ".join(failures))
        done = [result for result in results if not isinstance(result, Exception)]
        return SyncReport(version=version, seconds=time.monotonic() - started,
                          paused_s=max((r.paused_s for r in done), default=0.0),
                          interrupted=sum(r.interrupted for r in done),
                          replicas=tuple(rid for rid in replicas if rid not in lost), lost=tuple(lost))

    async def _one(self, replica_id: str, handle, update: WeightUpdate) -> WeightUpdateResult:
        # The replica bounds each step by the update's timeout; this bound covers a replica that never answers.
        margin = 5.0
        try:
            result = await asyncio.wait_for(handle.update_weights.remote(update), update.timeout_s + margin)
            reported = await asyncio.wait_for(handle.weight_version.remote(), margin)
        except asyncio.TimeoutError:
            raise WeightSyncError(f"no answer within {update.timeout_s + margin:.0f} s") from None
        except ray.exceptions.RayTaskError as error:
            raise WeightSyncError(str(error.cause)) from None
        if reported != str(update.version):
            raise WeightSyncError(f"reports weight version '{reported}' after loading {update.version}")
        return result
