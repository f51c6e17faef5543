"""What the fleet's front end pays per token and per request, piece by piece, outside a running fleet.

The serving benchmark measures each process's CPU per token under load; this probe times the pieces behind
it in isolation, each against what plain vLLM (or a leaner form) does instead, so a proposed change can be
priced before it is built:

- **derender**: one streamed completion token through rayfleet's `PoolRenderer` (vLLM's `OnlineDerenderer`
  and response models, plus the SSE chunk's JSON), its deltas decoded by the stream's `StreamDecoder` (the
  `tokenizers` library's Rust `DecodeStream`, as plain vLLM's engine client) and by vLLM's derenderer's own
  Python `detokenize_incrementally`, and the `DecodeStream` alone;
- **delta on the wire**: building one request's token delta as the replica does (`RequestDelta` of a
  `ReplicaChunk` of vLLM's pydantic `GenerateTokensStreamChoice`), pickling a 64-request batch of them and
  unpickling it, against plain tuples;
- **a request's task**: the replica reads each request's outputs from vLLM's `AsyncLLM.generate`, one task per
  request woken by its `RequestOutputCollector` every step, against one callback delivering every output;
- **actor call**: one-way latency of an actor call from an async actor (as the ingress calls its replica)
  after 0.3 s idle, for an empty call, a `GenerateCall` of a 128-token prompt, and the same as bytes.

    python benchmarks/probe_front_end_costs.py            # ~1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from contenders import DEMO_MODELS  # noqa: E402


def per_item_us(fn, items: int, repeats: int) -> float:
    began = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - began) / (items * repeats) * 1e6


async def derender_costs(model: str) -> dict[str, float]:
    from tokenizers.decoders import DecodeStream
    from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateTokensStreamChoice

    from rayfleet.control_plane.serving.rendering import PoolRenderer

    renderer = PoolRenderer("probe", model, {"max_model_len": 1024})
    await renderer.start()
    [rendered] = await renderer.render("completion", {"prompt": "hello world " * 20, "max_tokens": 64, "stream": True})
    backend = renderer.state.online_renderer.renderer.get_tokenizer()
    rng = random.Random(0)
    ids = [rng.randrange(len(backend.all_special_ids), len(backend)) for _ in range(64)]  # the model's own tokens
    repeats = 30

    async def derender(decodes_in_rust: bool) -> float:
        renderer.decodes_in_rust = decodes_in_rust
        began = time.process_time()
        for _ in range(repeats):
            rendered.stream_states.clear()
            for i, token in enumerate(ids):
                choice = GenerateTokensStreamChoice(index=0, token_ids=[token],
                                                    finish_reason=None if i < 63 else "length")
                (await renderer.derender_stream_choice(rendered, choice)).model_dump_json(exclude_unset=True)
        return (time.process_time() - began) / (len(ids) * repeats) * 1e6

    rust_decoder = await derender(True)
    python_decoder = await derender(False)
    rust = getattr(backend, "backend_tokenizer", None) or backend._tokenizer

    def decode_stream():
        stream = DecodeStream(skip_special_tokens=True)
        for token in ids:
            stream.step(rust, token)

    return {"derender + SSE JSON (rayfleet: vLLM's OnlineDerenderer, deltas by its StreamDecoder)": rust_decoder,
            "the same with vLLM's own delta decoding (Python detokenize_incrementally)": python_decoder,
            "DecodeStream.step alone (plain vLLM's detokenizer)": per_item_us(decode_stream, len(ids), repeats)}


def delta_costs() -> dict[str, float]:
    from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateTokensStreamChoice

    from rayfleet.actors.replica.protocol import ReplicaChunk, RequestDelta

    def delta(i: int) -> RequestDelta:
        return RequestDelta(f"cmpl-{i:024d}", chunk=ReplicaChunk(choices=[GenerateTokensStreamChoice(
            index=0, token_ids=[1234], finish_reason=None, stop_reason=None, logprobs=None, weight_versions=None)],
            num_cached_tokens=0))

    batch = [delta(i) for i in range(64)]
    wire = pickle.dumps(batch)
    tuples = [(f"cmpl-{i:024d}", 0, [1234], None, None, None, None, 0) for i in range(64)]
    tuple_wire = pickle.dumps(tuples)
    return {
        "build one delta (pydantic choice, dataclasses)": per_item_us(lambda: [delta(i) for i in range(64)], 64, 300),
        "pickle, per delta of a 64-delta batch": per_item_us(lambda: pickle.dumps(batch), 64, 300),
        "unpickle, per delta": per_item_us(lambda: pickle.loads(wire), 64, 300),
        "pickle + unpickle, per delta as a plain tuple": per_item_us(
            lambda: pickle.loads(pickle.dumps(tuples)), 64, 300),
        "bytes per delta on the wire, pydantic": len(wire) / 64,
        "bytes per delta on the wire, tuple": len(tuple_wire) / 64,
    }


async def request_task_costs(requests: int = 64, steps: int = 200) -> dict[str, float]:
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.output_processor import RequestOutputCollector

    class Output:  # what the collector hands over (a RequestOutput's place)
        finished = False

    collectors = [RequestOutputCollector(RequestOutputKind.DELTA, str(i)) for i in range(requests)]
    received = 0

    async def generate_loop(collector):  # AsyncLLM.generate's loop, as each request's task runs it
        nonlocal received
        while True:
            collector.get_nowait() or await collector.get()
            received += 1

    tasks = [asyncio.create_task(generate_loop(c)) for c in collectors]
    await asyncio.sleep(0)
    began = time.process_time()
    for _ in range(steps):  # the output handler: one put per request, then it yields to the loop
        for collector in collectors:
            collector.put(Output())
        await asyncio.sleep(0)
    woken = (time.process_time() - began) / (requests * steps) * 1e6
    for task in tasks:
        task.cancel()
    delivered = []
    began = time.process_time()
    for _ in range(steps):
        for _ in collectors:
            delivered.append(Output())
        await asyncio.sleep(0)
    direct = (time.process_time() - began) / (requests * steps) * 1e6
    return {"a task per request, woken per token": woken, "one callback for every request": direct}


def actor_call_latency(calls: int) -> dict[str, float]:
    import ray
    from vllm import SamplingParams

    from rayfleet.actors.replica.protocol import GenerateCall

    @ray.remote(num_cpus=0)
    class Target:
        async def arrive(self, *args):
            return time.perf_counter()

    @ray.remote(num_cpus=0)
    class Caller:
        async def run(self, target, calls: int) -> dict[str, float]:
            call = GenerateCall("r", list(range(128)), SamplingParams(max_tokens=1, temperature=0))
            out = {}
            for name, args in (("empty call", ()), ("GenerateCall, 128-token prompt", (call, "subscriber")),
                               ("the same call pickled to bytes", (pickle.dumps(call), "subscriber"))):
                one_way = []
                for _ in range(calls):
                    await asyncio.sleep(0.3)
                    began = time.perf_counter()
                    one_way.append((await target.arrive.remote(*args)) - began)
                out[f"one-way, {name} (ms)"] = statistics.median(one_way) * 1e3
            return out

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        target, caller = Target.remote(), Caller.remote()
        ray.get(target.arrive.remote())
        return ray.get(caller.run.remote(target, calls))
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEMO_MODELS / "tiny-llama-b"), help="model folder (its tokenizer)")
    parser.add_argument("--calls", type=int, default=30, help="actor calls per kind")
    args = parser.parse_args()
    sections = {"derender, µs per token": asyncio.run(derender_costs(args.model)),
                "replica -> ingress delta, µs": delta_costs(),
                "replica: reading a request's output, µs per token": asyncio.run(request_task_costs()),
                "ingress -> replica actor call, after 0.3 s idle": actor_call_latency(args.calls)}
    for title, rows in sections.items():
        print(f"\n| {title} | value |\n| --- | ---: |")
        for name, value in rows.items():
            print(f"| {name} | {value:.2f} |")


if __name__ == "__main__":
    main()
