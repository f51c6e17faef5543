"""The routing routes end to end: a second ingress with the chimera router on the session fleet's replicas.

`POST /v1/feedback` teaches the router (its next prediction for a similar prompt moves), a malformed call is a
400 that changes nothing, and `GET /v1/fleet/routing` explains each `auto` decision with every candidate's
predicted quality, length and latency; the answering pool and the reason ride in the `x-rayfleet-route` header.
Last, a promotion (an RL job's `promote_to`) loads a new weight version into a pool while a stream runs on it,
and the router relearns that pool from the verifier scores that came with the version.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
import ray

from conftest import ADMIN_KEY, API_KEY

EASY = "State the final answer to the following arithmetic problem: 3 + 4 ="
HARD = "State the final answer to the following arithmetic problem: 38 + 95 - 17 ="


@pytest.fixture(scope="module")
def chimera_url(fleet, tmp_path_factory):
    """The fleet's spec with the chimera router and a small labelled table, served under /chimera."""
    from ray import serve

    from rayfleet.control_plane.serve_app import build_app

    table = tmp_path_factory.mktemp("chimera") / "table.jsonl"
    rows = [{"prompt": prompt, "pool": pool, "score": score, "output_tokens": 8, "latency_s": latency}
            for prompt, scores in ((EASY, (1.0, 1.0)), (HARD, (0.0, 1.0)))
            for pool, score, latency in zip(("tiny-a", "tiny-b"), scores, (0.05, 0.08))]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = fleet.spec.model_dump()
    # These tests compare predictions made with the prompt's embedding: on a loaded machine the default 0.1 s
    # wait can pass before the embedding is back, and that request is routed on the pools' priors instead.
    spec["policies"]["router"] = {"name": "chimera", "params": {"table": str(table), "latency_weight": 0.1,
                                                                "embedding_wait_s": 30.0}}
    serve.run(build_app({"spec": spec}), name="rayfleet-chimera", route_prefix="/chimera", blocking=False)
    base = fleet.base_url.removesuffix("/v1") + "/chimera/v1"
    with httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as client:
        fleet.wait_for(lambda: _ok(client, base), timeout_s=120, what="the chimera ingress")
        yield base, client
    serve.delete("rayfleet-chimera")


def _ok(client: httpx.Client, base: str) -> bool:
    try:
        return client.get(f"{base}/models").status_code == 200
    except httpx.HTTPError:
        return False


