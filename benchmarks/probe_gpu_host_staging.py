"""Where a host-staged KV export's time goes on a GPU: the phases of `kernels.gather_to_shared` and of the
scatter out of the rows, against copies through a device buffer and the pinned-memory ceiling.

On 2026-12-01 (`docs/benchmarks-gpu-migration.md`) the host transport moved 512 MiB (256 blocks of a
Llama-3-8B-shaped bf16 cache) at 1.6 GB/s end to end against a 27 GB/s pinned ceiling. This probe times each
step of one export and one load, cold (a fresh shared-memory file) and warm (a file from the writer's pool):

- `create`: make and map the file; `register` / `unregister`: cudaHostRegister of the mapping and its undo;
- `kernel writes host`: the gather kernel writing the registered mapping through PCIe (what runs today);
- `gather on device` + `copy D2H`: the alternative, a gather into device memory, then one DMA copy;
- the same for the load (`kernel reads host` vs `copy H2D` + `scatter on device`);
- a KV store load (`--store-blocks` values stacked into host rows, then scattered): rows stacked into pageable
  memory, which the scatter locks and unlocks, against rows stacked into pinned memory.

Run on the GPU machine with rayfleet importable as `benchmarks/gpu_session.sh` makes it:
    python3 benchmarks/probe_gpu_host_staging.py --blocks 256 --rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from rayfleet.kernels import KVCacheLayers, SharedRows, gather_blocks, scatter_blocks, scatter_rows, stack_rows


def kv_cache(blocks: int, layers: int = 32, kv_heads: int = 8, head_dim: int = 128, block_size: int = 16):
    """Per-layer LBNHC views of one bf16 buffer, as vLLM 0.32 lays out a FlashAttention cache."""
    page = kv_heads * block_size * 2 * head_dim
    raw = torch.randn(layers * blocks * page // 2, dtype=torch.float32, device="cuda").view(torch.bfloat16)
    shape = (layers, blocks, kv_heads, block_size, 2 * head_dim)
    strides = (blocks * page, page, 2 * head_dim, kv_heads * 2 * head_dim, 1)
    view = raw.as_strided(shape, strides)
    return KVCacheLayers([view[layer] for layer in range(layers)])


def timed(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    began = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - began) * 1e3


def register(tensor: torch.Tensor) -> None:
    status = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel(), 0)
    assert int(status) == 0, f"cudaHostRegister failed: {int(status)}"


def unregister(tensor: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())


def one_round(cache: KVCacheLayers, ids: list[int], other_ids: list[int], warm: SharedRows | None) -> dict:
    nbytes = len(ids) * cache.layout.block_bytes
    phases: dict[str, float] = {}
    rows = SharedRows.named(len(ids), cache.layout.block_bytes)
    if warm is not None:
        warm.recycle()  # into this process's pool: `create` below takes it back with its pages
    host: list[torch.Tensor] = []
    phases["create"] = timed(lambda: host.append(rows.create()))
    tensor = host[0]
    staging = torch.empty((len(ids), cache.layout.block_bytes), dtype=torch.uint8, device="cuda")
    phases["gather on device"] = timed(lambda: gather_blocks(cache, ids, out=staging))
    # Not registered: the driver copies through its own pinned bounce buffers (first touch of a fresh file here).
    phases["copy D2H, rows not registered"] = timed(lambda: tensor.copy_(staging))
    phases["copy H2D, rows not registered"] = timed(lambda: staging.copy_(tensor))
    phases["register"] = timed(lambda: register(tensor))
    phases["kernel writes host"] = timed(lambda: gather_blocks(cache, ids, out=tensor))
    phases["copy D2H"] = timed(lambda: tensor.copy_(staging, non_blocking=True))
    phases["kernel reads host"] = timed(lambda: scatter_blocks(cache, tensor, other_ids))
    phases["copy H2D"] = timed(lambda: staging.copy_(tensor, non_blocking=True))
    phases["scatter on device"] = timed(lambda: scatter_blocks(cache, staging, other_ids))
    phases["unregister"] = timed(lambda: unregister(tensor))
    mapped: list[torch.Tensor] = []  # what the destination does: map the file, then read it
    phases["map (reader)"] = timed(lambda: mapped.append(rows.map()))
    phases["copy H2D from the reader's mapping, not registered"] = timed(lambda: staging.copy_(mapped[0]))
    return {"rows": rows, "gbps": {k: nbytes / v / 1e6 for k, v in phases.items()}, "ms": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=256, help="blocks per export (2 MiB each)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--store-blocks", type=int, default=20, help="blocks per KV store load")
    args = parser.parse_args()
    cache = kv_cache(blocks=4 * args.blocks)
    ids = list(range(0, 2 * args.blocks, 2))  # scattered, as a request's blocks are
    other_ids = list(range(2 * args.blocks + 1, 4 * args.blocks, 2))
    nbytes = len(ids) * cache.layout.block_bytes
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    ceiling = {"D2H": nbytes / min(timed(lambda: pinned.copy_(device)) for _ in range(5)) / 1e6,
               "H2D": nbytes / min(timed(lambda: device.copy_(pinned)) for _ in range(5)) / 1e6}
    print(f"{torch.cuda.get_device_name()}: {len(ids)} blocks of {cache.layout.block_bytes >> 20} MiB = "
          f"{nbytes >> 20} MiB; pinned ceiling D2H {ceiling['D2H']:.1f} GB/s, H2D {ceiling['H2D']:.1f} GB/s")
    results: dict[str, list[dict]] = {"cold": [], "warm": []}
    previous = None
    for round_ in range(2 * args.rounds):
        kind = "cold" if round_ % 2 == 0 else "warm"
        result = one_round(cache, ids, other_ids, previous if kind == "warm" else None)
        if kind == "cold" and previous is not None:
            previous.unlink()
        previous = result["rows"]
        results[kind].append(result)
    previous.unlink()
    print("\n| phase | cold ms | warm ms | cold GB/s | warm GB/s |\n| --- | ---: | ---: | ---: | ---: |")
    for phase in results["cold"][0]["ms"]:
        ms = {k: statistics.median(r["ms"][phase] for r in results[k][1:]) for k in results}
        print(f"| {phase} | {ms['cold']:.2f} | {ms['warm']:.2f} | {nbytes / ms['cold'] / 1e6:.1f} | "
              f"{nbytes / ms['warm'] / 1e6:.1f} |")
    store_load(cache, other_ids[:args.store_blocks], args.rounds)


def store_load(cache: KVCacheLayers, block_ids: list[int], rounds: int) -> None:
    """A KV store load: the shard's values (one array per block) stacked into host rows, then scattered
    (`prefix_store`): stacked into pageable memory (the scatter locks it for the copy) or into pinned memory."""
    values = [gather_blocks(cache, [i]).cpu().numpy()[0] for i in block_ids]
    nbytes = len(values) * values[0].size
    for pinned in (False, True, False, True):  # the first of each discarded (allocators warm up)
        times = [timed(lambda: scatter_rows(cache, stack_rows(values, pinned=pinned), block_ids))
                 for _ in range(rounds + 1)][1:]
        ms = statistics.median(times)
        print(f"KV store load of {len(values)} blocks ({nbytes >> 20} MiB), rows "
              f"{'pinned' if pinned else 'pageable'}: {ms:.2f} ms ({nbytes / ms / 1e6:.1f} GB/s)")


if __name__ == "__main__":
    main()
