"""The chimera router as pure decision code: its quality head on the committed routing table (real MiniLM
embeddings, no Ray), its decisions on fleet snapshots (idle, congested, with an SLO), and learning from feedback.

The table (`actors/tasks/trained/routing-table.jsonl`) holds the trained task models' verifier scores on
held-out questions, measured on this fleet by `benchmarks/bench_chimera.py`.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from rayfleet.actors.tasks import TRAINED_MODELS_DIR, generate
from rayfleet.policies.base import (
    FleetSnapshot,
    LabelledOutcome,
    PoolSnapshot,
    ReplicaSnapshot,
    ReplicaState,
    RequestInfo,
    RequestOutcome,
)
from rayfleet.policies.chimera import ChimeraRouter, read_table

TABLE = TRAINED_MODELS_DIR / "routing-table.jsonl"
POOLS = ("task-small", "task-large", "task-string")
PROBE_SEED = 1_600_000_000  # questions in neither the table nor the training data


@pytest.fixture(scope="module")
def embed(rows):
    """MiniLM embeddings, the table's prompts computed once for the module."""
    from rayfleet.actors.embedding.embedder import PromptEncoder

    encoder = PromptEncoder()  # what the fleet's embedder runs
    prompts = sorted({r.prompt for r in rows})
    cache = dict(zip(prompts, encoder.encode(prompts, batch_size=128)))

    def embed(texts):
        missing = [t for t in texts if t not in cache]
        if missing:
            cache.update(zip(missing, encoder.encode(missing)))
        return np.stack([cache[t] for t in texts])

    return embed


@pytest.fixture(scope="module")
def rows():
    return read_table(TABLE)


def router_on(rows, embed, **params) -> ChimeraRouter:
    router = ChimeraRouter(rows=rows, **params)
    router.fit_table(embed(router.table_prompts()))
    return router


def snapshot(backlog: dict[str, int] | None = None, throughput: float = 400.0,
             replicas_per_pool: int = 1) -> FleetSnapshot:
    backlog = backlog or {}
    pools = {}
    for pool in POOLS:
        replicas = tuple(ReplicaSnapshot(replica_id=f"{pool}-{i}", pool=pool, model=pool, state=ReplicaState.READY,
                                         predicted_remaining_tokens=backlog.get(f"{pool}-{i}", 0),
                                         decode_tokens_per_s=throughput if backlog.get(f"{pool}-{i}") else 0.0)
                         for i in range(replicas_per_pool))
        pools[pool] = PoolSnapshot(name=pool, model=pool, min_replicas=1, max_replicas=4,
                                   desired_replicas=replicas_per_pool, replicas=replicas)
    return FleetSnapshot(pools=pools)


def ask(router, embed, prompt: str, snap: FleetSnapshot, request_id: str = "r", **fields):
    info = RequestInfo(request_id=request_id, pool=None, prompt_tokens=len(prompt), max_tokens=16,
                       prompt_text=prompt, embedding=tuple(embed([prompt])[0]), **fields)
    return router.route(info, snap)


