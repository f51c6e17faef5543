"""The gRPC endpoint: vLLM's own VllmEngine service (smg-grpc-proto), called with its generated stub."""

from __future__ import annotations

import grpc
import pytest
from smg_grpc_proto.generated import vllm_engine_pb2 as pb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc

from conftest import API_KEY

pytestmark = pytest.mark.engines
PROMPT = [11 + (i * 5) % 300 for i in range(40)]


@pytest.fixture(scope="module")
def stub(fleet):
    channel = grpc.insecure_channel(fleet.grpc_target)
    yield vllm_engine_pb2_grpc.VllmEngineStub(channel)
    channel.close()


def metadata(pool: str | None = "tiny-a", key: str | None = API_KEY):
    pairs = [("rayfleet-pool", pool)] if pool else []
    return pairs + ([("authorization", f"Bearer {key}")] if key else [])


def generate(stub, stream: bool, max_tokens: int = 16, prompt=PROMPT, **md):
    request = pb.GenerateRequest(request_id=f"grpc-{stream}-{max_tokens}-{len(prompt)}",
                                 tokenized=pb.TokenizedInput(input_ids=prompt), stream=stream,
                                 sampling_params=pb.SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                   ignore_eos=True))
    return list(stub.Generate(request, metadata=metadata(**md), timeout=120))


def test_grpc_tokens_equal_the_http_completion_of_the_same_prompt(stub, client, demo_models):
    from transformers import AutoTokenizer

    http = client.completions.create(model="tiny-a", prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True, "skip_special_tokens": False})
    [response] = generate(stub, stream=False)
    assert response.WhichOneof("response") == "complete"
    assert response.complete.finish_reason == "length"
    assert response.complete.prompt_tokens == len(PROMPT)
    assert len(response.complete.output_ids) == 16
    tokenizer = AutoTokenizer.from_pretrained(demo_models / "tiny-llama-a")
    assert tokenizer.decode(list(response.complete.output_ids)) == http.choices[0].text


def test_grpc_stream_is_chunks_then_complete_with_the_same_tokens(stub):
    [full] = generate(stub, stream=False)
    responses = generate(stub, stream=True)
    kinds = [r.WhichOneof("response") for r in responses]
    assert kinds[-1] == "complete" and set(kinds[:-1]) == {"chunk"} and len(kinds) > 2
    streamed = [t for r in responses[:-1] for t in r.chunk.token_ids] + list(responses[-1].complete.output_ids)
    assert streamed == list(full.complete.output_ids)


@pytest.mark.parametrize("md, code", [
    ({"pool": None}, grpc.StatusCode.INVALID_ARGUMENT),        # several pools: the pool must be named
    ({"pool": "nope"}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"key": "wrong"}, grpc.StatusCode.UNAUTHENTICATED),
    ({"pool": "cold"}, grpc.StatusCode.UNAVAILABLE),            # no ready replica
])
def test_grpc_errors_carry_status_codes(stub, md, code):
    with pytest.raises(grpc.RpcError) as error:
        generate(stub, stream=False, **md)
    assert error.value.code() == code
    assert error.value.details()


def test_grpc_rejects_prompts_beyond_the_context(stub):
    with pytest.raises(grpc.RpcError) as error:
        generate(stub, stream=False, max_tokens=100, prompt=PROMPT * 25)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context length" in error.value.details()


def test_grpc_health_and_model_info(stub):
    assert stub.HealthCheck(pb.HealthCheckRequest(), timeout=30).healthy
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata(), timeout=30)
    assert info.served_model_name == "tiny-a" and info.max_context_length == 1024 and info.vocab_size == 512


def test_a_grpc_client_cancelling_its_stream_aborts_the_request_in_the_engine(fleet):
    """A cancelled call must abort its request: otherwise the engine decodes all 900 tokens for nobody.

    The client reads three chunks and stops reading, with a receive window of 1 KiB: Serve's proxy is then held
    in its write of the next chunks when the cancellation comes, where Serve's own handler lets it pass without
    cancelling the ingress' stream (grpc_registration.relay_until_the_call_ends). Then the same channel is served.
    """
    import time

    import ray
    from test_live_migration import replica_handle

    request = pb.GenerateRequest(request_id="grpc-cancelled", tokenized=pb.TokenizedInput(input_ids=PROMPT),
                                 stream=True, sampling_params=pb.SamplingParams(temperature=0, max_tokens=900,
                                                                                ignore_eos=True))
    channel = grpc.insecure_channel(fleet.grpc_target, options=[("grpc.http2.lookahead_bytes", 1024),
                                                                ("grpc.http2.bdp_probe", 0)])
    call = vllm_engine_pb2_grpc.VllmEngineStub(channel).Generate(request, metadata=metadata(), timeout=120)
    responses = iter(call)
    for _ in range(3):
        assert next(responses).WhichOneof("response") == "chunk"
    replicas = [replica_handle(r["replica_id"]) for r in fleet.replicas("tiny-a")]

    def output_tokens() -> int | None:  # of the request while a replica runs it (its id is scoped by tenant)
        return next((p.output_tokens for replica in replicas for p in ray.get(replica.load.remote()).requests
                     if p.request_id.endswith("/grpc-cancelled")), None)

    deadline = time.monotonic() + 30
    while (tokens := output_tokens()) is not None and tokens < 200 and time.monotonic() < deadline:
        time.sleep(0.05)  # until the chunks the client does not read fill its window
    assert tokens is not None, "the request is not running"
    call.cancel()
    last_seen, deadline = tokens, time.monotonic() + 60
    while (tokens := output_tokens()) is not None and time.monotonic() < deadline:
        last_seen = tokens
        time.sleep(0.05)
    assert tokens is None, "the request is still running a minute after its client cancelled"
    assert last_seen < 700, f"the request ran on to {last_seen} of its 900 tokens: it was not aborted"
    # The proxy survived the cancellation it relayed (it once crashed reading the peer of the ended call).
    [response] = generate(vllm_engine_pb2_grpc.VllmEngineStub(channel), stream=False)
    assert response.WhichOneof("response") == "complete"
    channel.close()
