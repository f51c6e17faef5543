"""The OpenAI endpoint of a real fleet (two pools of real vLLM CPU engines), through the official client."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from conftest import API_KEY

pytestmark = pytest.mark.engines
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
MESSAGES = [{"role": "user", "content": "Explain gradient descent in one sentence."}]


def stream_text_and_ids(client, **kwargs) -> tuple[str, list[str], str | None]:
    text, finish = [], None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices:
            delta = chunk.choices[0].delta.content
            if delta:
                text.append(delta)
            finish = chunk.choices[0].finish_reason or finish
    return "".join(text), text, finish


def test_models_lists_every_pool_and_auto(client):
    ids = {m.id for m in client.models.list().data}
    assert ids == {"tiny-a", "tiny-b", "mig", "cold", "auto"}


def test_streaming_and_non_streaming_greedy_outputs_are_identical(client):
    for model in ("tiny-a", "tiny-b"):
        full = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24, logprobs=True, **GREEDY)
        streamed, pieces, finish = stream_text_and_ids(client, model=model, messages=MESSAGES, max_tokens=24, **GREEDY)
        assert full.choices[0].message.content == streamed
        assert len(pieces) > 1, "the stream must arrive in several chunks"
        assert finish == full.choices[0].finish_reason == "length"
        assert full.usage.completion_tokens == 24
        assert len(full.choices[0].logprobs.content) == 24


def test_completions_endpoint_with_logprobs(client):
    result = client.completions.create(model="tiny-a", prompt="The quick brown fox", max_tokens=10, logprobs=2,
                                       **GREEDY)
    assert result.usage.completion_tokens == 10
    assert result.usage.prompt_tokens > 0
    assert len(result.choices[0].logprobs.tokens) == 10
    assert all(len(top) <= 3 for top in result.choices[0].logprobs.top_logprobs)


def test_n_choices_and_max_tokens_are_honoured(client):
    result = client.chat.completions.create(model="tiny-b", messages=MESSAGES, max_tokens=7, n=3, temperature=1.0,
                                            seed=1, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in result.choices) == [0, 1, 2]
    assert result.usage.completion_tokens == 21


def test_n_choices_stream(client):
    counts = {}
    for chunk in client.chat.completions.create(model="tiny-a", messages=MESSAGES, max_tokens=5, n=2, stream=True,
                                                stream_options={"include_usage": True}, temperature=1.0,
                                                extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            counts[c.index] = counts.get(c.index, 0) + 1
        if chunk.usage:
            usage = chunk.usage
    assert set(counts) == {0, 1}
    assert usage.completion_tokens == 10


def test_stop_string_ends_generation(client):
    reference = client.chat.completions.create(model="tiny-a", messages=MESSAGES, max_tokens=30, **GREEDY)
    text = reference.choices[0].message.content
    stop = text[10:14]
    assert stop.strip(), "reference output too short to pick a stop string"
    stopped = client.chat.completions.create(model="tiny-a", messages=MESSAGES, max_tokens=30, stop=[stop], **GREEDY)
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].message.content
    assert text.startswith(stopped.choices[0].message.content)


def test_auto_model_is_routed_to_a_pool(client):
    result = client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=4, **GREEDY)
    assert result.model in {"tiny-a", "tiny-b", "mig"}
    assert result.usage.completion_tokens == 4


async def test_32_concurrent_requests_across_two_pools_complete(async_client):
    async def one(i: int):
        model = ("tiny-a", "tiny-b")[i % 2]
        lengths = 8 + (i % 5) * 8
        result = await async_client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"request {i}"}], max_tokens=lengths,
            extra_body={"ignore_eos": True})
        return model, lengths, result

    results = await asyncio.gather(*(one(i) for i in range(32)))
    for model, length, result in results:
        assert result.model == model
        assert result.usage.completion_tokens == length
        assert result.choices[0].finish_reason == "length"


# ------------------------------------------------------------------ bad input
def raw(fleet, path: str, body, key: str | None = API_KEY, method: str = "POST") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.request(method, fleet.base_url + path, content=content, timeout=60,
                         headers={**headers, "Content-Type": "application/json"})


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert "Traceback" not in response.text
    return error


@pytest.mark.parametrize("body, fragment", [
    ({"model": "no-such-pool", "messages": MESSAGES}, "does not exist"),
    ({"model": "tiny-a", "messages": [{"role": "user", "content": "word " * 3000}]}, "maximum context length"),
    ({"model": "tiny-a", "messages": MESSAGES, "temperature": -1}, "temperature"),
    ({"model": "tiny-a", "messages": MESSAGES, "max_tokens": -5}, "max_tokens"),
    ({"model": "tiny-a", "messages": "not a list"}, "messages"),
    ("{not json", "not valid JSON"),
])
def test_invalid_requests_get_400_with_openai_body(fleet, body, fragment):
    error = assert_openai_error(raw(fleet, "/chat/completions", body), 400)
    assert fragment.lower() in error["message"].lower()


def test_official_client_sees_bad_request_error(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-a", messages=MESSAGES, top_p=7)


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_bad_api_key_gets_401(fleet, key):
    assert_openai_error(raw(fleet, "/chat/completions", {"model": "tiny-a", "messages": MESSAGES}, key=key), 401)


def test_pool_without_replicas_gets_503_with_retry_after(fleet):
    response = raw(fleet, "/chat/completions", {"model": "cold", "messages": MESSAGES, "max_tokens": 4})
    assert_openai_error(response, 503)
    assert int(response.headers["retry-after"]) >= 1


async def test_overload_gets_429_with_retry_after_and_loses_nothing(fleet, async_client):
    """More concurrent requests than the admission bound (48 per replica): the excess gets 429, the rest finish."""
    async def one(i):
        try:
            r = await async_client.chat.completions.with_raw_response.create(
                model="tiny-b", messages=[{"role": "user", "content": f"burst {i}"}], max_tokens=64,
                extra_body={"ignore_eos": True})
            return r.parse().usage.completion_tokens
        except openai.RateLimitError as error:
            assert int(error.response.headers["retry-after"]) >= 1
            return "429"

    outcomes = await asyncio.gather(*(one(i) for i in range(80)))
    rejected = outcomes.count("429")
    assert rejected > 0, "the burst never hit the admission bound"
    assert all(o == 64 for o in outcomes if o != "429"), "an admitted request lost tokens"
    assert len(outcomes) - rejected >= 48


def test_fleet_keeps_serving_after_bad_requests(fleet, client):
    for body in ({"model": "nope"}, "garbage", {"model": "tiny-a", "messages": MESSAGES, "n": 0}):
        assert raw(fleet, "/chat/completions", body).status_code == 400
    result = client.chat.completions.create(model="tiny-a", messages=MESSAGES, max_tokens=3, **GREEDY)
    assert result.usage.completion_tokens == 3


def test_stop_string_is_cut_from_the_stream_too(client):
    reference = client.chat.completions.create(model="tiny-a", messages=MESSAGES, max_tokens=30, **GREEDY)
    text = reference.choices[0].message.content
    stop = text[10:14]
    streamed, _, finish = stream_text_and_ids(client, model="tiny-a", messages=MESSAGES, max_tokens=30,
                                              stop=[stop], **GREEDY)
    assert finish == "stop"
    assert stop not in streamed and text.startswith(streamed)
