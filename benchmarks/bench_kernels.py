"""Bandwidth of the KV block movers against the ceilings measured in the same run (GPU only).

Layout: a 7B-class paged KV cache (default 32 layers, 8 KV heads, head dim 128, 16-token blocks, bf16:
64 KiB per block and layer), one int8 buffer viewed per layer as vLLM 0.32 does for FlashAttention
(LBNHC). Each measurement moves `--blocks` random distinct blocks of every layer, fresh ids per repeat.

Device-memory rows count bytes read plus bytes written, for the copy ceiling and the movers alike;
host-transfer rows count the bytes shipped, against a pinned cudaMemcpy of the same size. The decode
rows run a stand-in for decode (per layer: the four bf16 GEMMs of a 7B block against a batch of
`--batch` tokens, which streams ~14 GB of weights per step like a memory-bound decode) alone and with
transfers issued between its steps (back to back, or paced), in rounds against adjacent steps alone.
Timed regions start behind a spin kernel, so host launch latency is reported apart, not as GPU time.

    python benchmarks/bench_kernels.py                 # everything, a markdown report on stdout
    python benchmarks/bench_kernels.py --out report.md --no-sweep
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rayfleet.kernels import BlockMover, KVCacheLayers, gather_blocks, scatter_blocks
from rayfleet.kernels import torch_copy, triton_copy


SPIN_CYCLES = 1_000_000  # ~0.5 ms at H100 clocks


@dataclass
class Row:
    name: str
    ms: float
    gbps: float
    ceiling: str
    ceiling_gbps: float

    def markdown(self) -> str:
        return f"| {self.name} | {self.ms:.3f} | {self.gbps:.0f} | {100 * self.gbps / self.ceiling_gbps:.1f}% of {self.ceiling} |"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block")
    parser.add_argument("--cache-blocks", type=int, default=4096, help="blocks each layer holds")
    parser.add_argument("--blocks", type=int, default=256, help="blocks moved per transfer")
    parser.add_argument("--batch", type=int, default=64, help="tokens per decode step of the stand-in")
    parser.add_argument("--decode-steps", type=int, default=24, help="decode steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alone/beside measurement pairs per transfer kind")
    parser.add_argument("--no-sweep", action="store_true", help="skip the kernel tuning sweep")
    parser.add_argument("--no-decode", action="store_true", help="skip the overlap-with-decode rows")
    parser.add_argument("--out", help="also write the report here")
    return parser.parse_args(argv)


def bench(fn: Callable[[], object], before: Callable[[], object] = lambda: None, repeats: int = 50) -> float:
    """Median milliseconds of `fn` over `repeats` runs after warm-up; `before` (untimed) refreshes inputs."""
    times = []
    for i in range(repeats + 5):
        before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # Keep the GPU busy while the host launches `fn`, so that launch latency is not timed as transfer.
        torch.cuda._sleep(SPIN_CYCLES)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


class Workload:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        page = args.kv_heads * args.block_size * 2 * args.head_dim * 2
        shape = (args.layers, args.cache_blocks, args.kv_heads, args.block_size, 2 * args.head_dim)
        # LBNHC: physical [L, B, N, H, C], logical per-layer view [B, H, N, C], as vLLM's create_kv_cache_views.
        raw = torch.randint(-128, 128, (args.layers * args.cache_blocks * page,), dtype=torch.int8, device="cuda")
        strides = (args.cache_blocks * page // 2, page // 2, 2 * args.head_dim, args.kv_heads * 2 * args.head_dim, 1)
        view = raw.view(torch.bfloat16).as_strided(shape, strides)
        self.layers = [view[layer] for layer in range(args.layers)]
        self.cache = KVCacheLayers(self.layers)
        self.bytes = args.blocks * self.cache.layout.block_bytes
        self.staging = torch.empty((args.blocks, self.cache.layout.block_bytes), dtype=torch.uint8, device="cuda")
        self.host = [torch.empty(self.staging.shape, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.ids = self.fresh_ids()

    def fresh_ids(self) -> torch.Tensor:
        self.ids = torch.randperm(self.args.cache_blocks, device="cuda")[: self.args.blocks]
        return self.ids


def warm_up(work: Workload, seconds: float = 2.0) -> None:
    """Run copies until clocks and power have settled, so the first contender is not measured cold."""
    source = torch.empty_like(work.staging)
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(50):
            work.staging.copy_(source)
        torch.cuda.synchronize()


def ceilings(work: Workload) -> dict[str, float]:
    """GB/s of a device copy (read+write) and of pinned D2H / H2D copies, all of `work.bytes`."""
    source = torch.empty_like(work.staging).random_(0, 255)
    d2d = bench(lambda: work.staging.copy_(source))
    d2h = bench(lambda: work.host[0].copy_(work.staging, non_blocking=True))
    h2d = bench(lambda: work.staging.copy_(work.host[0], non_blocking=True))
    return {"copy": 2 * work.bytes / d2d / 1e6, "D2H": work.bytes / d2h / 1e6, "H2D": work.bytes / h2d / 1e6,
            "copy_ms": d2d, "D2H_ms": d2h, "H2D_ms": h2d}


def device_rows(work: Workload, ceiling: dict[str, float]) -> list[Row]:
    moved = 2 * work.bytes
    cache, staging, alignment = work.cache, work.staging, work.cache.alignment
    contenders = {
        "gather, naive per-layer index_select (bf16 views)": lambda: [layer.index_select(0, work.ids) for layer in work.layers],
        "gather, torch fallback (rayfleet torch_copy)": lambda: torch_copy.copy_blocks(cache, staging, work.ids, True, alignment),
        "gather, Triton fused kernel (gather_blocks)": lambda: gather_blocks(cache, work.ids, out=staging),
        "scatter, torch fallback (rayfleet torch_copy)": lambda: torch_copy.copy_blocks(cache, staging, work.ids, False, alignment),
        "scatter, Triton fused kernel (scatter_blocks)": lambda: scatter_blocks(cache, staging, work.ids),
    }
    rows = [Row("copy ceiling: torch D2D copy of the same bytes", ceiling["copy_ms"], ceiling["copy"], "copy", ceiling["copy"])]
    for name, fn in contenders.items():
        ms = bench(fn, work.fresh_ids)
        rows.append(Row(name, ms, moved / ms / 1e6, "copy", ceiling["copy"]))
    return rows


def sweep_rows(work: Workload, ceiling: dict[str, float]) -> list[Row]:
    """The Triton kernel's tuning space: bytes per program unit, warps, grid cap."""
    rows = []
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    configs = [(unit, warps, None) for unit in (8192, 16384, 65536) for warps in (4, 8, 16)]
    configs += [(triton_copy.UNIT_BYTES, triton_copy.NUM_WARPS, programs) for programs in (16, num_sms, 4 * num_sms)]
    for gather in (True, False):
        for unit, warps, programs in configs:
            ms = bench(lambda: triton_copy.copy_blocks(
                work.cache, work.staging, work.ids, gather, work.cache.alignment,
                max_programs=programs, unit_bytes=unit, num_warps=warps), work.fresh_ids)
            name = f"{'gather' if gather else 'scatter'} unit={unit // 1024}KiB warps={warps} programs={programs or 'all'}"
            rows.append(Row(name, ms, 2 * work.bytes / ms / 1e6, "copy", ceiling["copy"]))
    return rows


