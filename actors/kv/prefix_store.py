"""The KV store half of rayfleet's KV connector: prefix reuse across replicas and offload.

``RayfleetKVConnector`` (``connector.py``) delegates to these two classes when its
``kv_transfer_config.kv_connector_extra_config`` carries ``{"kv_store": {KVStoreConfig fields},
"namespace": "<model and layout id>"}``; without it they do not exist and the connector only migrates.

* Scheduler side (EngineCore process), :class:`SchedulerPrefixStore`:
  ``get_num_new_matched_tokens`` hashes the request's full blocks (``block_hash.block_hashes``), asks
  the store how many leading blocks beyond the local prefix-cache hit it holds, and claims them, leaving at
  least one token to compute. ``update_state_after_alloc`` turns the claim into a :class:`StoreLoad`
  (hashes -> freshly allocated block ids). ``build_connector_meta`` adds a :class:`StoreSave` for every full
  block a request's forward completes this step that the engine did not get from its prefix cache or the
  store, and that it has not put before.
* Worker side, :class:`WorkerPrefixStore`: loads get the blocks and scatter them; a block the store lost
  since the lookup, and every block after it, is reported through ``get_block_ids_with_load_errors``, and
  vLLM recomputes from there. ``save`` (in ``wait_for_save``, after the forward and before the scheduler can
  free the blocks) gathers the completed blocks and puts them from a background thread. So a block an engine
  later evicts under memory pressure is still in the store (offload), and any replica of the same namespace
  can load it.

With ``async_loads`` (the default) neither the lookup nor the load runs on the engine's step. The lookup goes
to a thread at the request's first admission attempt, and that schedule waits for it a little
(``lookup_grace_s``: a store answers in milliseconds, a skipped request waits a whole step); until it answers,
``get_num_new_matched_tokens`` says "ask again" (None: the scheduler skips the request and steps on with the
others), for at most the lookup budget (``lookup_budget_s``, and ``lookup_budget_per_block_s`` per block it
could supply: waiting never costs more than the prefill a hit saves); then the request is computed. A hit is
claimed as an async load (vLLM's ``WAITING_FOR_REMOTE_KVS``): a thread gets the blocks, the worker scatters them
between steps and reports the request in ``get_finished``; a load slower than ``load_budget_s`` or failing (a
shard slow, restarting or gone) reports its blocks as load errors, and vLLM recomputes them. A store that
misbehaves costs recomputation, never an engine. ``async_loads: false`` keeps the first, synchronous design
(the store round trips on the step) for comparison.

With ``priced`` (the default, async loads only) the scheduler side also prices each lookup and load
(``policies/kv_pricing.py``): it times the engine's own steps against the tokens they schedule and the loads it
claims, and asks the store only when the blocks it could bring take longer to prefill than the wait.

Blocks move in the kernels' row format (``rayfleet.kernels``: one row per block, all layers): a save is one
gather, a load one scatter. Neither process is a Ray worker: both connect to the cluster named by ``RAY_ADDRESS``, which the
replica sets to its GCS address before it builds the engine. See docs/kv_connector.md.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from ray.exceptions import GetTimeoutError
from vllm.logger import init_logger

from rayfleet.actors.engine_driver import join_cluster
from rayfleet.actors.kv.block_hash import BlockHash, block_hashes
from rayfleet.actors.kv.metadata import StoreLoad, StoreSave
from rayfleet.actors.kv.store import KVStoreClient, get_or_create_kv_store
from rayfleet.actors.kv.store_config import KVStoreConfig
from rayfleet.kernels import KVCacheLayers, gather_to_host, scatter_rows, stack_rows
from rayfleet.policies.kv_pricing import StorePricing

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

# Under vLLM's logger: this code runs in the engine's processes, where only vLLM's loggers have a handler.
logger = init_logger("vllm.rayfleet.kv_store")

# Hashes this engine put recently: a shared system prompt recomputed after a local eviction is not put
# again while the store most likely still holds it. Bounded, oldest forgotten first.
_SEEN_HASHES = 65536

STORE_COUNTERS = (
    "store_lookup_blocks",  # blocks beyond the local prefix hit that admissions asked the store for
    "store_hit_blocks",  # of those, blocks the store held and the engine claimed
    "store_blocks_loaded", "store_bytes_loaded", "store_load_errors",
    "store_blocks_saved", "store_bytes_saved", "store_put_errors",
    "store_blocks_already_held",  # computed here, but another engine had put them since: not sent again
    # Seconds spent waiting for the store: lookups (scheduler, on the step), loads (worker, on the step),
    # puts (worker, background thread).
    "store_lookup_s", "store_load_s", "store_put_s", "store_lookups", "store_loads", "store_puts",
    # Async path: lookups given up after their budget, loads past theirs, lookup errors (shard failures).
    "store_lookup_timeouts", "store_load_timeouts", "store_lookup_errors",
    # Pricing: lookups not made and held blocks not loaded because computing them was cheaper than the wait.
    "store_lookups_priced_out", "store_loads_priced_out",
)


def store_settings(vllm_config: VllmConfig) -> tuple[KVStoreConfig, str] | None:
    """(store config, hash namespace) from ``kv_connector_extra_config``; None: the store is off.

    The default namespace names what makes a block's bytes differ for the same tokens within one rayfleet
    build (model, dtypes, layout, block size, parallelism); a pool may set its own.
    """
    extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
    if extra.get("kv_store") is None:
        return None
    config = KVStoreConfig.model_validate(extra["kv_store"])
    cache = vllm_config.cache_config
    namespace = extra.get("namespace") or (
        f"{vllm_config.model_config.model}|{vllm_config.model_config.dtype}|kv={cache.cache_dtype}"
        f"|{cache.kv_cache_layout or 'default-layout'}|bs{cache.block_size}"
        f"|tp{vllm_config.parallel_config.world_size}"
    )
    return config, namespace


def connect_store(config: KVStoreConfig) -> KVStoreClient:
    """The store's client from an engine process (not a Ray worker): join the cluster at ``RAY_ADDRESS``."""
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        raise RuntimeError("rayfleet KV store: RAY_ADDRESS is not set in the engine's environment; the "
                           "replica must set it to its GCS address before building the engine")
    join_cluster(address, config.ray_namespace)
    return get_or_create_kv_store(config)


