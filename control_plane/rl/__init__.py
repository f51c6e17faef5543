"""The RL job on the fleet: its configuration, its view of the rollout pool, its loops (job.py), its metrics.
Run it with `python -m rayfleet.control_plane.rl --config CONFIG` (a Ray job)."""
