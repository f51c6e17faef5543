"""KV transfer rate of live migration: GB/s of KV moved per migration, against a memory-copy ceiling.

Two LLMReplica actors (real vLLM CPU engines with rayfleet's KV connector) serve the migration model of
`bench_migration_downtime.py` (~88 M parameters, float32, 16 KiB of KV per token). For each prompt length and
mode, one request (greedy, EOS ignored) runs on replica A; after `--at` output tokens A migrates it to B
(`LLMReplica.migrate_out`, the call the controller makes). Each migration's record gives the bytes moved,
its total time and the downtime (A's last token to B's first). The rates:

- `transfer GB/s` = bytes moved / total migration time (every stage, control round trips included);
- `pause GB/s` (stop-and-copy) = bytes moved / downtime: everything moves inside the pause there;
- `data path GB/s` = bytes moved / (seconds the source engine spent in the gather + seconds the destination
  spent in the scatter), from the connector's `export_s` / `load_s` counters: the bytes' own time, without
  the control round trips (RPCs that wait for an engine step, the stop, the resume's first step).

The ceiling is measured in the same run, in this process: a single-threaded copy of a buffer as large as the
longest request's KV (`torch.Tensor.copy_`, one core, bytes copied per second). A migration moves each byte
with at least two such copies (gather out of the source cache, scatter into the destination's), so 50% of the
ceiling is the best a copy-based path can reach.

    python benchmarks/bench_migration_transfer.py                         # 256..4096 tokens, 2 rounds
    python benchmarks/bench_migration_transfer.py --lengths 256,4096 --rounds 1 --label after
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_migration_downtime import migration_engine_args, migration_model_config  # noqa: E402
from contenders import DEMO_MODELS, REPO, ensure_ray  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "migration_transfer.json"
MODES = ("stop_and_copy", "precopy")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="256,1024,2048,4096", help="prompt lengths in tokens")
    parser.add_argument("--rounds", type=int, default=2, help="migrations per length and mode")
    parser.add_argument("--at", type=int, default=8, help="output tokens before the migration starts")
    parser.add_argument("--max-tokens", type=int, default=48, help="output tokens per request")
    parser.add_argument("--kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE per replica, GiB")
    parser.add_argument("--label", default="current", help="name of this run in the results file (e.g. before, after)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON; runs are kept by --label")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    return args


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def memcpy_ceiling(nbytes: int, repeats: int = 5) -> float:
    """Bytes per second of a one-thread copy of `nbytes` (best of `repeats`, pages touched first)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    finally:
        torch.set_num_threads(threads)
    return nbytes / best


def _timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def start_replicas(model_dir: Path, args: argparse.Namespace, max_model_len: int) -> list[Any]:
    """Two LLMReplica actors, as `Destination`s (id, handle, node) for `migrate_out`."""
    import ray

    from rayfleet.actors.replica.live_migration import Destination
    from rayfleet.actors.replica.llm_replica import LLMReplica

    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_gib), "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
    replicas = []
    for name in ("bench-a", "bench-b"):
        handle = ray.remote(LLMReplica).options(num_cpus=1, runtime_env={"env_vars": env}).remote(
            name, "bench", str(model_dir), migration_engine_args(max_model_len))
        replicas.append((name, handle))
    facts = ray.get([handle.start.remote() for _, handle in replicas])
    return [Destination(name, handle, fact["node_id"], tuple(fact["gpu_uuids"]))
            for (name, handle), fact in zip(replicas, facts)]


