"""The quick-start job: a local Ray, the demo fleet, real task questions through the official `openai` client.

The demo fleet serves three models trained on verifiable tasks (`rayfleet.actors.tasks`). The workload asks
seeded reasoning-gym questions (easy and hard arithmetic and string tasks) of `model="auto"`; for each it prints
the question, the answer, whether the task's verifier accepts it, which pool answered and why the router chose
it, and sends the verifier's score back as feedback (`POST /v1/feedback`), which the `chimera` router learns
from. Then the fleet's status and the endpoint URL; the fleet is taken down unless --keep-serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

from rayfleet.actors.tasks import DIFFICULTIES, FAMILIES, TaskInstance, generate, score
from rayfleet.control_plane.cli.launch import (
    LOCAL_LOGICAL_CPUS,
    connect,
    controller,
    deploy,
    direct_ingress_env,
    ensure_demo_models,
    load_any_spec,
    render_status,
)

logger = logging.getLogger("rayfleet.demo")

ROUTE_HEADER = "x-rayfleet-route"
DEMO_SEED = 424242  # the questions: held out from training (train_task_models.py draws from other seeds)


@dataclass
class Result:
    task: TaskInstance
    stream: bool
    answer: str
    score: float
    pool: str
    why: str
    tokens: int
    latency_s: float


def workload(count: int) -> list[TaskInstance]:
    """`count` questions cycling over every (family, difficulty) cell."""
    cells = [(f, d) for d in DIFFICULTIES for f in FAMILIES]
    return [generate(f, d, seed=DEMO_SEED + i)[0] for i, (f, d) in
            ((i, cells[i % len(cells)]) for i in range(count))]


async def ask(client, task: TaskInstance, max_tokens: int, stream: bool) -> Result:
    started = time.perf_counter()
    kwargs = dict(model="auto", messages=[{"role": "user", "content": task.prompt}], max_tokens=max_tokens,
                  temperature=0)
    if stream:
        raw = await client.chat.completions.with_raw_response.create(
            stream=True, stream_options={"include_usage": True}, **kwargs)
        text, tokens, request_id, pool = [], 0, "", ""
        async for chunk in raw.parse():  # the raw response parses synchronously, also on the async client
            request_id, pool = chunk.id, chunk.model
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        answer = "".join(text)
    else:
        raw = await client.chat.completions.with_raw_response.create(**kwargs)
        response = raw.parse()
        request_id, pool = response.id, response.model
        answer, tokens = response.choices[0].message.content or "", response.usage.completion_tokens
    latency = time.perf_counter() - started
    verdict = score(task, answer)
    # The verifier's verdict teaches the router (what a client with its own checker, or an RL loop, does).
    await client.post("/feedback", cast_to=object, body={"request_id": request_id, "score": verdict})
    why = raw.headers.get(ROUTE_HEADER, "").partition("; ")[2]
    return Result(task, stream, answer, verdict, pool, why, tokens, latency)


async def run_workload(base_url: str, count: int, max_tokens: int, api_key: str) -> list[Result]:
    from openai import AsyncOpenAI
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)
    tasks = workload(count)
    # The router starts on the first `auto` request: the embedder loads and embeds its table (~20 s here).
    logger.info("warming up the router (prompt embedder, routing table)")
    await client.chat.completions.create(model="auto", messages=[{"role": "user", "content": tasks[0].prompt}],
                                         max_tokens=1)
    results = []
    # Two waves: the second routes with what the first taught the router through feedback.
    # log lines print above the bar instead of through it
    with logging_redirect_tqdm(), tqdm(total=len(tasks), desc="task questions", unit="req") as bar:
        for wave in (tasks[: len(tasks) // 2], tasks[len(tasks) // 2:]):
            for done in asyncio.as_completed([ask(client, t, max_tokens, stream=i % 3 == 0)
                                              for i, t in enumerate(wave)]):
                results.append(await done)
                bar.update()
    return sorted(results, key=lambda r: (r.task.difficulty, r.task.family, r.task.seed))


def report(results: list[Result], wall_s: float) -> str:
    lines = [f"{'task':<22}{'question':<34}{'expected':>10}{'answer':>11}  {'verdict':<8}{'pool':<12}"
             "why the router chose it"]
    for r in results:
        question = r.task.prompt.rsplit(": ", 1)[-1].split(". Give only")[0]  # the operands or the word
        verdict = "ok" if r.score >= 1.0 else "wrong" if r.score == 0 else f"{r.score:.2f}"
        lines.append(f"{r.task.family + '/' + r.task.difficulty:<22}{question[:32]:<34}{r.task.answer[:10]:>10}"
                     f"{r.answer.strip()[:10]:>11}  {verdict:<8}{r.pool:<12}{r.why}")
    lines.append("")
    for pool in sorted({r.pool for r in results}):
        mine = [r for r in results if r.pool == pool]
        lines.append(f"{pool:<12} answered {len(mine):>3}: {sum(r.score >= 1 for r in mine):>3} accepted, "
                     f"mean latency {1e3 * sum(r.latency_s for r in mine) / len(mine):.0f} ms")
    accepted = sum(r.score >= 1 for r in results)
    tokens = sum(r.tokens for r in results)
    lines.append(f"{len(results)} questions, {accepted} accepted by their verifiers "
                 f"({100 * accepted / len(results):.0f}%), "
                 f"{tokens} tokens in {wall_s:.2f} s")
    return "\n".join(lines)


def run_demo(args) -> None:
    import ray

    spec = load_any_spec(args.spec)
    ensure_demo_models(spec)
    if args.address:
        serve_env = connect(args.address, start_local=False)
    else:
        # A cluster of the demo's own ("local"), even when `rayfleet up` left one running on this machine; it
        # inherits this process' environment, hence Serve's direct ingress settings.
        serve_env = direct_ingress_env(spec.ingress)
        os.environ.update(serve_env)
        ray.init(address="local", num_cpus=LOCAL_LOGICAL_CPUS, include_dashboard=False, namespace="rayfleet",
                 log_to_driver=False)
    url = deploy(spec, 600, serve_env)
    started = time.perf_counter()
    results = asyncio.run(run_workload(url, args.requests, args.max_tokens, api_key=_demo_key(spec)))
    print(report(results, time.perf_counter() - started))
    print(render_status(status_after_workload(controller())))
    print(f"\nOpenAI endpoint: {url}  (try: curl {url}/models; routing decisions: curl {url}/fleet/routing)")
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


def status_after_workload(fleet_controller, timeout_s: float = 10.0) -> dict:
    """The fleet's status once the controller has probed its replicas again after the workload: its status holds
    each replica's load as of the last health check, which may have run while the last answers were streaming
    (a status showing requests still running after all of them came back)."""
    import ray

    status = ray.get(fleet_controller.status.remote())
    seen, deadline = status["controller"]["ticks"], time.monotonic() + timeout_s
    while status["controller"]["ticks"] < seen + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        status = ray.get(fleet_controller.status.remote())
    return status


def _demo_key(spec) -> str:
    """The key the demo's workload sends: the spec's first inline key in clear, else any (auth: none)."""
    clear = [k if isinstance(k, str) else k.key for k in spec.ingress.api_keys]
    return next((k for k in clear if k), "rayfleet-demo")
