"""Live migration of running requests between real vLLM CPU engines, seen through the official client.

The "mig" pool has two replicas of the same model with small KV caches (72 blocks of 32 tokens).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import ray

from rayfleet.actors.replica.live_migration import Destination

pytestmark = pytest.mark.engines
PROMPT = [{"role": "user", "content": "Describe live migration of a running request."}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def mig_replicas(fleet) -> list[str]:
    return sorted(r["replica_id"] for r in fleet.replicas("mig"))


def where(fleet, request_id: str, timeout_s: float = 10.0) -> str:
    """The replica running `request_id`, as the controller sees it (its view is up to one tick old)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for r in fleet.status()["replicas"]:
            if request_id in r["requests"]:
                return r["replica_id"]
        time.sleep(0.05)
    raise AssertionError(f"request {request_id} is on no replica: {fleet.status()['replicas']}")


def replica_handle(replica_id: str):
    return ray.get_actor(f"rayfleet-replica-{replica_id}", namespace="rayfleet")


def free_blocks(replica_id: str) -> int:
    return ray.get(replica_handle(replica_id).kv_stats.remote())["num_free_blocks"]


async def settle(condition, timeout_s: float = 30.0) -> None:
    """Wait, bounded, until `condition()` holds, without failing: the asserts after it name what did not settle
    (a request's KV blocks are freed an engine step after it ends, a migration's rows when its cleanup runs)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not await asyncio.to_thread(condition):
        await asyncio.sleep(0.25)


@pytest.fixture
def mig_pool(fleet) -> list[str]:
    """The "mig" pool with both its replicas ready: a drain (or a kill) earlier in the session may have left
    one, so every test that moves requests between the two asks for them here and stands on its own."""
    return two_ready_mig_replicas(fleet)


def two_ready_mig_replicas(fleet) -> list[str]:
    if len(mig_replicas(fleet)) < 2:
        ray.get(fleet.controller.scale.remote("mig", 2))
        fleet.wait_for(lambda: len(mig_replicas(fleet)) == 2, what="two ready mig replicas")
    return mig_replicas(fleet)


@pytest.fixture(scope="module")
def reference(client):
    """Greedy output without migration (the same on either replica: same model, same weights)."""
    result = client.chat.completions.create(model="mig", messages=PROMPT, max_tokens=240, **GREEDY)
    return result.choices[0].message.content


async def stream_with_migrations(fleet, async_client, hops: int, mode: str, max_tokens: int = 240, **request):
    """Stream a greedy request (with `request`'s extra fields) and migrate it `hops` times mid-stream; returns
    text, usage, records."""
    stream = await async_client.chat.completions.create(model="mig", messages=PROMPT, max_tokens=max_tokens,
                                                        stream=True, stream_options={"include_usage": True},
                                                        **GREEDY, **request)
    text, records, usage, chunks, request_id = [], [], None, 0, None
    async for chunk in stream:
        request_id = request_id or chunk.id
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        chunks += 1
        if chunk.usage:
            usage = chunk.usage
        # Early in the stream: under load the ingress merges deltas, so a 240-token stream can arrive in far fewer
        # chunks than tokens, and an engine that runs ahead of a slow client can finish before a late hop starts.
        if len(records) < hops and chunks == 5 + 15 * len(records):
            # The first location comes from the controller; after that the request is where we moved it.
            src = records[-1]["dst"] if records else await asyncio.to_thread(where, fleet, request_id)
            dst = next(r for r in mig_replicas(fleet) if r != src)
            records.append(await fleet.controller.migrate.remote(request_id, src, dst, mode))
    return "".join(text), usage, records


@pytest.mark.parametrize("mode", ["precopy", "stop_and_copy"])
@pytest.mark.parametrize("hops", [1, 3])
async def test_migrated_stream_is_token_identical(fleet, async_client, reference, mode, hops, mig_pool):
    before = {r: free_blocks(r) for r in mig_replicas(fleet)}
    text, usage, records = await stream_with_migrations(fleet, async_client, hops, mode)
    assert [r["outcome"] for r in records] == ["migrated"] * hops, records
    assert text == reference
    assert usage.completion_tokens == 240
    for record in records:
        assert record["mode"] == mode
        assert record["recomputed_tokens"] <= 32, "the destination recomputed more than one block"
        assert record["blocks_moved"] > 0 and record["bytes_moved"] > 0
        assert record["downtime_s"] > 0
        if mode == "precopy":
            assert record["stages"] >= 2
    await settle(lambda: {r: free_blocks(r) for r in mig_replicas(fleet)} == before)
    assert {r: free_blocks(r) for r in mig_replicas(fleet)} == before, "KV blocks leaked"


async def test_destination_computes_exactly_one_token(fleet, async_client, mig_pool):
    _, _, records = await stream_with_migrations(fleet, async_client, 1, "stop_and_copy")
    assert [(r["outcome"], r["recomputed_tokens"]) for r in records] == [("migrated", 1)], records


async def test_migration_onto_a_full_replica_is_refused_and_completes_on_source(fleet, client, async_client, mig_pool):
    from vllm import SamplingParams

    from rayfleet.actors.replica.protocol import GenerateCall

    long_prompt = [11 + (i * 7) % 480 for i in range(850)]  # 27 blocks of KV to move
    expected = client.completions.create(model="mig", prompt=long_prompt, max_tokens=170, **GREEDY).choices[0].text
    _, dst = mig_replicas(fleet)
    # Two long requests straight on dst (bypassing the router) keep at least 28 of its 40 blocks busy.
    fillers = [replica_handle(dst).generate.options(num_returns="streaming").remote(GenerateCall(
        request_id=f"filler-{i}", prompt_token_ids=[12 + (i + j) % 400 for j in range(420)],
        sampling_params=SamplingParams(max_tokens=560, ignore_eos=True))) for i in range(2)]
    for filler in fillers:
        await (await filler.__anext__())
    # Until the controller sees dst's load, the router could send the next request there. (The ingress' last
    # view came with the reference request, seconds ago: older than `view_stale_s`, so it fetches a fresh one.)
    await asyncio.to_thread(fleet.wait_for, lambda: {"filler-0", "filler-1"} <= {
        rid for r in fleet.replicas("mig") if r["replica_id"] == dst for rid in r["requests"]},
        what="the fillers in the controller's view of dst")

    stream = await async_client.completions.create(model="mig", prompt=long_prompt, max_tokens=170, stream=True,
                                                   **GREEDY)
    text, record = [], None
    async for chunk in stream:
        text.append(chunk.choices[0].text if chunk.choices else "")
        if record is None and len(text) == 5:
            here = await asyncio.to_thread(where, fleet, chunk.id)
            assert here != dst, "the router placed the request on the filled replica"
            record = await fleet.controller.migrate.remote(chunk.id, here, dst, "precopy")
    for i in range(2):
        await replica_handle(dst).abort.remote(f"filler-{i}")
    assert record["outcome"] == "refused", record
    assert "free KV blocks" in record["reason"]
    assert "".join(text) == expected


async def test_destination_killed_mid_migration_leaves_request_on_source(fleet, async_client, reference, mig_pool):
    src, dst = mig_replicas(fleet)
    stream = await async_client.chat.completions.create(model="mig", messages=PROMPT, max_tokens=240, stream=True,
                                                        **GREEDY)
    text, record = [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if record is None and len(text) == 5:
            here = await asyncio.to_thread(where, fleet, chunk.id)
            other = next(r for r in mig_replicas(fleet) if r != here)
            victim = replica_handle(other)
            destination = Destination(other, victim, ray.get(victim.engine_facts.remote())["node_id"])
            os.kill(ray.get(victim.pid.remote()), signal.SIGKILL)
            # Straight to the source replica: the controller would already refuse a dead destination.
            record = await replica_handle(here).migrate_out.remote(chunk.id, destination, "mig-kill", "precopy")
    assert record["outcome"] == "aborted", record
    assert "".join(text) == reference
    fleet.wait_for(lambda: len(mig_replicas(fleet)) == 2, what="the killed replica to be replaced")


async def test_migrating_a_finished_request_changes_nothing(fleet, client, mig_pool):
    result = client.chat.completions.create(model="mig", messages=PROMPT, max_tokens=8, **GREEDY)
    src, dst = mig_replicas(fleet)
    before = {r: free_blocks(r) for r in (src, dst)}
    record = await fleet.controller.migrate.remote(result.id, src, dst, "precopy")
    assert record["outcome"] == "failed" and "no request" in record["reason"]
    assert {r: free_blocks(r) for r in (src, dst)} == before


def test_migrate_through_the_admin_api_validates_input(fleet):
    import httpx

    from conftest import ADMIN_KEY

    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    bad = httpx.post(f"{fleet.base_url}/fleet/migrate", json={"request_id": "x", "src": 3, "dst": "y"},
                     headers=headers, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "src"
    unknown = httpx.post(f"{fleet.base_url}/fleet/migrate", json={"request_id": "x", "src": "nope", "dst": "y"},
                         headers=headers, timeout=30)
    assert unknown.status_code == 400 and "unknown replica" in unknown.json()["error"]["message"]
    assert httpx.post(f"{fleet.base_url}/fleet/migrate", json={}, timeout=30).status_code == 401


async def test_draining_a_replica_migrates_its_requests_out_and_they_complete(fleet, async_client, mig_pool):
    async def one(i):
        return await async_client.chat.completions.create(
            model="mig", messages=[{"role": "user", "content": f"drain {i}"}], max_tokens=500, **GREEDY)

    tasks = [asyncio.create_task(one(i)) for i in range(2)]  # 17 KV blocks each; one replica holds both
    await asyncio.to_thread(fleet.wait_for, lambda: sum(len(r["requests"]) for r in fleet.replicas("mig")) == 2,
                            10, "both requests to be running")
    victim = max(fleet.replicas("mig"), key=lambda r: len(r["requests"]))
    assert victim["requests"], "no request landed on the replica to drain"
    moved = set(victim["requests"])
    await fleet.controller.drain.remote(victim["replica_id"])
    results = await asyncio.gather(*tasks)
    assert all(r.usage.completion_tokens == 500 for r in results)
    history = {m["request_id"]: m for m in fleet.status()["migrations"] if m["src"] == victim["replica_id"]}
    assert moved <= set(history), f"not every request was migrated out: {moved - set(history)}"
    assert all(history[rid]["outcome"] == "migrated" for rid in moved)


# ------------------------------------------------------------------ failures after the source stopped
@ray.remote(num_cpus=0)
class FailingDestination:
    """A stand-in destination: it accepts a migration, then fails at the one step no real replica can be made
    to fail at on cue, right after the source stopped the request: refusing the final KV chunk as a replica
    of another KV layout does ("stage"), or its process dying when asked to resume ("resume")."""

    def __init__(self, fail_at: str):
        self.fail_at = fail_at

    def can_accept(self, kv_blocks, layout=None):
        return True, ""

    def stage_kv(self, migration_id, chunk):
        from rayfleet.actors.kv.transfer import KVLayoutMismatchError

        if self.fail_at == "stage":
            raise KVLayoutMismatchError("chunk layout LBHNC/float32 != engine layout LBNHC/bfloat16")

    def drop_migration(self, migration_id):
        return False

    def resume_migrated(self, *args):
        os._exit(1)


LONG = 800  # tokens: long enough to still run on the engine when a test acts on it (the engine runs far ahead
# of the client's reads)


@pytest.fixture(scope="module")
def long_reference(client) -> tuple[dict, str]:
    """A long greedy request and its undisturbed output."""
    request = dict(model="mig", messages=PROMPT, max_tokens=LONG, **GREEDY)
    return request, client.chat.completions.create(**request).choices[0].message.content


@pytest.mark.parametrize("fail_at", ["stage", "resume"])
async def test_destination_failing_after_the_stop_resumes_on_the_source_token_exact(
        fleet, async_client, long_reference, mig_pool, fail_at):
    request, expected = long_reference
    destination = FailingDestination.remote(fail_at)
    stream = await async_client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                        **request)
    text, record, usage, request_id = [], None, None, None
    async with asyncio.timeout(120):  # before the fix, nothing ended this stream
        async for chunk in stream:
            request_id = chunk.id
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
            if record is None and len(text) == 5:
                here = await asyncio.to_thread(where, fleet, chunk.id)
                record = await replica_handle(here).migrate_out.remote(
                    chunk.id, Destination("stand-in", destination, ""), f"mig-fail-{fail_at}", "stop_and_copy")
    assert (record["outcome"], record["reason"][:19]) == ("aborted", "destination failed:"), str(record)
    assert "".join(text) == expected, "a token was lost or repeated when the request resumed on the source"
    assert usage.completion_tokens == LONG
    # Two controller ticks after the stream ended: the replicas' loads it shows were read after the end.
    ticks = fleet.status()["controller"]["ticks"]
    await asyncio.to_thread(fleet.wait_for, lambda: fleet.status()["controller"]["ticks"] >= ticks + 2,
                            what="two controller ticks")
    assert request_id not in {rid for r in fleet.replicas("mig") for rid in r["requests"]}, "phantom request"


async def test_request_finishing_on_the_destination_before_the_ingress_attaches_completes(
        fleet, async_client, long_reference, mig_pool):
    request, expected = long_reference
    stream = await async_client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                        **request)

    async def migrate_near_the_end(request_id: str) -> dict | None:
        """Migrate once the engine (not the client, which lags) has 10 tokens left to generate."""
        src = await asyncio.to_thread(where, fleet, request_id)
        dst = next(r for r in mig_replicas(fleet) if r != src)
        while True:
            load = await replica_handle(src).load.remote()
            progress = next((p for p in load.requests if p.request_id == request_id), None)
            if progress is None:
                return None  # finished before we got there: the test proved nothing
            if progress.output_tokens >= LONG - 10:
                return await fleet.controller.migrate.remote(request_id, src, dst, "stop_and_copy")
            await asyncio.sleep(0.005)

    text, usage, migration = [], None, None
    async for chunk in stream:
        migration = migration or asyncio.create_task(migrate_near_the_end(chunk.id))
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    record = await migration
    assert record is not None and record["outcome"] in ("migrated", "finished_on_source"), record
    assert "".join(text) == expected
    assert usage.completion_tokens == LONG


def test_migration_to_a_replica_of_another_pool_is_refused(fleet, mig_pool):
    other = fleet.replicas("tiny-b")[0]["replica_id"]
    with pytest.raises(ray.exceptions.RayTaskError, match="a request moves only within its pool"):
        ray.get(fleet.controller.migrate.remote("any-request", mig_pool[0], other, "precopy"))


async def test_pinned_request_is_refused_and_finishes_where_it_runs(fleet, async_client, mig_pool):
    stream = await async_client.chat.completions.create(model="mig", messages=PROMPT, max_tokens=120, stream=True,
                                                        temperature=0.8, seed=7, extra_body={"ignore_eos": True},
                                                        stream_options={"include_usage": True})
    record, usage, pieces = None, None, 0
    async for chunk in stream:
        pieces += 1
        usage = chunk.usage or usage
        if record is None and pieces == 10:
            src = await asyncio.to_thread(where, fleet, chunk.id)
            dst = next(r for r in mig_replicas(fleet) if r != src)
            record = await fleet.controller.migrate.remote(chunk.id, src, dst, "precopy")
    assert record["outcome"] == "refused" and "seeded sampling" in record["reason"], record
    assert usage.completion_tokens == 120


# A JSON object whose one string field cannot close within the test's 150 tokens: the grammar constrains every
# token, and a grammar restarted at the destination would demand '{' again.
STORY = {"type": "json_schema", "json_schema": {"name": "story", "schema": {
    "type": "object", "properties": {"story": {"type": "string", "minLength": 600}}, "required": ["story"]}}}


async def test_structured_output_request_migrates_with_its_grammar_state(fleet, client, async_client, mig_pool):
    expected = client.chat.completions.create(model="mig", messages=PROMPT, max_tokens=150, response_format=STORY,
                                              **GREEDY).choices[0].message.content
    assert expected.startswith('{"story"'), expected[:40]
    text, _, records = await stream_with_migrations(fleet, async_client, 1, "stop_and_copy", max_tokens=150,
                                                    response_format=STORY)
    assert [r["outcome"] for r in records] == ["migrated"], records
    assert text == expected