async def migrate_once(src, dst, prompt: list[int], mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one request on `src`, migrate it to `dst` (a `Destination`) after `args.at` tokens, read the rest there."""
    from vllm import SamplingParams

    from rayfleet.actors.replica.protocol import GenerateCall

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    call = GenerateCall(request_id=f"bench-{uuid.uuid4().hex[:8]}", prompt_token_ids=prompt, sampling_params=params)
    tokens = 0
    reached = asyncio.Event()
    handoff = None
    async for ref in src.generate.options(num_returns="streaming").remote(call):
        chunk = await ref
        if chunk.handoff is not None:
            handoff = chunk.handoff
            break
        tokens += sum(len(c.token_ids or []) for c in chunk.choices)
        if tokens >= args.at and not reached.is_set():
            reached.set()
            migration = asyncio.ensure_future(
                src.migrate_out.remote(call.request_id, dst, f"mig-{uuid.uuid4().hex[:8]}", mode))
    record = await migration
    if handoff is not None:
        async for ref in handoff.replica.attach.options(num_returns="streaming").remote(call.request_id):
            await ref
    return record


async def data_path_seconds(src, dst) -> float:
    """Seconds the source's engine spent gathering exports plus the destination's spent scattering loads
    (the connector's `export_s` / `load_s` counters): the time the bytes themselves took to move."""
    src_stats, dst_stats = await src.handle.kv_stats.remote(), await dst.handle.kv_stats.remote()
    return src_stats["export_s"] + dst_stats["load_s"]


async def sweep(replicas, args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    rows = []
    for length in args.lengths:
        for round_ in range(args.rounds):
            for mode in (MODES if round_ % 2 == 0 else MODES[::-1]):
                src, dst = replicas if len(rows) % 2 == 0 else replicas[::-1]
                prompt = [rng.randrange(10, 500) for _ in range(length)]
                before = await data_path_seconds(src, dst)
                record = await migrate_once(src.handle, dst, prompt, mode, args)
                row = {"length": length, "mode": mode, "round": round_, **{k: record[k] for k in (
                    "outcome", "stages", "blocks_moved", "bytes_moved", "downtime_s", "total_s")},
                       "copy_s": await data_path_seconds(src, dst) - before}
                rows.append(row)
                say(f"{length:>5} tokens {mode:<14} {row['outcome']:<10} {row['bytes_moved'] / 2**20:7.1f} MiB "
                    f"in {row['total_s'] * 1e3:7.0f} ms (downtime {row['downtime_s'] * 1e3:6.0f} ms)")
    return rows


def summarize(rows: list[dict[str, Any]], ceiling: float) -> list[dict[str, Any]]:
    summary = []
    for length in sorted({r["length"] for r in rows}):
        for mode in MODES:
            done = [r for r in rows if r["length"] == length and r["mode"] == mode and r["outcome"] == "migrated"]
            if not done:
                continue
            rate = statistics.median(r["bytes_moved"] / r["total_s"] for r in done)
            pause_rate = statistics.median(r["bytes_moved"] / r["downtime_s"] for r in done if r["downtime_s"] > 0)
            copy_rate = statistics.median(r["bytes_moved"] / r["copy_s"] for r in done if r.get("copy_s"))
            summary.append({"length": length, "mode": mode, "migrations": len(done),
                            "copy_ms": statistics.median(r.get("copy_s", 0.0) for r in done) * 1e3,
                            "copy_gbps": copy_rate / 1e9, "copy_of_ceiling": copy_rate / ceiling,
                            "mib": statistics.median(r["bytes_moved"] for r in done) / 2**20,
                            "total_ms": statistics.median(r["total_s"] for r in done) * 1e3,
                            "downtime_ms": statistics.median(r["downtime_s"] for r in done) * 1e3,
                            "transfer_gbps": rate / 1e9, "pause_gbps": pause_rate / 1e9,
                            "of_ceiling": rate / ceiling})
    return summary


def markdown(summary: list[dict[str, Any]], ceiling: float) -> str:
    lines = [f"memcpy ceiling (one thread, this run): {ceiling / 1e9:.2f} GB/s", "",
             "| tokens | mode | MiB moved | migration ms | downtime ms | transfer GB/s | of ceiling | pause GB/s "
             "| gather+scatter ms | data path GB/s | of ceiling |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in summary:
        lines.append(f"| {s['length']} | {s['mode']} | {s['mib']:.1f} | {s['total_ms']:.0f} | {s['downtime_ms']:.0f} "
                     f"| {s['transfer_gbps']:.3f} | {100 * s['of_ceiling']:.1f}% | {s['pause_gbps']:.3f} "
                     f"| {s.get('copy_ms', float('nan')):.1f} | {s.get('copy_gbps', float('nan')):.2f} "
                     f"| {100 * s.get('copy_of_ceiling', float('nan')):.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = " ".join(["python benchmarks/bench_migration_transfer.py", *argv])
    say(command)
    load_before = os.getloadavg()
    from rayfleet.control_plane.cli.demo_models import build_demo_model

    model_dir = build_demo_model(migration_model_config(), DEMO_MODELS)
    max_model_len = max(args.lengths) + args.max_tokens + 64
    ensure_ray()
    say(f"starting 2 replicas of {model_dir.name}")
    replicas = start_replicas(model_dir, args, max_model_len)
    try:
        rows = asyncio.run(sweep(replicas, args))
    finally:
        import ray

        for replica in replicas:
            ray.get(replica.handle.shutdown.remote())
    ceiling = memcpy_ceiling(max(r["bytes_moved"] for r in rows))
    summary = summarize(rows, ceiling)
    table = markdown(summary, ceiling)
    print("\n" + table + "\n", flush=True)
    load_after = os.getloadavg()
    saved = json.loads(args.out.read_text()) if args.out.exists() else {}
    saved[args.label] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()}-core CPU", "load_before": load_before,
        "load_after": load_after, "ceiling_bytes_per_s": ceiling, "rows": rows, "summary": summary, "table": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(saved, indent=1))
    say(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
