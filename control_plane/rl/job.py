"""The RL job: GRPO on the fleet's rollout pool, rollouts streaming into a trainer under a staleness bound k.

    rayfleet up examples/rl/fleet.yaml
    ray job submit --working-dir . -- python -m rayfleet.control_plane.rl --config examples/rl/products.yaml

(the Helm chart's RayJob runs the same module with `--fleet`, on a cluster of its own). Four loops run at once:
- **rollouts** (`actors/rl/rollout.py`): start a group whenever the gate admits it, G samples each on the pool's
  replicas through the token ledger, each sample into the sample store as soon as it is scored;
- **trainer** (`actors/rl/trainer.py`, a Ray actor): takes micro-batches as groups complete, steps, publishes
  each version to the weight store;
- **weight sync**: pushes published versions to the replicas when the sync policy says so (eager: at once;
  deferred: when the staleness bound would otherwise stall rollouts), and syncs replicas the controller adds;
- **the gate** (`StalenessGate`): the staleness bound's admission (`policies.rl`), so rollouts never run more
  than k steps ahead and never start on weights that would be stale when their turn comes.
Progress goes to `rayfleet status` (the RL progress actor), Prometheus (`telemetry.py`) and a progress bar.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray

from rayfleet.actors.rl.progress import StepRecord, progress_actor
from rayfleet.actors.rl.rollout import RolloutDriver, TaskStream, held_out, render_prompt
from rayfleet.actors.rl.sample_store import SampleStore
from rayfleet.actors.rl.trainer import StepReport, TrainerActor
from rayfleet.actors.rl.weight_sync import WeightSync, WeightSyncError, get_or_create_weight_store
from rayfleet.actors.tasks import TaskInstance, score
from rayfleet.control_plane.rl.config import RLConfig
from rayfleet.control_plane.rl.rollout_pool import RolloutPool
from rayfleet.control_plane.rl.telemetry import RLMetrics
from rayfleet.policies import registry
from rayfleet.policies.rl import Admission, StalenessBound

logger = logging.getLogger("rayfleet.rl.job")

STEP_TIMEOUT_S = 600.0  # a step that waits this long for complete groups means rollouts are stuck


class StalenessGate:
    """Admission of new rollout groups (the job's side of `policies.rl.StalenessBound.admit`)."""

    def __init__(self, bound: StalenessBound, groups_per_step: int, pool: RolloutPool, store: SampleStore,
                 start_version: int) -> None:
        self.bound, self.groups_per_step, self.pool, self.store = bound, groups_per_step, pool, store
        self.start_version = self.trainer_version = start_version
        self.started = 0
        self.dropped = 0  # groups the store dropped as stale (refreshed from its counters)
        self.needed_version = start_version  # the oldest weights the next group may start on
        self.blocked: Admission | None = None
        self.blocked_s = {Admission.AHEAD: 0.0, Admission.STALE_WEIGHTS: 0.0}
        self.wake = asyncio.Event()
        self.stale_weights = asyncio.Event()  # the sync loop's cue under the deferred policy

    def next_step(self) -> int:
        # Groups started and neither trained on in finished steps nor dropped are taken in the current step or
        # still ahead of it.
        ahead = self.started - self.dropped - (self.trainer_version - self.start_version) * self.groups_per_step
        return self.bound.next_group_step(self.trainer_version, 0, ahead, self.groups_per_step)

    async def admit(self) -> int:
        while True:
            step = self.next_step()
            self.needed_version = step - self.bound.k
            decision = self.bound.admit(step, self.trainer_version, self.pool.version)
            if decision is Admission.START:
                self.started += 1
                self.blocked = None
                return self.pool.version
            self.blocked = decision
            if decision is Admission.STALE_WEIGHTS:
                self.stale_weights.set()
            waited = time.monotonic()
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), 0.25)
            except asyncio.TimeoutError:
                self.dropped = (await self.store.stats()).total("groups_dropped_stale")
            self.blocked_s[decision] += time.monotonic() - waited

    def version_floor(self) -> int:
        return self.pool.version

    def group_done(self) -> None:
        self.wake.set()

    def on_step(self, version: int, dropped: int) -> None:
        self.trainer_version, self.dropped = version, dropped
        self.wake.set()

    def on_sync(self) -> None:
        self.wake.set()