def ask(client: httpx.Client, base: str, prompt: str, **headers) -> httpx.Response:
    response = client.post(f"{base}/chat/completions", headers=headers, json={
        "model": "auto", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response


def decision(client: httpx.Client, base: str, request_id: str) -> dict:
    decisions = client.get(f"{base}/fleet/routing", params={"limit": 50},  # every tenant's: admin only
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["decisions"]
    return next(d for d in decisions if d["request_id"] == request_id)


def quality(found: dict, pool: str) -> float:
    return next(c["quality"] for c in found["candidates"] if c["pool"] == pool)


def test_auto_decision_is_explained_with_each_candidates_predictions(chimera_url):
    base, client = chimera_url
    response = ask(client, base, HARD)
    body = response.json()
    found = decision(client, base, body["id"])
    assert found["pool"] == body["model"] == "tiny-b"  # the only model that solves the hard prompt
    assert response.headers["x-rayfleet-route"].startswith("tiny-b; chimera: ")
    assert found["embedded"] is True
    assert {c["pool"] for c in found["candidates"]} >= {"tiny-a", "tiny-b"}
    for candidate in found["candidates"]:
        assert {"quality", "output_tokens", "latency_s", "backlog_tokens", "objective"} <= set(candidate)
    status = client.get(f"{base}/fleet/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert any(d["request_id"] == body["id"] for d in status["routing"]["decisions"])


def test_feedback_moves_the_next_prediction_for_a_similar_prompt(chimera_url):
    base, client = chimera_url
    first = ask(client, base, HARD).json()
    before = quality(decision(client, base, first["id"]), first["model"])
    for _ in range(3):
        response = client.post(f"{base}/feedback", json={"request_id": first["id"], "score": 0.0})
        assert response.status_code == 200 and response.json()["learned"] is True
    second = ask(client, base, HARD).json()
    assert quality(decision(client, base, second["id"]), first["model"]) < before - 0.1


@pytest.mark.parametrize("body, param", [
    ({"score": 1.0}, "request_id"),
    ({"request_id": 7, "score": 1.0}, "request_id"),
    ({"request_id": "x", "score": 1.5}, "score"),
    ({"request_id": "x", "score": "high"}, "score"),
    ({"request_id": "x", "score": True}, "score"),
])
def test_malformed_feedback_is_a_400_and_changes_nothing(chimera_url, body, param):
    base, client = chimera_url
    first = ask(client, base, EASY).json()
    before = decision(client, base, first["id"])
    bad = dict(body, request_id=first["id"]) if body.get("request_id") == "x" else body
    response = client.post(f"{base}/feedback", json=bad)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    second = ask(client, base, EASY).json()
    after = decision(client, base, second["id"])
    assert before["embedded"] and after["embedded"]
    assert {c["pool"]: c["quality"] for c in after["candidates"]} == \
        {c["pool"]: c["quality"] for c in before["candidates"]}


def test_feedback_that_is_not_json_or_names_an_unknown_request_is_refused(chimera_url):
    base, client = chimera_url
    assert client.post(f"{base}/feedback", content=b"{nope").status_code == 400
    response = client.post(f"{base}/feedback", json={"request_id": "chatcmpl-never", "score": 1.0})
    assert response.status_code == 404 and response.json()["error"]["param"] == "request_id"


def test_a_bad_latency_weight_header_is_a_400_naming_it(chimera_url):
    base, client = chimera_url
    response = client.post(f"{base}/chat/completions", headers={"x-rayfleet-latency-weight": "-1"},
                           json={"model": "auto", "messages": [{"role": "user", "content": EASY}], "max_tokens": 2})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "x-rayfleet-latency-weight"


def embedded(client: httpx.Client, base: str) -> bool:
    """Whether a new `auto` request was routed with its prompt's embedding."""
    return decision(client, base, ask(client, base, EASY).json()["id"])["embedded"]


def embedder_pid() -> int | None:
    from ray.util.state import list_actors

    from rayfleet.actors.embedding.embedder import EMBEDDER_NAME

    alive = list_actors(filters=[("name", "=", EMBEDDER_NAME), ("state", "=", "ALIVE")])
    return alive[0].pid if alive else None


def test_an_embedder_that_dies_is_restarted_or_replaced_and_routing_uses_embeddings_again(fleet, chimera_url):
    """Its process killed, Ray restarts it; killed for good (as when the ingress process that created it dies),
    the ingress starts a new one. Meanwhile requests are routed on the pools' priors, none fails."""
    from rayfleet.actors.embedding.embedder import EMBEDDER_NAME
    from rayfleet.control_plane.controller_api import NAMESPACE

    base, client = chimera_url
    assert embedded(client, base)
    pid = embedder_pid()
    os.kill(pid, signal.SIGKILL)
    fleet.wait_for(lambda: embedded(client, base), timeout_s=120,
                   what="decisions with embeddings again after the embedder's process was killed")
    assert embedder_pid() not in (None, pid), "not the restarted embedder"
    ray.kill(ray.get_actor(EMBEDDER_NAME, namespace=NAMESPACE))  # no restart
    fleet.wait_for(lambda: embedded(client, base), timeout_s=120,
                   what="decisions with embeddings again from a new embedder")


def test_a_promoted_version_loads_under_a_running_stream_and_the_router_relearns_the_pool(fleet, chimera_url):
    """`FleetController.promote` on the "mig" pool (two replicas) while a 900-token stream runs on it: the stream
    finishes whole (its replica's requests move to the other replica by live migration before it reloads), both
    replicas report the new version, and the chimera ingress, which knew nothing of "mig" (prior 0.5 for every
    prompt), relearns it from the version's verifier scores: right on EASY, wrong on HARD. A second promotion,
    numbered 1 again as a new RL run's would be, with the opposite scores: the router follows again. The weights
    are the pool's own model's: the version changes, the tokens of later tests do not."""
    from transformers import AutoModelForCausalLM

    from rayfleet.actors.rl.weight_sync import WeightSync, get_or_create_weight_store, publish
    from rayfleet.control_plane.controller_api import NAMESPACE, replica_actor_name

    base, client = chimera_url
    before = decision(client, base, ask(client, base, HARD).json()["id"])
    assert quality(before, "mig") == pytest.approx(0.5)  # no row of "mig" in the table: its prior
    model = AutoModelForCausalLM.from_pretrained(fleet.spec.pool("mig").model, torch_dtype="float32")
    store = get_or_create_weight_store("rayfleet-promote-test", namespace=NAMESPACE)
    try:
        publish(store, 1, {name: tensor.numpy().copy() for name, tensor in model.state_dict().items()})
        update = WeightSync("rayfleet-promote-test", NAMESPACE, timeout_s=60).update_for(1)
        stream = StreamOnPool(fleet.base_url, "mig", max_tokens=900)
        assert stream.started.wait(60), stream.error
        labels = [{"prompt": EASY, "score": 1.0, "output_tokens": 2}, {"prompt": HARD, "score": 0.0,
                                                                        "output_tokens": 3}]
        result = ray.get(fleet.controller.promote.remote("mig", update, labels), timeout=300)
        stream.thread.join(120)
        assert stream.error is None and stream.finish_reason == "length" and stream.tokens == 900
        assert result["version"] == 1 and len(result["replicas"]) == 2 and result["quality_labels"] == 2
        assert sum(r["migrated"] for r in result["replicas"]) >= 1  # the stream moved off its replica first
        for replica in fleet.replicas("mig"):
            handle = ray.get_actor(replica_actor_name(replica["replica_id"]), namespace=NAMESPACE)
            assert ray.get(handle.weight_version.remote()) == "1"
        wait_for_quality_gap(client, base, "mig", 0.3)
        flipped = [dict(label, score=1.0 - label["score"]) for label in labels]
        ray.get(fleet.controller.promote.remote("mig", update, flipped), timeout=300)
        wait_for_quality_gap(client, base, "mig", -0.3)
    finally:
        ray.kill(store)


def wait_for_quality_gap(client: httpx.Client, base: str, pool: str, gap: float) -> None:
    """Until the router's predicted quality of `pool` on EASY minus HARD is beyond `gap` (its sign says which)."""
    deadline = time.monotonic() + 60
    while True:
        now = quality(decision(client, base, ask(client, base, EASY).json()["id"]), pool) - \
            quality(decision(client, base, ask(client, base, HARD).json()["id"]), pool)
        if now * gap > 0 and abs(now) >= abs(gap):
            return
        assert time.monotonic() < deadline, f"the router did not relearn '{pool}' (EASY - HARD quality {now:.2f})"


class StreamOnPool:
    """A streamed chat completion on one pool, read in a thread; `started` is set at its first token."""

    def __init__(self, base_url: str, pool: str, max_tokens: int):
        self.started = threading.Event()
        self.tokens, self.finish_reason, self.error = 0, None, None
        self.thread = threading.Thread(target=self._read, args=(base_url, pool, max_tokens), daemon=True)
        self.thread.start()

    def _read(self, base_url: str, pool: str, max_tokens: int) -> None:
        from openai import OpenAI

        try:
            chunks = OpenAI(base_url=base_url, api_key=API_KEY, timeout=300).chat.completions.create(
                model=pool, messages=[{"role": "user", "content": "Count on"}], max_tokens=max_tokens, stream=True,
                extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
            for chunk in chunks:
                if chunk.usage is not None:
                    self.tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    self.started.set()
                    self.finish_reason = choice.finish_reason or self.finish_reason
        except Exception as error:  # reported by the test's assertion
            self.error = f"{type(error).__name__}: {error}"
        finally:
            self.started.set()
