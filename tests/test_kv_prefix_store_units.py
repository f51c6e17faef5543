"""The KV store half of the connector without an engine or Ray: claims, load plans, saves, load errors,
and the async path (lookups and loads in threads, their budgets, a failing store).

A dict-backed fake store and minimal stand-ins for vLLM's Request, KVCacheBlocks and SchedulerOutput
drive `SchedulerPrefixStore` and `WorkerPrefixStore` directly.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from rayfleet.actors.kv.block_hash import block_hashes
from rayfleet.actors.kv.metadata import RayfleetConnectorMetadata, StoreLoad, StoreSave
from rayfleet.actors.kv.prefix_store import SchedulerPrefixStore, WorkerPrefixStore
from rayfleet.actors.kv.store_config import KVStoreConfig
from rayfleet.kernels import KVCacheLayers, gather_blocks
from rayfleet.policies.kv_pricing import StorePricing

BS = 4  # block size
NS = "units"


class FakeStore:
    """Answers from a dict; `gate` (when set) holds every answer until it opens; `broken` makes calls fail;
    `lookup_delay_s` is how long a lookup takes."""

    def __init__(self):
        self.blocks: dict[bytes, np.ndarray] = {}
        self.lookups = 0
        self.sent: list[bytes] = []  # every block hash a put carried
        self.put_calls = 0
        self.called = threading.Event()  # set by the first call that reaches the store
        self.gate: threading.Event | None = None
        self.broken = False
        self.lookup_delay_s = 0.0
        self.answered = threading.Event()  # set as the first lookup returns its answer

    def _wait(self):
        self.called.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.broken:
            raise ConnectionError("shard gone")

    def contains_prefix(self, hashes, timeout_s=None):
        self.lookups += 1
        self._wait()
        time.sleep(self.lookup_delay_s)
        held = next((i for i, h in enumerate(hashes) if h not in self.blocks), len(hashes))
        self.answered.set()
        return held

    def get(self, hashes, timeout_s=None):
        self._wait()
        return [self.blocks.get(h) for h in hashes]

    def contains(self, hashes, timeout_s=None):
        self._wait()
        return [h in self.blocks for h in hashes]

    def put(self, hashes, blocks):
        self.put_calls += 1
        self.sent += list(hashes)
        for h, b in zip(hashes, blocks, strict=True):
            self.blocks.setdefault(h, np.asarray(b).copy())


@dataclass
class FakeRequest:
    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int = 0
    lora_request: object = None
    cache_salt: str | None = None
    mm_features: list = field(default_factory=list)
    skip_reading_prefix_cache: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


class FakeBlocks:
    def __init__(self, ids):
        self.ids = ids

    def get_block_ids(self):
        return (self.ids,)


class FakeManager:
    def __init__(self):
        self.ids: dict[str, list[int]] = {}
        self.local_tokens: dict[str, int] = {}  # each request's local prefix hit

    def get_block_ids(self, req_id):
        return (self.ids[req_id],)

    def get_computed_blocks(self, request):
        return None, self.local_tokens.get(request.request_id, 0), 0


@dataclass
class FakeOutput:
    num_scheduled_tokens: dict[str, int]


SYNC = KVStoreConfig(async_loads=False)


def scheduler(store: FakeStore, config: KVStoreConfig = SYNC) -> tuple[SchedulerPrefixStore, FakeManager]:
    side = SchedulerPrefixStore(store, NS, BS, config)
    manager = FakeManager()
    side.bind_kv_cache_manager(manager)
    return side, manager


def hold(store: FakeStore, tokens: list[int], num_blocks: int) -> None:
    for h in block_hashes(tokens, BS, NS)[:num_blocks]:
        store.blocks[h] = np.zeros(8, np.uint8)


def test_claims_whole_store_blocks_beyond_the_local_hit_without_side_effects():
    store = FakeStore()
    tokens = list(range(100, 114))  # 14 tokens: 3 full blocks, 3 claimable
    hold(store, tokens, 3)
    side, _ = scheduler(store)
    request = FakeRequest("r", tokens)
    side.on_new_request(request)
    assert side.get_num_new_matched_tokens(request, BS) == 2 * BS  # local hit 1 block, store 2 more
    assert side.get_num_new_matched_tokens(request, BS) == 2 * BS  # asked twice, same answer
    meta = RayfleetConnectorMetadata()
    side.add_to_meta(meta, FakeOutput({}))
    assert meta.store_loads == []  # nothing planned before the allocation


def test_at_least_one_token_is_left_to_compute():
    store = FakeStore()
    tokens = list(range(100, 112))  # exactly 3 blocks: only 2 may be claimed
    hold(store, tokens, 3)
    side, _ = scheduler(store)
    request = FakeRequest("r", tokens)
    side.on_new_request(request)
    assert side.get_num_new_matched_tokens(request, 0) == 2 * BS


def test_allocation_plans_a_load_into_the_blocks_after_the_local_hit():
    store = FakeStore()
    tokens = list(range(100, 114))
    hold(store, tokens, 3)
    side, _ = scheduler(store)
    request = FakeRequest("r", tokens)
    side.on_new_request(request)
    side.get_num_new_matched_tokens(request, BS)
    side.update_state_after_alloc(request, FakeBlocks([7, 8, 9, 10]), 2 * BS)
    meta = RayfleetConnectorMetadata()
    side.add_to_meta(meta, FakeOutput({}))
    assert meta.store_loads == [StoreLoad("r", block_hashes(tokens, BS, NS)[1:3], [8, 9])]
    assert (meta.store_counts["store_lookup_blocks"], meta.store_counts["store_hit_blocks"]) == (2, 2)


def test_only_blocks_the_engine_computes_are_saved_and_each_once():
    store = FakeStore()
    tokens = list(range(100, 114))
    hold(store, tokens, 1)
    side, manager = scheduler(store)
    request = FakeRequest("r", tokens)
    side.on_new_request(request)
    side.get_num_new_matched_tokens(request, 0)
    side.update_state_after_alloc(request, FakeBlocks([5, 6, 7, 8]), BS)  # block 0 from the store
    manager.ids["r"] = [5, 6, 7, 8]
    request.num_computed_tokens = BS
    meta = RayfleetConnectorMetadata()
    side.add_to_meta(meta, FakeOutput({"r": 10}))  # prefill of the other 10 tokens: blocks 1 and 2 complete
    hashes = block_hashes(tokens, BS, NS)
    assert meta.store_saves == [StoreSave("r", hashes[1:3], [6, 7])]
    request.num_computed_tokens = 14
    request.all_token_ids = tokens + [1, 2]  # two decode steps later block 3 completes
    meta = RayfleetConnectorMetadata()
    side.add_to_meta(meta, FakeOutput({"r": 1}))
    assert meta.store_saves == []
    request.num_computed_tokens = 15
    meta = RayfleetConnectorMetadata()
    side.add_to_meta(meta, FakeOutput({"r": 1}))
    assert meta.store_saves == [StoreSave("r", block_hashes(request.all_token_ids, BS, NS)[3:4], [8])]


def test_a_decoding_request_hashes_only_its_new_blocks(monkeypatch):
    import rayfleet.actors.kv.prefix_store as prefix_store

    hashed_tokens = []
    real = prefix_store.block_hashes
    monkeypatch.setattr(prefix_store, "block_hashes",
                        lambda tokens, *args, **kwargs: hashed_tokens.append(len(tokens)) or real(tokens, *args, **kwargs))
    side, manager = scheduler(FakeStore())
    request = FakeRequest("r", list(range(100, 108)))  # 2 full blocks of prompt
    side.on_new_request(request)
    manager.ids["r"] = list(range(40))
    side.add_to_meta(RayfleetConnectorMetadata(), FakeOutput({"r": 8}))
    for step in range(32):  # a block completes every BS decode steps
        request.all_token_ids.append(step)
        request.num_computed_tokens = len(request.all_token_ids)
        side.add_to_meta(RayfleetConnectorMetadata(), FakeOutput({"r": 1}))
    assert side._chain(request, 10) == block_hashes(request.all_token_ids, BS, NS)  # the same chain as from scratch
    assert sum(hashed_tokens) == 10 * BS  # each block's tokens hashed once (rehashing the whole prefix each time: 216 tokens)


def test_a_chain_continued_from_a_parent_equals_the_whole_chain():
    tokens = list(range(1000, 1040))
    whole = block_hashes(tokens, BS, NS)
    assert whole[:4] + block_hashes(tokens[16:], BS, NS, parent=whole[3]) == whole


def test_a_block_already_put_by_this_engine_is_not_put_again():
    store = FakeStore()
    side, manager = scheduler(store)
    tokens = list(range(100, 109))
    for rid in ("a", "b"):  # the same prompt twice, with no local hit for the second (evicted)
        request = FakeRequest(rid, tokens)
        side.on_new_request(request)
        side.get_num_new_matched_tokens(request, 0)
        side.update_state_after_alloc(request, FakeBlocks([1, 2, 3]), 0)
        manager.ids[rid] = [1, 2, 3]
        meta = RayfleetConnectorMetadata()
        side.add_to_meta(meta, FakeOutput({rid: 9}))
        assert len(meta.store_saves) == (1 if rid == "a" else 0)
        side.request_finished(request)


def test_requests_the_namespace_does_not_cover_never_use_the_store():
    store = FakeStore()
    tokens = list(range(100, 114))
    hold(store, tokens, 3)
    side, _ = scheduler(store)
    for request in (FakeRequest("lora", tokens, lora_request=object()), FakeRequest("salt", tokens, cache_salt="x"),
                    FakeRequest("skip", tokens, skip_reading_prefix_cache=True)):
        side.on_new_request(request)
        assert side.get_num_new_matched_tokens(request, 0) == 0
    assert store.lookups == 0


def test_worker_loads_up_to_the_first_unusable_block_and_reports_the_rest():
    store = FakeStore()
    cache = KVCacheLayers([torch.zeros((6, 8), dtype=torch.uint8) for _ in range(2)])
    worker = WorkerPrefixStore(store)
    worker.register(cache)
    good = torch.arange(16, dtype=torch.uint8).view(1, 16)
    hashes = block_hashes(list(range(12)), BS, NS)
    store.blocks[hashes[0]] = good[0].numpy()
    store.blocks[hashes[2]] = good[0].numpy()  # present, but after a missing one
    meta = RayfleetConnectorMetadata(store_loads=[StoreLoad("r", hashes, [3, 4, 5])],
                                     store_saves=[StoreSave("r", hashes[:1], [3])])
    worker.bind(meta)
    worker.load()
    assert torch.equal(gather_blocks(cache, [3]), good)
    assert worker.take_load_errors() == {4, 5}
    worker.save()  # the failed request's saves are skipped
    worker.flush()
    assert worker.stats()["store_blocks_saved"] == 0
    assert (worker.stats()["store_blocks_loaded"], worker.stats()["store_load_errors"]) == (1, 1)


def test_blocks_another_engine_put_meanwhile_are_not_sent_again():
    """Two engines computed the same prefix (the second's lookup priced out, or both at once): the second's put
    carries only the block the store does not hold yet, and counts the others as already held."""
    store = FakeStore()
    hashes = block_hashes(list(range(12)), BS, NS)
    workers = []
    for _ in range(2):
        worker = WorkerPrefixStore(store)
        worker.register(KVCacheLayers([torch.arange(48, dtype=torch.uint8).view(6, 8) for _ in range(2)]))
        workers.append(worker)
    for worker, blocks in zip(workers, (2, 3)):
        worker.bind(RayfleetConnectorMetadata(store_saves=[StoreSave("r", hashes[:blocks], [0, 1, 2][:blocks])]))
        worker.save()
        worker.flush()
    assert store.sent == hashes[:3]  # each block sent once
    assert (workers[1].stats()["store_blocks_saved"], workers[1].stats()["store_blocks_already_held"]) == (1, 2)
    assert workers[1].stats()["store_bytes_saved"] == 16  # one block: 8 bytes in each of 2 layers


def test_saves_that_queue_behind_a_put_on_its_way_go_out_together_in_the_next():
    store = FakeStore()
    store.gate = threading.Event()  # the first put waits for the shard
    hashes = block_hashes(list(range(12)), BS, NS)
    worker = WorkerPrefixStore(store)
    worker.register(KVCacheLayers([torch.arange(48, dtype=torch.uint8).view(6, 8) for _ in range(2)]))
    for i in range(3):  # three steps, one new block each
        worker.bind(RayfleetConnectorMetadata(store_saves=[StoreSave("r", hashes[i:i + 1], [i])]))
        worker.save()
        assert store.called.wait(5)  # the first put is on its way (held at the shard) before the next steps
    store.gate.set()
    worker.flush()
    assert store.sent == hashes[:3] and store.put_calls == 2  # the first alone, the two behind it in one call
    held = store.blocks
    assert [bytes(held[h]) for h in hashes] == [bytes(range(8 * i, 8 * i + 8)) * 2 for i in range(3)]
    assert worker.stats()["store_puts"] == 2 and worker.stats()["store_blocks_saved"] == 3


# ---------------------------------------------------------------------------------------------- async path


def eventually(probe, timeout_s: float = 5.0):
    """The first non-None answer of `probe` (polled), or fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = probe()
        if answer is not None:
            return answer
        time.sleep(0.005)
    raise AssertionError(f"no answer within {timeout_s} s")


def test_async_lookup_asks_again_until_the_store_answers():
    store = FakeStore()
    tokens = list(range(100, 114))
    hold(store, tokens, 3)
    store.gate = threading.Event()
    side, _ = scheduler(store, KVStoreConfig(lookup_budget_s=5.0, lookup_budget_per_block_s=None))
    request = FakeRequest("r", tokens)
    side.on_new_request(request)
    assert side.get_num_new_matched_tokens(request, BS) is None  # the lookup runs off the step
    store.gate.set()
    assert eventually(lambda: side.get_num_new_matched_tokens(request, BS)) == 2 * BS
    assert store.lookups == 1  # asked again, looked up once


def test_async_lookup_past_its_budget_is_computed_instead():
    store = FakeStore()
    tokens = list(range(100, 114))
    hold(store, tokens, 3)
    store.gate = threading.Event()  # a shard that does not answer
    side, _ = scheduler(store, KVStoreConfig(lookup_budget_s=0.05, lookup_budget_per_block_s=None))
    request = FakeRequest("r", tokens)
    side.on_new_request(request)
    began = time.monotonic()
    assert eventually(lambda: side.get_num_new_matched_tokens(request, BS)) == 0
    assert 0.05 <= time.monotonic() - began < 2.0
    side.update_state_after_alloc(request, FakeBlocks([7, 8, 9, 10]), 0)
    meta = RayfleetConnectorMetadata()
    side.add_to_meta(meta, FakeOutput({}))
    assert meta.store_loads == [] and meta.store_counts["store_lookup_timeouts"] == 1
    store.gate.set()


def test_a_lookup_answered_within_the_grace_joins_this_schedule_not_the_next():
    """A store that answers in 5 ms: the request is admitted with its hit in the schedule that asked, instead of
    sitting out a whole step. With no grace it sits one out (None: ask again)."""
    tokens = list(range(100, 114))
    for grace, first_answer in ((0.05, 2 * BS), (0.0, None)):
        store = FakeStore()
        store.lookup_delay_s = 0.005
        hold(store, tokens, 3)
        side, _ = scheduler(store, KVStoreConfig(lookup_budget_s=5.0, lookup_budget_per_block_s=None,
                                                 lookup_grace_s=grace, priced=False))
        request = FakeRequest(f"r-{grace}", tokens)
        side.on_new_request(request)
        assert side.get_num_new_matched_tokens(request, BS) == first_answer


def test_the_schedules_lookups_share_one_grace_and_a_tenth_of_the_step_at_most():
    """A store that does not answer: the first lookup of a schedule waits the grace, the next ones nothing (the
    wait holds up the step for every running request). Once steps are timed, the grace is a tenth of a step."""
    tokens = list(range(100, 114))
    store = FakeStore()
    hold(store, tokens, 3)
    store.gate = threading.Event()
    side, _ = scheduler(store, KVStoreConfig(lookup_budget_s=5.0, lookup_budget_per_block_s=None,
                                             lookup_grace_s=0.2))
    waited = []
    for i in range(3):
        request = FakeRequest(f"r{i}", tokens)
        side.on_new_request(request)
        began = time.perf_counter()
        assert side.get_num_new_matched_tokens(request, BS) is None
        waited.append(time.perf_counter() - began)
    assert waited[0] >= 0.19 and waited[1] + waited[2] < 0.05, waited
    for _ in range(40):  # steps of 20 ms, as the engine's own timing would see them
        side._pricing.observe_step(64, 0.02, 4)
    side.add_to_meta(RayfleetConnectorMetadata(), FakeOutput({}))  # the next schedule
    request = FakeRequest("r-next", tokens)
    side.on_new_request(request)
    began = time.perf_counter()
    assert side.get_num_new_matched_tokens(request, BS) is None
    assert 0.001 <= time.perf_counter() - began < 0.05
    store.gate.set()


def test_short_hits_wait_at_most_what_their_prefill_costs():
    """The per-block budget: one claimable block may make its request wait only one block's budget."""
    store = FakeStore()
    tokens = list(range(100, 106))  # one claimable block
    hold(store, tokens, 1)
    store.gate = threading.Event()
    side, _ = scheduler(store, KVStoreConfig(lookup_budget_s=5.0, lookup_budget_per_block_s=0.02))
    request = FakeRequest("r", tokens)
    side.on_new_request(request)
    began = time.monotonic()
    assert eventually(lambda: side.get_num_new_matched_tokens(request, 0)) == 0
    assert time.monotonic() - began < 1.0
    store.gate.set()


def test_async_hit_is_claimed_as_an_async_load():
    store = FakeStore()
    tokens = list(range(100, 114))
    hold(store, tokens, 3)
    side, _ = scheduler(store, KVStoreConfig(lookup_budget_s=5.0))
    request = FakeRequest("r", tokens)
    side.on_new_request(request)
    assert eventually(lambda: side.get_num_new_matched_tokens(request, BS)) == 2 * BS
    side.update_state_after_alloc(request, FakeBlocks([7, 8, 9, 10]), 2 * BS)
    meta = RayfleetConnectorMetadata()
    side.add_to_meta(meta, FakeOutput({}))
    assert meta.store_loads == [StoreLoad("r", block_hashes(tokens, BS, NS)[1:3], [8, 9], is_async=True)]


def async_worker(store: FakeStore, load_budget_s: float = 5.0) -> tuple[WorkerPrefixStore, KVCacheLayers, list]:
    cache = KVCacheLayers([torch.zeros((6, 8), dtype=torch.uint8) for _ in range(2)])
    worker = WorkerPrefixStore(store, KVStoreConfig(load_budget_s=load_budget_s))
    worker.register(cache)
    hashes = block_hashes(list(range(12)), BS, NS)
    worker.bind(RayfleetConnectorMetadata(store_loads=[StoreLoad("r", hashes, [3, 4, 5], is_async=True)]))
    return worker, cache, hashes


def test_async_load_is_scattered_between_steps_and_reported_finished():
    store = FakeStore()
    good = torch.arange(16, dtype=torch.uint8).view(1, 16)
    store.gate = threading.Event()
    worker, cache, hashes = async_worker(store)
    for h in hashes:
        store.blocks[h] = good[0].numpy()
    worker.load()  # returns at once: the get runs in a thread
    assert worker.take_finished_loads() is None
    store.gate.set()
    assert eventually(worker.take_finished_loads) == {"r"}
    assert torch.equal(gather_blocks(cache, [3, 4, 5]), good.repeat(3, 1))
    assert worker.take_load_errors() == set()


def test_async_load_from_a_failed_shard_is_recomputed():
    store = FakeStore()
    store.broken = True
    worker, cache, _ = async_worker(store)
    worker.load()
    assert eventually(worker.take_finished_loads) == {"r"}
    assert worker.take_load_errors() == {3, 4, 5}  # every block: vLLM recomputes the request's prefix
    assert worker.stats()["store_load_errors"] == 1


def test_async_load_past_its_budget_is_recomputed_and_its_late_answer_dropped():
    store = FakeStore()
    store.gate = threading.Event()  # a slow shard
    worker, cache, hashes = async_worker(store, load_budget_s=0.05)
    for h in hashes:
        store.blocks[h] = np.full(16, 9, np.uint8)
    worker.load()
    assert eventually(worker.take_finished_loads) == {"r"}
    assert worker.take_load_errors() == {3, 4, 5}
    store.gate.set()  # the late answer arrives after the blocks were handed back for recompute
    time.sleep(0.05)
    assert worker.take_finished_loads() is None
    assert not gather_blocks(cache, [3, 4, 5]).any()  # never scattered
    assert worker.stats()["store_load_timeouts"] == 1


def primed_pricing(load_s: float | None = None) -> StorePricing:
    """An engine that has timed its steps: 5 ms each plus 1 ms per token (4 ms per block of BS tokens), and no
    batch to join (a block's prefill slows only the request that computes it)."""
    pricing = StorePricing(block_size=BS)
    for i in range(pricing.min_steps):
        tokens = 1 + i % 8
        pricing.observe_step(tokens, 0.005 + 0.001 * tokens, 0)
    if load_s is not None:
        pricing.observe_load(load_s)
    return pricing


def test_a_lookup_that_cannot_pay_never_reaches_the_store_and_is_counted():
    store = FakeStore()
    tokens = list(range(100, 110))  # 2 claimable blocks: 8 ms of prefill against a ~10 ms step and a load
    hold(store, tokens, 2)
    side = SchedulerPrefixStore(store, NS, BS, KVStoreConfig(lookup_budget_s=5.0), pricing=primed_pricing())
    request = FakeRequest("r", tokens)
    side.on_new_request(request)
    assert side.get_num_new_matched_tokens(request, 0) == 0  # computed at once: no lookup, no wait
    assert side.get_num_new_matched_tokens(request, 0) == 0  # asked again (it waited for KV room): same answer
    assert store.lookups == 0
    meta = RayfleetConnectorMetadata()
    side.add_to_meta(meta, FakeOutput({}))
    assert meta.store_counts["store_lookups_priced_out"] == 1
    assert meta.store_counts.get("store_lookup_blocks", 0) == 0  # not asked: the hit rate stays about real asks


def test_a_long_prefix_is_looked_up_but_a_short_hit_in_it_is_computed_rather_than_loaded():
    store = FakeStore()
    tokens = list(range(100, 145))  # 11 claimable blocks: 44 ms of prefill, worth a lookup
    hold(store, tokens, 2)  # the store holds only the first 2 (8 ms of prefill), and loads take 10 ms
    side = SchedulerPrefixStore(store, NS, BS, KVStoreConfig(lookup_budget_s=5.0), pricing=primed_pricing(0.010))
    request = FakeRequest("r", tokens)
    side.on_new_request(request)
    assert eventually(lambda: side.get_num_new_matched_tokens(request, 0)) == 0
    assert store.lookups == 1
    assert side.get_num_new_matched_tokens(request, 0) == 0  # decided once, also when asked again
    side.update_state_after_alloc(request, FakeBlocks(list(range(12))), 0)
    meta = RayfleetConnectorMetadata()
    side.add_to_meta(meta, FakeOutput({}))
    assert meta.store_loads == [] and meta.store_counts["store_loads_priced_out"] == 1


def test_without_pricing_every_request_with_blocks_beyond_its_local_hit_asks():
    store = FakeStore()
    tokens = list(range(100, 110))
    hold(store, tokens, 2)
    side = SchedulerPrefixStore(store, NS, BS, KVStoreConfig(lookup_budget_s=5.0, priced=False),
                                pricing=primed_pricing(0.010))
    request = FakeRequest("r", tokens)
    side.on_new_request(request)
    assert eventually(lambda: side.get_num_new_matched_tokens(request, 0)) == 2 * BS
    assert store.lookups == 1


def test_steps_are_timed_only_while_the_engine_stays_busy():
    pricing = StorePricing(block_size=BS)
    side = SchedulerPrefixStore(FakeStore(), NS, BS, KVStoreConfig(), pricing=pricing)
    for scheduled in ({"a": 5}, {"b": 7}, {"b": 1}, {"c": 3}):
        side.add_to_meta(RayfleetConnectorMetadata(), FakeOutput(scheduled))
    # a -> b: nothing ran in both (the engine may have idled in between); b -> b: one step of 7 tokens timed;
    # b -> c: again not.
    assert pricing.steps.points == 1 and pricing.steps.sx == 7


def timed_lookup(lookup_delay_s: float, grace_s: float, manager: FakeManager | None = None):
    """A scheduler side over a store whose lookups take `lookup_delay_s`, its pricing recording the lookups it
    is told of (and bound to `manager`, if given: the local prefix cache); the side, a request whose 11 blocks
    the store holds, and the record."""
    tokens = list(range(100, 145))
    store = FakeStore()
    store.lookup_delay_s = lookup_delay_s
    hold(store, tokens, 11)
    pricing = primed_pricing()
    timed: list[tuple[float, bool]] = []
    pricing.observe_lookup = lambda seconds, in_schedule: timed.append((seconds, in_schedule))
    side = SchedulerPrefixStore(store, NS, BS, KVStoreConfig(lookup_budget_s=5.0, lookup_budget_per_block_s=None,
                                                             lookup_grace_s=grace_s), pricing=pricing)
    assert pricing.grace_s == grace_s  # the config's grace, which the pricing prices
    if manager is not None:
        side.bind_kv_cache_manager(manager)
    request = FakeRequest("r", tokens)
    side.on_new_request(request)
    return side, request, timed


def test_each_lookup_is_timed_once_as_the_scheduler_saw_it():
    """A store answering in 5 ms inside the grace: the pricing learns ~5 ms, once, though the scheduler asks
    again for the same request (as it does every step a request waits)."""
    side, request, timed = timed_lookup(0.005, grace_s=0.5)
    assert side.get_num_new_matched_tokens(request, 0) == 11 * BS  # answered within the grace
    assert side.get_num_new_matched_tokens(request, 0) == 11 * BS
    [(seconds, in_schedule)] = timed
    assert 0.005 <= seconds < 0.5 and in_schedule


def test_a_lookup_asked_as_the_request_arrives_is_in_by_its_first_schedule_which_waits_nothing_for_it():
    """A store answering in 50 ms and a 5 ms grace: asked by the first schedule, the request sits out that step;
    asked as it arrived (it waited for a step meanwhile), the first schedule admits it with its hit, waits only
    for the answer's hand-over, and the pricing learns that asking cost that schedule about nothing. Asked from
    block 0, the answer holds for the local hit the schedule finds (one block here)."""
    side, request, timed = timed_lookup(0.05, grace_s=0.005)
    assert side.get_num_new_matched_tokens(request, BS) is None  # asked by the schedule: not in within the grace

    side, request, timed = timed_lookup(0.05, grace_s=0.005, manager=FakeManager())
    side.ask_ahead(request)
    assert side._store.answered.wait(5)
    assert side.get_num_new_matched_tokens(request, BS) == 10 * BS
    [(seconds, in_schedule)] = timed
    assert in_schedule and seconds < 0.005
    assert side._store.lookups == 1


def test_nothing_is_asked_ahead_that_the_local_cache_holds_or_that_could_not_pay_or_where_it_is_off():
    store = FakeStore()
    tokens = list(range(100, 145))
    hold(store, tokens, 11)
    side, _ = scheduler(store, KVStoreConfig(lookup_ahead=False, priced=False))
    request = FakeRequest("off", tokens)
    side.on_new_request(request)
    side.ask_ahead(request)
    assert store.lookups == 0 and eventually(lambda: side.get_num_new_matched_tokens(request, 0)) == 11 * BS

    manager = FakeManager()
    side, request, _ = timed_lookup(0.0, grace_s=0.005, manager=manager)
    manager.local_tokens[request.request_id] = request.num_tokens - 1  # every claimable block is local
    side.ask_ahead(request)
    assert side.get_num_new_matched_tokens(request, 11 * BS) == 0 and side._store.lookups == 0
    store = FakeStore()
    short = list(range(100, 110))  # 2 claimable blocks: their prefill costs less than asking (as above)
    hold(store, short, 2)
    side = SchedulerPrefixStore(store, NS, BS, KVStoreConfig(lookup_budget_s=5.0), pricing=primed_pricing())
    side.bind_kv_cache_manager(FakeManager())
    cheap = FakeRequest("cheap", short)
    side.on_new_request(cheap)
    side.ask_ahead(cheap)
    assert side.get_num_new_matched_tokens(cheap, 0) == 0
    meta = RayfleetConnectorMetadata()
    side.add_to_meta(meta, FakeOutput({}))
    assert meta.store_counts["store_lookups_priced_out"] == 1  # decided once, as it arrived
    assert store.lookups == 0


def test_a_lookup_answered_after_the_grace_is_timed_as_not_in_the_asking_step():
    side, request, timed = timed_lookup(0.05, grace_s=0.005)
    assert side.get_num_new_matched_tokens(request, 0) is None  # not answered within the grace: a later step
    assert eventually(lambda: side.get_num_new_matched_tokens(request, 0)) == 11 * BS
    [(seconds, in_schedule)] = timed
    assert seconds >= 0.05 and not in_schedule


def test_a_finished_async_load_teaches_the_price_of_loads():
    store = FakeStore()
    tokens = list(range(100, 145))
    hold(store, tokens, 11)
    pricing = primed_pricing()
    side = SchedulerPrefixStore(store, NS, BS, KVStoreConfig(lookup_budget_s=5.0), pricing=pricing)
    request = FakeRequest("r", tokens)
    side.on_new_request(request)
    assert eventually(lambda: side.get_num_new_matched_tokens(request, 0)) == 11 * BS
    side.update_state_after_alloc(request, FakeBlocks(list(range(12))), 11 * BS)
    assert pricing.load_s.value is None
    side.loads_finished({"r"})
    assert pricing.load_s.value is not None and pricing.load_s.value >= 0


def test_with_async_scheduling_the_time_between_schedules_is_priced_as_the_step_before():
    pricing = StorePricing(block_size=BS)
    side = SchedulerPrefixStore(FakeStore(), NS, BS, KVStoreConfig(), pricing=pricing, pipelined=True)
    for scheduled in ({"a": 5}, {"a": 7}, {"a": 1}):
        side.add_to_meta(RayfleetConnectorMetadata(), FakeOutput(scheduled))
    # Scheduling the third step waited for the first (5 tokens) to finish; the second was scheduled meanwhile.
    assert pricing.steps.points == 1 and pricing.steps.sx == 5


def test_a_lookup_the_store_answers_past_its_budget_counts_as_a_time_out_not_a_failure():
    from ray.exceptions import GetTimeoutError

    class LateStore(FakeStore):
        def contains_prefix(self, hashes, timeout_s=None):
            self.lookups += 1
            raise GetTimeoutError("Get timed out: some object(s) not ready.")  # the client's Ray timeout

    store = LateStore()
    tokens = list(range(100, 114))
    side, _ = scheduler(store, KVStoreConfig(lookup_budget_s=5.0))
    request = FakeRequest("r", tokens)
    side.on_new_request(request)
    assert eventually(lambda: side.get_num_new_matched_tokens(request, BS)) == 0
    assert side.get_num_new_matched_tokens(request, BS) == 0  # counted once, also when asked again
    meta = RayfleetConnectorMetadata()
    side.add_to_meta(meta, FakeOutput({}))
    assert meta.store_counts["store_lookup_timeouts"] == 1
    assert meta.store_counts.get("store_lookup_errors", 0) == 0


def test_a_read_only_engine_loads_from_the_store_and_puts_nothing():
    store = FakeStore()
    tokens = list(range(100, 114))  # 3 full blocks
    hold(store, tokens, 1)
    side, manager = scheduler(store, KVStoreConfig(async_loads=False, access="read_only"))
    request = FakeRequest("r", tokens)
    side.on_new_request(request)
    assert side.get_num_new_matched_tokens(request, 0) == BS  # block 0 from the store
    side.update_state_after_alloc(request, FakeBlocks([5, 6, 7, 8]), BS)
    manager.ids["r"] = [5, 6, 7, 8]
    request.num_computed_tokens = BS
    meta = RayfleetConnectorMetadata()
    side.add_to_meta(meta, FakeOutput({"r": 10}))  # blocks 1 and 2 computed: a read_write engine puts them
    assert len(meta.store_loads) == 1 and meta.store_saves == []


def test_a_write_only_engine_puts_what_it_computes_and_never_looks_up():
    store = FakeStore()
    tokens = list(range(100, 114))
    hold(store, tokens, 3)  # the store could supply every claimable block
    side, manager = scheduler(store, KVStoreConfig(access="write_only"))
    request = FakeRequest("r", tokens)
    side.on_new_request(request)
    assert side.get_num_new_matched_tokens(request, 0) == 0
    side.update_state_after_alloc(request, FakeBlocks([5, 6, 7, 8]), 0)
    manager.ids["r"] = [5, 6, 7, 8]
    meta = RayfleetConnectorMetadata()
    side.add_to_meta(meta, FakeOutput({"r": 14}))
    assert store.lookups == 0 and meta.store_loads == []
    assert meta.store_saves == [StoreSave("r", block_hashes(tokens, BS, NS)[:3], [5, 6, 7])]
