"""The `rayfleet` command: bring a fleet up on a Ray cluster, look at it, change it; and the demo."""
