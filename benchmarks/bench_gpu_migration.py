"""KV migration between two processes' paged KV caches on GPUs, through the connector's own worker code.

The GPU machine has no vLLM, so this runs rayfleet's KV connector worker half (`WorkerKVMigrationState`, the
code that runs inside vLLM's worker process) over vLLM-shaped paged caches held by torch: FlashAttention
layout (LBNHC views of one buffer per engine), 16-token blocks, bf16, Llama-3-8B's KV shape (32 layers,
8 KV heads of 128: 2 MiB per block, 128 KiB per token). A source process exports a request's blocks
(`export_final` for a stop-and-copy, `export_blocks` for pre-copy stages); a destination process, with its
own cache, stages them (`stage`) and loads them into freshly allocated blocks (`start_load`), exactly as the
connector does inside vLLM. Transports:

- `device (CUDA IPC)`: rows gathered into a GPU buffer of the source, opened by the destination through a
  CUDA IPC handle and scattered device to device (on one GPU; across two GPUs the destination first copies the
  rows over the peer link);
- `host-staged (/dev/shm)`: rows gathered straight into a page-locked shared-memory file, scattered from it;
- `same process (reference)`: gather and scatter in one process, no IPC (the floor of the device path).

Reported per transfer size (16 blocks to a 32k-token request): GB/s of KV moved (bytes / (export + stage +
load) seconds) against ceilings measured in the same run (a device copy of the same bytes on one GPU, a
peer copy across two; pinned D2H+H2D for host staging); the last-stage downtime of a 32k-token request
pre-copied up to its last 16 blocks (export the last stage, stage it, load everything staged: the pause the
connector imposes); and the slowdown of a decode stand-in (bench_kernels.Decode, 7B GEMMs) beside migration
transfers issued between its steps, back to back and paced like pre-copy stages.

    python benchmarks/bench_gpu_migration.py                  # on a GPU machine (one GPU, or two)
    python benchmarks/bench_gpu_migration.py --device cpu --layers 2 --cache-blocks 64 --sizes 4,16 --no-decode
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

HOST, DEVICE = "host", "device"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test of the logic")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--cache-blocks", type=int, default=4096, help="blocks per engine's cache (64k tokens)")
    parser.add_argument("--sizes", default="16,256,1024,2048", help="blocks per transfer (2048 = 32k tokens)")
    parser.add_argument("--repeats", type=int, default=5, help="transfers per size and transport (median)")
    parser.add_argument("--batch", type=int, default=64, help="tokens per decode step of the stand-in")
    parser.add_argument("--decode-steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3, help="alone/beside pairs per decode measurement")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--out", help="also write the markdown report here")
    args = parser.parse_args(argv)
    args.sizes = [int(size) for size in args.sizes.split(",")]
    return args


# ---------------------------------------------------------------------------------------------------- caches
def kv_cache(args: argparse.Namespace, device: str) -> list[torch.Tensor]:
    """Per-layer LBNHC views of one bf16 buffer ([blocks, kv heads, block tokens, 2 x head dim] logically),
    as vLLM 0.32 lays out a FlashAttention cache; random contents."""
    page = args.kv_heads * args.block_size * 2 * args.head_dim
    raw = torch.randn(args.layers * args.cache_blocks * page, dtype=torch.float32, device=device).to(torch.bfloat16)
    shape = (args.layers, args.cache_blocks, args.kv_heads, args.block_size, 2 * args.head_dim)
    strides = (args.cache_blocks * page, page, 2 * args.head_dim, args.kv_heads * 2 * args.head_dim, 1)
    view = raw.as_strided(shape, strides)
    return [view[layer] for layer in range(args.layers)]


def worker_over(layers: list[torch.Tensor], args: argparse.Namespace):
    """The connector's worker half over these layers, set up as `register_kv_caches` does."""
    from rayfleet.actors.kv.migration_state import WorkerKVMigrationState
    from rayfleet.kernels import KVCacheLayers

    config = SimpleNamespace(cache_config=SimpleNamespace(block_size=args.block_size, kv_cache_layout="LBNHC"))
    worker = WorkerKVMigrationState(config, SimpleNamespace(num_blocks=args.cache_blocks, kv_cache_layout="LBNHC"))
    worker.register_cache(KVCacheLayers(layers))
    return worker


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------- destination
def destination_main(conn, args: argparse.Namespace) -> None:
    """The destination engine's worker, in its own process: stage chunks, load them, report the times."""
    from rayfleet.actors.kv.metadata import LoadJob, RayfleetConnectorMetadata

    device = "cpu" if args.device == "cpu" else f"cuda:{1 if torch.cuda.device_count() > 1 else 0}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    layers = kv_cache(args, device)
    worker = worker_over(layers, args)
    conn.send(("ready", worker.gpu_uuids()))
    while True:
        message = conn.recv()
        if message[0] == "stop":
            return
        _, migration_id, wires, block_ids, verify = message
        began = time.perf_counter()
        for wire in wires:
            worker.stage(migration_id, wire)
        staged = time.perf_counter()
        worker.bind(RayfleetConnectorMetadata(loads=[LoadJob(migration_id, 0, block_ids, len(block_ids))]))
        worker.start_load()
        sync(device)
        loaded = time.perf_counter()
        digest = checksum(layers, block_ids) if verify else None
        conn.send((staged - began, loaded - staged, digest, worker.take_load_errors()))