def _store_eligible(request: Request) -> bool:
    # LoRA adapters, cache salts and multimodal inputs change a block's KV for the same tokens, and the
    # namespace does not name them: such requests neither load nor save.
    return request.lora_request is None and not request.cache_salt and not request.mm_features


@dataclass
class _Lookup:
    local_blocks: int  # block-aligned local prefix hit
    asked_blocks: int  # blocks beyond it that the store was asked for
    hit_blocks: int  # blocks claimed from the store


@dataclass
class _PendingLookup:
    """A lookup running in a thread: how many of the chain's blocks from `first_block` the store holds."""

    future: Future
    first_block: int
    asked_blocks: int
    started: float = field(default_factory=time.monotonic)
    timed: bool = False  # its latency given to the pricing (once: the scheduler may ask again)
    seen: bool = False  # a schedule has waited its grace for it (asked ahead, none had yet)


class SchedulerPrefixStore:
    """Scheduler side: plans loads at admission and saves after every step."""

    def __init__(self, store: KVStoreClient, namespace: str, block_size: int, config: KVStoreConfig | None = None,
                 pricing: StorePricing | None = None, pipelined: bool = False):
        config = config or KVStoreConfig()
        self._store = store
        self._namespace = namespace
        self._block_size = block_size
        self.async_loads = config.async_loads
        self._reads, self._writes = config.access != "write_only", config.access != "read_only"
        self._lookup_budget_s = config.lookup_budget_s
        self._lookup_budget_per_block_s = config.lookup_budget_per_block_s
        self._lookup_grace_s = config.lookup_grace_s
        self._lookup_ahead = config.lookup_ahead and config.async_loads
        self._grace_left_s = config.lookup_grace_s  # of this schedule's
        self._kv_cache_manager = None
        self._requests: dict[str, Request] = {}  # eligible live requests
        self._hashes: dict[str, list[BlockHash]] = {}  # chain of each request's full blocks, grown lazily
        self._lookups: dict[str, _Lookup] = {}  # last answer of get_num_new_matched_tokens
        self._pending: dict[str, _PendingLookup] = {}  # async lookups, by request id
        self._saved_upto: dict[str, int] = {}  # blocks [0, n) are local, loaded or planned for saving
        self._seen: OrderedDict[BlockHash, None] = OrderedDict()
        self._lookup_counts: Counter[str] = Counter()  # sent to the worker in the next metadata
        self._counts_lock = threading.Lock()  # lookup threads count too
        self._loads: list[StoreLoad] = []
        self._lookup_threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rayfleet-kv-lookup")
        self._pricing = None
        if config.priced and config.async_loads:
            self._pricing = pricing or StorePricing(block_size)
            self._pricing.grace_s = config.lookup_grace_s  # the schedules' grace, which it prices
        # The last two schedules: when, tokens scheduled, which requests. The time since the last one is the
        # step it scheduled, or with async scheduling (`pipelined`: the next step is scheduled while one runs)
        # the step before it.
        self._schedules: deque[tuple[float, int, set[str]]] = deque(maxlen=2)
        self._timed_lag = 2 if pipelined else 1
        self._price_logged: tuple[float, int | None] = (0.0, None)  # when, break-even blocks
        self._claimed_at: dict[str, float] = {}  # async loads in flight: when their blocks were claimed
        self._priced_out: set[str] = set()  # requests whose lookup could not pay: computed, not asked again

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        self._kv_cache_manager = kv_cache_manager

    def on_new_request(self, request: Request) -> None:
        if _store_eligible(request):
            self._requests[request.request_id] = request

    def ask_ahead(self, request: Request) -> None:
        """Ask the store as the request arrives, not when the scheduler first considers it: a request usually
        waits a step or more for that, and its answer is in by then, where a lookup asked by that schedule holds
        the step up for its grace or, unanswered within it, costs the request a whole step. Asked from block 0
        (the local hit may grow or shrink before the schedule; the store answers for the leading blocks it
        holds); not asked where the local cache holds every block already, or the lookup could not pay."""
        if not self._lookup_ahead or not self._reads_prefix(request) or self._kv_cache_manager is None:
            return
        claimable = self._claimable_blocks(request)
        local_blocks = self._kv_cache_manager.get_computed_blocks(request)[1] // self._block_size
        if claimable > local_blocks and self._lookup_pays(request, claimable - local_blocks):
            self._start_lookup(request, 0, claimable)

    def _reads_prefix(self, request: Request) -> bool:
        return self._reads and request.request_id in self._requests and not request.skip_reading_prefix_cache

    def _claimable_blocks(self, request: Request) -> int:
        """Whole blocks only, and at least one token left to compute (vLLM asserts it)."""
        return (request.num_tokens - 1) // self._block_size

    def _chain(self, request: Request, num_blocks: int) -> list[BlockHash]:
        chain = self._hashes.setdefault(request.request_id, [])
        if len(chain) < num_blocks:  # a decoding request grows a block at a time: hash only the new ones
            new_tokens = request.all_token_ids[len(chain) * self._block_size : num_blocks * self._block_size]
            chain += block_hashes(new_tokens, self._block_size, self._namespace, parent=chain[-1] if chain else None)
        return chain[:num_blocks]

    def _contains(self, chain: list[BlockHash], timeout_s: float | None) -> int | None:
        """Leading blocks of `chain` the store holds; 0 when a shard fails (then compute), None past
        `timeout_s`."""
        began = time.perf_counter()
        failed = 0
        try:
            return self._store.contains_prefix(chain, timeout_s=timeout_s)
        except GetTimeoutError:  # past its budget (async lookups only): counted as a time-out by the scheduler
            return None
        except Exception as error:  # a shard slow, restarting or gone: the request is computed
            logger.warning("rayfleet: KV store lookup failed (%s: %s); computing instead", type(error).__name__, error)
            failed = 1
            return 0
        finally:
            self._count(store_lookup_s=time.perf_counter() - began, store_lookups=1, store_lookup_errors=failed)

    def _count(self, **counts: float) -> None:
        with self._counts_lock:
            self._lookup_counts.update(counts)

    def _budget(self, asked_blocks: int) -> float:
        if self._lookup_budget_per_block_s is None:
            return self._lookup_budget_s
        return min(self._lookup_budget_s, asked_blocks * self._lookup_budget_per_block_s)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int | None:
        """Tokens beyond the (block-aligned) local hit the store holds; None: ask again (lookup running).
        Only memoizes: may be called again for the same request."""
        if not self._reads_prefix(request):
            return 0
        local_blocks = num_computed_tokens // self._block_size
        claimable = self._claimable_blocks(request)
        asked = max(0, claimable - local_blocks)
        hit = 0
        if asked and not self.async_loads:
            hit = self._contains(self._chain(request, claimable)[local_blocks:], None)
        elif asked and not self._lookup_pays(request, asked):
            asked = 0
        elif asked:
            hit = self._async_hit(request, local_blocks, claimable)
            if hit is None:
                return None
        self._lookups[request.request_id] = _Lookup(local_blocks, asked, hit)
        return hit * self._block_size

    def _lookup_pays(self, request: Request, asked: int) -> bool:
        """A lookup already running goes on; a new one only when its blocks' prefill would outlast the wait.
        Decided once per request: the scheduler asks again every step a request waits (for KV room)."""
        rid = request.request_id
        if self._pricing is None or rid in self._pending:
            return True
        if rid in self._priced_out:
            return False
        if self._pricing.lookup_pays(asked):
            return True
        self._priced_out.add(rid)
        self._count(store_lookups_priced_out=1)
        return False

    def _wait_grace(self, lookup: Future, budget_s: float) -> float:
        """Wait a little for a lookup this schedule started: a store answers in a few milliseconds, and a request
        whose lookup is not answered now joins the next schedule, a whole step later (tens of milliseconds to
        seconds). The wait holds up the step for every running request, so a schedule waits at most
        `lookup_grace_s` for all its lookups together, and at most a tenth of the engine's measured step."""
        began = time.perf_counter()
        wait([lookup], timeout=min(self._grace_left_s, budget_s))
        waited = time.perf_counter() - began
        self._grace_left_s -= waited
        return waited

    def _new_schedule_grace(self) -> float:
        return self._lookup_grace_s if self._pricing is None else self._pricing.schedule_grace_s()

    def _time_lookup(self, pending: _PendingLookup, waited_s: float | None) -> None:
        """For the pricing: whether the store answered within the grace of the first schedule that wanted it, and
        how long that schedule waited for it (nothing, when asked ahead and answered before; later answers are
        seen a step or more late: their time is the step's, which it knows)."""
        if self._pricing is not None and not pending.timed:
            pending.timed = True
            in_schedule = waited_s is not None and pending.future.done()
            self._pricing.observe_lookup(waited_s if in_schedule else time.monotonic() - pending.started, in_schedule)

    def _start_lookup(self, request: Request, first_block: int, claimable: int) -> _PendingLookup:
        chain = self._chain(request, claimable)[first_block:]
        pending = self._pending[request.request_id] = _PendingLookup(
            self._lookup_threads.submit(self._contains, chain, self._budget(len(chain))), first_block, len(chain))
        return pending

    def _async_hit(self, request: Request, local_blocks: int, claimable: int) -> int | None:
        pending = self._pending.get(request.request_id) or self._start_lookup(request, local_blocks, claimable)
        budget = self._budget(pending.asked_blocks)
        waited = None
        if not pending.seen:  # the first schedule that wants the answer waits its grace (none if already in)
            pending.seen = True
            waited = self._wait_grace(pending.future, budget)
        done = pending.future.done()
        if not done and time.monotonic() - pending.started < budget:
            return None
        self._time_lookup(pending, waited)
        if not done or pending.future.result() is None:  # past its budget: here, or the client's Ray timeout
            pending.future.cancel()
            self._pending[request.request_id] = _PendingLookup(_answered(0), pending.first_block, 0, timed=True)
            self._count(store_lookup_timeouts=1)
            return 0
        held_until = pending.first_block + pending.future.result()
        hit = max(0, min(held_until, claimable) - local_blocks)
        if hit and self._pricing is not None and not self._pricing.load_pays(hit):
            # Decided once: the scheduler may ask again for the same request.
            self._pending[request.request_id] = _PendingLookup(_answered(0), local_blocks, pending.asked_blocks,
                                                               timed=True)
            self._count(store_loads_priced_out=1)
            return 0
        return hit

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        lookup = self._lookups.pop(request.request_id, None)
        self._pending.pop(request.request_id, None)
        if lookup is None:
            return
        hit = num_external_tokens // self._block_size
        first = lookup.local_blocks
        self._count(store_lookup_blocks=lookup.asked_blocks, store_hit_blocks=hit)
        if hit:
            if self._pricing is not None:
                self._claimed_at[request.request_id] = time.monotonic()
            block_ids = blocks.get_block_ids()[0][first:first + hit]
            self._loads.append(StoreLoad(request.request_id, self._chain(request, first + hit)[first:],
                                         list(block_ids), is_async=self.async_loads))
        # What the engine did not compute itself is not saved again.
        self._saved_upto[request.request_id] = max(self._saved_upto.get(request.request_id, 0), first + hit)

    def loads_finished(self, request_ids) -> None:
        """The worker reported these async loads done (scattered, or failed and to be recomputed)."""
        now = time.monotonic()
        for request_id in request_ids:
            claimed = self._claimed_at.pop(request_id, None)
            if claimed is not None and self._pricing is not None:
                self._pricing.observe_load(now - claimed)

    def _observe_step(self, scheduled: dict[str, int]) -> None:
        """Time the step that ran since the last schedule. Only when a request ran in both (the engine was busy
        throughout): otherwise the interval includes the engine's idle wait for work."""
        now = time.perf_counter()
        schedules, lag = self._schedules, self._timed_lag
        if len(schedules) >= lag:
            timed = schedules[-lag]
            next_requests = scheduled if lag == 1 else schedules[-1][2]
            if not timed[2].isdisjoint(next_requests):
                self._pricing.observe_step(timed[1], now - schedules[-1][0], len(timed[2]))
        schedules.append((now, sum(scheduled.values()), set(scheduled)))
        self._log_price(now)

    def _log_price(self, now: float) -> None:
        """The price in the engine's log once a minute, and after 10 s when its break-even moved by half or more
        (the price follows the load: on a busy small machine it moves within seconds)."""
        at, logged = self._price_logged
        if now - at <= 10:
            return
        break_even = self._pricing.break_even_blocks()
        moved = (break_even is None) != (logged is None) or (
            break_even is not None and not logged / 2 <= break_even <= logged * 1.5)
        if moved or now - at > 60:
            self._price_logged = (now, break_even)
            logger.info("rayfleet: KV store price: %s", self._pricing.describe())

    def add_to_meta(self, meta, scheduler_output: SchedulerOutput) -> None:
        """Fill ``meta.store_loads``, ``meta.store_saves`` and ``meta.store_counts`` for this step."""
        if self._pricing is not None:
            self._observe_step(scheduler_output.num_scheduled_tokens)
        self._grace_left_s = self._new_schedule_grace()  # for the next schedule's lookups
        meta.store_loads, self._loads = self._loads, []
        with self._counts_lock:
            meta.store_counts, self._lookup_counts = dict(self._lookup_counts), Counter()
        if not self._writes:  # read_only: nothing computed here is put
            return
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            request = self._requests.get(req_id)
            if request is None:
                continue
            # Before _update_after_schedule: this step's tokens get their KV in this step's forward.
            # (Clamped to the known tokens for async scheduling, where sampled ids arrive a step late.)
            computed = min(request.num_computed_tokens + num_scheduled, len(request.all_token_ids))
            full = computed // self._block_size
            start = self._saved_upto.get(req_id, 0)
            if full <= start:
                continue
            self._saved_upto[req_id] = full
            block_ids = self._kv_cache_manager.get_block_ids(req_id)[0]
            chain = self._chain(request, full)
            fresh = [i for i in range(start, full) if chain[i] not in self._seen]
            for i in fresh:
                self._seen[chain[i]] = None
            while len(self._seen) > _SEEN_HASHES:
                self._seen.popitem(last=False)
            if fresh:
                meta.store_saves.append(StoreSave(req_id, [chain[i] for i in fresh], [block_ids[i] for i in fresh]))

    def request_finished(self, request: Request) -> None:
        for table in (self._requests, self._hashes, self._lookups, self._saved_upto, self._pending, self._claimed_at):
            table.pop(request.request_id, None)
        self._priced_out.discard(request.request_id)


