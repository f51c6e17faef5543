"""Bad input never gets past the ingress: a 4xx with an OpenAI error body before any stream starts, never a
5xx or a traceback, over HTTP and gRPC; and the fleet serves normally afterwards.

The 46 fixed cases are benchmarks/bad_inputs.py's (also sent to plain vLLM and Ray Serve LLM there). The
property-based part generates requests from the ingress' own OpenAPI schema (schemathesis) and gRPC
`GenerateRequest`s (hypothesis); its example counts are bounded to fit the suite's time budget, and
benchmarks/bad_inputs.py's corpus plus a longer run of the same properties are the deeper checks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from smg_grpc_proto.generated import vllm_engine_pb2 as pb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc

from conftest import API_KEY

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bad_inputs import CORPUS, send  # noqa: E402

pytestmark = pytest.mark.engines
# Bounded for the suite's time budget (generating from vLLM's request schemas costs ~0.5 s an example).
OPENAPI_EXAMPLES = 8  # per route
GRPC_EXAMPLES = 30


def origin(fleet) -> str:
    return fleet.base_url.removesuffix("/v1")


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_bad_input_is_a_4xx_before_any_stream(fleet, case):
    status, content_type, _ = send(origin(fleet), case, model="tiny-a", api_key=API_KEY)
    assert 400 <= status < 500, f"{case.name}: HTTP {status}"
    assert content_type.startswith("application/json"), f"{case.name}: a stream started ({content_type})"


def test_openapi_fuzz_never_gets_a_5xx(fleet):
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{origin(fleet)}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    fuzzed = [op for op in operations if op.path in ("/v1/chat/completions", "/v1/completions")]
    assert len(fuzzed) == 2, "the ingress' schema lost its request bodies"
    for operation in fuzzed:
        @settings(max_examples=OPENAPI_EXAMPLES, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case):
            if isinstance(case.body, dict):  # short generations; a string model mostly names a real pool
                case.body.update(max_tokens=4, n=1)
                case.body.pop("max_completion_tokens", None)
                if isinstance(case.body.get("model"), str):
                    case.body["model"] = "tiny-a"
            response = case.call(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
            assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
            assert "Traceback" not in response.text

        fuzz()


SAMPLING = st.builds(
    pb.SamplingParams,
    temperature=st.floats(-2, 5, allow_nan=False) | st.just(float("nan")),
    top_p=st.floats(-1, 2), top_k=st.integers(0, 2**32 - 1), min_p=st.floats(-1, 2),
    frequency_penalty=st.floats(-5, 5), presence_penalty=st.floats(-5, 5), repetition_penalty=st.floats(-1, 3),
    max_tokens=st.integers(0, 8), min_tokens=st.integers(0, 16), n=st.integers(0, 40),
    stop_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=3),
    logprobs=st.integers(-3, 40), seed=st.integers(-(2**31), 2**31 - 1),
    logit_bias=st.dictionaries(st.integers(-(2**31), 2**31 - 1), st.floats(-200, 200), max_size=3),
    json_schema=st.sampled_from(["", "{", '{"type": "notatype"}', '{"type": "object"}']),
)


@settings(max_examples=GRPC_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(ids=st.lists(st.integers(0, 2**32 - 1), max_size=6), params=SAMPLING, request_id=st.text(max_size=8))
def test_grpc_fuzz_never_gets_an_internal_error(fleet, ids, params, request_id):
    with grpc.insecure_channel(fleet.grpc_target) as channel:
        stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
        request = pb.GenerateRequest(request_id=request_id, tokenized=pb.TokenizedInput(input_ids=ids),
                                     sampling_params=params, stream=True)
        try:
            list(stub.Generate(request, metadata=[("rayfleet-pool", "tiny-a"), ("authorization", f"Bearer {API_KEY}")],
                               timeout=60))
        except grpc.RpcError as error:
            assert error.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), error.details()
            assert "Traceback" not in (error.details() or "")


def test_fleet_serves_normally_after_the_fuzzing(fleet, client):
    result = client.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=3, extra_body={"ignore_eos": True})
    assert result.usage.completion_tokens == 3
    assert httpx.get(f"{origin(fleet)}/health", timeout=30).status_code == 200