def checksum(layers: list[torch.Tensor], block_ids: list[int]) -> float:
    ids = torch.tensor(block_ids, device=layers[0].device)
    return float(sum(layer.index_select(0, ids).float().sum().item() for layer in layers))


def receive(conn, timeout_s: float = 120.0):
    """The destination's answer, or an error if it died or hangs (never wait forever on a lent machine)."""
    if not conn.poll(timeout_s):
        raise TimeoutError(f"the destination process did not answer within {timeout_s:.0f} s")
    return conn.recv()


# ---------------------------------------------------------------------------------------------------- source
@dataclass
class Moved:
    export_s: float
    stage_s: float
    load_s: float
    wall_s: float
    precopy_held_s: float = 0.0  # the engine's loop held by the pre-copy stage's export call
    precopy_landed_s: float = 0.0  # from that call until its rows had landed


class Source:
    """The source engine's worker in this process, plus the pipe to the destination's."""

    def __init__(self, args: argparse.Namespace, conn):
        self.args, self.conn = args, conn
        self.layers = kv_cache(args, args.device)
        self.worker = worker_over(self.layers, args)
        self.count = 0

    def migrate(self, num_blocks: int, transport: str, precopy_to: int = 0, verify: bool = False) -> Moved:
        """Stop-and-copy of `num_blocks` blocks (after pre-copying the first `precopy_to`, staged at the
        destination untimed): export the rest, stage it, load everything, as the connector's resume does."""
        from rayfleet.actors.kv.metadata import FinalRequest, RayfleetConnectorMetadata, TrackedRequest
        from rayfleet.actors.kv.transfer import KVChunk

        self.count += 1
        external, internal, migration = f"r{self.count}", f"r{self.count}-0", f"m{self.count}"
        generator = torch.Generator().manual_seed(self.count)
        src_ids = torch.randperm(self.args.cache_blocks, generator=generator)[:num_blocks].tolist()
        dst_ids = torch.randperm(self.args.cache_blocks, generator=generator)[:num_blocks].tolist()
        tokens = num_blocks * self.args.block_size
        wires, held_s, landed_s = [], 0.0, 0.0
        if precopy_to:  # the request has computed `precopy_to` blocks when the pre-copy stage runs
            progress = TrackedRequest(internal, external, precopy_to * self.args.block_size, src_ids)
            self.worker.bind(RayfleetConnectorMetadata(tracked=[progress]))
            called = time.perf_counter()
            precopy = self.worker.export_blocks(external, 0, transport)
            held_s = time.perf_counter() - called
            if not precopy["landed"]:  # host rows gathered while the engine steps: wait for them, as the connector does
                assert self.worker.export_landed(external) == {"status": "live"}
            landed_s = time.perf_counter() - called
            wires.append(precopy["chunk"])
        began = time.perf_counter()
        self.worker.expect_final(external, 60.0)
        self.worker.bind(RayfleetConnectorMetadata(finals=[FinalRequest(internal, external, src_ids, tokens, [])]))
        final = self.worker.export_final(external, precopy_to, transport)["chunk"]
        exported = time.perf_counter()
        self.conn.send(("load", migration, [*wires, final], dst_ids, verify))
        stage_s, load_s, digest, errors = receive(self.conn)
        wall = time.perf_counter() - began
        chunks = [KVChunk.from_wire(wire) for wire in (*wires, final)]
        self.worker.release_rows([chunk.device.name for chunk in chunks if chunk.device is not None])
        for chunk in chunks:  # as the source's replica does once a migration handed off (`EngineKVMigrator.release`)
            chunk.recycle()
        self.worker.take_finished_sending()
        if errors:
            raise RuntimeError(f"destination reported load errors for blocks {sorted(errors)[:8]}...")
        if verify and abs(digest - checksum(self.layers, src_ids)) > 1e-3 * max(1.0, abs(digest)):
            raise RuntimeError(f"{transport}: destination blocks differ from the source's ({digest} vs source)")
        return Moved(exported - began, stage_s, load_s, wall, held_s, landed_s)


