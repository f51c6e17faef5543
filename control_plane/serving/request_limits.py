"""Bounds on one request, checked before anything reaches a renderer or an engine.

vLLM's renderer validates each field's type and range, but not how much a single request may ask for: the
body's size and nesting, how many choices, prompts and tokens. These are the fleet's (`ingress.limits` in the
spec): too large a body is a 413, everything else a 400 naming the field, both before a stream starts.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from rayfleet.control_plane.serving.auth import Principal
from rayfleet.control_plane.serving.errors import OpenAIHTTPError
from rayfleet.control_plane.spec import RequestLimitsSpec


def _invalid(message: str, param: str | None = None) -> OpenAIHTTPError:
    return OpenAIHTTPError(400, message, "invalid_request_error", param)


async def read_json_body(request: Request, limits: RequestLimitsSpec) -> dict[str, Any]:
    """The request's JSON object, within the body size and nesting bounds."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise _too_large(limits)
    raw = bytearray()
    async for part in request.stream():  # read no further than the bound, whatever the header said
        raw += part
        if len(raw) > limits.max_body_bytes:
            raise _too_large(limits)
    return parse_json_object(bytes(raw), limits.max_json_depth)


def parse_json_object(raw: bytes, max_depth: int) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _invalid(f"request body is not valid JSON: {error}") from None
    except RecursionError:
        raise _invalid(f"request body is nested deeper than {max_depth} levels") from None
    if not isinstance(body, dict):
        raise _invalid("request body must be a JSON object")
    if json_depth(body) > max_depth:
        raise _invalid(f"request body is nested deeper than {max_depth} levels")
    return body


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_request(body: dict[str, Any], limits: RequestLimitsSpec, principal: Principal) -> None:
    """The bounds a body can be checked against before rendering; types are left to vLLM's validation."""
    model = body.get("model")
    if not isinstance(model, str):
        raise _invalid("'model' must be a string: a pool name or 'auto'", "model")
    check_counts(body.get("n"), body.get("max_tokens"), limits)
    check_counts(None, body.get("max_completion_tokens"), limits, max_tokens_field="max_completion_tokens")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not _is_int(prompt[0]) and len(prompt) > limits.max_prompts:
        raise _invalid(f"{len(prompt)} prompts in one request; this endpoint allows at most {limits.max_prompts}",
                       "prompt")
    priority = body.get("priority")
    if priority not in (None, 0) and not principal.may_set_priority:
        raise OpenAIHTTPError(403, "This API key may not set 'priority'.", "permission_error", "priority")


def check_counts(n: Any, max_tokens: Any, limits: RequestLimitsSpec, max_tokens_field: str = "max_tokens") -> None:
    """Choices and tokens asked for, where given as integers (other types are vLLM's validation's to refuse)."""
    if _is_int(n) and n > limits.max_n:
        raise _invalid(f"'n' is {n}; this endpoint allows at most {limits.max_n}", "n")
    if limits.max_tokens is not None and _is_int(max_tokens) and max_tokens > limits.max_tokens:
        raise _invalid(f"'{max_tokens_field}' is {max_tokens}; this endpoint allows at most {limits.max_tokens}",
                       max_tokens_field)


def check_prompt_tokens(num_tokens: int, limits: RequestLimitsSpec) -> None:
    if limits.max_prompt_tokens is not None and num_tokens > limits.max_prompt_tokens:
        raise _invalid(f"the prompt has {num_tokens} tokens; this endpoint allows at most "
                       f"{limits.max_prompt_tokens}", "messages")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _too_large(limits: RequestLimitsSpec) -> OpenAIHTTPError:
    return OpenAIHTTPError(413, f"request body is larger than {limits.max_body_bytes} bytes",
                           "invalid_request_error")
