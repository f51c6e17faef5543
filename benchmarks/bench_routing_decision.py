"""Micro-benchmark: one chimera routing decision (excluding the embedding call) on a 16-replica snapshot.

    python benchmarks/bench_routing_decision.py [--decisions 5000]

The router holds the committed routing table (every row a kNN neighbour candidate), the snapshot has 16 ready
replicas over the 3 task pools with decode backlogs, and each request carries a real MiniLM embedding of a
task question. The goal (issue 16): p99 under 2 ms. `least_load` on the same snapshot is the reference.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from rayfleet.actors.tasks import TRAINED_MODELS_DIR, generate
from rayfleet.policies.base import FleetSnapshot, PoolSnapshot, ReplicaSnapshot, ReplicaState, RequestInfo
from rayfleet.policies.chimera import ChimeraRouter
from rayfleet.policies.routing import LeastLoadRouter

POOLS = {"task-small": 6, "task-large": 6, "task-string": 4}


def snapshot() -> FleetSnapshot:
    pools = {}
    for pool, count in POOLS.items():
        replicas = tuple(ReplicaSnapshot(replica_id=f"{pool}-{i}", pool=pool, model=pool, state=ReplicaState.READY,
                                         predicted_remaining_tokens=100 * i, tokens_in_flight=300 * i,
                                         decode_tokens_per_s=400.0, accelerator="CPU",
                                         node_id=f"node-{i % 4}")  # chimera sums each node's CPU replicas
                         for i in range(count))
        pools[pool] = PoolSnapshot(name=pool, model=pool, min_replicas=1, max_replicas=8, desired_replicas=count,
                                   replicas=replicas)
    return FleetSnapshot(pools=pools)


def time_router(router, requests: list[RequestInfo], snap: FleetSnapshot) -> list[float]:
    for request in requests[:200]:  # warm-up
        router.route(request, snap)
    times = []
    for request in requests:
        started = time.perf_counter()
        router.route(request, snap)
        times.append(time.perf_counter() - started)
    return sorted(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decisions", type=int, default=5000)
    args = parser.parse_args(argv)
    from rayfleet.actors.embedding.embedder import PromptEncoder

    print("load before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    embed = PromptEncoder()
    chimera = ChimeraRouter(table=str(TRAINED_MODELS_DIR / "routing-table.jsonl"), latency_weight=0.5)
    chimera.fit_table(embed.encode(chimera.table_prompts()))
    tasks = [t for f in ("chain_sum", "products", "spell_backward")
             for t in generate(f, "hard", seed=1_500_000_000, count=100)]
    vectors = embed.encode([t.prompt for t in tasks])
    requests = [RequestInfo(request_id=f"r{i}", pool=None, prompt_tokens=30, max_tokens=16,
                            embedding=tuple(vectors[i % len(tasks)])) for i in range(args.decisions)]
    snap = snapshot()
    print(f"{len(snap.routable_replicas())} replicas, {len(chimera.rows)} table rows, {args.decisions} decisions")
    results = {name: time_router(router, requests, snap)
               for name, router in (("chimera", chimera), ("least_load", LeastLoadRouter()))}
    for name, times in results.items():
        p50, p99 = statistics.median(times), times[int(0.99 * len(times))]
        print(f"{name:<11} p50 {1e3 * p50:.3f} ms  p99 {1e3 * p99:.3f} ms  max {1e3 * times[-1]:.3f} ms")
    ratio = statistics.median(results["chimera"]) / statistics.median(results["least_load"])
    p99 = results["chimera"][int(0.99 * len(results["chimera"]))]
    print(f"chimera / least_load p50: {ratio:.1f}x; goal p99 < 2 ms: {'met' if p99 < 2e-3 else 'MISSED'}")
    print("load after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
