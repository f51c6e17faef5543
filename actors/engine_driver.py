"""How an engine process joins the fleet's Ray cluster to reach its actors and objects.

vLLM's engine core and workers are children of a replica's Ray worker, not Ray workers themselves. Two of
rayfleet's engine plugins need Ray inside them: the KV store connector (the store's shard actors) and the
object-store weight transfer of rollout pools (the trainer's arrays). They join as Ray drivers.

A driver starts Ray's `ray_listen_error_messages` thread, which long-polls the GCS for error messages to print.
In an engine process on Ray 2.60 that long poll does not wait: measured on 2026-12-05 with two rollout engines
after their first weight sync, the GCS answered 847,423 polls in six minutes (1.3 ms each, its
`ObservabilityPubSubService.GcsSubscriberPoll` counter), and the GCS (58% of a core) and each engine worker
(21%) spent about one of the machine's two cores on it, for the engine's whole life, whether it decoded or idled.
A plain driver on the same cluster waits as it should (cause in Ray's pubsub not found). An engine prints
nothing to a terminal, so the thread has no use there: it is stopped right after the join, the way
`ray.shutdown` stops it, leaving the connection up.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("rayfleet.engine_driver")


def join_cluster(address: str, namespace: str) -> None:
    """Connect this engine process to the cluster at `address` (once) without Ray's error-printing thread."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="WARNING")
    stop_error_listener()


def stop_error_listener() -> None:
    from ray._private import worker as ray_worker

    driver = ray_worker.global_worker
    thread = getattr(driver, "listener_thread", None)
    subscriber = getattr(driver, "gcs_error_subscriber", None)
    if thread is None or subscriber is None:
        logger.warning("Ray's driver changed shape: its error listener is left running in this engine process")
        return
    # The thread checks the event between polls; closing the subscriber ends the poll it is in.
    driver.threads_stopped.set()
    subscriber.close()
    thread.join(timeout=10)
    driver.threads_stopped.clear()
    if thread.is_alive():
        logger.warning("Ray's error listener did not stop in this engine process")
