"""FleetController: one named, detached Ray actor that turns a FleetSpec into running replicas.

It reconciles the spec (desired replicas per pool) into LLMReplica actors, health-checks them every
`health.check_period_s`, replaces dead ones, scales pools at runtime, drains replicas before removing them
(no new requests; in-flight ones finish, or move out when a migration policy is active), and runs the
policies on a periodic tick over a FleetSnapshot. Durable state goes to the state store so a restarted
controller re-adopts its replicas (they are named, detached actors).

Ray re-runs only the constructor of a restarted actor, so the constructor itself starts the control loop (as
Ray Serve's own controller does), and nothing in it may fail for good: a state store that cannot be reached
yet is retried by the loop, which re-adopts the replicas it finds by their actor names meanwhile and starts
new ones only once it knows the desired counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import ray

from rayfleet.actors.kv.store import get_or_create_kv_store
from rayfleet.actors.observability import tracing
from rayfleet.actors.observability.logs import configure_actor_logging
from rayfleet.control_plane.controller_api import (
    CONTROLLER_NAME,
    NAMESPACE,
    AuditEntry,
    FleetError,
    replica_actor_name,
)
from rayfleet.actors.replica.protocol import Destination, WeightUpdate
from rayfleet.control_plane.kuberay import CLUSTER_NAME_ENV, KubeRayScaler
from rayfleet.control_plane.spec import FleetSpec, PoolSpec, SpecError, parse_spec
from rayfleet.control_plane.state_store import DurableState
from rayfleet.control_plane.telemetry import FleetMetrics
from rayfleet.policies import registry
from rayfleet.policies.base import (
    FleetSnapshot,
    LabelledOutcome,
    MigrationDecision,
    MigrationRecord,
    PoolRole,
    PoolSnapshot,
    RemembersHistory,
    ReplicaSnapshot,
    ReplicaState,
)

logger = logging.getLogger("rayfleet.controller")
# How often a policy's learned history (RemembersHistory) is written to the state store: the seasonal
# forecast's bins are 30 s, so a restart loses at most about one bin.
POLICY_HISTORY_SAVE_S = 30.0


@dataclass
class ReplicaRecord:
    replica_id: str
    pool: str
    handle: Any
    state: ReplicaState = ReplicaState.STARTING
    created_at: float = field(default_factory=time.time)
    facts: dict[str, Any] = field(default_factory=dict)
    load: Any = None  # the replica's last ReplicaLoad
    last_error: str = ""
    failed_checks: int = 0
    drain_started: float | None = None
    start_task: asyncio.Task | None = None
    readopted: bool = False  # taken back after a controller restart: may already serve requests

    @property
    def still_starting(self) -> bool:
        """Its engine is still being built (a readopted replica may already serve, so it never counts)."""
        return self.start_task is not None and not self.start_task.done() and not self.readopted

    def snapshot(self, pool: PoolSpec) -> ReplicaSnapshot:
        load = self.load
        return ReplicaSnapshot(
            replica_id=self.replica_id,
            pool=self.pool,
            model=pool.model,
            state=self.state,
            num_running=load.num_running if load else 0,
            num_waiting=load.num_waiting if load else 0,
            kv_cache_usage=load.kv_cache_usage if load else 0.0,
            kv_blocks_total=load.kv_blocks_total if load else 0,
            kv_block_size=load.kv_block_size if load else 0,
            tokens_in_flight=load.tokens_in_flight if load else 0,
            predicted_remaining_tokens=load.predicted_remaining_tokens if load else 0,
            decode_tokens_per_s=load.decode_tokens_per_s if load else 0.0,
            requests_started=load.requests_started if load else 0,
            requests=load.requests if load else (),
            node_id=self.facts.get("node_id", ""),
            accelerator=pool.resources.accelerator_type or ("GPU" if pool.resources.num_gpus else "CPU"),
            last_error=self.last_error,
            updated_at=time.time(),
        )


class FleetController:
    async def __init__(self, spec: dict[str, Any]):  # Ray runs an async constructor on the actor's loop
        self.spec: FleetSpec = parse_spec(spec)
        configure_actor_logging(self.spec.log_level)
        tracing.setup_tracing(self.spec.tracing, "controller")
        if self.spec.state_store == "memory://":
            logger.warning("state_store is memory://: a restarted controller re-adopts its replicas but forgets "
                           "runtime scaling, migration history and what its policies learned over time; use Redis to "
                           "keep them")
        self.store = DurableState(self.spec.state_store, self.spec.name)
        self.state_loaded = False  # desired counts read from the store (or it is memory://)
        self.added_pools: list[dict[str, Any]] = []  # pools added at runtime (add_pool), kept in the store
        # Per pool, the verifier scores that came with its promoted weights ({"revision": n, "version": v,
        # "rows": [...]}, kept in the store): ingresses relearn the pool's quality estimates from them.
        self.quality_labels: dict[str, dict[str, Any]] = {}
        self.replicas: dict[str, ReplicaRecord] = {}
        self.desired: dict[str, int] = {p.name: p.start_replicas for p in self.spec.pools}
        self.restarts: dict[str, int] = {}
        self._replacements_due: dict[str, int] = {}  # replicas found dead and not replaced yet, per pool
        self.migrations: list[MigrationRecord] = []
        self.metrics = FleetMetrics()
        self._build_policies()
        self.kuberay = _kuberay_scaler()
        # Created once, here, before any replica: the engines only find it by name (see kv_prefix_store).
        self.kv_store = get_or_create_kv_store(self.spec.kv_store) if self.spec.kv_store is not None else None
        self._loop_task: asyncio.Task | None = None
        self.ticks = 0  # completed control-loop iterations since this process started
        self._readopt()
        await self.run()

    def _build_policies(self) -> None:
        policies = self.spec.policies
        self.scaler = registry.create("scaler", policies.scaler.name, policies.scaler.params)
        self.migration_policy = registry.create("migration", policies.migration.name, policies.migration.params)
        self._policy_state_saved_at = 0.0

    def _policies_with_history(self):
        """(kind, name, policy) of the policies that keep a history across restarts (`RemembersHistory`)."""
        policies = self.spec.policies
        for kind, name, policy in (("scaler", policies.scaler.name, self.scaler),
                                   ("migration", policies.migration.name, self.migration_policy)):
            if isinstance(policy, RemembersHistory):
                yield kind, name, policy

    def _restore_policy_history(self) -> None:
        for kind, name, policy in self._policies_with_history():
            try:
                saved = self.store.get(f"policy_state:{kind}")
                if not saved or saved.get("name") != name:
                    continue  # none kept, or kept by another policy than the spec names now
                policy.load_state_dict(saved["state"])
                logger.info("%s %s: history restored from the state store", kind, name)
            except Exception as error:  # a history that cannot be read or no longer fits is relearned
                logger.warning("%s %s: stored history not usable (%r); relearning it", kind, name, error)

    def _save_policy_history(self, now: float) -> None:
        if now - self._policy_state_saved_at < POLICY_HISTORY_SAVE_S:
            return
        self._policy_state_saved_at = now
        for kind, name, policy in self._policies_with_history():
            self.store.put(f"policy_state:{kind}", {"name": name, "state": policy.state_dict()})

    # ---------------------------------------------------------------- lifecycle
    async def run(self) -> None:
        """Start the reconcile/health/policy loop (idempotent; the constructor already does)."""
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._loop())

    def _load_state(self) -> bool:
        """Once the store answers: the desired counts it holds and the registry's drain states."""
        if self.state_loaded:
            return True
        if not self.store.connect():
            return False
        try:
            stored = self.store.get("desired", {}) or {}
            registry = self.store.get("replicas", {}) or {}
            added = self.store.get("added_pools", []) or []
            self.quality_labels = self.store.get("quality_labels", {}) or {}
        except Exception as error:
            logger.warning("state store read failed (%s); retrying", type(error).__name__)
            return False
        # Pools added at runtime (add_pool) are part of the fleet until removed, across controller restarts.
        self.added_pools, self.spec = added, self._with_pools(added)
        for pool in self.spec.pools:
            self.desired.setdefault(pool.name, pool.start_replicas)
        # The constructor knew only the spec's pools: take back the live replicas of the added ones too, before
        # the first reconcile would start new ones beside them (and leave these running, unmanaged).
        unmanaged = self._readopt()
        if unmanaged:
            logger.warning("replicas of pools this fleet does not have are running, unmanaged: %s (pools added at "
                           "runtime are forgotten on restart with state_store memory://); stop them with ray.kill "
                           "(actors %s<id> in namespace %s)", ", ".join(sorted(unmanaged)),
                           replica_actor_name(""), NAMESPACE)
        self.desired.update({k: v for k, v in stored.items() if k in self.desired})
        for replica_id, info in registry.items():
            record = self.replicas.get(replica_id)
            if record is not None and info.get("state") == ReplicaState.DRAINING.value:
                self._begin_drain(record, reason="draining before the controller restarted")
        self.state_loaded = True
        self.store.put("spec", self.spec.without_secrets().model_dump(mode="json"))
        self.store.put("desired", self.desired)
        self.store.put("added_pools", self.added_pools)
        self._persist_registry()
        self._restore_policy_history()
        logger.info("controller state loaded: desired %s, %d replicas adopted", self.desired, len(self.replicas))
        return True

    async def wait_ready(self, timeout_s: float = 600.0) -> dict[str, int]:
        """Wait until every pool has its desired number of READY replicas."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready = self._count(ReplicaState.READY)
            if all(ready.get(pool, 0) >= want for pool, want in self.desired.items()):
                return ready
            await asyncio.sleep(0.5)
        raise TimeoutError(f"fleet not ready after {timeout_s:.0f} s: {self.status()['replicas']}")

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        await asyncio.gather(*(self._stop(record) for record in list(self.replicas.values())),
                             return_exceptions=True)
        self.store.delete("replicas")

    async def _loop(self) -> None:
        last_policy_tick = 0.0
        while True:
            try:
                self.store.heal(time.time())
                await self._check_health()
                now = time.monotonic()
                if now - last_policy_tick >= self.spec.policies.tick_s:
                    last_policy_tick = now
                    await self._run_policies()
                if self._load_state():  # no new replicas before the desired counts are known
                    self._reconcile()
                await self._progress_drains()
                self.metrics.observe(self.snapshot())
                self.ticks += 1
            except Exception:  # the loop must survive any single bad tick
                logger.exception("controller tick failed")
            await asyncio.sleep(min(self.spec.health.check_period_s, self.spec.policies.tick_s))

    # ---------------------------------------------------------------- reconcile
    def _live(self, pool: str) -> list[ReplicaRecord]:
        return [r for r in self.replicas.values()
                if r.pool == pool and r.state in (ReplicaState.STARTING, ReplicaState.READY)]

    def _count(self, state: ReplicaState) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.replicas.values():
            if record.state is state:
                counts[record.pool] = counts.get(record.pool, 0) + 1
        return counts

    def _reconcile(self) -> None:
        for pool in self.spec.pools:
            live = self._live(pool.name)
            missing = self.desired[pool.name] - len(live)
            for _ in range(max(missing, 0)):
                due = self._replacements_due.get(pool.name, 0)
                self._replacements_due[pool.name] = max(due - 1, 0)
                self._start_replica(pool, "replacement" if due else "scale")
            if missing < 0:
                # Remove the least useful first: still starting, then least tokens in flight.
                def cost(r: ReplicaRecord):
                    return (r.state is ReplicaState.READY, r.load.tokens_in_flight if r.load else 0)
                for record in sorted(live, key=cost)[: -missing]:
                    self._begin_drain(record, reason="scale-down")

    def _start_replica(self, pool: PoolSpec, reason: str) -> ReplicaRecord:
        from rayfleet.actors.replica.llm_replica import LLMReplica

        replica_id = f"{pool.name}-{uuid.uuid4().hex[:6]}"
        resources = pool.resources
        options: dict[str, Any] = dict(
            name=replica_actor_name(replica_id),
            namespace=NAMESPACE,
            lifetime="detached",
            num_cpus=resources.num_cpus,
            num_gpus=resources.num_gpus,
            max_restarts=0,  # the controller replaces dead replicas itself (new id, fresh engine)
            runtime_env=self._runtime_env(pool),
        )
        if resources.accelerator_type:
            options["accelerator_type"] = resources.accelerator_type
        if resources.memory_gb:
            options["memory"] = int(resources.memory_gb * 2**30)
        if resources.custom:
            options["resources"] = dict(resources.custom)
        kv_store = pool.engine_kv_store(self.spec.kv_store)
        handle = ray.remote(LLMReplica).options(**options).remote(
            replica_id, pool.name, pool.model, pool.engine_args, pool.served_model_name, pool.live_migration,
            kv_store=kv_store, kv_store_namespace=pool.kv_store_namespace,
            log_engine_metrics=pool.log_engine_metrics, tracing_config=self.spec.tracing)
        record = ReplicaRecord(replica_id=replica_id, pool=pool.name, handle=handle)
        self.replicas[replica_id] = record
        record.start_task = asyncio.create_task(self._await_start(record))
        self._persist_registry()
        self.metrics.replica_starts.inc(tags={"pool": pool.name, "reason": reason})
        logger.info("starting replica %s of pool %s (%s)", replica_id, pool.name, reason)
        return record

    def _runtime_env(self, pool: PoolSpec) -> dict[str, Any]:
        """The pool's Ray runtime_env, with its `env`, the log level and what vLLM's tracing reads."""
        env_vars = {"RAYFLEET_LOG_LEVEL": self.spec.log_level, **tracing.engine_tracing_env(self.spec.tracing),
                    **pool.runtime_env.get("env_vars", {}), **pool.env}
        return {**pool.runtime_env, "env_vars": env_vars}

    async def _await_start(self, record: ReplicaRecord) -> None:
        try:
            record.facts = await asyncio.wait_for(record.handle.start.remote(),
                                                  timeout=self.spec.health.start_timeout_s)
            if record.state is ReplicaState.STARTING:
                record.state = ReplicaState.READY
                logger.info("replica %s is ready", record.replica_id)
        except Exception as error:
            await self._mark_dead(record, f"start failed: {error}")

    async def _check_health(self) -> None:
        records = [r for r in self.replicas.values() if r.state in (ReplicaState.READY, ReplicaState.DRAINING)]
        results = await asyncio.gather(*(self._probe(record) for record in records), return_exceptions=True)
        for record, result in zip(records, results):
            if isinstance(result, Exception):
                record.failed_checks += 1
                if isinstance(result, ray.exceptions.RayActorError) or record.failed_checks >= 3:
                    await self._mark_dead(record, f"health check failed: {type(result).__name__}: {result}")
            else:
                record.failed_checks = 0
                record.load = result

    async def _probe(self, record: ReplicaRecord):
        timeout = self.spec.health.check_timeout_s
        await asyncio.wait_for(record.handle.check_health.remote(self.spec.health.stall_timeout_s), timeout=timeout)
        return await asyncio.wait_for(record.handle.load.remote(), timeout=timeout)

    async def _mark_dead(self, record: ReplicaRecord, reason: str) -> None:
        if record.state in (ReplicaState.DEAD, ReplicaState.STOPPED):
            return
        was_draining = record.state is ReplicaState.DRAINING
        record.state = ReplicaState.DEAD
        record.last_error = reason
        self.restarts[record.pool] = self.restarts.get(record.pool, 0) + 1
        if not was_draining:
            self._replacements_due[record.pool] = self._replacements_due.get(record.pool, 0) + 1
        self.metrics.replica_failures.inc(tags={"pool": record.pool})
        logger.error("replica %s is dead (%s)%s", record.replica_id, reason,
                     "" if was_draining else "; starting a replacement")
        try:
            ray.kill(record.handle)
        except Exception:  # already gone
            pass
        self.replicas.pop(record.replica_id, None)
        self._persist_registry()
        # The replacement comes from _reconcile: live < desired for this pool now.

    # ---------------------------------------------------------------- scaling and draining
    def scale(self, pool: str, replicas: int, origin: str = "api") -> dict[str, Any]:
        with self._audited("scale", {"pool": pool, "replicas": replicas}, origin) as audit:
            spec = self._pool(pool)
            if not spec.min_replicas <= replicas <= spec.max_replicas:
                raise FleetError(f"scale {pool} to {replicas}: outside [min_replicas={spec.min_replicas}, "
                                 f"max_replicas={spec.max_replicas}] of the spec")
            logger.info("scaling pool %s from %d to %d replicas", pool, self.desired[pool], replicas)
            audit["detail"] = f"desired {self.desired[pool]} -> {replicas}"
            self.desired[pool] = replicas
            self.store.put("desired", self.desired)
            self._reconcile()
        return {"pool": pool, "desired": replicas}

    def add_pool(self, pool: dict[str, Any]) -> dict[str, Any]:
        """Add a pool to the running fleet (e.g. an RL job's rollout pool); its replicas start now."""
        if not self.state_loaded:
            raise FleetError("add_pool: the controller has not read its state store yet; try again")
        if any(p.name == pool.get("name") for p in self.spec.pools):
            raise FleetError(f"add_pool: the fleet already has a pool '{pool.get('name')}'")
        self.spec = self._with_pools([pool])
        self.added_pools = self.added_pools + [pool]
        name = self.spec.pools[-1].name
        self.desired[name] = self.spec.pools[-1].start_replicas
        self.store.put("added_pools", self.added_pools)
        self.store.put("desired", self.desired)
        logger.info("pool %s added with %d replicas", name, self.desired[name])
        self._reconcile()
        return {"pool": name, "desired": self.desired[name]}

    async def remove_pool(self, name: str) -> dict[str, Any]:
        """Stop a pool added with add_pool and forget it."""
        if name not in [p["name"] for p in self.added_pools]:
            raise FleetError(f"remove_pool: '{name}' was not added at runtime (pools from the spec stay)")
        self.spec = self.spec.model_copy(update={"pools": [p for p in self.spec.pools if p.name != name]})
        self.desired.pop(name, None)
        self.added_pools = [p for p in self.added_pools if p["name"] != name]
        self.store.put("added_pools", self.added_pools)
        self.store.put("desired", self.desired)
        records = [r for r in self.replicas.values() if r.pool == name]
        await asyncio.gather(*(self._stop(r) for r in records), return_exceptions=True)
        logger.info("pool %s removed (%d replicas stopped)", name, len(records))
        return {"pool": name, "stopped": len(records)}

    def _with_pools(self, pools: list[dict[str, Any]]) -> FleetSpec:
        if not pools:
            return self.spec
        try:
            return parse_spec({**self.spec.model_dump(), "pools": [*self.spec.model_dump()["pools"], *pools]})
        except SpecError as error:
            raise FleetError(str(error)) from None

    def drain(self, replica_id: str, origin: str = "api") -> dict[str, Any]:
        """Drain one replica and lower its pool's desired count by one (the way to remove a *specific* one)."""
        with self._audited("drain", {"replica_id": replica_id}, origin) as audit:
            record = self.replicas.get(replica_id)
            if record is None:
                raise FleetError(f"unknown replica '{replica_id}'; known: {', '.join(sorted(self.replicas))}")
            pool = self._pool(record.pool)
            self.desired[record.pool] = max(self.desired[record.pool] - 1, pool.min_replicas)
            self.store.put("desired", self.desired)
            self._begin_drain(record, reason=f"drain requested ({origin})")
            audit["detail"] = f"{len(record.load.requests) if record.load else 0} requests to move or finish"
        return {"replica_id": replica_id, "state": record.state.value}

    @contextlib.contextmanager
    def _audited(self, action: str, params: dict[str, Any], origin: str) -> Iterator[dict[str, str]]:
        """Record an operator action in the audit log: refused (a FleetError, re-raised) or done."""
        audit = {"detail": ""}
        try:
            yield audit
        except Exception as error:
            outcome = "refused" if isinstance(error, FleetError) else "failed"
            self._audit(AuditEntry(action, params, origin, outcome, f"{error}"))
            raise
        self._audit(AuditEntry(action, params, origin, "ok", audit["detail"]))

    def _audit(self, entry: AuditEntry) -> None:
        self.store.append("audit", asdict(entry))
        logger.info("audit: %s %s by %s: %s%s", entry.action, entry.params, entry.origin, entry.outcome,
                    f" ({entry.detail})" if entry.detail else "")

    def audit_log(self, count: int = 100) -> list[dict[str, Any]]:
        """The latest operator actions, oldest first."""
        return self.store.tail("audit", count)

    def _begin_drain(self, record: ReplicaRecord, reason: str) -> None:
        if record.state is ReplicaState.DRAINING:
            return
        logger.info("draining replica %s (%s)", record.replica_id, reason)
        record.state = ReplicaState.DRAINING
        record.drain_started = time.monotonic()
        record.handle.set_accepting.remote(False)

    async def _progress_drains(self) -> None:
        for record in [r for r in self.replicas.values() if r.state is ReplicaState.DRAINING]:
            if record.still_starting:
                await self._stop(record)
                continue
            idle = record.load is not None and not record.load.requests
            expired = time.monotonic() - (record.drain_started or 0) > self.spec.health.drain_timeout_s
            if idle or expired:
                if expired and not idle:
                    logger.warning("drain of %s timed out with %d requests left", record.replica_id,
                                   len(record.load.requests) if record.load else -1)
                await self._stop(record)

    async def _stop(self, record: ReplicaRecord) -> None:
        release_pod = record.state is ReplicaState.DRAINING
        if record.still_starting:
            # Nothing to finish gracefully, and a shutdown call would queue behind the engine's build for up to
            # the 30 s below (a pool removed while a replacement starts waited exactly that long).
            record.start_task.cancel()
        else:
            try:
                await asyncio.wait_for(record.handle.shutdown.remote(), timeout=30)
            except Exception:  # dead or stuck: the kill below is what matters
                pass
        try:
            ray.kill(record.handle)
        except Exception:
            pass
        record.state = ReplicaState.STOPPED
        self.replicas.pop(record.replica_id, None)
        self._persist_registry()
        logger.info("replica %s stopped", record.replica_id)
        if release_pod:
            await self._release_pod(record)

    async def _release_pod(self, record: ReplicaRecord) -> None:
        """On KubeRay, hand the drained replica's Pod back: its worker group shrinks by exactly that Pod.

        Without this the Ray autoscaler would remove *some* idle worker after its idle timeout; naming the
        drained Pod in `workersToDelete` removes the one whose requests were already moved or finished.
        """
        pod, group = record.facts.get("pod"), record.facts.get("worker_group")
        if self.kuberay is None or not pod or not group or group == "headgroup":
            return
        if any(r.facts.get("pod") == pod for r in self.replicas.values()):
            return  # another replica still runs on that Pod
        try:
            request = await asyncio.to_thread(self.kuberay.release_pod, group, pod)
            logger.info("released Pod %s: worker group %s down to %d", pod, group, request.replicas)
        except Exception as error:  # the autoscaler still reclaims the idle Pod later
            logger.warning("could not release Pod %s of group %s: %s", pod, group, error)

    # ---------------------------------------------------------------- policies and migration
    async def _run_policies(self) -> None:
        snapshot = self.snapshot()
        for pool, want in self.scaler.desired_replicas(snapshot).items():
            spec = self._pool(pool)
            clamped = min(max(want, spec.min_replicas), spec.max_replicas)
            if clamped != self.desired[pool]:
                logger.info("scaler %s: pool %s %d -> %d", self.spec.policies.scaler.name, pool,
                            self.desired[pool], clamped)
                self.desired[pool] = clamped
                self.store.put("desired", self.desired)
        if self.state_loaded:  # else the history restored from the store would be overwritten by a fresh one
            self._save_policy_history(time.monotonic())
        draining = frozenset(r.replica_id for r in self.replicas.values() if r.state is ReplicaState.DRAINING)
        decisions = self.migration_policy.plan(snapshot, draining)
        if decisions:
            await asyncio.gather(*(self._execute_migration(d) for d in decisions), return_exceptions=True)

    async def migrate(self, request_id: str, src: str, dst: str, mode: str = "precopy",
                      origin: str = "api") -> dict[str, Any]:
        """Live-migrate one running request from replica `src` to replica `dst`."""
        params = {"request_id": request_id, "src": src, "dst": dst, "mode": mode}
        with self._audited("migrate", params, origin) as audit:
            record = await self._execute_migration(MigrationDecision(request_id, src, dst, mode, reason=origin))
            audit["detail"] = f"{record.outcome}: downtime {record.downtime_s * 1e3:.1f} ms, " \
                              f"{record.bytes_moved} bytes{'; ' + record.reason if record.reason else ''}"
        return asdict(record)

    async def promote(self, pool: str, update: WeightUpdate,
                      labels: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Load new weights (e.g. a trained RL version) into every replica of `pool` without downtime, one
        replica at a time: it stops taking requests, its running ones move to the pool's other replicas by live
        migration (those that cannot move finish where they are), it loads the weights through vLLM's
        weight-update API and must then report the new version, and it takes requests again. With one replica
        its requests are only drained: new ones wait in the ingress' replays meanwhile. `labels`: the new
        weights' verifier scores on labelled prompts (`LabelledOutcome` fields); once every replica
        runs the new version, the routers relearn the pool's quality from them."""
        records = [r for r in self.replicas.values() if r.pool == self._pool(pool).name and r.state is ReplicaState.READY]
        if not records:
            raise FleetError(f"promote: pool '{pool}' has no ready replica")
        rows = [asdict(row) for row in self._labelled_outcomes(pool, labels or [])]
        done = []
        for record in records:
            started = time.monotonic()
            await record.handle.set_accepting.remote(False)
            try:
                moved = await self._drain_by_migration(record, [r for r in records if r is not record])
                await record.handle.update_weights.remote(update)
                version = await record.handle.weight_version.remote()
                if version != str(update.version):
                    raise FleetError(f"promote: {record.replica_id} reports version '{version}' after loading "
                                     f"{update.version}")
            finally:
                await record.handle.set_accepting.remote(True)
            done.append({"replica_id": record.replica_id, "migrated": moved, "seconds": time.monotonic() - started})
            logger.info("promoted %s to weight version %d (%d requests migrated out first)", record.replica_id,
                        update.version, moved)
        if rows:
            revision = self.quality_labels.get(pool, {}).get("revision", 0) + 1
            self.quality_labels[pool] = {"revision": revision, "version": update.version, "rows": rows}
            self.store.put("quality_labels", self.quality_labels)
            logger.info("pool %s: %d verifier scores of version %d for the routers", pool, len(rows), update.version)
        return {"pool": pool, "version": update.version, "replicas": done, "quality_labels": len(rows)}

    @staticmethod
    def _labelled_outcomes(pool: str, labels: list[dict[str, Any]]) -> list[LabelledOutcome]:
        outcomes = []
        for number, label in enumerate(labels):
            try:
                outcome = LabelledOutcome(**{"pool": pool, "latency_s": 0.0, **label})
                valid = outcome.pool == pool and 0.0 <= outcome.score <= 1.0
            except TypeError as error:
                raise FleetError(f"promote: labels[{number}]: {error}") from None
            if not valid:
                raise FleetError(f"promote: labels[{number}] must score pool '{pool}' in [0, 1]")
            outcomes.append(outcome)
        return outcomes

    def pool_quality_labels(self, pool: str) -> tuple[int, list[LabelledOutcome]]:
        """The revision of the pool's verifier scores (see `promote`) and the scores."""
        labels = self.quality_labels.get(pool, {"revision": 0, "rows": []})
        return labels["revision"], [LabelledOutcome(**row) for row in labels["rows"]]

    async def _drain_by_migration(self, record: ReplicaRecord, others: list[ReplicaRecord]) -> int:
        """Move `record`'s running requests to the least loaded of `others`; wait until it holds none."""
        deadline = time.monotonic() + self.spec.health.drain_timeout_s
        load = await record.handle.load.remote()
        moved = 0
        for request in load.requests if others else ():
            dst = min(others, key=lambda r: r.load.tokens_in_flight if r.load else 0)
            result = await self._execute_migration(MigrationDecision(request.request_id, record.replica_id,
                                                                     dst.replica_id, reason="promote"))
            moved += result.outcome == "migrated"
        while (await record.handle.load.remote()).requests:
            if time.monotonic() > deadline:
                raise FleetError(f"promote: {record.replica_id} still runs requests after "
                                 f"{self.spec.health.drain_timeout_s:.0f} s")
            await asyncio.sleep(0.1)
        return moved

    async def _execute_migration(self, decision: MigrationDecision) -> MigrationRecord:
        src, dst = self.replicas.get(decision.src), self.replicas.get(decision.dst)
        if src is None or dst is None:
            missing = decision.src if src is None else decision.dst
            raise FleetError(f"migrate: unknown replica '{missing}'")
        if src.pool != dst.pool:  # same architecture is not enough: two fine-tunes must not swap requests
            raise FleetError(f"migrate: {decision.dst} is in pool {dst.pool}, not {src.pool}; a request moves only "
                             "within its pool")
        if dst.state is not ReplicaState.READY:
            raise FleetError(f"migrate: destination {decision.dst} is {dst.state.value}, not ready")
        if decision.mode not in ("precopy", "stop_and_copy"):
            raise FleetError(f"migrate: mode must be 'precopy' or 'stop_and_copy', got '{decision.mode}'")
        migration_id = f"mig-{uuid.uuid4().hex[:8]}"
        destination = Destination(decision.dst, dst.handle, dst.facts.get("node_id", ""),
                                  tuple(dst.facts.get("gpu_uuids", ())))
        try:  # bounded: one stuck migration must not hold up the control loop
            result = await asyncio.wait_for(
                src.handle.migrate_out.remote(decision.request_id, destination, migration_id, decision.mode),
                timeout=self.spec.health.migration_timeout_s)
        except asyncio.TimeoutError:
            raise FleetError(f"migrate: {migration_id} of {decision.request_id} did not finish within "
                             f"{self.spec.health.migration_timeout_s:.0f} s") from None
        record = MigrationRecord(**result)
        self.migrations.append(record)
        del self.migrations[:-500]
        self.store.append("migrations", asdict(record))
        self.metrics.observe_migration(record)
        logger.info("migration %s of %s %s -> %s: %s (downtime %.1f ms, %d blocks)", migration_id,
                    decision.request_id, decision.src, decision.dst, record.outcome,
                    record.downtime_s * 1e3, record.blocks_moved)
        return record

    # ---------------------------------------------------------------- views
    def _pool(self, name: str) -> PoolSpec:
        try:
            return self.spec.pool(name)
        except KeyError:
            raise FleetError(f"unknown pool '{name}'; pools: {', '.join(p.name for p in self.spec.pools)}") from None

    def snapshot(self) -> FleetSnapshot:
        pools = {}
        for pool in self.spec.pools:
            records = [r for r in self.replicas.values() if r.pool == pool.name]
            max_len = next((r.facts.get("max_model_len", 0) for r in records if r.facts), 0)
            pools[pool.name] = PoolSnapshot(
                name=pool.name, model=pool.model, min_replicas=pool.min_replicas,
                max_replicas=pool.max_replicas, desired_replicas=self.desired[pool.name], tags=dict(pool.tags),
                replicas=tuple(r.snapshot(pool) for r in records), max_model_len=max_len,
                role=PoolRole(pool.role), prefill_pool=pool.prefill_pool,
                quality_labels_revision=self.quality_labels.get(pool.name, {}).get("revision", 0))
        return FleetSnapshot(pools=pools, migrations=tuple(self.migrations[-50:]))

    def fleet_view(self) -> tuple[FleetSnapshot, dict[str, Any]]:
        """What an ingress needs to route: the snapshot and the routable replicas' handles."""
        handles = {rid: r.handle for rid, r in self.replicas.items() if r.state is ReplicaState.READY}
        return self.snapshot(), handles

    def get_spec(self) -> dict[str, Any]:
        return self.spec.without_secrets().model_dump(mode="json")

    def status(self, migrations: int = 20) -> dict[str, Any]:
        """Pools, replicas with their load and requests, and the latest `migrations` records."""
        snapshot = self.snapshot()
        replicas = []
        for pool in snapshot.pools.values():
            for r in pool.replicas:
                replicas.append({
                    "replica_id": r.replica_id, "pool": r.pool, "model": r.model, "state": r.state.value,
                    "accelerator": r.accelerator,
                    "running": r.num_running, "waiting": r.num_waiting,
                    "kv_cache_usage": round(r.kv_cache_usage, 4), "tokens_in_flight": r.tokens_in_flight,
                    "decode_tokens_per_s": round(r.decode_tokens_per_s, 1), "node_id": r.node_id[:12],
                    "requests": [q.request_id for q in r.requests],
                    "last_error": r.last_error,
                })
        return {
            "fleet": self.spec.name,
            "pools": {name: {"desired": p.desired_replicas, "min": p.min_replicas, "max": p.max_replicas,
                             "ready": len(p.routable_replicas), "restarts": self.restarts.get(name, 0),
                             "model": p.model, "tags": p.tags}
                      for name, p in snapshot.pools.items()},
            "replicas": replicas,
            "migrations": [asdict(m) for m in self.migrations[-migrations:]],
            "migration_policy": self._migration_policy_state(),
            "controller": {"ticks": self.ticks, "pid": os.getpid(), "state_store_connected": self.store.connected},
        }

    def _migration_policy_state(self) -> dict[str, Any]:
        # `explain` is optional: a plug-in migration policy needs only `plan`.
        explain = getattr(self.migration_policy, "explain", None)
        return {"name": self.spec.policies.migration.name, **(explain() if explain is not None else {})}

    async def kv_store_stats(self) -> list[dict[str, Any]] | None:
        """Each KV store shard's hits, misses and tier usage; None when the fleet has no store."""
        if self.kv_store is None:
            return None
        stats = await asyncio.gather(*(shard.stats.remote() for shard in self.kv_store.shards))
        return [asdict(s) for s in stats]

    # ---------------------------------------------------------------- durability
    def _persist_registry(self) -> None:
        self.store.put("replicas", {rid: {"pool": r.pool, "state": r.state.value}
                                    for rid, r in self.replicas.items()})

    def _readopt(self) -> list[str]:
        """After a controller restart, take back this fleet's live replicas of the pools it knows, found by their
        actor names (Ray knows them whether or not the state store is reachable); those already taken back are
        left as they are. Each becomes ready once it answers a health check; the store's registry later restores
        which ones were draining. Returns the ids of live replicas of pools it does not know."""
        prefix = replica_actor_name("")
        unknown = []
        for actor in ray.util.list_named_actors(all_namespaces=True):
            name = actor["name"]
            if actor["namespace"] != NAMESPACE or not name.startswith(prefix):
                continue
            replica_id = name[len(prefix):]
            pool = replica_id.rsplit("-", 1)[0]
            if pool not in self.desired:
                unknown.append(replica_id)
                continue
            if replica_id in self.replicas:
                continue
            try:
                handle = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:  # gone meanwhile
                continue
            record = ReplicaRecord(replica_id=replica_id, pool=pool, handle=handle, readopted=True)
            self.replicas[replica_id] = record
            record.start_task = asyncio.create_task(self._await_readopted(record))
            logger.info("re-adopting replica %s of pool %s", replica_id, pool)
        return unknown

    async def _await_readopted(self, record: ReplicaRecord) -> None:
        """A re-adopted replica is ready when its engine answers (it may still have been starting)."""
        deadline = time.monotonic() + self.spec.health.start_timeout_s
        while True:
            try:
                await asyncio.wait_for(record.handle.check_health.remote(), self.spec.health.check_timeout_s)
                record.facts = await record.handle.engine_facts.remote()
                break
            except ray.exceptions.RayActorError as error:
                await self._mark_dead(record, f"lost while the controller restarted: {type(error).__name__}")
                return
            except Exception as error:
                if time.monotonic() > deadline:
                    await self._mark_dead(record, f"not ready after re-adoption: {type(error).__name__}")
                    return
                await asyncio.sleep(1.0)
        if record.state is ReplicaState.STARTING:
            record.state = ReplicaState.READY
            logger.info("re-adopted replica %s is ready", record.replica_id)


def _kuberay_scaler():
    """The RayCluster's scaler when running in a Pod of the rayfleet chart, else None."""
    if not os.environ.get(CLUSTER_NAME_ENV):
        return None
    try:
        return KubeRayScaler.in_cluster()
    except Exception as error:
        logger.warning("running on KubeRay but cannot reach the Kubernetes API (%s); drained Pods are left "
                       "to the Ray autoscaler", error)
        return None


def get_or_create_controller(spec: FleetSpec):
    """The fleet's controller actor: found by name, or created detached and started."""
    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        pass
    handle = ray.remote(FleetController).options(
        name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", num_cpus=0,
        max_restarts=-1, max_task_retries=0, get_if_exists=True,
    ).remote(spec.model_dump())
    ray.get(handle.run.remote())
    return handle