def test_quality_head_ranks_models_on_held_out_prompts_better_than_chance(rows, embed):
    """Pairwise ranking accuracy on held-out queries (pairs of pools whose scores differ): chance is 0.5;
    the head must reach 0.75."""
    queries = sorted({r.query_id for r in rows})
    random.Random(0).shuffle(queries)
    held = set(queries[: len(queries) // 4])
    router = router_on([r for r in rows if r.query_id not in held], embed)
    by = {(r.query_id, r.pool): r for r in rows}
    vectors = dict(zip(sorted(held), embed([by[q, POOLS[0]].prompt for q in sorted(held)])))
    agree = total = 0
    for q in held:
        predicted = {p: router.predict(p, router._unit(vectors[q]))[0] for p in POOLS}
        for a in POOLS:
            for b in POOLS:
                if a < b and by[q, a].score != by[q, b].score:
                    total += 1
                    agree += (predicted[a] > predicted[b]) == (by[q, a].score > by[q, b].score)
    assert total >= 20, "the table should hold queries the models disagree on"
    assert agree / total >= 0.75, f"ranking accuracy {agree}/{total}"


def test_easy_prompts_go_to_the_small_model_and_hard_ones_to_a_strong_model(rows, embed):
    """Measured on this CPU, the small and the large model decode at the same speed when idle (35.0 vs 35.1 ms
    per token in the table: vLLM's per-step cost dominates models this small), so what sends easy prompts to the
    small model is congestion: one request in flight on the large model (30 tokens of backlog) is enough."""
    router = router_on(rows, embed, latency_weight=0.5)
    busy_large = snapshot({"task-large-0": 30})
    easy = [t for f in ("chain_sum", "products") for t in generate(f, "easy", PROBE_SEED, 8)]
    easy_pools = [ask(router, embed, t.prompt, busy_large, f"e{i}").pool for i, t in enumerate(easy)]
    assert easy_pools.count("task-small") >= 14, easy_pools
    # Hard words: only the large model and the string specialist reverse them, idle or not.
    for fleet in (snapshot(), busy_large):
        hard_words = [ask(router, embed, t.prompt, fleet, f"w{i}").pool
                      for i, t in enumerate(generate("spell_backward", "hard", PROBE_SEED, 10))]
        assert "task-small" not in hard_words, hard_words
    # And no arithmetic goes to the model that knows none.
    idle_easy = [ask(router, embed, t.prompt, snapshot(), f"i{i}").pool for i, t in enumerate(easy)]
    assert "task-string" not in idle_easy, idle_easy


def test_congested_strong_pool_shifts_the_decision_as_the_objective_says(rows, embed):
    router = router_on(rows, embed, latency_weight=0.5)
    [hard] = generate("spell_backward", "hard", seed=PROBE_SEED + 50)
    assert ask(router, embed, hard.prompt, snapshot()).pool == "task-large"
    # 4000 tokens of decode backlog at 400 tok/s: ~10 s more on task-large. With lambda 0.5 that costs ~5
    # quality points, more than task-large's edge, so the request goes to the string specialist ...
    congested = snapshot({"task-large-0": 4000})
    decision = ask(router, embed, hard.prompt, congested, "r2")
    assert decision.pool == "task-string"
    large = next(c for c in router.explain(1)[0]["candidates"] if c["pool"] == "task-large")
    assert large["latency_s"] > 9 and large["backlog_tokens"] == 4000
    # ... while a request that values quality only (lambda 0 in its header) still waits for the strong model,
    assert ask(router, embed, hard.prompt, congested, "r3", latency_weight=0.0).pool == "task-large"
    # and with a latency SLO the best quality within it wins.
    assert ask(router, embed, hard.prompt, congested, "r4", latency_slo_s=1.0).pool != "task-large"
    assert ask(router, embed, hard.prompt, congested, "r5", latency_slo_s=30.0).pool == "task-large"


def on_nodes(snap: FleetSnapshot, nodes: dict[str, str]) -> FleetSnapshot:
    """`snap` with its replicas as CPU replicas placed on nodes (replica id -> node id)."""
    return FleetSnapshot(pools={name: dataclasses.replace(pool, replicas=tuple(
        dataclasses.replace(r, accelerator="CPU", node_id=nodes[r.replica_id]) for r in pool.replicas))
        for name, pool in snap.pools.items()})


def test_cpu_replicas_sharing_a_node_congest_together_so_easy_prompts_stay_on_the_best_model(rows, embed):
    """Three CPU engines on one node share its cores: a request on the idle small model waits for the large
    model's work as much as one batched with it, so the backlog that moves easy prompts to `task-small` when each
    replica has its own hardware (test above) changes no decision here; on separate nodes it moves them again."""
    router = router_on(rows, embed, latency_weight=0.5)
    busy_large = snapshot({"task-large-0": 30})
    easy = [t for f in ("chain_sum", "products") for t in generate(f, "easy", PROBE_SEED, 8)]
    one_node = on_nodes(busy_large, {f"{p}-0": "node-a" for p in POOLS})
    idle_node = on_nodes(snapshot(), {f"{p}-0": "node-a" for p in POOLS})
    shared = [ask(router, embed, t.prompt, one_node, f"s{i}").pool for i, t in enumerate(easy)]
    small = next(c for c in router.explain(1)[0]["candidates"] if c["pool"] == "task-small")
    assert small["backlog_tokens"] == 30  # the node's backlog, though task-small itself has none
    idle = [ask(router, embed, t.prompt, idle_node, f"i{i}").pool for i, t in enumerate(easy)]
    assert shared == idle and shared.count("task-large") >= 12, (shared, idle)
    own_nodes = on_nodes(busy_large, {f"{p}-0": f"node-{p}" for p in POOLS})
    separate = [ask(router, embed, t.prompt, own_nodes, f"n{i}").pool for i, t in enumerate(easy)]
    assert separate.count("task-small") >= 14, separate
    # And a fleet that pins its CPU engines to disjoint cores says so: each congests alone again.
    pinned = router_on(rows, embed, latency_weight=0.5, cpu_replicas_share_node=False)
    assert [ask(pinned, embed, t.prompt, one_node, f"p{i}").pool for i, t in enumerate(easy)].count(
        "task-small") >= 14


def test_second_replica_of_a_pool_takes_the_request_when_the_first_is_busy(rows, embed):
    router = router_on(rows, embed, latency_weight=0.5)
    [hard] = generate("spell_backward", "hard", seed=PROBE_SEED + 51)
    decision = ask(router, embed, hard.prompt, snapshot({"task-large-0": 4000}, replicas_per_pool=2))
    assert (decision.pool, decision.replica_id) == ("task-large", "task-large-1")


def test_feedback_changes_later_decisions(rows, embed):
    router = router_on(rows, embed, latency_weight=0.5)
    idle = snapshot()
    probes = generate("spell_backward", "hard", seed=PROBE_SEED + 100, count=40)
    before = ask(router, embed, probes[0].prompt, idle, "first").pool
    assert before != "task-small"
    # The chosen model keeps failing on these questions (e.g. after a bad update): verifiers report 0.
    for i, task in enumerate(probes[1:]):
        decision = ask(router, embed, task.prompt, idle, f"fb{i}")
        assert router.feedback(f"fb{i}", 0.0 if decision.pool == before else 1.0)
    assert ask(router, embed, probes[0].prompt, idle, "after").pool != before


def test_a_promoted_pool_relearns_from_its_new_weights_verifier_scores_alone(rows, embed):
    """An RL version of task-small that learned hard sums and forgot easy products: after `relearn` with its
    verifier scores, task-small's predicted quality follows them, its old table rows (sums wrong, products right)
    no longer count, and the other pools' estimates stay."""
    router = router_on(rows, embed)
    sums = generate("chain_sum", "hard", seed=PROBE_SEED + 200, count=41)
    products = generate("products", "easy", seed=PROBE_SEED + 300, count=41)

    def predicted_quality(prompt: str, request_id: str) -> dict[str, float]:
        ask(router, embed, prompt, snapshot(), request_id)
        return {c["pool"]: c["quality"] for c in router.explain(1)[0]["candidates"]}
    before = {"sum": predicted_quality(sums[0].prompt, "sum-before"),
              "product": predicted_quality(products[0].prompt, "product-before")}
    assert before["sum"]["task-small"] < 0.3 < 0.7 < before["product"]["task-small"]
    new_rows = [LabelledOutcome(t.prompt, "task-small", score, 6, 0.0) for tasks, score in
                ((sums[1:], 1.0), (products[1:], 0.0)) for t in tasks]
    router.relearn("task-small", new_rows, embed([r.prompt for r in new_rows]))
    after = {"sum": predicted_quality(sums[0].prompt, "sum-after"),
             "product": predicted_quality(products[0].prompt, "product-after")}
    assert after["product"]["task-small"] < 0.3 < 0.7 < after["sum"]["task-small"]
    for probe in ("sum", "product"):  # the other pools' estimates did not move
        del before[probe]["task-small"], after[probe]["task-small"]
    assert after == before
    with pytest.raises(ValueError, match="task-small"):
        router.relearn("task-small", [LabelledOutcome("q", "task-large", 1.0, 1, 0.0)], embed(["q"]))


def test_feedback_for_an_unknown_request_or_out_of_range_changes_nothing(rows, embed):
    router = router_on(rows, embed)
    quality_rows = {p: t.size for p, t in router.quality.items()}
    assert router.feedback("never-routed", 1.0) is False
    ask(router, embed, "State the final answer to the following arithmetic problem: 4 + 5 =", snapshot(), "x")
    with pytest.raises(ValueError):
        router.feedback("x", 1.5)
    assert {p: t.size for p, t in router.quality.items()} == quality_rows


def test_finished_requests_teach_the_length_predictor_and_workflow_stages(rows, embed):
    router = router_on(rows, embed)
    prompt = "Spell this word backward (example: sun -> nus): abracadabra"
    vector = router._unit(embed([prompt])[0])
    before = router.predict("task-string", vector)[1]
    for i in range(30):
        ask(router, embed, prompt, snapshot(), f"len{i}", workflow_id="wf", workflow_stage="1/3")
        router.observe(RequestOutcome(f"len{i}", "task-string", "task-string-0", output_tokens=15, latency_s=0.1))
    assert router.predict("task-string", vector)[1] > before + 2
    assert router.stage_tokens[("task-string", 1)] == pytest.approx(15)
    # The remaining output of a workflow at stage 1 of 3 counts the later stages too.
    assert router.workflow_remaining("task-string", (1, 3), 10.0) > 10.0


def test_routing_a_16_replica_snapshot_picks_the_least_congested_replica_of_the_best_pool(rows, embed):
    """Correctness of the case `benchmarks/bench_routing_decision.py` times (16 replicas, the full table)."""
    router = router_on(rows, embed, latency_weight=0.5)
    backlog = {f"{p}-{i}": 500 + 100 * i for p in POOLS for i in range(6)}
    backlog["task-large-3"] = 0
    snap = snapshot(backlog, replicas_per_pool=6)
    snap = FleetSnapshot(pools={**snap.pools, "task-string": PoolSnapshot(
        name="task-string", model="task-string", min_replicas=1, max_replicas=4, desired_replicas=4,
        replicas=snap.pools["task-string"].replicas[:4])})
    assert len(snap.routable_replicas()) == 16
    [hard] = generate("spell_backward", "hard", seed=PROBE_SEED + 7)
    assert ask(router, embed, hard.prompt, snap).replica_id == "task-large-3"


def test_without_an_embedding_the_router_falls_back_to_pool_priors(rows):
    router = ChimeraRouter(rows=rows)
    info = RequestInfo(request_id="n", pool=None, prompt_tokens=3, max_tokens=16)
    router.route(info, snapshot())
    explained = router.explain(1)[0]
    assert explained["embedded"] is False
    for candidate in explained["candidates"]:
        prior = np.mean([r.score for r in rows if r.pool == candidate["pool"]])
        assert candidate["quality"] == pytest.approx(prior, abs=1e-3)


def test_a_named_pool_gets_its_fastest_replica(rows):
    router = ChimeraRouter(rows=rows)
    info = RequestInfo(request_id="named", pool="task-small", prompt_tokens=3, max_tokens=16)
    decision = router.route(info, snapshot({"task-small-0": 900}, replicas_per_pool=2))
    assert decision.replica_id == "task-small-1"


def test_a_late_embedding_still_teaches_from_the_requests_feedback(rows, embed):
    """Routed on priors because its embedding came after the router's wait, a request's feedback is learned once
    the embedding arrives (and not before: without a vector there is nothing to learn from)."""
    router = router_on(rows, embed)
    prompt = "Spell this word backward (example: sun -> nus): zebra"
    info = RequestInfo(request_id="late", pool=None, prompt_tokens=12, max_tokens=16, prompt_text=prompt)
    pool = router.route(info, snapshot()).pool
    assert router.explain(1)[0]["embedded"] is False
    assert router.feedback("late", 1.0) is False
    rows_before = router.quality[pool].size
    router.attach_embedding("late", embed([prompt])[0])
    assert router.feedback("late", 1.0) is True
    assert router.quality[pool].size == rows_before + 1


def test_an_embedding_that_comes_while_the_request_waits_in_admission_routes_it(rows, embed):
    """Past the router's wait but before admission let the request through: it is routed with its embedding
    (the same choice as an on-time embedding), not on the pools' priors."""
    router = router_on(rows, embed)
    prompt = "Spell this word backward (example: sun -> nus): zebra"
    vector = embed([prompt])[0]
    on_time = RequestInfo(request_id="on-time", pool=None, prompt_tokens=12, max_tokens=16, prompt_text=prompt,
                          embedding=tuple(vector.tolist()))
    expected = router.route(on_time, snapshot()).pool
    router.attach_embedding("queued", vector)
    queued = RequestInfo(request_id="queued", pool=None, prompt_tokens=12, max_tokens=16, prompt_text=prompt)
    assert router.route(queued, snapshot()).pool == expected
    assert router.explain(1)[0]["embedded"] is True
    assert router.feedback("queued", 1.0) is True
    assert "queued" not in router.unrouted_embeddings


def test_an_embedding_later_than_the_wait_routes_without_it_and_is_delivered_when_it_comes():
    import asyncio

    from rayfleet.control_plane.serving.gateway import within_wait

    async def run():
        delivered = []
        arrived = asyncio.Event()

        async def embedding(delay_s):
            await asyncio.sleep(delay_s)
            return (0.6, 0.8)

        def late(vector):
            delivered.append(vector)
            arrived.set()

        assert await within_wait(asyncio.create_task(embedding(0)), 1.0, late) == (0.6, 0.8)
        started = asyncio.get_running_loop().time()
        assert await within_wait(asyncio.create_task(embedding(0.5)), 0.05, late) is None
        assert asyncio.get_running_loop().time() - started < 0.4  # did not wait for it
        await asyncio.wait_for(arrived.wait(), 5)
        return delivered

    assert asyncio.run(run()) == [(0.6, 0.8)]
