"""The KV connector's pieces without an engine: data movers, layout views, scheduler and worker state.

The engine-level behaviour (token-exact migration, no leaks) is in test_kv_connector.py.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from vllm.v1.request import RequestStatus

from rayfleet.actors.kv.connector import (
    RayfleetConnectorMetadata,
    SchedulerKVMigrationState,
    TrackedRequest,
    WorkerKVMigrationState,
    _as_block_bytes,
    gather_blocks,
    scatter_blocks,
)

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


def test_gather_then_scatter_copies_whole_blocks_byte_exact():
    layers = list(_cpu_cache().values())
    views = [_as_block_bytes(layer) for layer in layers]
    rows = gather_blocks(views, [3, 7])
    assert rows.shape == (2, 2 * views[0].shape[1])
    scatter_blocks(views, [0, 9], rows)
    for layer in layers:
        assert torch.equal(layer[0], layer[3]) and torch.equal(layer[9], layer[7])
    assert gather_blocks(views, []).shape == (0, rows.shape[1])


def test_block_compact_layouts_are_viewed_and_split_blocks_refused():
    # LBNHC-like: tokens outside heads inside a block, still one contiguous run per block.
    permuted = torch.randn(NUM_BLOCKS, BLOCK_SIZE, 2, 8).permute(0, 2, 1, 3)
    assert _as_block_bytes(permuted).shape == (NUM_BLOCKS, BLOCK_SIZE * 2 * 8 * 4)
    # A leading K/V dimension puts a block's K and V far apart: not a raw-copyable block.
    kv_split = torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, 8).permute(1, 0, 2, 3)
    with pytest.raises(NotImplementedError, match="not one contiguous run"):
        _as_block_bytes(kv_split)


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


def _worker() -> WorkerKVMigrationState:
    config = SimpleNamespace(cache_config=SimpleNamespace(block_size=BLOCK_SIZE, kv_cache_layout="LBHNC"))
    worker = WorkerKVMigrationState(config, SimpleNamespace(num_blocks=NUM_BLOCKS, kv_cache_layout="LBHNC"))
    worker.register_kv_caches(_cpu_cache())
    return worker


def _final_meta(internal_id: str, external_id: str) -> RayfleetConnectorMetadata:
    from rayfleet.actors.kv.connector import FinalRequest

    return RayfleetConnectorMetadata(finals=[FinalRequest(internal_id, external_id, [1, 2], 6, list(range(7)))])


def test_worker_releases_a_client_abort_at_once_and_holds_an_expected_stop():
    worker = _worker()
    worker.bind(_final_meta("a-1", "a"))
    assert worker.take_finished_sending() == {"a-1"}
    worker.expect_final("b", timeout_s=10)
    assert worker.export_final("b", 0)["status"] == "pending"
    worker.bind(_final_meta("b-1", "b"))
    assert worker.take_finished_sending() is None  # held for the export
    ready = worker.export_final("b", 1)
    assert (ready["status"], ready["first_block"], ready["num_blocks"], ready["num_computed_tokens"]) == (
        "ready", 1, 1, 6)
    assert len(ready["data"]) == worker._layout.bytes_per_block
    assert worker.take_finished_sending() == {"b-1"}


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
    wire = {**worker.layout(), "block_size": 2 * BLOCK_SIZE}
    with pytest.raises(ValueError, match="layout mismatch"):
        worker.stage("m", 0, 1, bytes(worker._layout.bytes_per_block), wire)
    with pytest.raises(ValueError, match="expected"):
        worker.stage("m", 0, 2, bytes(worker._layout.bytes_per_block), worker.layout())
