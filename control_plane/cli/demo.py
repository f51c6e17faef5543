"""The quick-start job: a local Ray, the demo fleet, a sample workload through the official `openai` client.

It prints each request's pool, token count, time to first token and latency, the fleet's status, and the
endpoint URL, then takes the fleet down (or keeps serving with --keep-serving).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from dataclasses import dataclass

from rayfleet.control_plane.cli.launch import (
    LOCAL_LOGICAL_CPUS,
    connect,
    controller,
    deploy,
    ensure_demo_models,
    load_any_spec,
    render_status,
)

logger = logging.getLogger("rayfleet.demo")

PROMPTS = [
    "Explain gradient descent in one sentence.",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Why does a fleet need a router?",
    "Describe live migration of a running request.",
    "List three uses of a KV cache store.",
]


@dataclass
class Result:
    model: str
    stream: bool
    tokens: int
    ttft_s: float
    latency_s: float
    served_by: str
    text: str


async def one_request(client, model: str, prompt: str, max_tokens: int, stream: bool) -> Result:
    started = time.perf_counter()
    messages = [{"role": "user", "content": prompt}]
    extra = {"ignore_eos": True}
    if stream:
        first = None
        text, tokens, served_by = [], 0, model
        response = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                        stream=True, stream_options={"include_usage": True},
                                                        extra_body=extra)
        async for chunk in response:
            served_by = chunk.model
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text.append(chunk.choices[0].delta.content)
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        end = time.perf_counter()
        return Result(model, True, tokens, (first or end) - started, end - started, served_by, "".join(text))
    response = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                    extra_body=extra)
    end = time.perf_counter()
    return Result(model, False, response.usage.completion_tokens, end - started, end - started, response.model,
                  response.choices[0].message.content or "")


async def run_workload(base_url: str, models: list[str], requests: int, max_tokens: int,
                       api_key: str = "rayfleet-demo") -> list[Result]:
    from openai import AsyncOpenAI
    from tqdm.asyncio import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)
    jobs = [one_request(client, models[i % len(models)], PROMPTS[i % len(PROMPTS)], max_tokens, stream=i % 2 == 0)
            for i in range(requests)]
    with logging_redirect_tqdm():  # log lines print above the bar instead of through it
        return await tqdm.gather(*jobs, desc="sample workload", unit="req")


def report(results: list[Result], wall_s: float) -> str:
    lines = [f"{'model':<8}{'served by':<10}{'stream':<8}{'tokens':>7}{'TTFT ms':>9}{'latency ms':>12}  text"]
    for r in results:
        lines.append(f"{r.model:<8}{r.served_by:<10}{str(r.stream):<8}{r.tokens:>7}{1e3 * r.ttft_s:>9.0f}"
                     f"{1e3 * r.latency_s:>12.0f}  {r.text[:32]!r}")
    tokens = sum(r.tokens for r in results)
    ttfts = [r.ttft_s for r in results if r.stream]
    lines.append(f"{len(results)} requests, {tokens} tokens in {wall_s:.2f} s ({tokens / wall_s:.0f} tok/s); "
                 f"TTFT p50 {1e3 * statistics.median(ttfts):.0f} ms (streaming requests)")
    return "\n".join(lines)


def run_demo(args) -> None:
    import ray

    spec = load_any_spec(args.spec)
    ensure_demo_models(spec)
    if args.address:
        connect(args.address, start_local=False)
    else:
        # A cluster of the demo's own ("local"), even when `rayfleet up` left one running on this machine.
        ray.init(address="local", num_cpus=LOCAL_LOGICAL_CPUS, include_dashboard=False, namespace="rayfleet",
                 log_to_driver=False)
    url = deploy(spec, wait_s=600)
    models = [p.name for p in spec.pools] + ["auto"]
    started = time.perf_counter()
    results = asyncio.run(run_workload(url, models, args.requests, args.max_tokens,
                                       api_key=(spec.ingress.api_keys or ["rayfleet-demo"])[0]))
    print(report(results, time.perf_counter() - started))
    print(render_status(ray.get(controller().status.remote())))
    print(f"\nOpenAI endpoint: {url}  (try: curl {url}/models)")
    print(f"Ops dashboard:   {url.removesuffix('/v1')}/dashboard")
    if args.keep_serving:
        print("serving until Ctrl-C")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    from ray import serve

    serve.shutdown()
    ray.get(controller().shutdown.remote())
