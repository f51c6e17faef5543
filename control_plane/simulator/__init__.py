"""A discrete-event fleet simulator that runs rayfleet's own policy objects over calibrated replicas."""