@dataclass
class RunResult:
    name: str
    staleness_bound: int
    sync_policy: str
    interrupt: str
    start_version: int
    steps: list[StepRecord] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)  # held-out reward per evaluated version
    wall_s: float = 0.0
    samples: int = 0
    samples_per_s: float = 0.0
    sync_s: float = 0.0
    syncs: int = 0
    trainer_wait_s: float = 0.0
    trainer_compute_s: float = 0.0
    rollout_blocked_ahead_s: float = 0.0
    rollout_blocked_stale_weights_s: float = 0.0
    dropped_stale: int = 0
    replays: int = 0
    resubmits: int = 0
    groups_started: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class RLJob:
    def __init__(self, config: RLConfig, controller, run_id: str | None = None, show_progress: bool = True):
        self.config = config
        self.controller = controller
        self.run_id = run_id or f"{config.name}-{uuid.uuid4().hex[:6]}"
        self.show_progress = show_progress
        self.bound = StalenessBound(config.staleness_bound)
        self.sync_policy = registry.create("weight_sync", config.weight_sync.policy)
        self.pool = RolloutPool(controller, config.rollout_pool, max_replays=config.max_replays)
        self.metrics = RLMetrics(self.run_id)
        self.progress = progress_actor()
        self.published = 0
        self.sync_s = 0.0
        self.syncs = 0
        self.new_version = asyncio.Event()

    async def run(self) -> RunResult:
        from transformers import AutoTokenizer

        config = self.config
        store = SampleStore.create(config.store.shards, config.store.capacity_groups)
        weight_store_name = f"rayfleet-rl-weights-{self.run_id}"
        weight_store = get_or_create_weight_store(weight_store_name, namespace="rayfleet")
        trainer = ray.remote(TrainerActor).options(num_cpus=config.trainer.num_cpus).remote(
            config.model, config.trainer, config.checkpoint.dir)
        try:
            state = await trainer.state.remote()
            start = state["version"]
            result = RunResult(config.name, config.staleness_bound, config.weight_sync.policy,
                               config.weight_sync.interrupt, start)
            self.published = await trainer.publish.remote(weight_store)
            await trainer.snapshot.remote()
            sync = WeightSync(weight_store_name, "rayfleet", config.weight_sync.interrupt, config.weight_sync.timeout_s)
            await self.pool.wait_ready(1, timeout_s=600)
            await self._sync(sync, self.pool.unsynced(self.published))  # every replica onto the trainer's weights
            gate = StalenessGate(self.bound, config.groups_per_step, self.pool, store, start)
            tokenizer = AutoTokenizer.from_pretrained(config.model)
            cells = {(f, d): w for f, d, w in config.tasks.cells}
            tasks = TaskStream(cells, config.tasks.seed, start=state["extra"].get("task_cursor", 0))
            driver = RolloutDriver(self.pool, store, tokenizer, tasks, gate, config.group_size,
                                   config.sampling.temperature, config.sampling.max_tokens, seed=config.tasks.seed,
                                   run_id=self.run_id)
            self.progress.start.remote({"name": config.name, "run_id": self.run_id, "k": config.staleness_bound,
                                        "sync": config.weight_sync.policy, "pool": config.rollout_pool,
                                        "steps": config.steps, "start_version": start})
            stop = asyncio.Event()
            started = time.monotonic()
            loops = [asyncio.create_task(driver.run(stop)), asyncio.create_task(self._sync_loop(sync, gate, stop))]
            try:
                await self._train(trainer, weight_store, store, gate, driver, loops, result, started)
            finally:
                stop.set()
                await asyncio.gather(*loops, return_exceptions=True)
            result.wall_s = time.monotonic() - started
            stats = await store.stats()
            result.dropped_stale = stats.total("groups_dropped_stale")
            result.samples_per_s = result.samples / result.wall_s if result.wall_s else 0.0
            result.sync_s, result.syncs = self.sync_s, self.syncs
            result.rollout_blocked_ahead_s = gate.blocked_s[Admission.AHEAD]
            result.rollout_blocked_stale_weights_s = gate.blocked_s[Admission.STALE_WEIGHTS]
            result.replays, result.resubmits = driver.counters.replays, driver.counters.resubmits
            result.groups_started = driver.counters.groups_started
            result.curve, final_scores = await self._evaluate(trainer, tokenizer, cells, result)
            if config.promote_to:
                # The held-out verifier scores of the promoted version teach the routers its quality.
                labels = [{"prompt": instance.prompt, "score": reward, "output_tokens": tokens,
                           "query_id": instance.key}
                          for instance, reward, tokens in final_scores]
                promoted = await self.controller.promote.remote(config.promote_to, sync.update_for(self.published),
                                                                labels)
                logger.info("version %d promoted to pool %s: %s", self.published, config.promote_to, promoted)
            self.progress.finish.remote("finished", wall_s=round(result.wall_s, 1),
                                        samples_per_s=round(result.samples_per_s, 2),
                                        heldout_reward=[round(p["reward"], 3) for p in result.curve])
            return result
        except BaseException as error:
            self.progress.finish.remote("failed", error=f"{type(error).__name__}: {error}")
            raise
        finally:
            for actor in [trainer, weight_store, *store.shards]:
                ray.kill(actor)

    async def _train(self, trainer, weight_store, store, gate, driver, loops, result: RunResult, started) -> None:
        from tqdm import tqdm

        config = self.config
        samples = 0
        bar = tqdm(total=config.steps, initial=result.start_version, desc=f"RL {config.name} (k={self.bound.k})",
                   unit="step", disable=not self.show_progress)
        for _ in range(result.start_version, config.steps):
            step = asyncio.ensure_future(trainer.step.remote(store, config.groups_per_step, self.bound.k,
                                                             STEP_TIMEOUT_S))
            await asyncio.wait([step, *loops], return_when=asyncio.FIRST_COMPLETED)
            for loop in loops:  # a rollout or sync loop that ended early ended in an error: surface it
                if loop.done() and not step.done():
                    step.cancel()
                    loop.result()
                    raise RuntimeError("a rollout loop stopped before the run's end")
            if driver.failures:
                raise RuntimeError(f"{len(driver.failures)} rollout groups failed; first: {driver.failures[0]!r}")
            report: StepReport = await step
            self.published = await trainer.publish.remote(weight_store)
            self.new_version.set()
            dropped = (await store.stats()).total("groups_dropped_stale")
            gate.on_step(report.version, dropped)
            samples += report.samples
            result.samples = samples
            result.trainer_wait_s += report.wait_s
            result.trainer_compute_s += report.compute_s
            elapsed = time.monotonic() - started
            record = StepRecord(
                step=report.version, elapsed_s=round(elapsed, 3), reward_mean=report.reward_mean,
                samples_per_s=samples / elapsed, version_lag_mean=report.version_lag_mean,
                version_lag_max=report.version_lag_max, dropped_stale=dropped, pool_version=self.pool.version,
                sync_s=round(self.sync_s, 4), wait_s=round(report.wait_s, 4), compute_s=round(report.compute_s, 4),
                replays=driver.counters.replays, resubmits=driver.counters.resubmits)
            result.steps.append(record)
            self.progress.record.remote(record)
            self.metrics.observe_step(record)
            bar.update(1)
            bar.set_postfix(reward=f"{report.reward_mean:.2f}", lag=f"{report.version_lag_mean:.1f}",
                            sps=f"{record.samples_per_s:.1f}", dropped=dropped, pool_v=self.pool.version)
            logger.info("step %d: reward %.3f, %.1f samples/s, lag %.2f (max %d), %d dropped stale, rollout "
                        "weights v%d, sync %.2f s total, trainer wait %.2f s compute %.2f s", report.version,
                        report.reward_mean, record.samples_per_s, report.version_lag_mean, report.version_lag_max,
                        dropped, self.pool.version, self.sync_s, report.wait_s, report.compute_s)
            if report.version % config.eval.every_steps == 0 or report.version == config.steps:
                await trainer.snapshot.remote()
            if config.checkpoint.dir and (report.version % config.checkpoint.every_steps == 0
                                          or report.version == config.steps):
                await trainer.save_checkpoint.remote({"task_cursor": driver.tasks.position}, dropped)
        bar.close()

    async def _sync_loop(self, sync: WeightSync, gate: StalenessGate, stop: asyncio.Event) -> None:
        """Keeps replicas on the weights the policy wants; new replicas are synced before they get rollouts."""
        while not stop.is_set():
            cues = [asyncio.ensure_future(e.wait()) for e in (self.new_version, gate.stale_weights, stop)]
            await asyncio.wait(cues, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            for cue in cues:
                cue.cancel()
            self.new_version.clear()
            gate.stale_weights.clear()
            if stop.is_set():
                return
            await self.pool.refresh()
            due = {rid: handle for rid, handle in self.pool.handles.items()
                   if self.sync_policy.should_sync(self.pool.versions.get(rid, -1), self.published,
                                                   gate.needed_version)}
            if due:
                await self._sync(sync, due)
                gate.on_sync()

    async def _sync(self, sync: WeightSync, replicas: dict[str, Any]) -> None:
        version = self.published
        for attempt in range(self.config.weight_sync.retries + 1):
            try:
                report = await sync.push(replicas, version)
                break
            except WeightSyncError as error:
                if attempt == self.config.weight_sync.retries:
                    raise
                logger.warning("weight sync attempt %d failed, retrying: %s", attempt + 1, error)
        self.pool.mark_synced(report.replicas, version)
        if report.lost:
            logger.warning("replicas %s died during the sync to v%d; their replacements sync before rollouts",
                           list(report.lost), version)
            self.pool.forget(report.lost)
        self.sync_s += report.seconds
        self.syncs += 1
        self.metrics.observe_sync(report.seconds)
        logger.debug("synced %s to v%d in %.3f s (paused %.3f s, %d requests interrupted)", list(replicas),
                     version, report.seconds, report.paused_s, report.interrupted)

    async def _evaluate(self, trainer, tokenizer, cells, result: RunResult
                        ) -> tuple[list[dict[str, float]], list[tuple[TaskInstance, float, int]]]:
        """Held-out reward of each snapshot version, greedy and (with `eval.samples`) sampled as the rollouts
        sample (after the run, so evaluation costs it nothing); and the final version's greedy score and length
        per held-out instance."""
        instances = held_out(cells, self.config.eval.seed, self.config.eval.count)
        prompts = [render_prompt(tokenizer, instance) for instance in instances]
        elapsed = {r.step: r.elapsed_s for r in result.steps}
        elapsed[result.start_version] = 0.0
        curve, final_scores = [], []
        sampling = self.config.sampling

        def reward(instance, tokens) -> float:
            return score(instance, tokenizer.decode(tokens, skip_special_tokens=True))
        for version in sorted(await trainer.snapshot_versions.remote()):
            greedy, sampled = await trainer.evaluate.remote(version, prompts, sampling.max_tokens,
                                                            self.config.eval.samples, sampling.temperature)
            point = {"version": version, "elapsed_s": elapsed.get(version, float("nan")),
                     "reward": sum(map(reward, instances, greedy)) / len(instances)}
            if sampled:
                point["sampled_reward"] = sum(reward(i, t) for i, ts in zip(instances, sampled) for t in ts) / sum(
                    map(len, sampled))
            curve.append(point)
            if version == self.published:
                final_scores = [(i, reward(i, t), len(t)) for i, t in zip(instances, greedy)]
            logger.info("held-out reward at v%d: greedy %.3f, sampled %s", version, point["reward"],
                        f"{point['sampled_reward']:.3f}" if sampled else "-")
        return curve, final_scores


def write_result(result: RunResult, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"rl-{result.name}-k{result.staleness_bound}.json"
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return path
