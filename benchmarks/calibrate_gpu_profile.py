"""Measure a Llama-shaped model's engine step times on a GPU, for the fleet simulator's GPU profiles.

The GPU machine has no vLLM, so this runs the model's forward the way vLLM's kernels do it in shape and size:
bf16 weights of the model's real size (one set per layer, so every step reads all of them from memory), fused QKV
and gate/up projections, RMSNorm, FlashAttention through torch's `scaled_dot_product_attention`, grouped-query
attention where the model has it, the LM head on the last token of each sequence, and each step captured in a
CUDA graph and replayed (vLLM captures its steps in CUDA graphs too, so kernel launches are not what is timed).
Rotary embeddings and sampling are left out (elementwise work under 1% of a step). One layer's KV cache is shared
by all layers: each layer still reads a cache far larger than the GPU's L2, so the memory traffic is a real
step's. What is not measured: vLLM's CPU-side work per step (scheduling, input preparation), which vLLM v1
overlaps with the GPU's step; the simulator's GPU profiles carry GPU time only.

Two kinds of points, as `calibrate_simulator.py` takes on the CPU:
- **prefill**: one sequence of L prompt tokens, causal attention over itself;
- **decode**: B sequences of one new token each over C context tokens.

`benchmarks/step_fit.py` fits the simulator's `StepTimeModel` to them (`step_s = base + prefill_token * L +
decode_seq * B + context_token * B * C`); `control_plane/simulator/profiles.py` carries the fitted numbers.

    python3 benchmarks/calibrate_gpu_profile.py --model llama-13b --out /tmp/out/h100-llama-13b.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_fit import fit  # noqa: E402


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 128

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * 2  # bf16 K and V of every layer

    @property
    def weight_bytes(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.intermediate
        return 2 * (self.layers * per_layer + self.vocab * self.hidden)


SHAPES = {
    # Llama-2-13B: DistServe's class of model (the simulator's a100-llama-13b profile has this shape).
    "llama-13b": Shape(hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824, vocab=32000),
    # Llama-3-8B: grouped-query attention (8 KV heads), the size most fleets serve today.
    "llama3-8b": Shape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
}

PREFILL_LENGTHS = (64, 128, 256, 512, 1024, 2048, 4096)
DECODE_BATCHES = (1, 8, 32, 64, 128, 256)
DECODE_CONTEXTS = (256, 1024, 4096)
MAX_DECODE_TOKENS = 131072  # batch x context: beyond what one 80 GB GPU's KV holds for these models


class StandIn:
    """The model's weights on the GPU and one forward step over `tokens` new tokens of `batch` sequences."""

    def __init__(self, shape: Shape, device: str) -> None:
        import torch

        self.shape, self.torch = shape, torch
        q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim

        def weight(rows: int, cols: int):
            return torch.randn(rows, cols, device=device, dtype=torch.bfloat16) * 0.02

        self.layers = [{"qkv": weight(shape.hidden, q + 2 * kv), "o": weight(q, shape.hidden),
                        "gate_up": weight(shape.hidden, 2 * shape.intermediate),
                        "down": weight(shape.intermediate, shape.hidden),
                        "norm": torch.ones(shape.hidden, device=device, dtype=torch.bfloat16)}
                       for _ in range(shape.layers)]
        self.lm_head = weight(shape.hidden, shape.vocab)

    def rms(self, x, w):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * self.torch.rsqrt(variance + 1e-6)).to(x.dtype) * w

    def layer(self, x, w, attend):
        s = self.shape
        q_width, kv_width = s.heads * s.head_dim, s.kv_heads * s.head_dim
        q, k, v = (self.rms(x, w["norm"]) @ w["qkv"]).split([q_width, kv_width, kv_width], dim=-1)
        x = x + attend(q, k, v) @ w["o"]
        gate, up = (self.rms(x, w["norm"]) @ w["gate_up"]).chunk(2, dim=-1)
        return x + (self.torch.nn.functional.silu(gate) * up) @ w["down"]

    def prefill(self, x):
        """One sequence of `len(x)` tokens, causal attention over itself; logits of its last token."""
        s, F = self.shape, self.torch.nn.functional
        length = x.shape[0]

        def attend(q, k, v):
            heads = [t.view(1, length, n, s.head_dim).transpose(1, 2) for t, n in
                     ((q, s.heads), (k, s.kv_heads), (v, s.kv_heads))]
            out = F.scaled_dot_product_attention(*heads, is_causal=True, enable_gqa=s.kv_heads != s.heads)
            return out.transpose(1, 2).reshape(length, s.heads * s.head_dim)

        for w in self.layers:
            x = self.layer(x, w, attend)
        return x[-1:] @ self.lm_head

    def decode(self, x, k_cache, v_cache):
        """`len(x)` sequences, one new token each, over the caches' context; the new K and V written last."""
        s, F = self.shape, self.torch.nn.functional
        batch = x.shape[0]

        def attend(q, k, v):
            k_cache[:, :, -1] = k.view(batch, s.kv_heads, s.head_dim)
            v_cache[:, :, -1] = v.view(batch, s.kv_heads, s.head_dim)
            # The query heads sharing a KV head ride as that head's query rows (one new token attends to the
            # whole context, so no mask): FlashAttention's grouped-query decode, without copying K and V per head.
            group = s.heads // s.kv_heads
            out = F.scaled_dot_product_attention(q.view(batch, s.kv_heads, group, s.head_dim), k_cache, v_cache)
            return out.reshape(batch, s.heads * s.head_dim)

        for w in self.layers:
            x = self.layer(x, w, attend)
        return x @ self.lm_head


