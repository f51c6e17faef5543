"""RL on the fleet: rollouts on the fleet's replicas stream samples to a trainer through a sharded sample store,
with a staleness bound k and versioned weight sync (see docs/rl.md)."""