def _answered(value: int) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


@dataclass
class _PendingLoad:
    job: StoreLoad
    future: Future  # the blocks, or None when the store failed
    started: float = field(default_factory=time.monotonic)


class WorkerPrefixStore:
    """Worker side: executes the step's loads (before the forward, or in threads for async loads) and its
    saves after the forward."""

    def __init__(self, store: KVStoreClient, config: KVStoreConfig | None = None):
        config = config or KVStoreConfig()
        self._store = store
        self._load_budget_s = config.load_budget_s
        self._cache: KVCacheLayers | None = None
        self._bytes_per_block = 0
        self._loads: list[StoreLoad] = []
        self._saves: list[StoreSave] = []
        self._failed: set[str] = set()  # requests whose load failed this step: their KV is not saved
        self._load_errors: set[int] = set()
        self._pending: dict[str, _PendingLoad] = {}  # async loads in flight, by request id
        self.counters: Counter[str] = Counter()
        # Puts wait for the shards; one background thread keeps them off the engine's step (in order). Saves
        # that queue while a put is on its way go out together in the next one: a call costs ~2 ms of host CPU
        # whatever it carries (docs/benchmarks-kv-store.md, run 7).
        self._putter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayfleet-kv-put")
        self._put_lock = threading.Lock()
        self._unsent: list[tuple[list[BlockHash], torch.Tensor]] = []  # gathered, not yet taken by a put
        self._last_put: Future | None = None
        # Async loads wait for the shards in threads; a few, so one slow shard does not hold up the others.
        self._loaders = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rayfleet-kv-load")

    def register(self, cache: KVCacheLayers) -> None:
        self._cache = cache
        self._bytes_per_block = cache.layout.block_bytes

    def bind(self, meta) -> None:
        self._loads, self._saves = meta.store_loads, meta.store_saves
        self.counters.update(meta.store_counts)

    def load(self) -> None:
        """Start this step's loads: async ones go to threads; synchronous ones complete here."""
        loads, self._loads = self._loads, []
        self._failed = set()
        for job in loads:
            if job.is_async:
                future = self._loaders.submit(self._fetch, job.hashes, self._load_budget_s)
                self._pending[job.internal_id] = _PendingLoad(job, future)
                continue
            began = time.perf_counter()
            if not self._apply(job, self._fetch(job.hashes, None)):
                self._failed.add(job.internal_id)
            self.counters["store_load_s"] += time.perf_counter() - began

    def take_finished_loads(self) -> set[str] | None:
        """Requests whose async load ended since the last step (their blocks scattered now, between steps,
        or reported as load errors when the store failed or ran past `load_budget_s`)."""
        finished = set()
        now = time.monotonic()
        for request_id, pending in list(self._pending.items()):
            if pending.future.done():
                blocks = pending.future.result()
            elif now - pending.started > self._load_budget_s:
                blocks = None  # the thread's late answer is dropped: these blocks are recomputed
                self.counters["store_load_timeouts"] += 1
                logger.warning("rayfleet: KV store load of %s took over %.2f s; recomputing",
                               request_id, self._load_budget_s)
            else:
                continue
            self._apply(pending.job, blocks)
            self.counters["store_load_s"] += now - pending.started
            del self._pending[request_id]
            finished.add(request_id)
        return finished or None

    def _fetch(self, hashes: list[BlockHash], timeout_s: float | None) -> list | None:
        try:
            return self._store.get(hashes, timeout_s=timeout_s)
        except Exception as error:  # a shard slow, restarting or gone: recompute, never fail the engine
            logger.warning("rayfleet: KV store get of %d blocks failed (%s: %s); recomputing", len(hashes),
                           type(error).__name__, error)
            return None

    def _apply(self, job: StoreLoad, blocks: list | None) -> bool:
        """Scatter the leading usable blocks; the rest are load errors (vLLM recomputes from the first)."""
        blocks = blocks if blocks is not None else [None] * len(job.hashes)
        usable = next((i for i, block in enumerate(blocks)
                       if block is None or block.size != self._bytes_per_block), len(blocks))
        if usable:
            rows = stack_rows(blocks[:usable], pinned=self._cache.device.type == "cuda")
            scatter_rows(self._cache, rows, job.block_ids[:usable])
        if usable < len(blocks):
            # Evicted (or of another size, or the shard failed) since the lookup.
            logger.warning("rayfleet: KV store lost %d of %d blocks of %s since its lookup; recomputing",
                           len(blocks) - usable, len(blocks), job.internal_id)
            self._load_errors.update(job.block_ids[usable:])
            self.counters["store_load_errors"] += 1
        self.counters["store_loads"] += 1
        self.counters["store_blocks_loaded"] += usable
        self.counters["store_bytes_loaded"] += usable * self._bytes_per_block
        return usable == len(blocks)

    def save(self) -> None:
        saves, self._saves = self._saves, []
        hashes: list[BlockHash] = []
        block_ids: list[int] = []
        for job in saves:
            if job.internal_id in self._failed:
                continue  # this step's forward read KV that vLLM is about to recompute
            hashes += job.hashes
            block_ids += job.block_ids
        if not block_ids:
            return
        # The gather copies: the rows stay valid whatever the engine does with the blocks next, so the
        # put can finish in the background while the engine steps on.
        rows = gather_to_host(self._cache, block_ids)
        with self._put_lock:
            self._unsent.append((hashes, rows))
            if len(self._unsent) == 1:  # else a put already queued takes these too
                self._last_put = self._putter.submit(self._put_unsent)

    def _put_unsent(self) -> None:
        # Never empty: a put is queued only by the save that found nothing unsent, and only it takes them.
        with self._put_lock:
            batch, self._unsent = self._unsent, []
        self._put([h for hashes, _ in batch for h in hashes], torch.cat([rows for _, rows in batch]))

    def _put(self, hashes: list[BlockHash], rows: torch.Tensor) -> None:
        """Send the blocks the store does not hold yet. Another engine may have put some since this one chose
        to compute them (a lookup priced out, a prefix computed on both at once): asking costs a round trip
        of hashes, sending them again their bytes through the object store and a copy in the shard."""
        began = time.perf_counter()
        try:
            held = self._store.contains(hashes)
            missing = [i for i, present in enumerate(held) if not present]
            if missing:
                self._store.put([hashes[i] for i in missing], list(rows[missing].numpy()))
        except Exception:  # a lost put is a later miss, never wrong KV; the step must not fail for it
            logger.exception("rayfleet: KV store put of %d blocks failed", len(hashes))
            self.counters["store_put_errors"] += 1
            return
        self.counters["store_put_s"] += time.perf_counter() - began
        self.counters["store_puts"] += 1
        self.counters["store_blocks_saved"] += len(missing)
        self.counters["store_blocks_already_held"] += len(hashes) - len(missing)
        self.counters["store_bytes_saved"] += len(missing) * rows[0].numel()

    def flush(self) -> None:
        """Wait for the puts submitted so far (tests, and a replica about to shut down)."""
        if self._last_put is not None:
            self._last_put.result()

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def stats(self) -> dict[str, Any]:
        self.flush()  # counters of saves include every put submitted before this call
        return {name: self.counters[name] for name in STORE_COUNTERS}