# ---------------------------------------------------------------------------------------------------- report
def ceilings(args: argparse.Namespace, nbytes: int) -> dict[str, float]:
    """Bytes per second: a device copy of `nbytes` (peer copy across two GPUs), pinned D2H and H2D."""
    if args.device != "cuda":
        src, dst = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
        memcpy = nbytes / best_of(lambda: dst.copy_(src))
        return {"device": memcpy, "host": memcpy}
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    b = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1" if torch.cuda.device_count() > 1 else "cuda:0")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = nbytes / best_of(lambda: b.copy_(a), cuda=True)
    d2h = nbytes / best_of(lambda: host.copy_(a), cuda=True)
    h2d = nbytes / best_of(lambda: a.copy_(host), cuda=True)
    return {"device": device, "host": 1 / (1 / d2h + 1 / h2d)}


def best_of(fn, repeats: int = 5, cuda: bool = False) -> float:
    times = []
    for _ in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return min(times[1:])


def transfer_rows(source: Source, args: argparse.Namespace, transports: list[str]) -> list[str]:
    block_bytes = source.worker._layout.bytes_per_block
    lines = []
    for size in args.sizes:
        nbytes = size * block_bytes
        ceiling = ceilings(args, nbytes)
        for transport in transports:
            if transport == HOST and nbytes > 0.8 * shutil.disk_usage("/dev/shm").free:
                lines.append(f"| {size} ({size * args.block_size} tokens) | {transport} | {nbytes / 2**20:.1f} | "
                             "not run: /dev/shm too small on this machine | | | | | |")
                continue
            source.migrate(size, transport, verify=True)  # warm-up, and a check that the bytes arrived intact
            runs = [source.migrate(size, transport) for _ in range(args.repeats)]
            moved = statistics.median(r.export_s + r.stage_s + r.load_s for r in runs)
            rate = nbytes / moved
            ref = ceiling["device" if transport == DEVICE else "host"]
            lines.append(f"| {size} ({size * args.block_size} tokens) | {transport} | {nbytes / 2**20:.1f} | "
                         f"{1e3 * statistics.median(r.export_s for r in runs):.2f} | "
                         f"{1e3 * statistics.median(r.stage_s for r in runs):.2f} | "
                         f"{1e3 * statistics.median(r.load_s for r in runs):.2f} | {rate / 1e9:.1f} | "
                         f"{ref / 1e9:.1f} | {100 * rate / ref:.0f}% |")
            print(lines[-1], flush=True)
    return lines


def downtime_rows(source: Source, args: argparse.Namespace, transports: list[str]) -> list[str]:
    size = max(args.sizes)
    last_stage = min(16, size)
    lines = []
    for transport in transports:
        if transport == HOST and size * source.worker._layout.bytes_per_block > 0.8 * shutil.disk_usage("/dev/shm").free:
            lines.append(f"| {size * args.block_size} | {transport} | {last_stage} | not run: /dev/shm too small | | | |")
            continue
        runs = [source.migrate(size, transport, precopy_to=size - last_stage) for _ in range(args.repeats)]
        lines.append(f"| {size * args.block_size} | {transport} | {last_stage} | "
                     f"{1e3 * statistics.median(r.export_s + r.stage_s + r.load_s for r in runs):.2f} | "
                     f"{1e3 * statistics.median(r.wall_s for r in runs):.2f} | "
                     f"{1e3 * statistics.median(r.precopy_held_s for r in runs):.2f} | "
                     f"{1e3 * statistics.median(r.precopy_landed_s for r in runs):.2f} |")
        print(lines[-1], flush=True)
    return lines


