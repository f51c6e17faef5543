"""The ingress' boundary on a real fleet: admin routes, tenants, request ids, priority, request limits."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from smg_grpc_proto.generated import vllm_engine_pb2 as pb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc

from conftest import ADMIN_KEY, API_KEY, OTHER_TENANT_KEY

pytestmark = pytest.mark.engines
MESSAGES = [{"role": "user", "content": "hello"}]


def post(fleet, path: str, body, key: str | None, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(fleet.base_url + path, json=body, headers=headers, timeout=60, **kwargs)


def get(fleet, path: str, key: str) -> httpx.Response:
    return httpx.get(fleet.base_url + path, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.mark.parametrize("path, body", [
    ("/fleet/scale", {"pool": "tiny-a", "replicas": 3}),
    ("/fleet/drain", {"replica_id": "whatever"}),
    ("/fleet/migrate", {"request_id": "x", "src": "a", "dst": "b"}),
])
def test_user_keys_get_403_on_fleet_controls(fleet, path, body):
    response = post(fleet, path, body, API_KEY)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["type"] == "permission_error"
    assert post(fleet, path, body, None).status_code == 401


def test_admin_key_controls_the_fleet(fleet):
    desired = fleet.status()["pools"]["tiny-a"]["desired"]
    response = post(fleet, "/fleet/scale", {"pool": "tiny-a", "replicas": desired}, ADMIN_KEY)
    assert response.status_code == 200 and response.json() == {"pool": "tiny-a", "desired": desired}
    assert "replicas" in get(fleet, "/fleet/status", ADMIN_KEY).json()


async def test_users_see_only_their_own_requests_in_status(fleet):
    async with httpx.AsyncClient(timeout=120) as http:
        async with http.stream("POST", fleet.base_url + "/chat/completions",
                               headers={"Authorization": f"Bearer {API_KEY}"},
                               json={"model": "tiny-a", "messages": MESSAGES, "max_tokens": 400, "stream": True,
                                     "ignore_eos": True}) as stream:
            async for line in stream.aiter_lines():
                if line.startswith("data: {"):
                    request_id = line.split('"id":"')[1].split('"')[0]
                    break
            mine = get(fleet, "/fleet/status", API_KEY).json()
            theirs = get(fleet, "/fleet/status", OTHER_TENANT_KEY).json()
    assert request_id in {r["request_id"] for r in mine["requests"]}
    assert "replicas" not in mine and "replicas" not in theirs, "users see no fleet-wide replica list"
    assert request_id not in str(theirs)


def test_priority_needs_a_key_that_may_set_it(fleet):
    body = {"model": "tiny-a", "messages": MESSAGES, "max_tokens": 2, "priority": -10}
    assert post(fleet, "/chat/completions", body, API_KEY).status_code == 403
    assert post(fleet, "/chat/completions", body, ADMIN_KEY).status_code == 200


@pytest.mark.parametrize("body, status", [
    ({"model": "tiny-a", "messages": MESSAGES, "n": 64}, 400),
    ({"model": "tiny-a", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}, 413),
    ({"model": "tiny-a", "prompt": ["a"] * 100}, 400),
])
def test_requests_beyond_the_limits_are_refused_before_they_start(fleet, body, status):
    path = "/completions" if "prompt" in body else "/chat/completions"
    response = post(fleet, path, {**body, "stream": True}, API_KEY)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]


def grpc_request(request_id: str, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id, tokenized=pb.TokenizedInput(input_ids=[11, 12, 13, 14]),
                              stream=True, sampling_params=pb.SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                             ignore_eos=True))


def metadata(key: str):
    return [("rayfleet-pool", "tiny-a"), ("authorization", f"Bearer {key}")]


async def test_grpc_request_ids_are_per_tenant_and_abort_reaches_only_its_own(fleet):
    """Both tenants choose the same request id; one tenant's Abort of that id must not touch the other's."""
    async with grpc.aio.insecure_channel(fleet.grpc_target) as channel:
        stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
        started = {API_KEY: asyncio.Event(), OTHER_TENANT_KEY: asyncio.Event()}

        async def run(key: str) -> tuple[int, str]:
            tokens, finish = 0, ""
            async for response in stub.Generate(grpc_request("shared-id", 600), metadata=metadata(key), timeout=120):
                if response.WhichOneof("response") == "chunk":
                    tokens += len(response.chunk.token_ids)
                    started[key].set()
                else:
                    tokens += len(response.complete.output_ids)
                    finish = response.complete.finish_reason
            return tokens, finish

        mine = asyncio.create_task(run(API_KEY))
        theirs = asyncio.create_task(run(OTHER_TENANT_KEY))
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started.values())), 60)
        await stub.Abort(pb.AbortRequest(request_ids=["shared-id"]), metadata=metadata(OTHER_TENANT_KEY), timeout=30)
        assert await mine == (600, "length"), "another tenant's Abort reached this request"
        tokens, finish = await theirs
        assert tokens < 600 and finish == "abort", "the aborting tenant's own request went on"
