"""The KV connector's pieces without an engine: scheduler and worker state, chunks in shared memory.

The engine-level behaviour (token-exact migration, no leaks) is in test_kv_connector.py.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch
from vllm.v1.request import RequestStatus

from rayfleet.actors.kv.metadata import FinalRequest, LoadJob, RayfleetConnectorMetadata, TrackedRequest
from rayfleet.actors.kv import migration_state
from rayfleet.actors.kv.migration_state import SchedulerKVMigrationState, WorkerKVMigrationState
from rayfleet.actors.kv.transfer import KVChunk, KVLayoutMismatchError
from rayfleet.kernels import KVCacheLayers, gather_to_shared, live_files

BLOCK_SIZE = 4
NUM_BLOCKS = 10


def _cpu_cache(num_layers: int = 2) -> dict[str, torch.Tensor]:
    """Layers laid out as vLLM 0.32 does on the CPU: LBHNC views of one int8 buffer."""
    shape = (NUM_BLOCKS, 1, BLOCK_SIZE, 8)  # [blocks, kv heads, tokens, 2 * head size]
    page = 1 * BLOCK_SIZE * 8
    buffer = torch.zeros(num_layers * NUM_BLOCKS * page * 4, dtype=torch.int8).view(torch.float32)
    layers = {f"layer.{i}": buffer.as_strided(shape, (page, page, 8, 1), i * NUM_BLOCKS * page)
              for i in range(num_layers)}
    for layer in layers.values():
        layer.copy_(torch.randn(shape))
    return layers


def _request(request_id: str, num_tokens: int, params: dict | None, num_computed: int = 0):
    return SimpleNamespace(request_id=request_id, num_tokens=num_tokens, num_computed_tokens=num_computed,
                           kv_transfer_params=params, status=RequestStatus.RUNNING,
                           all_token_ids=list(range(num_tokens)))


def _scheduler(blocks: dict[str, list[int]]) -> SchedulerKVMigrationState:
    state = SchedulerKVMigrationState(BLOCK_SIZE)
    manager = SimpleNamespace(block_pool=SimpleNamespace(get_num_free_blocks=lambda: 42),
                              get_block_ids=lambda rid: (blocks.get(rid, []),))
    state.bind_kv_cache_manager(manager)
    return state


def test_load_claims_all_but_one_token_beyond_the_local_hit():
    state = _scheduler({})
    request = _request("r-1", num_tokens=23, params={"rayfleet": {"request_id": "r", "load": "m", "num_tokens": 23}})
    state.on_new_request(request)
    assert state.get_num_new_matched_tokens(request, 0) == (22, False)
    assert state.get_num_new_matched_tokens(request, 8) == (14, False)  # local hit of 2 blocks
    assert state.get_num_new_matched_tokens(request, 0) == (22, False)  # no side effects
    blocks = SimpleNamespace(get_block_ids=lambda: ([5, 6, 7, 8, 9, 10],))
    state.update_state_after_alloc(request, blocks, 14)
    [job] = state.build_connector_meta(SimpleNamespace(num_scheduled_tokens={}, preempted_req_ids=set())).loads
    # tokens 8..22 live in blocks 2..5 of the request: the partial last block is loaded whole
    assert (job.migration_id, job.first_block, job.block_ids, job.num_tokens) == ("m", 2, [7, 8, 9, 10], 14)
    assert state.get_num_new_matched_tokens(request, 0) == (0, False)  # loaded once, not on a re-prefill


def test_load_fully_covered_locally_drops_the_staging():
    state = _scheduler({})
    request = _request("r-1", num_tokens=23, params={"rayfleet": {"request_id": "r", "load": "m", "num_tokens": 8}})
    state.on_new_request(request)
    assert state.get_num_new_matched_tokens(request, 12) == (0, False)
    state.update_state_after_alloc(request, SimpleNamespace(get_block_ids=lambda: ([1, 2, 3],)), 0)
    meta = state.build_connector_meta(SimpleNamespace(num_scheduled_tokens={}, preempted_req_ids=set()))
    assert meta.drops == ["m"] and meta.loads == []


def test_tracked_requests_report_blocks_and_tokens_after_the_step():
    state = _scheduler({"r-1": [4, 5]})
    request = _request("r-1", num_tokens=6, params={"rayfleet": {"request_id": "r"}}, num_computed=0)
    state.on_new_request(request)
    state.on_new_request(_request("plain-1", num_tokens=6, params=None))
    meta = state.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r-1": 6, "plain-1": 6},
                                                      preempted_req_ids=set()))
    assert meta.tracked == [TrackedRequest("r-1", "r", 6, [4, 5])]
    assert meta.num_free_blocks == 42
    request.num_computed_tokens = 6
    meta = state.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r-1": 1}, preempted_req_ids=set()))
    assert meta.tracked == [TrackedRequest("r-1", "r", 7, None)]  # blocks unchanged: not resent


def test_abort_of_a_tagged_request_delays_the_free_and_hands_over_the_tokens():
    state = _scheduler({})
    aborted = _request("r-1", num_tokens=9, params={"rayfleet": {"request_id": "r"}}, num_computed=8)
    finished = _request("s-1", num_tokens=9, params={"rayfleet": {"request_id": "s"}})
    plain = _request("p-1", num_tokens=9, params=None)
    for request in (aborted, finished, plain):
        state.on_new_request(request)
    aborted.status = RequestStatus.FINISHED_ABORTED
    finished.status = RequestStatus.FINISHED_LENGTH_CAPPED
    plain.status = RequestStatus.FINISHED_ABORTED
    assert state.request_finished(aborted, [3, 4]) == (True, None)
    assert state.request_finished(finished, [5]) == (False, None)
    assert state.request_finished(plain, [6]) == (False, None)
    meta = state.build_connector_meta(SimpleNamespace(num_scheduled_tokens={}, preempted_req_ids=set()))
    [final] = meta.finals
    assert (final.external_id, final.block_ids, final.num_computed_tokens, final.all_token_ids) == (
        "r", [3, 4], 8, list(range(9)))
    assert meta.finished == [("s-1", "s")]


def _worker(cache: dict[str, torch.Tensor] | None = None) -> WorkerKVMigrationState:
    config = SimpleNamespace(cache_config=SimpleNamespace(block_size=BLOCK_SIZE, kv_cache_layout="LBHNC"))
    worker = WorkerKVMigrationState(config, SimpleNamespace(num_blocks=NUM_BLOCKS, kv_cache_layout="LBHNC"))
    worker.register_cache(KVCacheLayers(list((cache or _cpu_cache()).values())))
    return worker


def _final_meta(internal_id: str, external_id: str, block_ids: list[int] | None = None) -> RayfleetConnectorMetadata:
    return RayfleetConnectorMetadata(
        finals=[FinalRequest(internal_id, external_id, block_ids or [1, 2], 6, list(range(7)))])


def _moved(src_cache: dict[str, torch.Tensor], dst_cache: dict[str, torch.Tensor]) -> KVChunk:
    """Stop request "r" on a worker over `src_cache` (blocks 3, 7) and load it into blocks 0, 9 of another."""
    src, dst = _worker(src_cache), _worker(dst_cache)
    src.expect_final("r", timeout_s=10)
    src.bind(_final_meta("r-1", "r", [3, 7]))
    chunk = KVChunk.from_wire(src.export_final("r", 0)["chunk"])
    dst.stage("mig", chunk.to_wire())
    dst.bind(RayfleetConnectorMetadata(loads=[LoadJob("mig", 0, [0, 9], 6)]))
    dst.start_load()
    assert dst.stats()["blocks_imported"] == 2 and dst.take_load_errors() == set()
    return chunk


def test_a_stopped_request_moves_byte_exact_through_shared_rows():
    before = live_files()
    src_cache, dst_cache = _cpu_cache(), _cpu_cache()
    chunk = _moved(src_cache, dst_cache)
    for src_layer, dst_layer in zip(src_cache.values(), dst_cache.values()):
        assert torch.equal(dst_layer[0], src_layer[3]) and torch.equal(dst_layer[9], src_layer[7])
    assert chunk.shared.name in live_files()  # the caller owns the rows until it releases them
    chunk.release()
    assert live_files() == before


def test_layouts_that_split_a_block_move_too():
    # A leading K/V dimension puts a block's K and V far apart (two runs per block): the kernels move it.
    def split_cache() -> dict[str, torch.Tensor]:
        return {f"layer.{i}": torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, 8).permute(1, 0, 2, 3) for i in range(2)}

    src_cache, dst_cache = split_cache(), split_cache()
    _moved(src_cache, dst_cache).release()
    for src_layer, dst_layer in zip(src_cache.values(), dst_cache.values()):
        assert torch.equal(dst_layer[0], src_layer[3]) and torch.equal(dst_layer[9], src_layer[7])


def test_worker_releases_a_client_abort_at_once_and_holds_an_expected_stop():
    worker = _worker()
    worker.bind(_final_meta("a-1", "a"))
    assert worker.take_finished_sending() == {"a-1"}
    worker.expect_final("b", timeout_s=10)
    assert worker.export_final("b", 0)["status"] == "pending"
    worker.bind(_final_meta("b-1", "b"))
    assert worker.take_finished_sending() is None  # held for the export
    ready = worker.export_final("b", 1)
    chunk = KVChunk.from_wire(ready["chunk"])
    assert (ready["status"], chunk.first_block, chunk.num_blocks, ready["num_computed_tokens"]) == ("ready", 1, 1, 6)
    assert chunk.rows().shape == (1, worker._layout.bytes_per_block)
    chunk.release()
    assert worker.take_finished_sending() == {"b-1"}


def _live_worker(cache: dict[str, torch.Tensor], block_ids: list[int]) -> WorkerKVMigrationState:
    """A worker tracking live request "p" (internal "p-1") with `block_ids`, all of them complete."""
    worker = _worker(cache)
    worker.bind(RayfleetConnectorMetadata(tracked=[TrackedRequest("p-1", "p", BLOCK_SIZE * len(block_ids),
                                                                  block_ids)]))
    return worker


def test_a_precopy_from_a_cpu_cache_is_gathered_off_the_engine_loop_and_lands_byte_exact(monkeypatch):
    cache = _cpu_cache()
    worker = _live_worker(cache, [3, 7, 5])
    gate = threading.Event()
    monkeypatch.setattr(migration_state, "gather_to_shared",
                        lambda *args, **kwargs: gate.wait(10) and gather_to_shared(*args, **kwargs))
    began = time.monotonic()
    wire = worker.export_blocks("p", 1)  # returns while the gather waits: the engine would step meanwhile
    assert time.monotonic() - began < 5 and wire["status"] == "live" and wire["landed"] is False
    gate.set()
    assert worker.export_landed("p") == {"status": "live"}
    chunk = KVChunk.from_wire(wire["chunk"])
    try:
        rows = chunk.rows().view(2, 2, -1)  # [blocks, layers, page bytes]
        for layer, layer_cache in enumerate(cache.values()):
            for row, block in enumerate([7, 5]):
                assert torch.equal(rows[row, layer], layer_cache[block].reshape(-1).view(torch.uint8))
    finally:
        chunk.release()
    assert worker.stats()["blocks_exported"] == 2 and worker.stats()["export_s"] > 0


def test_a_precopy_whose_request_ended_or_lost_its_blocks_meanwhile_is_not_live():
    cache = _cpu_cache()
    finished = _live_worker(cache, [3, 7])
    wire = finished.export_blocks("p", 0)
    finished.bind(RayfleetConnectorMetadata(finished=[("p-1", "p")]))
    assert finished.export_landed("p") == {"status": "finished"}
    KVChunk.from_wire(wire["chunk"]).release()
    preempted = _live_worker(cache, [3, 7])
    wire = preempted.export_blocks("p", 0)
    preempted.bind(RayfleetConnectorMetadata(tracked=[TrackedRequest("p-1", "p", 0, [])]))  # preemption
    assert preempted.export_landed("p") == {"status": "moved"}
    KVChunk.from_wire(wire["chunk"]).release()


def test_blocks_of_a_stopped_request_are_released_only_after_its_precopy_gather_ends():
    worker = _live_worker(_cpu_cache(), [3, 7])
    gate = threading.Event()
    gather = worker._timed_gather
    worker._timed_gather = lambda *args: gate.wait(10) and gather(*args)  # a gather that is still reading
    wire = worker.export_blocks("p", 0)
    [pending] = worker._gathering["p"]
    worker.bind(_final_meta("p-1", "p"))  # a client abort: its blocks go back to the engine...
    threading.Timer(0.2, gate.set).start()
    assert worker.take_finished_sending() == {"p-1"}
    assert pending.seconds.done()  # ...only once nothing reads them any more
    KVChunk.from_wire(wire["chunk"]).release()


def test_a_stop_whose_abort_reached_the_worker_unexpected_is_answered_released_at_once():
    worker = _worker()
    worker.bind(_final_meta("a-1", "a"))  # the abort came first: no final export expected, blocks freed
    assert worker.take_finished_sending() == {"a-1"}
    worker.expect_final("a", timeout_s=10)  # the expectation, too late
    assert worker.export_final("a", 0) == {"status": "released"}  # not "pending" until the deadline
    worker.bind(RayfleetConnectorMetadata(tracked=[TrackedRequest("a-2", "a", 4, [1])]))  # the id in use again
    worker.expect_final("a", timeout_s=10)
    assert worker.export_final("a", 0)["status"] == "pending"


def test_worker_frees_a_held_stop_at_its_deadline():
    worker = _worker()
    worker.expect_final("c", timeout_s=0.05)
    worker.bind(_final_meta("c-1", "c"))
    assert worker.take_finished_sending() is None
    time.sleep(0.06)
    assert worker.take_finished_sending() == {"c-1"}
    assert worker.export_final("c", 0)["status"] == "expired"
    assert worker.stats()["finals_expired"] == 1


def test_worker_refuses_staging_of_another_layout():
    worker = _worker()
    worker.expect_final("s", timeout_s=10)
    worker.bind(_final_meta("s-1", "s"))
    wire = worker.export_final("s", 0)["chunk"]
    try:
        with pytest.raises(KVLayoutMismatchError, match="layout mismatch"):
            worker.stage("m", {**wire, "layout": {**wire["layout"], "block_size": 2 * BLOCK_SIZE}})
        with pytest.raises(ValueError, match="expected"):  # rows of another size than the chunk claims
            worker.stage("m", {**wire, "num_blocks": 1})
        with pytest.raises(FileNotFoundError):
            worker.stage("m", {**wire, "rows": wire["rows"] + "-gone"})
    finally:
        KVChunk.from_wire(wire).release()
    assert worker.stats()["staged_migrations"] == 0
