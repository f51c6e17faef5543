"""Two costs of moving a request's KV between replicas: pre-copy downtime with and without writing pre-copied
blocks ahead into the destination, and the prefill-to-decode handoff of disaggregation.

Two LLMReplica actors (real vLLM CPU engines, rayfleet's KV connector, prefix caching on: write-ahead keeps the
blocks it writes in the destination's prefix cache) serve the migration model of `bench_migration_downtime.py`
(~88 M parameters, float32, 16 KiB of KV per token).

- **write-ahead**: one greedy request per length runs on A and is migrated to B with pre-copy after 8 output
  tokens (`LLMReplica.migrate_out`, what the controller calls), once with `MigrationLimits.write_ahead` on and once
  off (order alternating per round). `--background N` requests decode on B meanwhile, so B's steps are busy, as in
  the loaded runs where the scatter inside the pause showed (852 ms at 2,048 tokens, docs/benchmarks-migration.md).
  The record's downtime is A's last token to B's first.
- **handoff**: the same request prefilled on A with a handoff to B at its first token (a stop-and-copy migration,
  `GenerateCall.handoff_to`), against the request served by A alone (colocated): client-side TTFT, the gap
  between the first and the second token (where the handoff sits), and the mean gap over the rest.

    python benchmarks/bench_handoff.py --rounds 2          # ~8 min on 2 cores; run alone (heavy lock)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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

RESULTS = REPO / "benchmarks" / "results" / "handoff.json"
DOC = REPO / "docs" / "benchmarks-handoff.md"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,1024,2048,4096", help="prompt lengths in tokens")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--background", type=int, default=6, help="requests decoding on B during write-ahead runs")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--kv-gib", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    return args


def start_replicas(model_dir: Path, args: argparse.Namespace, max_model_len: int):
    import ray

    from rayfleet.actors.replica.llm_replica import LLMReplica
    from rayfleet.actors.replica.protocol import Destination

    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_gib), "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
    engine = {**migration_engine_args(max_model_len), "enable_prefix_caching": True}
    handles = [ray.remote(LLMReplica).options(num_cpus=1, runtime_env={"env_vars": env}).remote(
        name, "bench", str(model_dir), engine) for name in ("handoff-a", "handoff-b")]
    facts = ray.get([h.start.remote() for h in handles])
    return [Destination(f["replica_id"], h, f["node_id"]) for h, f in zip(handles, facts)]


def set_write_ahead(replica, on: bool) -> None:
    import ray

    def apply(self, on):
        self.migration_limits = dataclasses.replace(self.migration_limits, write_ahead=on)

    ray.get(replica.__ray_call__.remote(apply, on))


def call_of(prompt: list[int], max_tokens: int, handoff=None):
    from vllm import SamplingParams

    from rayfleet.actors.replica.protocol import GenerateCall

    return GenerateCall(request_id=f"bench-{uuid.uuid4().hex[:8]}", prompt_token_ids=prompt, handoff_to=handoff,
                        sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


async def token_times(replica, call) -> list[float]:
    """Arrival time of every token of `call` started on `replica`, across a handoff (the ledger's path)."""
    from rayfleet.control_plane.serving.ledger import Placement, TokenLedger, follow
    from rayfleet.control_plane.serving.replica_streams import ReplicaStreams

    async def nowhere(_call, _exclude):
        raise RuntimeError("replayed")

    began = time.perf_counter()
    times: list[float] = []
    ledger = TokenLedger(call=call, placement=Placement(replica.replica_id, replica.handle))
    async for choice in follow(ledger, nowhere, ReplicaStreams(), max_replays=0):
        times += [time.perf_counter() - began] * len(choice.token_ids or [])
    return times


async def background_load(replica, count: int, rng: random.Random) -> list:
    """`count` long requests decoding on `replica`; `stop_load` ends them. Their streams must be cancelled in Ray
    (which aborts the requests): cancelling only the local task that reads a stream leaves the request decoding
    on the replica, and in the run of 2026-12-02 the leftovers piled up until every resume on B timed out."""
    async def drain(stream):
        async for ref in stream:
            await ref

    streams = [replica.handle.generate.options(num_returns="streaming").remote(
        call_of([rng.randrange(10, 500) for _ in range(512)], 4000)) for _ in range(count)]
    tasks = [asyncio.ensure_future(drain(stream)) for stream in streams]
    await asyncio.sleep(2.0)  # all prefilled and decoding
    return list(zip(streams, tasks))


async def stop_load(load: list) -> None:
    import ray

    for stream, task in load:
        ray.cancel(stream)
        task.cancel()
    await asyncio.gather(*(task for _, task in load), return_exceptions=True)


async def write_ahead_run(a, b, length: int, on: bool, args, rng: random.Random) -> dict[str, Any]:
    set_write_ahead(a.handle, on)
    load = await background_load(b, args.background, rng)
    try:
        call = call_of([rng.randrange(10, 500) for _ in range(length)], args.max_tokens)
        migration = None
        tokens = 0
        async for ref in a.handle.generate.options(num_returns="streaming").remote(call):
            chunk = await ref
            if chunk.handoff is not None:
                async for more in chunk.handoff.replica.attach.options(num_returns="streaming").remote(call.request_id):
                    await more
                break
            tokens += sum(len(c.token_ids or []) for c in chunk.choices)
            if tokens >= 8 and migration is None:
                migration = asyncio.ensure_future(a.handle.migrate_out.remote(
                    call.request_id, b, f"mig-{uuid.uuid4().hex[:8]}", "precopy"))
        record = await migration
    finally:
        await stop_load(load)
    return {"length": length, "write_ahead": on, **{k: record[k] for k in (
        "outcome", "stages", "blocks_moved", "downtime_s", "total_s")}}


async def handoff_run(a, b, length: int, args, rng: random.Random) -> dict[str, Any]:
    # Fresh prompts of the same length for both (prefill costs the same; no prefix-cache hit either way).
    colocated = await token_times(a, call_of([rng.randrange(10, 500) for _ in range(length)], args.max_tokens))
    handed = await token_times(a, call_of([rng.randrange(10, 500) for _ in range(length)], args.max_tokens,
                                          handoff=b))
    record = [r for r in await a.handle.handoff_records.remote()][-1]
    gaps = lambda t: statistics.mean(y - x for x, y in zip(t[1:], t[2:]))  # noqa: E731 - after the second token
    return {"length": length, "colocated_ttft_s": colocated[0], "colocated_first_gap_s": colocated[1] - colocated[0],
            "colocated_gap_s": gaps(colocated), "pd_ttft_s": handed[0], "pd_first_gap_s": handed[1] - handed[0],
            "pd_gap_s": gaps(handed), "outcome": record["outcome"], "downtime_s": record["downtime_s"],
            "blocks_moved": record["blocks_moved"], "recomputed_tokens": record["recomputed_tokens"]}


async def measure(replicas, args) -> dict[str, list[dict[str, Any]]]:
    a, b = replicas
    rng = random.Random(args.seed)
    write_ahead, handoff = [], []
    for length in args.lengths:
        for round_ in range(args.rounds):
            for on in ((True, False) if round_ % 2 == 0 else (False, True)):
                row = await write_ahead_run(a, b, length, on, args, rng)
                write_ahead.append(row)
                say(f"{length:>5} tokens write-ahead {'on ' if on else 'off'}: {row['outcome']}, downtime "
                    f"{row['downtime_s'] * 1e3:.0f} ms, {row['stages']} stages")
            row = await handoff_run(a, b, length, args, rng)
            handoff.append(row)
            say(f"{length:>5} tokens handoff: {row['outcome']}, 1st->2nd token {row['pd_first_gap_s'] * 1e3:.0f} ms "
                f"(colocated {row['colocated_first_gap_s'] * 1e3:.0f} ms), downtime {row['downtime_s'] * 1e3:.0f} ms")
    return {"write_ahead": write_ahead, "handoff": handoff}


def markdown(rows: dict[str, list[dict[str, Any]]]) -> str:
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    lines = ["Pre-copy downtime (ms, median) with B decoding background requests:", "",
             "| tokens | write-ahead off | write-ahead on | on / off |", "| ---: | ---: | ---: | ---: |"]
    for length in sorted({r["length"] for r in rows["write_ahead"]}):
        mine = [r for r in rows["write_ahead"] if r["length"] == length and r["outcome"] == "migrated"]
        off = [r["downtime_s"] for r in mine if not r["write_ahead"]]
        on = [r["downtime_s"] for r in mine if r["write_ahead"]]
        if off and on:
            lines.append(f"| {length} | {med(off):.0f} | {med(on):.0f} | {med(on) / med(off):.2f} |")
    lines += ["", "Prefill/decode handoff at the first token against the same request served by one replica "
              "(ms, median):", "",
              "| tokens | TTFT colocated / P/D | 1st->2nd token colocated / P/D | handoff cost | handoff pause | "
              "later gaps colocated / P/D | blocks moved | tokens recomputed |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for length in sorted({r["length"] for r in rows["handoff"]}):
        mine = [r for r in rows["handoff"] if r["length"] == length and r["outcome"] == "migrated"]
        if not mine:
            continue
        pick = lambda k: med([r[k] for r in mine])  # noqa: E731
        lines.append(f"| {length} | {pick('colocated_ttft_s'):.0f} / {pick('pd_ttft_s'):.0f} | "
                     f"{pick('colocated_first_gap_s'):.0f} / {pick('pd_first_gap_s'):.0f} | "
                     f"{pick('pd_first_gap_s') - pick('colocated_first_gap_s'):.0f} | {pick('downtime_s'):.0f} | "
                     f"{pick('colocated_gap_s'):.1f} / {pick('pd_gap_s'):.1f} | "
                     f"{statistics.median(r['blocks_moved'] for r in mine):.0f} | "
                     f"{statistics.median(r['recomputed_tokens'] for r in mine):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = " ".join(["python benchmarks/bench_handoff.py", *argv])
    load_before = os.getloadavg()
    from rayfleet.control_plane.cli.demo_models import build_demo_model

    model_dir = build_demo_model(migration_model_config(), DEMO_MODELS)
    ensure_ray()
    replicas = start_replicas(model_dir, args, max(args.lengths) + 4000 + 64)
    try:
        rows = asyncio.run(measure(replicas, args))
    finally:
        import ray

        for replica in replicas:
            ray.get(replica.handle.shutdown.remote())
            ray.kill(replica.handle)
    table = markdown(rows)
    print("\n" + table + "\n", flush=True)
    load_after = os.getloadavg()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "command": command,
            "machine": f"{platform.machine()}, {os.cpu_count()}-core CPU", "load_before": load_before,
            "load_after": load_after}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, **rows}, indent=1))
    header = (f"Generated by `{command}` on {meta['date']} ({meta['machine']}, load average {load_before[0]:.2f} "
              f"before, {load_after[0]:.2f} after). Raw numbers: `{args.out.relative_to(REPO)}`.\n\n")
    text = args.doc.read_text() if args.doc.exists() else ""
    begin, end = "<!-- bench_handoff:begin -->", "<!-- bench_handoff:end -->"
    block = f"{begin}\n{header}{table}\n{end}"
    args.doc.write_text(text.split(begin)[0] + block + text.split(end, 1)[1] if begin in text else text + "\n" + block + "\n")
    say(f"wrote {args.out} and {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
