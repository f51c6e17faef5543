"""Specification of the KV block movers (`rayfleet.kernels`).

Every test runs on the CPU (torch fallback) and, where a GPU is present, on CUDA (Triton kernel,
streams, pinned memory): the same file is CI's check and the GPU machine's.

The reference is deliberately independent of the movers' own layout analysis: a block's staging
bytes are the bytes of `layer.select(block_dim, block)` in address order, layer after layer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rayfleet.kernels import (
    BlockMover,
    KVCacheLayers,
    KVLayoutError,
    SharedRows,
    gather_blocks,
    gather_to_shared,
    live_files,
    scatter_blocks,
    shared_rows,
    torch_copy,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.int8]

NUM_BLOCKS, NUM_LAYERS, NUM_HEADS, BLOCK_SIZE = 32, 3, 2, 16

# vLLM 0.32's KVCacheLayout members: the physical order of the logical axes [L, B, H, N, C].
VLLM_LAYOUTS = {
    "LBHNC": (0, 1, 2, 3, 4),  # CPU backend
    "LBNHC": (0, 1, 3, 2, 4),  # FlashAttention (NHD)
    "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4),
    "BLNHC": (1, 0, 3, 2, 4),
    "BHLNC": (1, 2, 0, 3, 4),
}


@dataclass
class Cache:
    layers: list[torch.Tensor]
    block_dim: int

    def kv(self) -> KVCacheLayers:
        return KVCacheLayers(self.layers, block_dim=self.block_dim)


def random_bytes(nbytes: int, device: str) -> torch.Tensor:
    """Random int8 bytes: every dtype's bit patterns, NaNs included, so comparisons are bytewise."""
    return torch.randint(-128, 128, (nbytes,), dtype=torch.int8, device=device)


def vllm_cache(order: tuple[int, ...], dtype: torch.dtype, device: str, head_size: int = 32, pad: int = 0) -> Cache:
    """Per-layer views of one int8 buffer as vLLM 0.32 builds them (`create_kv_cache_views`):
    logical `[num_blocks, num_kv_heads, block_size, 2 * head_size]`, strides permuted by `order`.
    `pad` bytes after each page imitate `page_size_padded` (layer-outer, block-compact layouts)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shape = (NUM_LAYERS, NUM_BLOCKS, NUM_HEADS, BLOCK_SIZE, 2 * head_size * itemsize)
    strides, stride = [0] * 5, 1
    for dim in reversed(order):
        if dim == 1:
            stride += pad
        strides[dim], stride = stride, stride * shape[dim]
    raw = random_bytes(stride, device)
    view = raw.as_strided(shape, strides)
    return Cache([view[layer].view(dtype) for layer in range(NUM_LAYERS)], block_dim=0)


def legacy_flash_cache(dtype: torch.dtype, device: str, head_size: int = 32) -> Cache:
    """`[2, num_blocks, block_size, num_kv_heads, head_size]` per layer: K and V of a block are two
    runs half a layer apart. Layers lie at irregular distances, as separate allocations may."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shape = (2, NUM_BLOCKS, BLOCK_SIZE, NUM_HEADS, head_size)
    layer_bytes = 2 * NUM_BLOCKS * BLOCK_SIZE * NUM_HEADS * head_size * itemsize
    offsets = [layer * layer_bytes + layer * layer * 256 for layer in range(NUM_LAYERS)]
    raw = random_bytes(offsets[-1] + layer_bytes, device)
    return Cache([raw[offset : offset + layer_bytes].view(dtype).view(shape) for offset in offsets], block_dim=1)


CACHES: dict[str, Callable[[torch.dtype, str], Cache]] = {
    **{name: (lambda dtype, device, order=order: vllm_cache(order, dtype, device)) for name, order in VLLM_LAYOUTS.items()},
    "LBHNC-padded": lambda dtype, device: vllm_cache(VLLM_LAYOUTS["LBHNC"], dtype, device, pad=256),
    # 40-element heads: pages are not a multiple of the kernel's 16 KiB unit or of a power of two.
    "LBNHC-head40": lambda dtype, device: vllm_cache(VLLM_LAYOUTS["LBNHC"], dtype, device, head_size=40),
    "legacy-flash": legacy_flash_cache,
}


