"""The metrics the Grafana dashboards query exist: scraped from Ray's metrics endpoint of a running fleet.

The fleet is driven through every path a panel shows (requests to each pool and to `auto`, a live
migration, a replay, a repeated prompt for vLLM's prefix cache, a KV store with hits on both tiers, a
miss and evictions), then Ray's Prometheus endpoint is scraped until every series name each panel's
PromQL uses is there.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import ray

from test_live_migration import mig_pool, replica_handle, where  # noqa: F401 (mig_pool is a fixture)

GRAFANA = Path(__file__).resolve().parents[1] / "dashboards" / "grafana"
SOURCES = [Path(__file__).resolve().parents[1] / path for path in
           ("control_plane/telemetry.py", "actors/kv/store_metrics.py")]
# PromQL words that are not series: functions, aggregations, grouping and set operators.
PROMQL_WORDS = {"sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "scalar",
                "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "topk",
                "bottomk", "clamp_min", "clamp_max", "abs", "delta", "deriv", "offset"}
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def promql_series(expr: str) -> set[str]:
    """The series names a PromQL expression reads."""
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", expr)  # grouping label lists
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)  # matchers, ranges, strings
    return {word for word in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr) if word not in PROMQL_WORDS}


def panel_series() -> dict[str, set[str]]:
    """Every Grafana panel (by dashboard file and title) with the series its queries read."""
    panels = {}
    for path in sorted(GRAFANA.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            if panel["type"] != "row":
                panels[f"{path.name}: {panel['title']}"] = set().union(
                    *(promql_series(target["expr"]) for target in panel["targets"]))
    return panels


def scraped_series(port: int) -> set[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and line[0] != "#"}


def test_every_panel_queries_series_rayfleet_or_vllm_exports():
    """Static check: rayfleet's series are declared in its telemetry code, vLLM's carry Ray's prefix."""
    declared = "\n".join(path.read_text() for path in SOURCES)
    panels = panel_series()
    assert len(panels) >= 20
    for title, series in panels.items():
        assert series, f"{title}: no series"
        for name in series:
            assert name.startswith(("ray_rayfleet_", "ray_vllm_")), f"{title}: {name} lacks Ray's ray_ prefix"
            if name.startswith("ray_rayfleet_"):
                base = re.sub(r"_(bucket|count|sum)$", "", name.removeprefix("ray_"))
                assert f'"{base}"' in declared, f"{title}: {base} is declared nowhere in rayfleet"


def test_promql_series_reads_names_not_labels_or_functions():
    expr = ('sum by (tier) (rate(ray_a_total{tier="x"}[5m])) / scalar(sum(rate(ray_b_total[1m])) + '
            'histogram_quantile(0.99, sum by (le, pool) (rate(ray_c_bucket[5m]))))')
    assert promql_series(expr) == {"ray_a_total", "ray_b_total", "ray_c_bucket"}


async def drive_every_path(fleet, async_client, mig_pool, tmp_path):  # noqa: F811
    """Traffic through each thing a panel shows; returns the KV store to shut down afterwards."""
    long_prompt = "Describe live migration of a running request. " * 12  # > 2 KV blocks: a prefix-cache hit
    for model in ("tiny-a", "tiny-b", "auto", "tiny-a"):
        await async_client.chat.completions.create(model=model, messages=[{"role": "user", "content": long_prompt}],
                                                   max_tokens=8, **GREEDY)
    async for _ in await async_client.chat.completions.create(
            model="tiny-b", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True, **GREEDY):
        pass

    # A replay: the replica least_load prefers when both are idle stops accepting; of two requests one
    # lands on it and is replayed on the other.
    preferred = min(mig_pool)
    await replica_handle(preferred).set_accepting.remote(False)
    try:
        await asyncio.gather(*(async_client.chat.completions.create(
            model="mig", messages=[{"role": "user", "content": "hello"}], max_tokens=4, **GREEDY) for _ in range(2)))
    finally:
        await replica_handle(preferred).set_accepting.remote(True)

    # A live migration mid-stream.
    stream = await async_client.chat.completions.create(
        model="mig", messages=[{"role": "user", "content": "Tell a long story."}], max_tokens=200, stream=True,
        **GREEDY)
    records, chunks = [], 0
    async for chunk in stream:
        chunks += 1
        if chunks == 10:
            src = await asyncio.to_thread(where, fleet, chunk.id)
            dst = next(r for r in mig_pool if r != src)
            records.append(await fleet.controller.migrate.remote(chunk.id, src, dst, "precopy"))
    assert [r["outcome"] for r in records] == ["migrated"], records

    return await asyncio.to_thread(kv_store_with_hits_misses_and_evictions, tmp_path)


def kv_store_with_hits_misses_and_evictions(disk_dir: Path):
    """A small store of its own: memory hits, disk hits, a miss, memory evictions spilled to disk."""
    from rayfleet.actors.kv.block_hash import block_hashes
    from rayfleet.actors.kv.store import get_or_create_kv_store
    from rayfleet.actors.kv.store_config import KVStoreConfig

    store = get_or_create_kv_store(KVStoreConfig(name=f"metrics-{uuid.uuid4().hex[:8]}", memory_bytes=2048,
                                                 disk_dir=disk_dir, disk_bytes=1 << 20))
    hashes = block_hashes(range(16), 4, "metrics")  # four blocks of 1 KiB: two spill to disk
    store.put(hashes, [np.full(1024, i, dtype=np.uint8) for i in range(4)])
    assert all(block is not None for block in store.get(hashes))  # memory and disk hits
    assert store.get(block_hashes(range(100, 104), 4, "metrics")) == [None]  # a miss
    return store


@pytest.mark.engines
async def test_every_series_a_grafana_panel_queries_exists_on_a_running_fleet(
        fleet, async_client, mig_pool, tmp_path):  # noqa: F811 (mig_pool: a fixture)
    store = await drive_every_path(fleet, async_client, mig_pool, tmp_path)
    try:
        port = ray._private.worker.global_worker.node.metrics_export_port
        wanted = panel_series()
        deadline = time.monotonic() + 60  # Ray's processes report their metrics to the node's agent periodically
        while True:
            exported = await asyncio.to_thread(scraped_series, port)
            missing = {title: sorted(series - exported) for title, series in wanted.items() if series - exported}
            if not missing or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
        assert not missing, f"panels querying series Ray does not export: {missing}"
    finally:
        await asyncio.to_thread(store.shutdown)
