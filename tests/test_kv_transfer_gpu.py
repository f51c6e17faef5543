"""Migration rows on a GPU: host-staged through page-locked shared memory, and device rows opened by another
process through CUDA IPC, moved by the connector's worker half. GPU only (deselected without CUDA; run on the
GPU machine with `benchmarks/gpu_session.sh`)."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.gpu

BLOCK_SIZE, NUM_BLOCKS, LAYERS = 16, 64, 4


def _layers(seed: int) -> list[torch.Tensor]:
    """LBNHC bf16 views of one buffer, as vLLM lays out a FlashAttention cache; contents from `seed`."""
    heads, head_dim = 2, 64
    page = heads * BLOCK_SIZE * 2 * head_dim
    generator = torch.Generator(device="cuda").manual_seed(seed)
    raw = torch.randn(LAYERS * NUM_BLOCKS * page, device="cuda", generator=generator).to(torch.bfloat16)
    shape = (LAYERS, NUM_BLOCKS, heads, BLOCK_SIZE, 2 * head_dim)
    view = raw.as_strided(shape, (NUM_BLOCKS * page, page, 2 * head_dim, heads * 2 * head_dim, 1))
    return [view[layer] for layer in range(LAYERS)]


def _digest(rows: torch.Tensor) -> str:
    return hashlib.sha256(rows.cpu().numpy().tobytes()).hexdigest()


def _worker(layers: list[torch.Tensor]):
    from rayfleet.actors.kv.migration_state import WorkerKVMigrationState
    from rayfleet.kernels import KVCacheLayers

    config = SimpleNamespace(cache_config=SimpleNamespace(block_size=BLOCK_SIZE, kv_cache_layout="LBNHC"))
    worker = WorkerKVMigrationState(config, SimpleNamespace(num_blocks=NUM_BLOCKS, kv_cache_layout="LBNHC"))
    worker.register_cache(KVCacheLayers(layers))
    return worker


def test_shared_rows_gathered_on_a_gpu_are_byte_exact():
    from rayfleet.kernels import KVCacheLayers, gather_blocks, gather_to_shared, live_files, scatter_rows

    source, target = KVCacheLayers(_layers(1)), KVCacheLayers(_layers(2))
    ids, into = [5, 3, 60, 7], [0, 1, 2, 63]
    shared = gather_to_shared(source, ids)
    try:
        assert torch.equal(shared.map(), gather_blocks(source, ids).cpu())
        scatter_rows(target, shared.map(), into)
        assert torch.equal(gather_blocks(target, into), gather_blocks(source, ids))
    finally:
        shared.unlink()
    assert shared.name not in live_files()


def test_a_recycled_staging_file_stays_page_locked_and_is_reused_without_a_resize():
    """The second export finds the writer's file locked already; a smaller one reuses it at its size (a resize
    would detach pinned pages from the file), and what readers map is still exactly the gathered rows."""
    from rayfleet.kernels import KVCacheLayers, gather_blocks, gather_to_shared, shared_rows

    source = KVCacheLayers(_layers(4))
    first = gather_to_shared(source, [1, 2, 3, 4, 5, 6])
    inode, size = first.path.stat().st_ino, first.path.stat().st_size
    assert first.slab and size == shared_rows.slab_size(first.nbytes) and size > first.nbytes
    held = shared_rows._LOCKED.held_bytes()
    read = first.map(locked=True)  # what a destination on a GPU stages
    assert read.is_pinned() and torch.equal(read, gather_blocks(source, [1, 2, 3, 4, 5, 6]).cpu())
    assert not first.map().is_pinned()  # a plain reader's mapping, as before
    first.recycle()
    second = gather_to_shared(source, [40, 9, 11])
    try:
        assert second.path.stat().st_ino == inode and second.path.stat().st_size == size
        assert shared_rows._LOCKED.held_bytes() == held  # the same locked mapping, not a second one
        assert torch.equal(second.map(), gather_blocks(source, [40, 9, 11]).cpu())
        assert torch.equal(second.map(locked=True), gather_blocks(source, [40, 9, 11]).cpu())
    finally:
        second.unlink()
    third = gather_to_shared(source, [7])  # the unlinked file's mapping is let go once its name is gone
    try:
        assert third.path.stat().st_ino != inode
        assert shared_rows._LOCKED.held_bytes() == held
        assert torch.equal(third.map(), gather_blocks(source, [7]).cpu())
    finally:
        third.unlink()


def test_store_values_stacked_into_pinned_rows_scatter_byte_exact():
    """A KV store load on a GPU stacks the shard's values into page-locked rows (no lock per load)."""
    from rayfleet.kernels import KVCacheLayers, gather_blocks, scatter_rows, stack_rows

    source, target = KVCacheLayers(_layers(5)), KVCacheLayers(_layers(6))
    values = [gather_blocks(source, [i]).cpu().numpy()[0] for i in (8, 2, 33)]
    rows = stack_rows(values, pinned=True)
    assert rows.is_pinned() and torch.equal(rows, stack_rows(values))
    scatter_rows(target, rows, [0, 1, 2])
    assert torch.equal(gather_blocks(target, [0, 1, 2]), gather_blocks(source, [8, 2, 33]))