def layer_blocks(layer: torch.Tensor, block_dim: int) -> torch.Tensor:
    """`[num_blocks, page_bytes]`: each block's bytes of one layer in address order, read through
    the storage on the CPU."""
    itemsize = layer.element_size()
    storage = torch.empty(0, dtype=torch.uint8).set_(layer.untyped_storage().cpu())
    elements = torch.arange(storage.numel() // itemsize).as_strided(layer.shape, layer.stride(), layer.storage_offset())
    per_block = elements.movedim(block_dim, 0).reshape(layer.shape[block_dim], -1).sort(dim=1).values
    return storage[(per_block.unsqueeze(-1) * itemsize + torch.arange(itemsize)).flatten(1)]


def snapshot(cache: Cache) -> list[torch.Tensor]:
    """Every block of every layer, bytewise, on the CPU."""
    return [layer_blocks(layer, cache.block_dim) for layer in cache.layers]


def reference_rows(cache: Cache, block_ids: list[int]) -> torch.Tensor:
    return torch.cat([blocks[block_ids] for blocks in snapshot(cache)], dim=1)


def distinct_ids(count: int, generator: torch.Generator) -> list[int]:
    return torch.randperm(NUM_BLOCKS, generator=generator)[:count].tolist()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.fixture
def generator(request: pytest.FixtureRequest) -> torch.Generator:
    return torch.Generator().manual_seed(hash(request.node.name) % 2**31)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", CACHES)
def test_gather_returns_each_blocks_bytes_layer_after_layer(layout, dtype, device, generator):
    cache = CACHES[layout](dtype, device)
    block_ids = distinct_ids(int(torch.randint(1, NUM_BLOCKS + 1, (), generator=generator)), generator)
    rows = gather_blocks(cache.kv(), block_ids)
    assert torch.equal(rows.cpu(), reference_rows(cache, block_ids))


@pytest.mark.parametrize("direct_from_bytes", [0, torch_copy.DIRECT_GATHER_PAGE_BYTES])
@pytest.mark.parametrize("layout", CACHES)
def test_no_blocks_gather_to_empty_rows_and_scatter_nothing(layout, direct_from_bytes, monkeypatch):
    """A migration stage with no new complete block gathers nothing (it failed the migration before)."""
    monkeypatch.setattr(torch_copy, "DIRECT_GATHER_PAGE_BYTES", direct_from_bytes)
    cache = CACHES[layout](torch.float32, "cpu")
    before = reference_rows(cache, list(range(NUM_BLOCKS)))
    rows = gather_blocks(cache.kv(), [])
    assert rows.shape == (0, cache.kv().layout.block_bytes)
    scatter_blocks(cache.kv(), rows, [])
    assert torch.equal(reference_rows(cache, list(range(NUM_BLOCKS))), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8], ids=str)
@pytest.mark.parametrize("layout", CACHES)
def test_block_by_block_gather_of_large_pages_is_exact(layout, dtype, generator, monkeypatch):
    """Pages from `DIRECT_GATHER_PAGE_BYTES` on are copied block by block straight into the rows."""
    monkeypatch.setattr(torch_copy, "DIRECT_GATHER_PAGE_BYTES", 0)
    cache = CACHES[layout](dtype, "cpu")
    block_ids = distinct_ids(int(torch.randint(1, NUM_BLOCKS + 1, (), generator=generator)), generator)
    assert torch.equal(gather_blocks(cache.kv(), block_ids), reference_rows(cache, block_ids))


def test_recycled_rows_serve_the_next_allocation_and_the_pool_keeps_its_newest_within_its_bound(monkeypatch):
    def my_pool() -> list[str]:
        return live_files(f"{shared_rows.POOL_PREFIX}{os.getpid()}-")

    first, rows = SharedRows.allocate(4, 4096)
    rows.fill_(7)
    del rows
    first.recycle()
    assert first.name not in live_files() and len(my_pool()) == 1
    second, rows = SharedRows.allocate(2, 4096)  # the pooled file, renamed and cut to size
    assert my_pool() == [] and second.path.stat().st_size == 2 * 4096
    assert torch.equal(second.map(), rows)
    del rows
    monkeypatch.setattr(shared_rows, "POOL_BYTES", 4096)
    second.recycle()  # more than the pool's bound, but the newest file stays whatever its size
    assert len(my_pool()) == 1 and second.name not in live_files()
    third, rows = SharedRows.allocate(1, 4096)  # takes the pooled file
    other, _ = SharedRows.allocate(1, 4096)  # a fresh one
    del rows
    third.recycle()
    newest = other.path.stat().st_ino
    other.recycle()  # the pool keeps its newest files within the bound: the older one goes
    assert [(shared_rows.SHM_DIR / name).stat().st_ino for name in my_pool()] == [newest]
    monkeypatch.setattr(shared_rows, "POOL_BYTES", 0)  # pooling off: recycling unlinks
    fourth, _ = SharedRows.allocate(1, 4096)
    fourth.recycle()
    assert fourth.name not in live_files() and len(my_pool()) == 0


