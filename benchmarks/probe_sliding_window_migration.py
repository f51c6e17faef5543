"""Live migration of a request on a pool whose model has sliding-window layers, checked token by token.

    python benchmarks/probe_sliding_window_migration.py --model MODEL_DIR [--prompt-tokens 900] [--max-tokens 96]

Gemma 3 (e.g. the 270M generalist `examples/convert_gemma_generalist.py` writes) interleaves sliding-window
attention layers (a 512-token window) with full-attention ones. vLLM allocates such models in two KV cache groups
only under its hybrid KV cache manager, which it turns off on the CPU platform and whenever the configured KV
connector does not declare hybrid support (rayfleet's does not): every layer then gets a block for every token,
as a full-attention layer would. This probe shows what live migration does on such a pool: a 2-replica pool, one
greedy streamed request whose prompt is longer than the window, migrated twice mid-stream (pre-copy, then
stop-and-copy), against the same request without migration. It prints whether the two texts agree and each
migration's record (stages, bytes moved, tokens the destination recomputed, downtime).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_migration_downtime import fleet_for, say, where  # noqa: E402
from contenders import SERVED_NAME, ensure_ray, warm_up  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model folder (Gemma 3 or another with "
                                                                   "sliding-window layers)")
    parser.add_argument("--prompt-tokens", type=int, default=900, help="prompt length; above the window")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--first-at", type=int, default=16, help="streamed tokens before the pre-copy migration")
    parser.add_argument("--second-at", type=int, default=48,
                        help="streamed tokens before the stop-and-copy migration back")
    parser.add_argument("--kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE per replica, GiB")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/rayfleet-sliding-window"))
    return parser.parse_args(argv)


async def migrated_text(fleet, client, prompt: list[int], args: argparse.Namespace) -> tuple[str, list[dict]]:
    """The streamed text of one greedy request, migrated with pre-copy after `first_at` chunks and back with
    stop-and-copy after `second_at`."""
    stream = await client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=args.max_tokens,
                                             stream=True, temperature=0, extra_body={"ignore_eos": True})
    records, pieces, request_id = [], [], None
    async for chunk in stream:
        request_id = request_id or chunk.id
        pieces += [choice.text for choice in chunk.choices]
        if len(records) < 2 and len(pieces) == (args.first_at, args.second_at)[len(records)]:
            src = records[-1]["dst"] if records else await asyncio.to_thread(where, fleet, request_id)
            dst = next(r for r in fleet.replica_ids() if r != src)
            records.append(await fleet.controller.migrate.remote(request_id, src, dst,
                                                                 ("precopy", "stop_and_copy")[len(records)]))
    return "".join(pieces), records


async def compare(fleet, args: argparse.Namespace) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{fleet.base_url}/v1", api_key="none")
    rng = random.Random(0)
    prompt = [rng.randrange(1000, 200_000) for _ in range(args.prompt_tokens)]
    text, records = await migrated_text(fleet, client, prompt, args)
    reference = await client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=args.max_tokens,
                                                temperature=0, extra_body={"ignore_eos": True})
    expected = reference.choices[0].text
    return {"prompt_tokens": args.prompt_tokens, "output_tokens": reference.usage.completion_tokens,
            "identical": text == expected,
            "first_difference": next((i for i, (a, b) in enumerate(zip(text, expected)) if a != b), None),
            "migrations": records}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    ensure_ray()
    fleet = fleet_for(args.model, args, max_model_len=2048, log_dir=args.log_dir)
    say(f"starting a fleet of 2 replicas of {args.model.name}")
    fleet.start()
    try:
        warm_up(fleet.base_url, requests=2)
        report = asyncio.run(compare(fleet, args))
    finally:
        fleet.stop()
    print(json.dumps(report, indent=1))
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