def _open_and_digest(rows) -> str:
    return _digest(rows.open())


def test_device_rows_open_byte_exact_in_another_process():
    from rayfleet.kernels import DeviceRows, KVCacheLayers, gather_to_device

    rows = gather_to_device(KVCacheLayers(_layers(3)), [9, 2, 40])
    with mp.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_open_and_digest, (DeviceRows.share("test-rows", rows),)) == _digest(rows)


def _load_into_fresh_cache(migration_id: str, wires: list[dict], block_ids: list[int]) -> tuple[str, list[int]]:
    """A destination engine's worker in this process: stage the chunks, load them, digest the blocks."""
    from rayfleet.actors.kv.metadata import LoadJob, RayfleetConnectorMetadata
    from rayfleet.kernels import gather_blocks

    worker = _worker(_layers(5))
    for wire in wires:
        worker.stage(migration_id, wire)
    worker.bind(RayfleetConnectorMetadata(loads=[LoadJob(migration_id, 0, block_ids, len(block_ids) * BLOCK_SIZE)]))
    worker.start_load()
    torch.cuda.synchronize()
    return _digest(gather_blocks(worker._cache, block_ids)), sorted(worker.take_load_errors())


@pytest.mark.parametrize("transport", ["device", "host"])
def test_worker_half_migrates_a_stopped_request_between_processes(transport):
    from rayfleet.actors.kv.metadata import FinalRequest, RayfleetConnectorMetadata, TrackedRequest
    from rayfleet.actors.kv.transfer import KVChunk
    from rayfleet.kernels import gather_blocks

    source = _worker(_layers(4))
    src_ids, dst_ids = [3, 9, 27, 4, 50, 11], [0, 1, 2, 3, 4, 5]
    tokens = len(src_ids) * BLOCK_SIZE
    # A pre-copy stage of the first 4 blocks while the request runs, then the stop and the rest.
    source.bind(RayfleetConnectorMetadata(tracked=[TrackedRequest("r-0", "r", 4 * BLOCK_SIZE, src_ids)]))
    exported = source.export_blocks("r", 0, transport)
    precopy = exported["chunk"]
    # Host rows are gathered while the engine steps, on a GPU too: read only once they have landed.
    assert exported["landed"] == (transport == "device")
    assert exported["landed"] or source.export_landed("r") == {"status": "live"}
    source.expect_final("r", 30.0)
    source.bind(RayfleetConnectorMetadata(finals=[FinalRequest("r-0", "r", src_ids, tokens, [])]))
    final = source.export_final("r", 4, transport)["chunk"]
    chunks = [KVChunk.from_wire(wire) for wire in (precopy, final)]
    assert [(c.first_block, c.num_blocks) for c in chunks] == [(0, 4), (4, 2)]
    assert all((c.device is not None) == (transport == "device") for c in chunks)
    with mp.get_context("spawn").Pool(1) as pool:
        digest, errors = pool.apply(_load_into_fresh_cache, ("m", [precopy, final], dst_ids))
    assert errors == [] and digest == _digest(gather_blocks(source._cache, src_ids))
    assert source.release_rows([c.device.name for c in chunks if c.device is not None]) == (
        2 if transport == "device" else 0)
    for chunk in chunks:
        chunk.release()
    assert source.stats()["device_exports"] == 0
