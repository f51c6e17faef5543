"""What every Ray process of a fleet sets up the same way: its logging and its tracing.

The ingress, the controller and the replicas all import this (it sits below both layers that need it:
actors never import the control plane)."""