def graph_seconds(step, repeats: int) -> float:
    """Median seconds of one replay of `step` captured in a CUDA graph (three timed runs of `repeats` replays)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the graph: cuBLAS and SDPA pick their kernels
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        graph.replay()
    runs = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end) / 1e3 / repeats)
    del graph
    torch.cuda.empty_cache()
    return statistics.median(runs)


def measure(model: StandIn, repeats: int) -> dict:
    import torch

    s, device = model.shape, "cuda"
    prefill, decode = [], []
    with torch.inference_mode():
        for length in PREFILL_LENGTHS:
            x = torch.randn(length, s.hidden, device=device, dtype=torch.bfloat16)
            seconds = graph_seconds(lambda: model.prefill(x), repeats)
            prefill.append({"prefill_tokens": length, "seconds": seconds})
            print(f"prefill {length:5d} tokens: {seconds * 1e3:7.2f} ms", flush=True)
        for batch in DECODE_BATCHES:
            for context in DECODE_CONTEXTS:
                if batch * context > MAX_DECODE_TOKENS:
                    continue
                x = torch.randn(batch, s.hidden, device=device, dtype=torch.bfloat16)
                k_cache = torch.randn(batch, s.kv_heads, context, s.head_dim, device=device, dtype=torch.bfloat16)
                v_cache = torch.randn_like(k_cache)
                seconds = graph_seconds(lambda: model.decode(x, k_cache, v_cache), repeats)
                decode.append({"batch": batch, "context": context, "seconds": seconds})
                print(f"decode {batch:3d} x {context:4d} ctx: {seconds * 1e3:7.2f} ms/step", flush=True)
                del k_cache, v_cache
                torch.cuda.empty_cache()
    return {"prefill": prefill, "decode": decode}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", choices=sorted(SHAPES), default="llama-13b")
    parser.add_argument("--repeats", type=int, default=10, help="CUDA-graph replays per timed run (default 10)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the points and the fit")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("calibrate_gpu_profile: no CUDA device here; run it on the GPU machine", file=sys.stderr)
        return 2
    shape = SHAPES[args.model]
    print(f"{args.model}: {shape.weight_bytes / 1e9:.1f} GB of bf16 weights, "
          f"{shape.kv_bytes_per_token / 1024:.0f} KiB of KV per token, on {torch.cuda.get_device_name()}", flush=True)
    points = measure(StandIn(shape, "cuda"), args.repeats)
    result = {"model": args.model, "shape": asdict(shape), "weight_bytes": shape.weight_bytes,
              "kv_bytes_per_token": shape.kv_bytes_per_token, "gpu": torch.cuda.get_device_name(),
              "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory, "torch": torch.__version__,
              "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "points": points, "fit": fit(points)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    f = result["fit"]
    print(f"fit: base {f['base_s'] * 1e3:.2f} ms + {f['prefill_token_s'] * 1e6:.2f} us/prefill token + "
          f"{f['decode_seq_s'] * 1e6:.2f} us/decoding sequence + {f['context_token_s'] * 1e9:.2f} ns/context token; "
          f"mean error {f['mean_abs_rel_error']:.1%}, max {f['max_abs_rel_error']:.1%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