def test_the_cpu_path_never_takes_a_slab_from_the_pool():
    """A GPU writer's recycled slab may be page-locked by readers: resizing it (what the CPU path does to a
    pooled file) would detach their pages. It stays in the pool, marked, for the next GPU gather."""
    slab = shared_rows.SHM_DIR / f"{shared_rows.POOL_PREFIX}{os.getpid()}{shared_rows.SLAB_MARK}test"
    slab.write_bytes(bytes(3 * 4096))
    try:
        rows, _ = SharedRows.allocate(2, 4096)
        assert slab.exists() and slab.stat().st_size == 3 * 4096
        rows.unlink()
    finally:
        slab.unlink(missing_ok=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", CACHES)
def test_scatter_writes_the_target_blocks_and_nothing_else(layout, dtype, device, generator):
    source, target = CACHES[layout](dtype, device), CACHES[layout](dtype, device)
    count = int(torch.randint(1, NUM_BLOCKS // 2, (), generator=generator))
    source_ids, target_ids = distinct_ids(count, generator), distinct_ids(count, generator)
    expected = snapshot(target)
    for layer, source_layer in zip(expected, snapshot(source)):
        layer[target_ids] = source_layer[source_ids]
    scatter_blocks(target.kv(), gather_blocks(source.kv(), source_ids), target_ids)
    synchronize(device)
    assert all(torch.equal(got, want) for got, want in zip(snapshot(target), expected))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("count", [1, 7, NUM_BLOCKS - 1])
def test_block_counts_off_the_kernel_tile_round_trip(count, device, generator):
    source, target = vllm_cache(VLLM_LAYOUTS["LBNHC"], torch.bfloat16, device), vllm_cache(VLLM_LAYOUTS["LBNHC"], torch.bfloat16, device)
    source_ids, target_ids = distinct_ids(count, generator), distinct_ids(count, generator)
    scatter_blocks(target.kv(), gather_blocks(source.kv(), source_ids), target_ids)
    for source_layer, target_layer in zip(source.layers, target.layers):
        assert torch.equal(target_layer[target_ids].view(torch.int16).cpu(), source_layer[source_ids].view(torch.int16).cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [1, 2, 8, 16], ids=lambda offset: f"staging+{offset}B")
def test_staging_at_any_byte_offset_is_filled_exactly(offset, device, generator):
    cache = vllm_cache(VLLM_LAYOUTS["LBNHC"], torch.float16, device)
    block_ids = distinct_ids(5, generator)
    buffer = torch.zeros(offset + 5 * cache.kv().layout.block_bytes + 64, dtype=torch.uint8, device=device)
    out = buffer[offset : offset + 5 * cache.kv().layout.block_bytes].view(5, -1)
    gather_blocks(cache.kv(), block_ids, out=out)
    assert torch.equal(out.cpu(), reference_rows(cache, block_ids))
    assert not buffer[:offset].any() and not buffer[offset + out.numel() :].any()


@pytest.mark.parametrize("device", DEVICES)
def test_odd_sized_runs_are_copied_bytewise(device, generator):
    # 3-byte runs force one-byte words; no vLLM backend makes these, but nothing in the movers assumes widths.
    layers = [random_bytes(NUM_BLOCKS * 4 * 3, device).view(NUM_BLOCKS, 4, 3)[:, ::2] for _ in range(2)]
    cache = Cache(layers, block_dim=0)
    assert cache.kv().alignment == 1 and cache.kv().layout.num_segments == 2
    block_ids = distinct_ids(9, generator)
    assert torch.equal(gather_blocks(cache.kv(), block_ids).cpu(), reference_rows(cache, block_ids))


def test_layout_describes_runs_of_each_layout():
    flash, legacy, head_outer = (
        vllm_cache(VLLM_LAYOUTS["LBNHC"], torch.bfloat16, "cpu").kv().layout,
        legacy_flash_cache(torch.bfloat16, "cpu").kv().layout,
        vllm_cache(VLLM_LAYOUTS["LHBNC"], torch.bfloat16, "cpu").kv().layout,
    )
    page = NUM_HEADS * BLOCK_SIZE * 2 * 32 * 2
    assert (flash.num_segments, flash.segment_bytes, flash.block_stride) == (1, page, page)
    assert (legacy.num_segments, legacy.segment_bytes, legacy.segment_stride) == (2, page // 2, NUM_BLOCKS * page // 2)
    assert (head_outer.num_segments, head_outer.segment_bytes) == (NUM_HEADS, page // NUM_HEADS)
    assert flash.block_bytes == legacy.block_bytes == head_outer.block_bytes == NUM_LAYERS * page


def test_layers_that_are_not_runs_at_one_stride_are_rejected():
    # Per block: 2 x 3 runs of 4 elements, runs 8 apart inside a group but groups 32 apart, not 24.
    ragged = torch.zeros(NUM_BLOCKS, 2, 4, 8)[:, :, :3, :4]
    with pytest.raises(KVLayoutError, match="equal contiguous runs"):
        KVCacheLayers([ragged])


def test_layers_of_different_geometry_are_rejected():
    with pytest.raises(KVLayoutError, match="differ"):
        KVCacheLayers([torch.zeros(NUM_BLOCKS, 16), torch.zeros(NUM_BLOCKS, 32)])


def test_block_ids_out_of_range_raise_before_any_copy():
    cache = vllm_cache(VLLM_LAYOUTS["LBHNC"], torch.float32, "cpu").kv()
    with pytest.raises(IndexError):
        gather_blocks(cache, [0, NUM_BLOCKS])


def test_staging_of_the_wrong_shape_is_rejected():
    cache = vllm_cache(VLLM_LAYOUTS["LBHNC"], torch.float32, "cpu").kv()
    with pytest.raises(ValueError, match="shape"):
        scatter_blocks(cache, torch.zeros(2, cache.layout.block_bytes - 1, dtype=torch.uint8), [0, 1])


# On a GPU the mover has two paths: 2D DMA per block, and the staged kernel + copy-engine pipeline.
# GPU cases carry the `gpu` mark: without a GPU they are deselected (tests/conftest.py), not skipped.
GPU_PATHS = [pytest.param("cuda", True, id="cuda-dma", marks=pytest.mark.gpu),
             pytest.param("cuda", False, id="cuda-staged", marks=pytest.mark.gpu)]
MOVER_PATHS = [pytest.param("cpu", None, id="cpu"), *GPU_PATHS]


@pytest.mark.parametrize("device, use_dma", MOVER_PATHS)
@pytest.mark.parametrize("layout", ["LBNHC", "LHBNC", "BLHNC", "LBHNC-padded", "legacy-flash"])
def test_mover_round_trips_blocks_through_host_memory(layout, device, use_dma, generator):
    source, target = CACHES[layout](torch.bfloat16, device), CACHES[layout](torch.bfloat16, device)
    if use_dma and source.kv().run_pitch is None:
        pytest.skip("no single pitch between a block's runs: the staged path's case")
    source_ids, target_ids = distinct_ids(21, generator), distinct_ids(21, generator)
    # Staged path: a ring of two 2-block slots, so eleven chunks per transfer and each slot reused.
    staging_bytes = 4 * source.kv().layout.block_bytes
    saver = BlockMover(source.kv(), use_dma=use_dma, staging_bytes=staging_bytes)
    loader = BlockMover(target.kv(), use_dma=use_dma, staging_bytes=staging_bytes)
    saved = saver.save(source_ids)
    saved.wait()
    assert saved.done() and saved.host.device.type == "cpu"
    assert torch.equal(saved.host, reference_rows(source, source_ids))
    expected = snapshot(target)
    for layer, source_layer in zip(expected, snapshot(source)):
        layer[target_ids] = source_layer[source_ids]
    loader.load(saved.host, target_ids).wait()
    assert all(torch.equal(got, want) for got, want in zip(snapshot(target), expected))


@pytest.mark.gpu
def test_dma_is_refused_for_layers_without_one_pitch():
    with pytest.raises(ValueError, match="pitch"):
        BlockMover(legacy_flash_cache(torch.bfloat16, "cuda").kv(), use_dma=True)


@pytest.mark.parametrize("device, use_dma", GPU_PATHS)
def test_mover_save_sees_kv_written_on_the_callers_stream(device, use_dma, generator):
    cache = vllm_cache(VLLM_LAYOUTS["LBNHC"], torch.bfloat16, device)
    block_ids = distinct_ids(16, generator)
    mover = BlockMover(cache.kv(), use_dma=use_dma, staging_bytes=4 * cache.kv().layout.block_bytes)
    torch.cuda._sleep(50_000_000)  # keep the current stream busy, so only stream ordering can make this pass
    for layer in cache.layers:
        layer.fill_(3.0)
    transfer = mover.save(block_ids)
    transfer.wait()
    assert torch.equal(transfer.host.view(torch.bfloat16), torch.full_like(transfer.host.view(torch.bfloat16), 3.0))


@pytest.mark.parametrize("device, use_dma", GPU_PATHS)
def test_loaded_blocks_are_visible_to_a_stream_that_waits_for_the_transfer(device, use_dma, generator):
    cache = vllm_cache(VLLM_LAYOUTS["LBNHC"], torch.bfloat16, device)
    block_ids = distinct_ids(16, generator)
    mover = BlockMover(cache.kv(), use_dma=use_dma, staging_bytes=4 * cache.kv().layout.block_bytes)
    host = mover.host_buffer(len(block_ids))
    host.view(torch.bfloat16).fill_(5.0)
    mover.load(host, block_ids).wait_stream()
    first_layer = cache.layers[0][block_ids].clone()  # queued on the current stream after the wait
    assert bool((first_layer == 5.0).all())


@pytest.mark.gpu
def test_kernel_reads_and_writes_pinned_host_staging_directly(generator):
    source, target = vllm_cache(VLLM_LAYOUTS["LBNHC"], torch.bfloat16, "cuda"), vllm_cache(VLLM_LAYOUTS["LBNHC"], torch.bfloat16, "cuda")
    source_ids, target_ids = distinct_ids(9, generator), distinct_ids(9, generator)
    host = torch.zeros(9, source.kv().layout.block_bytes, dtype=torch.uint8, pin_memory=True)
    gather_blocks(source.kv(), source_ids, out=host)
    torch.cuda.synchronize()
    assert torch.equal(host, reference_rows(source, source_ids))
    scatter_blocks(target.kv(), host, target_ids)
    torch.cuda.synchronize()
    assert torch.equal(reference_rows(target, target_ids), host)


@pytest.mark.gpu
@pytest.mark.parametrize("max_programs", [1, 7, None])
def test_kernel_covers_every_unit_with_small_units_and_a_capped_grid(max_programs, generator):
    from rayfleet.kernels import triton_copy

    cache = vllm_cache(VLLM_LAYOUTS["LHBNC"], torch.float16, "cuda", head_size=40)
    block_ids = torch.tensor(distinct_ids(13, generator), device="cuda")
    kv = cache.kv()
    rows = torch.empty(13, kv.layout.block_bytes, dtype=torch.uint8, device="cuda")
    triton_copy.copy_blocks(kv, rows, block_ids, gather=True, alignment=kv.alignment, max_programs=max_programs, unit_bytes=512)
    assert torch.equal(rows.cpu(), reference_rows(cache, block_ids.tolist()))


def interpreted_kernel_round_trip() -> None:
    """Gather and scatter through the Triton kernel itself on CPU tensors; run with TRITON_INTERPRET=1."""
    from rayfleet.kernels import triton_copy

    source = vllm_cache(VLLM_LAYOUTS["LHBNC"], torch.float16, "cpu", head_size=40)  # two 2560-byte runs per block
    target = vllm_cache(VLLM_LAYOUTS["LHBNC"], torch.float16, "cpu", head_size=40)
    kv, block_ids = source.kv(), [7, 0, NUM_BLOCKS - 1]
    rows = torch.zeros(len(block_ids), kv.layout.block_bytes, dtype=torch.uint8)
    # 512-byte units and a grid of 4: several chunks per run and several units per program.
    copy = dict(alignment=kv.alignment, max_programs=4, unit_bytes=512)
    triton_copy.copy_blocks(kv, rows, torch.tensor(block_ids), gather=True, **copy)
    assert torch.equal(rows, reference_rows(source, block_ids))
    triton_copy.copy_blocks(target.kv(), rows, torch.tensor([1, 2, 3]), gather=False, **copy)
    assert torch.equal(reference_rows(target, [1, 2, 3]), rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernel is tested instead")
def test_triton_kernel_is_exact_in_the_interpreter():
    # CI has no GPU: Triton's interpreter runs the very kernel on the CPU. It reads TRITON_INTERPRET
    # when the kernel is defined, hence a fresh process. (Triton 3.6's interpreter fails on NumPy 2.5.)
    pytest.importorskip("triton")
    subprocess.run(
        [sys.executable, "-c", "import test_kernels; test_kernels.interpreted_kernel_round_trip()"],
        cwd=Path(__file__).parent, env={**os.environ, "TRITON_INTERPRET": "1"}, check=True, timeout=300,
    )


def test_real_vllm_views_are_described_and_copied():
    interface = pytest.importorskip("vllm.v1.kv_cache_interface")
    from vllm.v1.kv_cache_layout import KVCacheLayout

    spec = interface.FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=NUM_HEADS, head_size=64, dtype=torch.bfloat16)
    page = spec.page_size_bytes
    for layout in (KVCacheLayout.LBHNC, KVCacheLayout.LBNHC, KVCacheLayout.BLHNC):
        layer_stride, block_stride = (page * NUM_BLOCKS, page) if layout.is_layer_compact else (page, page * NUM_LAYERS)
        tensor = interface.KVCacheTensor(
            size=page * NUM_BLOCKS * NUM_LAYERS, layers=[f"l{i}" for i in range(NUM_LAYERS)],
            layer_stride=layer_stride, block_stride=block_stride,
        )
        layers = interface.create_kv_cache_views(random_bytes(tensor.size, "cpu"), spec, NUM_BLOCKS, layout, tensor)
        cache = Cache(layers, block_dim=0)
        assert cache.kv().layout.page_bytes == page
        assert torch.equal(gather_blocks(cache.kv(), [5, 0, 17]), reference_rows(cache, [5, 0, 17]))


def test_rows_map_from_a_file_larger_than_them():
    """A GPU writer's staging files come in whole slabs (kernels/locked_staging.py): readers map the first rows."""
    rows, tensor = SharedRows.allocate(3, 4096)
    try:
        tensor.copy_(torch.arange(3 * 4096, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 4096))
        os.truncate(rows.path, shared_rows.slab_size(rows.nbytes))
        assert torch.equal(rows.map(), tensor)
        for wrong in (rows.nbytes - 1, rows.nbytes + 4096, shared_rows.slab_size(rows.nbytes) + 4096):
            os.truncate(rows.path, wrong)
            with pytest.raises(ValueError, match="expected"):  # neither exact nor whole slabs holding the rows
                rows.map()
    finally:
        rows.unlink()


def test_slab_rows_are_made_only_by_a_gpu_gather():
    """A slab's file is never resized (a reader on a GPU may keep its pages locked), so the CPU path, which
    resizes pool files, may not make one."""
    with pytest.raises(ValueError, match="slab"):
        SharedRows.named(2, 4096, slab=True).create()
    assert not SharedRows.named(2, 4096).slab
    cache = CACHES["LBHNC"](torch.float32, "cpu").kv()
    with pytest.raises(ValueError, match="slab"):
        gather_to_shared(cache, [0, 1], into=SharedRows.named(2, cache.layout.block_bytes, slab=True))


def test_rows_in_flight_stay_locked_beyond_the_bound_and_pooled_ones_go(tmp_path, monkeypatch):
    """The bound on page-locked staging applies to files waiting in a pool, not to rows a transfer reads next:
    a 4 GiB pre-copy stage dropped when the last, small stage arrived was registered again inside the pause
    (0.9 s on an H200). CUDA's registration is stood in for by recording it: this is the set's bookkeeping."""
    from rayfleet.kernels import locked_staging

    locked: list[int] = []
    monkeypatch.setattr(locked_staging, "register", lambda mapping: locked.append(mapping.data_ptr()))
    monkeypatch.setattr(locked_staging, "unregister", lambda mapping: locked.remove(mapping.data_ptr()))
    staging = locked_staging.LockedStaging(tmp_path, "kv", "kv-rows-", max_bytes=2 * 4096)

    def file(name: str, pages: int) -> Path:
        (tmp_path / name).write_bytes(bytes(pages * 4096))
        return tmp_path / name

    big = staging.reading(file("kv-rows-big", 4), 4 * 4096)  # staged, over the bound alone
    staging.reading(file("kv-rows-last", 1), 4096)  # the last stage: the big one is still in flight
    assert big.data_ptr() in locked and staging.held_bytes() == 5 * 4096
    os.rename(tmp_path / "kv-rows-big", tmp_path / "kv-pool-big")  # loaded and recycled: now it waits in a pool
    staging.reading(file("kv-rows-next", 1), 4096)
    assert big.data_ptr() not in locked and staging.held_bytes() == 2 * 4096
