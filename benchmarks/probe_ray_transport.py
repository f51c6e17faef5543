"""What one message between two async actors costs: Ray's actor call and stream item against a ZMQ socket.

Issue 14's front end crosses Ray twice per request: the ingress starts requests with an actor call
(`LLMReplica.submit`) and reads every engine step's deltas as one item of a streaming generator
(`LLMReplica.deltas`). vLLM's own front end talks to its engine over ZMQ with msgpack. This probe prices the two
transports for the same messages, so that replacing Ray on the token path is judged on numbers:

- `call`: a request/reply with a `submit`-sized message (one call, a 128-token prompt): a Ray actor call
  against ZMQ DEALER/ROUTER;
- `stream`: one item of a delta batch (4 requests x 8 tokens), one way: a Ray streaming generator against ZMQ
  PUSH/PULL. Latency is one way, by the wall clock both actors share on this machine.

Messages are paced 4 ms apart (an idle fleet's pace, not a saturated one); CPU is both actors' user + system
time per message, less the same actors pacing without sending. Contenders alternate within each round.

    python benchmarks/probe_ray_transport.py                  # ~2 minutes on 2 cores
    python benchmarks/probe_ray_transport.py --messages 2000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import statistics
import time

import msgspec
import psutil
import ray
import zmq
import zmq.asyncio

PACE_S = 0.004
SUBMIT = [{"request_id": "req-0", "prompt_token_ids": list(range(128)), "max_tokens": 128, "temperature": 0.0}]
BATCH = [{"request_id": f"req-{i}", "token_ids": list(range(8)), "logprobs": None} for i in range(4)]


class Side:
    """What both actors have: a ZMQ context, their process id, and pacing without sending (the CPU baseline)."""

    def __init__(self) -> None:
        self.ctx = zmq.asyncio.Context()

    def pid(self) -> int:
        return os.getpid()

    async def pace(self, n: int) -> None:
        for _ in range(n):
            await asyncio.sleep(PACE_S)


@ray.remote
class Replica(Side):
    """The replica's side: answers calls, produces stream items."""

    async def submit(self, calls: list) -> list:
        return [None] * len(calls)

    async def answer(self, address: str, n: int) -> None:
        socket = self.ctx.socket(zmq.ROUTER)
        socket.connect(address)
        for _ in range(n):
            identity, message = await socket.recv_multipart()
            calls = msgspec.msgpack.decode(message)
            await socket.send_multipart([identity, msgspec.msgpack.encode([None] * len(calls))])
        socket.close()

    async def deltas(self, n: int):
        for _ in range(n):
            await asyncio.sleep(PACE_S)
            yield time.time(), BATCH

    async def push(self, address: str, n: int) -> None:
        socket = self.ctx.socket(zmq.PUSH)
        socket.connect(address)
        for _ in range(n):
            await asyncio.sleep(PACE_S)
            await socket.send(msgspec.msgpack.encode((time.time(), BATCH)))
        socket.close(linger=1000)


@ray.remote
class Ingress(Side):
    """The ingress' side: makes calls, reads stream items. Each method returns its latencies in seconds."""

    async def ray_call(self, replica, n: int) -> list[float]:
        seconds = []
        for _ in range(n):
            await asyncio.sleep(PACE_S)
            began = time.perf_counter()
            await replica.submit.remote(SUBMIT)
            seconds.append(time.perf_counter() - began)
        return seconds

    async def zmq_call(self, replica, n: int) -> list[float]:
        socket = self.ctx.socket(zmq.DEALER)
        port = socket.bind_to_random_port("tcp://127.0.0.1")
        answering = replica.answer.remote(f"tcp://127.0.0.1:{port}", n)
        seconds = []
        for _ in range(n):
            await asyncio.sleep(PACE_S)
            began = time.perf_counter()
            await socket.send(msgspec.msgpack.encode(SUBMIT))
            msgspec.msgpack.decode(await socket.recv())
            seconds.append(time.perf_counter() - began)
        await answering
        socket.close()
        return seconds

    async def ray_stream(self, replica, n: int) -> list[float]:
        seconds = []
        async for ref in replica.deltas.options(num_returns="streaming").remote(n):
            sent, _ = await ref
            seconds.append(time.time() - sent)
        return seconds

    async def zmq_stream(self, replica, n: int) -> list[float]:
        socket = self.ctx.socket(zmq.PULL)
        port = socket.bind_to_random_port("tcp://127.0.0.1")
        pushing = replica.push.remote(f"tcp://127.0.0.1:{port}", n)
        seconds = []
        for _ in range(n):
            sent, _ = msgspec.msgpack.decode(await socket.recv())
            seconds.append(time.time() - sent)
        await pushing
        socket.close()
        return seconds


CONTENDERS = {"call": ("ray_call", "zmq_call"), "stream": ("ray_stream", "zmq_stream")}


def cpu_seconds(pids: list[int]) -> float:
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def measure(ingress, replica, pids: list[int], method: str, n: int) -> tuple[list[float], float]:
    """Latencies, and CPU seconds of both actors over the run."""
    before = cpu_seconds(pids)
    if method == "pace":
        ray.get([ingress.pace.remote(n), replica.pace.remote(n)])
        return [], cpu_seconds(pids) - before
    seconds = ray.get(getattr(ingress, method).remote(replica, n))
    return seconds, cpu_seconds(pids) - before


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1000, help="per contender and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    replica, ingress = Replica.remote(), Ingress.remote()
    pids = ray.get([replica.pid.remote(), ingress.pid.remote()])
    for methods in CONTENDERS.values():  # warm both paths: connections, imports
        for method in methods:
            measure(ingress, replica, pids, method, 50)
    results: dict[str, list[tuple[float, float, float]]] = {}
    for round_ in range(args.rounds):
        _, idle = measure(ingress, replica, pids, "pace", args.messages)
        for methods in CONTENDERS.values():
            for method in (methods if round_ % 2 == 0 else methods[::-1]):
                seconds, used = measure(ingress, replica, pids, method, args.messages)
                results.setdefault(method, []).append((quantile(seconds, 0.5), quantile(seconds, 0.9),
                                                       max(0.0, used - idle) / args.messages))
        print(f"round {round_ + 1} of {args.rounds} done", flush=True)
    print(f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
          f"{os.cpu_count()} cores; load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}; "
          f"{args.messages} messages per contender and round, medians of {args.rounds} rounds\n")
    print("| message | transport | p50 ms | p90 ms | CPU per message, both actors (us) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for kind, methods in CONTENDERS.items():
        rows = {m: [statistics.median(r[i] for r in results[m]) for i in range(3)] for m in methods}
        for method in methods:
            p50, p90, cpu = rows[method]
            print(f"| {kind} | {method.split('_')[0]} | {p50 * 1e3:.3f} | {p90 * 1e3:.3f} | {cpu * 1e6:.0f} |")
        (ray_p50, _, ray_cpu), (zmq_p50, _, zmq_cpu) = rows[methods[0]], rows[methods[1]]
        print(f"| {kind} | Ray / ZMQ | {ray_p50 / zmq_p50:.1f}x | | {ray_cpu / zmq_cpu:.1f}x |")
    ray.shutdown()


if __name__ == "__main__":
    main()