def movers(work: Workload) -> dict[str, BlockMover]:
    return {
        "DMA": BlockMover(work.cache, use_dma=True),
        "staged, 16 programs": BlockMover(work.cache, use_dma=False, max_programs=16),
        "staged, full grid": BlockMover(work.cache, use_dma=False, max_programs=None),
    }


def host_rows(work: Workload, ceiling: dict[str, float]) -> tuple[list[Row], list[str]]:
    """Rows for host transfers, and lines on the host CPU time it takes to issue one."""
    rows = [
        Row("D2H ceiling: pinned cudaMemcpy of the same bytes", ceiling["D2H_ms"], ceiling["D2H"], "D2H", ceiling["D2H"]),
        Row("H2D ceiling: pinned cudaMemcpy of the same bytes", ceiling["H2D_ms"], ceiling["H2D"], "H2D", ceiling["H2D"]),
    ]
    issue = []
    for label, mover in movers(work).items():
        for save in (True, False):
            def transfer() -> None:
                (mover.save(work.ids, work.host[0]) if save else mover.load(work.host[0], work.ids)).wait_stream()
            ms = bench(transfer, work.fresh_ids)
            direction = "D2H" if save else "H2D"
            name = f"{'save (D2H)' if save else 'load (H2D)'}, BlockMover {label}"
            rows.append(Row(name, ms, work.bytes / ms / 1e6, direction, ceiling[direction]))
        ids = work.ids.tolist()
        torch.cuda.synchronize()
        started = time.perf_counter()
        mover.save(ids, work.host[0])
        issue.append(f"host CPU time to issue one save, BlockMover {label}: {1e3 * (time.perf_counter() - started):.2f} ms")
        torch.cuda.synchronize()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(100):
        gather_blocks(work.cache, work.ids, out=work.staging)
    issue.append(f"host CPU time to issue one gather_blocks: {1e3 * (time.perf_counter() - started) / 100:.3f} ms")
    torch.cuda.synchronize()
    for gather in (True, False):
        ms = bench(lambda: triton_copy.copy_blocks(
            work.cache, work.host[0], work.ids, gather, work.cache.alignment, max_programs=16), work.fresh_ids)
        direction = "D2H" if gather else "H2D"
        rows.append(Row(f"{'gather straight to' if gather else 'scatter straight from'} pinned host "
                        "(zero-copy kernel, 16 programs)", ms, work.bytes / ms / 1e6, direction, ceiling[direction]))
    return rows, issue


