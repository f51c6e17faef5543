"""Who may call the ingress and how much one request may ask for: key checks, tenants and roles, request
limits, credentials kept out of what is stored and shown. Pure code; no Ray, no engine."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rayfleet.actors.replica.continuity import why_pinned
from rayfleet.control_plane.serving.auth import AuthConfigError, KeyRing, require_admin
from rayfleet.control_plane.serving.errors import OpenAIHTTPError
from rayfleet.control_plane.serving.request_limits import check_request, json_depth, parse_json_object
from rayfleet.control_plane.spec import IngressSpec, RequestLimitsSpec, key_digest, parse_spec, redact_url

USER_KEY = "user-key-0123456789"
ADMIN_KEY = "admin-key-0123456789"


def ring(**ingress) -> KeyRing:
    return KeyRing.from_spec(IngressSpec(**ingress), environ={"ADMIN_KEYS": ADMIN_KEY})


def status_of(call) -> int:
    with pytest.raises(OpenAIHTTPError) as error:
        call()
    return error.value.status


def test_keys_map_to_their_tenant_and_role():
    keys = ring(api_keys=[{"name": "team-a", "key": USER_KEY, "allow_priority": True}], admin_keys_env="ADMIN_KEYS")
    user = keys.authenticate(f"Bearer {USER_KEY}", "")
    admin = keys.authenticate(f"Bearer {ADMIN_KEY}", "")
    assert (user.name, user.admin, user.may_set_priority) == ("team-a", False, True)
    assert admin.admin and admin.may_set_priority


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer wrong-key-0123456789", f"Basic {USER_KEY}",
                                    f"Bearer {USER_KEY}x"])
def test_anything_but_a_known_bearer_key_is_401(header):
    assert status_of(lambda: ring(api_keys=[USER_KEY]).authenticate(header, "")) == 401


def test_user_key_gets_403_on_admin_routes():
    user = ring(api_keys=[USER_KEY]).authenticate(f"Bearer {USER_KEY}", "")
    assert status_of(lambda: require_admin(user)) == 403


def test_the_ring_keeps_only_digests():
    keys = ring(api_keys=[USER_KEY, {"name": "t", "key": "another-key-0123456789"}])
    assert USER_KEY not in repr(keys.__dict__) and "another-key" not in repr(keys.__dict__)
    assert ring(api_keys=[{"name": "t", "sha256": key_digest(USER_KEY)}]).authenticate(f"Bearer {USER_KEY}", "")


def test_auth_without_keys_refuses_to_start_naming_the_choice():
    with pytest.raises(AuthConfigError, match="ingress.auth: none"):
        KeyRing.from_spec(IngressSpec(), environ={})


def test_empty_key_variable_refuses_to_start():
    with pytest.raises(AuthConfigError, match="RAYFLEET_API_KEYS"):
        KeyRing.from_spec(IngressSpec(api_keys_env="RAYFLEET_API_KEYS"), environ={"RAYFLEET_API_KEYS": " , "})


def test_auth_none_is_explicit_and_admits_everyone_as_admin(caplog):
    keys = KeyRing.from_spec(IngressSpec(auth="none"))
    assert keys.authenticate("", "").admin
    assert "AUTHENTICATION IS OFF" in caplog.text


def test_client_request_ids_are_scoped_by_tenant():
    keys = ring(api_keys=[{"name": "a", "key": USER_KEY}, {"name": "b", "key": "b-key-0123456789abc"}])
    a = keys.authenticate(f"Bearer {USER_KEY}", "")
    b = keys.authenticate("Bearer b-key-0123456789abc", "")
    assert a.scoped_id("req-1") != b.scoped_id("req-1")


def test_stored_spec_has_no_credentials():
    spec = parse_spec({"pools": [{"name": "p", "model": "m"}], "state_store": "redis://:hunter2@redis:6379/0",
                       "ingress": {"api_keys": [USER_KEY, {"name": "t", "key": ADMIN_KEY, "role": "admin"}]}})
    shown = json.dumps(spec.without_secrets().model_dump(mode="json"))
    assert "hunter2" not in shown and USER_KEY not in shown and ADMIN_KEY not in shown
    assert key_digest(USER_KEY) in shown and "redis://***@redis:6379/0" in shown


@pytest.mark.parametrize("url", ["redis://:pw@h:1/0", "redis://u:pw@h/0", "rediss://pw@h:1/0"])
def test_redacted_urls_hold_no_password(url):
    assert "pw" not in redact_url(url)


LIMITS = RequestLimitsSpec(max_body_bytes=4096, max_json_depth=8, max_tokens=512, max_n=4, max_prompts=3)
USER = ring(api_keys=[USER_KEY]).authenticate(f"Bearer {USER_KEY}", "")


@pytest.mark.parametrize("body, param", [
    ({"model": ["tiny-a"]}, "model"),
    ({"model": {"x": 1}}, "model"),
    ({"model": None}, "model"),
    ({"model": "m", "n": 5}, "n"),
    ({"model": "m", "max_tokens": 513}, "max_tokens"),
    ({"model": "m", "max_completion_tokens": 10_000}, "max_completion_tokens"),
    ({"model": "m", "prompt": ["a", "b", "c", "d"]}, "prompt"),
])
def test_over_limit_fields_are_400_naming_the_field(body, param):
    with pytest.raises(OpenAIHTTPError) as error:
        check_request(body, LIMITS, USER)
    assert (error.value.status, error.value.param) == (400, param)


def test_priority_needs_a_key_that_allows_it():
    with pytest.raises(OpenAIHTTPError) as error:
        check_request({"model": "m", "priority": -5}, LIMITS, USER)
    assert error.value.status == 403
    check_request({"model": "m", "priority": 0}, LIMITS, USER)  # the default is anyone's


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 20 + b"1" + b"}" * 20])
def test_deep_json_is_400_not_a_recursion_error(raw):
    with pytest.raises(OpenAIHTTPError) as error:
        parse_json_object(raw, LIMITS.max_json_depth)
    assert error.value.status == 400


@settings(max_examples=100, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                    max_leaves=30))
def test_any_json_is_parsed_or_refused_with_400(value):
    raw = json.dumps(value).encode()
    try:
        body = parse_json_object(raw, LIMITS.max_json_depth)
    except OpenAIHTTPError as error:
        assert error.status == 400
        return
    assert json_depth(body) <= LIMITS.max_json_depth
    try:
        check_request(body, LIMITS, USER)
    except OpenAIHTTPError as error:
        assert error.status in (400, 403)


def test_requests_whose_state_is_not_in_their_tokens_are_pinned():
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    assert why_pinned(SamplingParams(temperature=0), True) is None
    assert why_pinned(SamplingParams(temperature=0.8), True) is None  # any continuation is an equally valid sample
    assert "seeded" in why_pinned(SamplingParams(temperature=0.8, seed=3), True)
    assert why_pinned(SamplingParams(temperature=0.8, seed=3), True, reseeds=True) is None  # RL rollouts
    assert "n > 1" in why_pinned(SamplingParams(n=2), True)
    assert "penalty" in why_pinned(SamplingParams(frequency_penalty=0.5), True)
    grammar = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a", "b"]))
    assert why_pinned(grammar, grammar_continues=True) is None  # rayfleet's connector advances the grammar
    assert "structured" in why_pinned(grammar, grammar_continues=False)


def test_a_seeded_rollout_replays_from_a_derived_seed_and_a_seeded_client_request_is_refused():
    from vllm import SamplingParams
    from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateTokensStreamChoice

    from rayfleet.actors.replica.protocol import GenerateCall
    from rayfleet.control_plane.serving.ledger import ReplayImpossible, TokenLedger

    def after_three_tokens(**ledger_options) -> TokenLedger:
        call = GenerateCall("r", [1, 2], SamplingParams(temperature=0.8, seed=3, max_tokens=10))
        ledger = TokenLedger(call, **ledger_options)
        ledger.record(GenerateTokensStreamChoice(index=0, token_ids=[7, 8, 9]))
        return ledger

    with pytest.raises(ReplayImpossible, match="seeded sampling"):
        after_three_tokens().replay_call()
    replay = after_three_tokens(reseed_replays=True).replay_call()
    assert replay.prompt_token_ids == [1, 2, 7, 8, 9] and replay.sampling_params.max_tokens == 7
    assert replay.sampling_params.seed not in (None, 3)
    assert replay.sampling_params.seed == after_three_tokens(reseed_replays=True).replay_call().sampling_params.seed


class _ControllerStandIn:
    """Stand-in for the controller's actor handle (a controller kept down for minutes cannot be had cheaply
    here; the chaos soak does it for real): hands out numbered views, or fails as Ray does while re-creating
    it. The view cache's logic is what is tested; the live fleet's requests exercise the real controller."""

    def __init__(self):
        self.up = True
        self.views = 0
        self.fleet_view = self

    async def remote(self):
        import ray

        if not self.up:
            raise ray.exceptions.ActorUnavailableError("restarting", None)
        from rayfleet.policies.base import FleetSnapshot

        self.views += 1
        return FleetSnapshot(pools={}), {"view": self.views}


async def test_a_restarting_controller_s_last_view_routes_up_to_the_replay_wait_then_503(monkeypatch):
    from rayfleet.control_plane.serving import gateway

    controller, now = _ControllerStandIn(), [1000.0]
    monkeypatch.setattr(gateway.time, "monotonic", lambda: now[0])
    view = gateway.ControllerView(controller, IngressSpec().replay_wait_s, IngressSpec().view_stale_s)
    assert (await view.get())[1] == {"view": 1}
    controller.up = False
    now[0] += 120  # a restart on a loaded 2-core machine took 65 s in the soak
    assert (await view.get(fresh=True))[1] == {"view": 1}
    now[0] += 200  # past replay_wait_s (300 s): the controller is not coming back soon
    with pytest.raises(OpenAIHTTPError) as error:
        await view.get(fresh=True)
    assert error.value.status == 503


async def test_a_stale_view_is_used_at_once_and_refreshed_off_the_request_path(monkeypatch):
    from rayfleet.control_plane.serving import gateway

    controller, now = _ControllerStandIn(), [1000.0]
    monkeypatch.setattr(gateway.time, "monotonic", lambda: now[0])
    spec = IngressSpec()
    view = gateway.ControllerView(controller, spec.replay_wait_s, spec.view_stale_s)
    assert (await view.get())[1] == {"view": 1}
    now[0] += gateway.VIEW_TTL_S / 2
    assert (await view.get())[1] == {"view": 1} and controller.views == 1  # fresh enough: no fetch at all
    now[0] += gateway.VIEW_TTL_S  # stale, within view_stale_s: this request routes on the view it has...
    assert (await view.get())[1] == {"view": 1}
    assert (await view.get())[1] == {"view": 1}  # ...and so does the next one, while one fetch runs
    await view._refresh
    assert controller.views == 2 and (await view.get())[1] == {"view": 2}
    now[0] += spec.view_stale_s + 1  # too old to route on: the request waits for the controller
    assert (await view.get())[1] == {"view": 3}
    assert (await view.get(fresh=True))[1] == {"view": 4}  # a replay asks for a fresh view: always fetched
    waiting = gateway.ControllerView(_ControllerStandIn(), spec.replay_wait_s, stale_s=0)  # as before 2026-12-03
    await waiting.get()
    now[0] += gateway.VIEW_TTL_S * 1.5
    assert (await waiting.get())[1] == {"view": 2}


def test_a_lost_replica_is_one_warning_however_many_requests_it_had(caplog):
    """A dead rollout replica had a hundred requests in flight: one warning names it, the rest go to debug."""
    import logging

    from rayfleet.control_plane.serving.ledger import log_replay

    lost = ConnectionError("actor died")
    with caplog.at_level(logging.DEBUG, logger="rayfleet.ledger"):
        for i in range(100):
            log_replay(f"req-{i}", "replica-gone-1", lost, 9)
        log_replay("req-x", "replica-gone-2", lost, 9)
    ledger_records = [r for r in caplog.records if r.name == "rayfleet.ledger"]
    warnings = [r.getMessage() for r in ledger_records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "replica-gone-1" in warnings[0] and "replica-gone-2" in warnings[1]
    assert sum(r.levelno == logging.DEBUG for r in ledger_records) == 99