def decode_rows(source: Source, args: argparse.Namespace) -> list[str]:
    """Decode stand-in steps with migration copies issued between them on a side stream (the kernels' gather out
    of this cache, scatter into another), back to back or paced like pre-copy stages, against steps alone;
    optionally with the copy kernels' grid capped, so they leave most SMs and bandwidth to decode."""
    import bench_kernels
    from rayfleet.kernels import KVCacheLayers, triton_copy

    cache = source.worker._cache
    decode = bench_kernels.Decode(SimpleNamespace(layers=args.layers, batch=args.batch))
    bench_kernels.decode_alone(decode, 3)
    other = KVCacheLayers(kv_cache(args, "cuda"))
    side = torch.cuda.Stream()
    lines = []
    for name, blocks, every, programs in (("back to back, 256 blocks per transfer", 256, 1, None),
                                          ("back to back, 256 blocks, kernels capped at 16 programs", 256, 1, 16),
                                          ("pre-copy stage of 64 blocks every 4th step", 64, 4, None)):
        slowdowns = []
        for _ in range(args.rounds):
            alone = bench_kernels.decode_alone(decode, args.decode_steps)

            def issue(step: int) -> None:
                if step % every:
                    return
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # allocated on the side stream: decode never reuses them early
                    ids = torch.randperm(args.cache_blocks, device="cuda")[:blocks]
                    rows = torch.empty((blocks, cache.layout.block_bytes), dtype=torch.uint8, device="cuda")
                    for into, gather in ((cache, True), (other, False)):
                        triton_copy.copy_blocks(into, rows, ids, gather, cache.alignment, max_programs=programs)

            marks = bench_kernels.timed_steps(decode, args.decode_steps, issue)
            beside = statistics.median(a.elapsed_time(b) for a, b in zip(marks, marks[1:]))
            slowdowns.append(100 * (beside / alone - 1))
        lines.append(f"| {name} | {statistics.median(slowdowns):+.1f}% | {min(slowdowns):+.1f}% .. "
                     f"{max(slowdowns):+.1f}% | {alone:.3f} ms |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: pass --device cpu for a smoke test of the logic")
    context = mp.get_context("spawn")
    parent, child = context.Pipe()
    destination = context.Process(target=destination_main, args=(child, args), daemon=True)
    destination.start()
    _, dst_gpus = receive(parent)
    source = Source(args, parent)
    src_gpus = source.worker.gpu_uuids()
    transports = [HOST] + ([DEVICE] if src_gpus and src_gpus[0] in dst_gpus else [])
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    name = torch.cuda.get_device_name() if gpus else "CPU"
    report = [f"device: {gpus} x {name}; torch {torch.__version__}; date {datetime.date.today().isoformat()}; "
              f"command: python benchmarks/bench_gpu_migration.py {' '.join(argv)}",
              f"cache: {args.layers} layers, {args.kv_heads} KV heads of {args.head_dim}, {args.block_size}-token "
              f"blocks, bf16, LBNHC: {source.worker._layout.bytes_per_block / 2**20:.2f} MiB per block", "",
              "| blocks moved | transport | MiB | export ms | stage ms | load ms | GB/s | ceiling GB/s | of ceiling |",
              "|---|---|---|---|---|---|---|---|---|"]
    report += transfer_rows(source, args, transports)
    report += ["", "| request tokens | transport | last-stage blocks | downtime ms (export + stage + load all) "
               "| with the pipe round trip ms | pre-copy stage: engine loop held ms | pre-copy stage: rows landed ms |",
               "|---|---|---|---|---|---|---|"]
    report += downtime_rows(source, args, transports)
    if not args.no_decode and args.device == "cuda":
        report += ["", "| decode stand-in beside migration copies | slowdown (median) | range | step alone |",
                   "|---|---|---|---|"]
        report += decode_rows(source, args)
    parent.send(("stop",))
    destination.join(timeout=60)
    text = "\n".join(report)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
