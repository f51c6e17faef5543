"""RL job metrics through Ray's Prometheus endpoint (`ray.util.metrics`, like the fleet's in
`control_plane/telemetry.py`), tagged by run name."""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from rayfleet.actors.rl.progress import StepRecord

SYNC_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class RLMetrics:
    def __init__(self, run: str) -> None:
        self.tags = {"run": run}
        keys = ("run",)
        self.reward = Gauge("rayfleet_rl_reward", "Mean verifier reward of the last step's rollouts", tag_keys=keys)
        self.samples_per_s = Gauge("rayfleet_rl_samples_per_second", "Samples trained on per second",
                                   tag_keys=keys)
        self.trainer_version = Gauge("rayfleet_rl_trainer_version", "The trainer's weight version", tag_keys=keys)
        self.pool_version = Gauge("rayfleet_rl_rollout_weight_version", "The rollout replicas' (oldest) weight "
                                  "version", tag_keys=keys)
        self.lag = Gauge("rayfleet_rl_version_lag", "Mean trainer-minus-sample version over the last step",
                         tag_keys=keys)
        self.dropped = Counter("rayfleet_rl_dropped_stale_groups_total", "Groups the staleness bound dropped",
                               tag_keys=keys)
        self.sync = Histogram("rayfleet_rl_weight_sync_seconds", "One weight sync of the rollout pool",
                              boundaries=SYNC_BUCKETS_S, tag_keys=keys)
        self._dropped_seen = 0

    def observe_step(self, record: StepRecord) -> None:
        self.reward.set(record.reward_mean, tags=self.tags)
        self.samples_per_s.set(record.samples_per_s, tags=self.tags)
        self.trainer_version.set(record.step, tags=self.tags)
        self.pool_version.set(record.pool_version, tags=self.tags)
        self.lag.set(record.version_lag_mean, tags=self.tags)
        if record.dropped_stale > self._dropped_seen:
            self.dropped.inc(record.dropped_stale - self._dropped_seen, tags=self.tags)
            self._dropped_seen = record.dropped_stale

    def observe_sync(self, seconds: float) -> None:
        self.sync.observe(seconds, tags=self.tags)
