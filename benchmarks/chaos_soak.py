"""Chaos soak: streaming clients against a local fleet while replicas, the controller, Redis and an engine
core are killed, stopped or restarted, and a pool is rolled replica by replica.

Every stream is greedy and compared with an undisturbed reference of the same prompt: a stream is
**completed** when its text and token count equal the reference's, **corrupted** when it ended normally but
differs (a token missing, repeated or different), **failed** when it got an HTTP error or an in-band error
event, and **hung** when no byte arrived for `--hung-s` seconds (default: longer than the fleet's own bound,
`ingress.replay_wait_s` + `chunk_timeout_s`, on a stream waiting for a replacement). The goal is 0 failed, 0
corrupted, 0 hung. Each stream's longest gap between two events (its stall) is reported too.

Faults (one timeline, loopback only), each once and in this order: the controller SIGKILLed (Ray restarts it),
a random replica SIGKILLed (the restarted controller must replace it), Redis restarted empty (no
persistence), an engine core SIGSTOPped for 30 s, a replica drained, and a rolling replacement of every
replica of the first pool (a new replica first, then the old one drained: the Kubernetes rollout case); then a
random replica SIGKILLed every `--kill-every-s` seconds until `--minutes` have passed. Each fault waits for
the fleet to recover from the previous one, so every fault runs even when recoveries take longer than planned
(the run then lasts longer than `--minutes`); the clients go on for `--tail-s` after the last fault. Recovery
time is how long after a fault every pool again has its desired number of ready replicas.

    .venv/bin/python benchmarks/chaos_soak.py --minutes 8 --clients 8     # results/chaos_soak.json + table

Run it alone (the heavy lock); it starts its own Ray, Redis and fleet and stops them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contenders import DEMO_MODELS, ENGINE_ARGS, ENGINE_ENV, ensure_ray, free_port, wait_http_ok  # noqa: E402

KEY = "soak-user-key-0123456789"
ADMIN = "soak-admin-key-0123456789"
POOLS = {"soak-a": ("tiny-llama-a", 2), "soak-b": ("tiny-llama-b", 1)}
PROMPTS = [f"Soak prompt {i}: tell a long story about fault tolerance number {i}." for i in range(12)]


@dataclass
class Outcome:
    pool: str
    verdict: str  # completed | corrupted | failed | hung
    latency_s: float
    max_gap_s: float  # the longest wait between two events of the stream (or before the first)
    detail: str = ""


@dataclass
class Fault:
    name: str
    at_s: float
    recovered_s: float | None = None  # until every pool has its desired ready replicas again
    detail: str = ""


@dataclass
class Soak:
    base_url: str
    controller: object
    redis: subprocess.Popen
    redis_port: int
    started: float = field(default_factory=time.monotonic)
    outcomes: list[Outcome] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    finished: bool = False  # set after the last fault and the tail: the clients stop

    def now(self) -> float:
        return time.monotonic() - self.started


# ---------------------------------------------------------------- fleet
def start_redis(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    for _ in range(100):
        try:
            redis.Redis(port=port).ping()
            return proc
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def spec(port: int, redis_port: int, max_tokens: int) -> dict:
    pools = [{"name": name, "model": str(DEMO_MODELS / model), "min_replicas": 1, "max_replicas": count + 1,
              "initial_replicas": count, "resources": {"num_cpus": 1}, "env": ENGINE_ENV,
              "engine_args": ENGINE_ARGS} for name, (model, count) in POOLS.items()]
    return {"name": "rayfleet-soak", "pools": pools, "state_store": f"redis://127.0.0.1:{redis_port}/0",
            "ingress": {"host": "127.0.0.1", "port": port, "chunk_timeout_s": 20,
                        "api_keys": [KEY, {"name": "ops", "key": ADMIN, "role": "admin"}]},
            "policies": {"router": {"name": "least_load"}, "migration": {"name": "llumnix"}},
            "health": {"check_period_s": 1.0, "stall_timeout_s": 15}}


def start_fleet(redis_port: int, max_tokens: int) -> tuple[str, object]:
    import ray
    from ray import serve

    from rayfleet.control_plane.controller_api import CONTROLLER_NAME, NAMESPACE
    from rayfleet.control_plane.serve_app import build_app

    ensure_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"spec": spec(port, redis_port, max_tokens)}), name="rayfleet", route_prefix="/",
              blocking=False)
    controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    ray.get(controller.wait_ready.remote(timeout_s=600))
    base = f"http://127.0.0.1:{port}"
    wait_http_ok(f"{base}/health", 120, "fleet ingress")
    return base, controller


def status(soak: Soak) -> dict:
    import ray

    for _ in range(60):  # the controller may be restarting
        try:
            return ray.get(soak.controller.status.remote(), timeout=10)
        except Exception:
            time.sleep(1)
    raise RuntimeError("controller unreachable for a minute")


def healthy(state: dict) -> bool:
    return all(pool["ready"] >= pool["desired"] for pool in state["pools"].values())


def replica_pid(replica_id: str) -> int:
    import ray

    handle = ray.get_actor(f"rayfleet-replica-{replica_id}", namespace="rayfleet")
    return ray.get(handle.pid.remote(), timeout=30)


# ---------------------------------------------------------------- clients
async def reference(http: httpx.AsyncClient, base: str, pool: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    response = await http.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
        "model": pool, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    response.raise_for_status()
    body = response.json()
    return body["choices"][0]["text"], body["usage"]["completion_tokens"]


async def one_stream(http: httpx.AsyncClient, soak: Soak, pool: str, prompt: str, max_tokens: int,
                     expected: tuple[str, int], hung_s: float) -> Outcome:
    began = last = time.monotonic()
    text, tokens, gap = [], 0, 0.0

    def outcome(verdict: str, detail: str = "") -> Outcome:
        return Outcome(pool, verdict, time.monotonic() - began, max(gap, time.monotonic() - last), detail)

    try:
        async with http.stream("POST", f"{soak.base_url}/v1/completions",
                               headers={"Authorization": f"Bearer {KEY}"},
                               timeout=httpx.Timeout(30, read=hung_s),
                               json={"model": pool, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                     "ignore_eos": True, "stream": True,
                                     "stream_options": {"include_usage": True}}) as response:
            if response.status_code != 200:
                return outcome("failed", f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                gap, last = max(gap, time.monotonic() - last), time.monotonic()
                event = json.loads(line[6:])
                if "error" in event:
                    return outcome("failed", event["error"]["message"][:200])
                for choice in event.get("choices") or []:
                    text.append(choice.get("text") or "")
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except httpx.ReadTimeout:
        return outcome("hung", f"no byte for {hung_s:.0f} s")
    except httpx.HTTPError as error:
        return outcome("failed", type(error).__name__)
    if ("".join(text), tokens) == expected:
        return outcome("completed")
    return outcome("corrupted", f"{tokens} tokens, text {'equal' if ''.join(text) == expected[0] else 'differs'}")


async def client_loop(soak: Soak, refs: dict, max_tokens: int, hung_s: float, seed: int) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient() as http:
        while not soak.finished:
            pool, prompt = rng.choice(list(refs))
            soak.outcomes.append(await one_stream(http, soak, pool, prompt, max_tokens, refs[(pool, prompt)], hung_s))


# ---------------------------------------------------------------- chaos
async def wait_recovered(soak: Soak, fault: Fault, timeout_s: float = 300) -> None:
    await asyncio.sleep(2)  # let the controller see the fault first
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if healthy(await asyncio.to_thread(status, soak)):
            fault.recovered_s = soak.now() - fault.at_s
            return
        await asyncio.sleep(1)


def ready_replicas(state: dict, pool: str | None = None) -> list[str]:
    return [r["replica_id"] for r in state["replicas"] if r["state"] == "ready" and pool in (None, r["pool"])]


async def kill_random_replica(soak: Soak, rng: random.Random) -> Fault:
    victim = rng.choice(ready_replicas(await asyncio.to_thread(status, soak)))
    fault = Fault("kill replica", soak.now(), detail=victim)
    os.kill(await asyncio.to_thread(replica_pid, victim), signal.SIGKILL)
    return fault


async def kill_controller(soak: Soak, rng: random.Random) -> Fault:
    pid = (await asyncio.to_thread(status, soak))["controller"]["pid"]
    fault = Fault("kill controller", soak.now(), detail=f"pid {pid}")
    os.kill(pid, signal.SIGKILL)
    return fault


async def restart_redis(soak: Soak, rng: random.Random) -> Fault:
    fault = Fault("restart Redis (empty)", soak.now())
    soak.redis.terminate()
    soak.redis.wait(timeout=30)
    await asyncio.sleep(5)
    soak.redis = start_redis(soak.redis_port)
    return fault


async def stop_engine_core(soak: Soak, rng: random.Random, seconds: float = 30) -> Fault:
    import psutil

    victim = rng.choice(ready_replicas(await asyncio.to_thread(status, soak)))
    fault = Fault("SIGSTOP engine core 30 s", soak.now(), detail=victim)
    children = psutil.Process(await asyncio.to_thread(replica_pid, victim)).children(recursive=True)
    for child in children:
        child.send_signal(signal.SIGSTOP)
    await asyncio.sleep(seconds)
    for child in children:
        try:
            child.send_signal(signal.SIGCONT)
        except psutil.NoSuchProcess:
            pass
    return fault


async def drain_replica(soak: Soak, rng: random.Random) -> Fault:
    state = await asyncio.to_thread(status, soak)
    pool = next(name for name, p in state["pools"].items() if p["desired"] > 1)
    victim = rng.choice(ready_replicas(state, pool))
    fault = Fault("drain replica", soak.now(), detail=victim)
    await soak.controller.drain.remote(victim)
    await asyncio.to_thread(wait_until, lambda: victim not in {r["replica_id"] for r in status(soak)["replicas"]}, 300)
    await soak.controller.scale.remote(pool, POOLS[pool][1])  # back to its size
    return fault


async def rolling_replacement(soak: Soak, rng: random.Random) -> Fault:
    """Every replica of the first pool replaced: a new one first, then the old one drained."""
    pool, (_, count) = next(iter(POOLS.items()))
    old = ready_replicas(await asyncio.to_thread(status, soak), pool)
    fault = Fault("rolling replacement", soak.now(), detail=f"{pool}: {', '.join(old)}")
    for replica in old:
        await soak.controller.scale.remote(pool, count + 1)
        await asyncio.to_thread(wait_until, lambda: len(ready_replicas(status(soak), pool)) >= count + 1, 300)
        await soak.controller.drain.remote(replica)
        await asyncio.to_thread(wait_until, lambda: replica not in {r["replica_id"] for r in status(soak)["replicas"]},
                                300)
    return fault


def wait_until(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise TimeoutError("condition not reached")


async def chaos(soak: Soak, end_at: float, kill_every_s: float, seed: int, last_fault_at: float) -> None:
    rng = random.Random(seed)
    # Each one-off fault once (the replica kill right after the controller's: the restarted controller must
    # replace it), then replica kills until the end; all of the schedule runs, however long recoveries take.
    schedule = [kill_controller, kill_random_replica, restart_redis, stop_engine_core, drain_replica,
                rolling_replacement]
    await asyncio.sleep(kill_every_s / 2)
    while (schedule or soak.now() < end_at) and soak.now() < last_fault_at:
        action = schedule.pop(0) if schedule else kill_random_replica
        try:
            fault = await action(soak, rng)
        except Exception as error:  # the soak goes on; the table says what could not be done
            fault = Fault(action.__name__, soak.now(), detail=f"not done: {type(error).__name__}: {error}")
        print(f"[{soak.now():6.0f} s] {fault.name} {fault.detail}", flush=True)
        soak.faults.append(fault)
        await wait_recovered(soak, fault)
        print(f"[{soak.now():6.0f} s]   recovered after {fault.recovered_s} s; streams so far {verdicts(soak)}",
              flush=True)
        await asyncio.sleep(max(kill_every_s - (soak.now() - fault.at_s), 1))


# ---------------------------------------------------------------- report
def verdicts(soak: Soak) -> dict[str, int]:
    return {v: sum(o.verdict == v for o in soak.outcomes) for v in ("completed", "corrupted", "failed", "hung")}


def summarize(soak: Soak) -> dict:
    counts = verdicts(soak)
    latencies = sorted(o.latency_s for o in soak.outcomes if o.verdict == "completed")
    gaps = sorted(o.max_gap_s for o in soak.outcomes)
    return {"sent": len(soak.outcomes), **counts, "duration_s": soak.now(),
            "p50_latency_s": statistics.median(latencies) if latencies else None, "p99_latency_s": p99(latencies),
            "p99_stall_s": p99(gaps), "max_stall_s": gaps[-1] if gaps else None,
            "faults": [asdict(f) for f in soak.faults],
            "not_completed": [asdict(o) for o in soak.outcomes if o.verdict != "completed"]}


def p99(values: list[float]) -> float | None:
    return values[min(len(values) - 1, int(0.99 * len(values)))] if values else None


def table(result: dict) -> str:
    lines = ["| sent | completed | failed | corrupted | hung | p50 latency | p99 latency | p99 stall | longest stall |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| {result['sent']} | {result['completed']} | {result['failed']} | {result['corrupted']} | "
             f"{result['hung']} | {result['p50_latency_s']:.1f} s | {result['p99_latency_s']:.1f} s | "
             f"{result['p99_stall_s']:.1f} s | {result['max_stall_s']:.1f} s |", "",
             "| at | fault | detail | recovered after |", "|---|---|---|---|"]
    for fault in result["faults"]:
        recovered = f"{fault['recovered_s']:.0f} s" if fault["recovered_s"] is not None else "not within 300 s"
        lines.append(f"| {fault['at_s']:.0f} s | {fault['name']} | {fault['detail']} | {recovered} |")
    return "\n".join(lines)


async def run(args) -> dict:
    redis_port = free_port()
    redis = start_redis(redis_port)
    base, controller = start_fleet(redis_port, args.max_tokens)
    soak = Soak(base, controller, redis, redis_port)
    try:
        async with httpx.AsyncClient(timeout=300) as http:
            pairs = [(pool, prompt) for pool in POOLS for prompt in PROMPTS]
            refs = dict(zip(pairs, await asyncio.gather(*(reference(http, base, p, q, args.max_tokens)
                                                          for p, q in pairs))))
        print(f"references: {len(refs)} greedy completions of {args.max_tokens} tokens", flush=True)
        soak.started = time.monotonic()
        clients = asyncio.gather(*(client_loop(soak, refs, args.max_tokens, args.hung_s, seed)
                                   for seed in range(args.clients)))
        await chaos(soak, args.minutes * 60 - args.tail_s, args.kill_every_s, args.seed, args.last_fault_minutes * 60)
        await asyncio.sleep(args.tail_s)  # streams begun during the last recovery finish under load
        soak.finished = True
        await clients
        return summarize(soak)
    finally:
        from ray import serve

        serve.shutdown()
        try:
            import ray

            ray.get(controller.shutdown.remote(), timeout=120)
        except Exception:
            pass
        soak.redis.terminate()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--kill-every-s", type=float, default=45)
    parser.add_argument("--hung-s", type=float, default=330,
                        help="no byte for this long: hung (above ingress.replay_wait_s 300 + chunk_timeout_s 20)")
    parser.add_argument("--tail-s", type=float, default=60, help="clients go on this long after the last fault")
    parser.add_argument("--last-fault-minutes", type=float, default=20,
                        help="no fault starts after this (a bound on the run; the table lists the faults that ran)")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "chaos_soak.json")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