class Decode:
    """Stand-in for a decode step: per layer x@Wqkv, x@Wo, x@Wgate_up, x@Wdown in bf16 (7B shapes)."""

    def __init__(self, args: argparse.Namespace) -> None:
        hidden, inter = 4096, 14336
        shapes = [(hidden, 3 * hidden // 2), (hidden, hidden), (hidden, 2 * inter), (inter, hidden)]
        self.weights = [[torch.randn(shape, dtype=torch.bfloat16, device="cuda") for shape in shapes]
                        for _ in range(args.layers)]
        self.x = torch.randn(args.batch, hidden, dtype=torch.bfloat16, device="cuda")
        self.x_inter = torch.randn(args.batch, inter, dtype=torch.bfloat16, device="cuda")

    def step(self) -> None:
        for w_qkv, w_o, w_up, w_down in self.weights:
            self.x @ w_qkv
            self.x @ w_o
            self.x @ w_up
            self.x_inter @ w_down


IssueTransfer = Callable[[torch.Tensor, torch.Tensor], Callable[[torch.cuda.Stream], None]]


@dataclass
class Overlap:
    """One round: decode steps that ran beside transfers, and the transfers' rate meanwhile."""

    step_ms: float
    overlapped: int
    rate_gbps: float


def timed_steps(decode: Decode, steps: int, before_step: Callable[[int], object] = lambda step: None) -> list[torch.cuda.Event]:
    """Queue `steps` decode steps, calling `before_step(step)` before each; events bracket the steps.

    The host is kept within two steps of the GPU, so that what it issues between steps lands beside
    the step it precedes (and a DMA save, which queues one copy per block, never meets the driver's
    full queue: it blocks the caller once about a thousand copies are queued)."""
    marks = [torch.cuda.Event(enable_timing=True)]
    marks[0].record()
    for step in range(steps):
        before_step(step)
        decode.step()
        marks.append(torch.cuda.Event(enable_timing=True))
        marks[-1].record()
        if len(marks) > 3:
            marks[-3].synchronize()
    torch.cuda.synchronize()
    return marks


def decode_alone(decode: Decode, steps: int) -> float:
    """Median step time with nothing beside it."""
    marks = timed_steps(decode, steps)
    return statistics.median(a.elapsed_time(b) for a, b in zip(marks, marks[1:]))


def decode_beside(
    work: Workload, decode: Decode, transfer: IssueTransfer, blocks: int, alone_ms: float, steps: int, copy_gbps: float
) -> Overlap:
    """Decode steps with transfers of `blocks` random blocks issued between them, as a connector would.

    Back to back (all blocks of the workload): transfers are issued so that about two stay queued
    ahead of a copy engine moving `copy_gbps`. Paced (fewer blocks): one transfer before every step."""
    transfer_ms = work.bytes / copy_gbps / 1e6
    back_to_back = blocks == work.args.blocks
    # A probe stream waits for each transfer as it is issued, so its events time the transfers' ends.
    probe, ends = torch.cuda.Stream(), []

    def issue(step: int) -> None:
        due = int(2 + step * alone_ms / transfer_ms) if back_to_back else step + 1
        while len(ends) < due:
            wait = transfer(torch.randperm(work.args.cache_blocks)[:blocks], work.host[len(ends) % 2][:blocks])
            wait(probe)
            ends.append(probe.record_event(torch.cuda.Event(enable_timing=True)))

    marks = timed_steps(decode, steps, issue)
    overlapped = [a.elapsed_time(b) for a, b in zip(marks, marks[1:]) if b.elapsed_time(ends[-1]) > 0]
    rate = len(ends) * blocks * work.cache.layout.block_bytes / marks[0].elapsed_time(ends[-1]) / 1e6
    return Overlap(statistics.median(overlapped) if overlapped else float("nan"), len(overlapped), rate)


def decode_rows(work: Workload, args: argparse.Namespace, ceiling: dict[str, float]) -> list[str]:
    """Decode slowdown beside each kind of transfer: per round, the steps beside transfers against
    steps alone measured just before, so that drift in clocks or power cancels; median of rounds."""
    decode = Decode(args)
    decode_alone(decode, 3)
    side = torch.cuda.Stream()
    contiguous = torch.empty_like(work.staging)

    def on_side(copy: Callable[[], object]) -> Callable[[torch.cuda.Stream], None]:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            copy()
        return lambda stream: stream.wait_stream(side)

    mover, staged = BlockMover(work.cache, use_dma=True), BlockMover(work.cache, use_dma=False, max_programs=16)
    candidates: list[tuple[str, IssueTransfer, int]] = [
        ("plain pinned cudaMemcpy D2H of a contiguous buffer (floor)",
         lambda ids, host: on_side(lambda: host.copy_(contiguous[: len(host)], non_blocking=True)), args.blocks),
        ("plain pinned cudaMemcpy H2D of a contiguous buffer (floor)",
         lambda ids, host: on_side(lambda: contiguous[: len(host)].copy_(host, non_blocking=True)), args.blocks),
        ("save, BlockMover DMA", lambda ids, host: mover.save(ids, host).wait_stream, args.blocks),
        ("load, BlockMover DMA", lambda ids, host: mover.load(host, ids).wait_stream, args.blocks),
        ("save, BlockMover staged (16 programs)", lambda ids, host: staged.save(ids, host).wait_stream, args.blocks),
        ("load, BlockMover staged (16 programs)", lambda ids, host: staged.load(host, ids).wait_stream, args.blocks),
        ("save, zero-copy kernel to pinned host (16 programs)", lambda ids, host: on_side(
            lambda: triton_copy.copy_blocks(work.cache, host, ids.cuda(), True, work.cache.alignment, max_programs=16)),
         args.blocks),
    ]
    for paced in (16, 64):
        candidates.append((f"load, BlockMover DMA, paced: {paced} blocks per step",
                           lambda ids, host: mover.load(host, ids).wait_stream, paced))
    lines = []
    for name, transfer, blocks in candidates:
        slowdowns, rounds = [], []
        for _ in range(args.rounds):
            alone = decode_alone(decode, args.decode_steps)
            rounds.append(decode_beside(work, decode, transfer, blocks, alone, args.decode_steps, ceiling["D2H"]))
            slowdowns.append(100 * (rounds[-1].step_ms / alone - 1))
        line = (f"| {name} | {statistics.median(slowdowns):+.1f}% | {min(slowdowns):+.1f}% .. {max(slowdowns):+.1f}% | "
                f"{min(r.overlapped for r in rounds)} of {args.decode_steps} | "
                f"{statistics.median(r.rate_gbps for r in rounds):.1f} GB/s | {alone:.3f} ms |")
        print(line, flush=True)
        lines.append(line)
    return lines


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels needs a CUDA GPU")
    import triton

    work = Workload(args)
    warm_up(work)
    ceiling = ceilings(work)
    layout = work.cache.layout
    report = [
        f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
        f"date {datetime.date.today().isoformat()}",
        f"command: python benchmarks/bench_kernels.py {' '.join(argv)}",
        f"layout: {args.layers} layers x {args.kv_heads} KV heads x head dim {args.head_dim} x {args.block_size}-token "
        f"blocks, bf16, LBNHC; {layout.page_bytes // 1024} KiB per block and layer; {args.blocks} random blocks of "
        f"{args.cache_blocks} per transfer = {work.bytes / 2**20:.0f} MiB",
        "",
        "| contender | ms (median) | GB/s | vs ceiling |",
        "|---|---|---|---|",
    ]
    transfers, issue = host_rows(work, ceiling)
    sections = [device_rows(work, ceiling), transfers]
    if not args.no_sweep:
        sections.append(sweep_rows(work, ceiling))
    for rows in sections:
        report += [row.markdown() for row in rows]
        print("\n".join(row.markdown() for row in rows), flush=True)
    recheck = bench(lambda: work.staging.copy_(torch.empty_like(work.staging)))
    report += [f"| copy ceiling re-measured after all rows above | {recheck:.3f} | {2 * work.bytes / recheck / 1e6:.0f} | |",
               "", *issue]
    if not args.no_decode:
        report += ["", "| beside decode | slowdown (median of rounds) | rounds | steps overlapped (fewest) "
                   "| transfer rate meanwhile | decode step alone |", "|---|---|---|---|---|---|", *decode_rows(work, args, ceiling)]
    text = "\n".join(report)
    print(text)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
