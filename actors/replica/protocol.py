"""Messages between the ingress and the replicas: replicas speak tokens, never OpenAI.

A replica streams `ReplicaChunk`s for one request. The choices are vLLM's own token-out protocol type
(`GenerateTokensStreamChoice`), so the ingress hands them to vLLM's derenderer unchanged. A chunk with
`handoff` set ends the stream on this replica: the request moved (live migration) and the ingress
re-attaches to `handoff.replica` for the rest, under the same request id. The ingress receives chunks of all
its requests on a replica over one stream, in `DeltaBatch`es (see `delta_stream.py`).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only a type here: the controller and the CLI read these messages without importing vLLM
    from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateTokensStreamChoice


@dataclass(frozen=True)
class Destination:
    """A replica a request moves to: its id, its actor handle, the Ray node it runs on and the GPUs it sees."""

    replica_id: str
    handle: Any
    node_id: str
    gpu_uuids: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerateCall:
    """What the ingress asks a replica to run: rendered tokens and vLLM sampling params."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any  # vllm.SamplingParams (picklable)
    priority: int = 0
    workflow_id: str | None = None
    predicted_output_tokens: int | None = None
    # The prompt's last `continued_tokens` are output the client already has (a replay after a failure):
    # the engine's structured-output grammar must resume after them (actors/kv/continuation.py).
    continued_tokens: int = 0
    # W3C trace context of the span this call continues (`actors/observability/tracing.py`); None untraced.
    trace_headers: dict[str, str] | None = None
    # Prefill/decode disaggregation: after its first token, the request moves with its KV to this replica.
    handoff_to: Destination | None = None


@dataclass(frozen=True)
class Handoff:
    """The request left this replica; its remaining tokens come from `replica_id`."""

    replica_id: str
    replica: Any  # the destination's Ray actor handle
    all_token_ids: tuple[int, ...]  # prompt + every output token the source committed (its KV moved)


@dataclass(frozen=True)
class ReplicaChunk:
    choices: list[GenerateTokensStreamChoice] = field(default_factory=list)
    num_cached_tokens: int | None = None
    handoff: Handoff | None = None


@dataclass(frozen=True)
class RequestDelta:
    """One request's next piece on a multiplexed stream: a chunk (tokens or a handoff), an error that ends
    the request here, or neither: its stream on this replica is complete."""

    request_id: str
    chunk: ReplicaChunk | None = None
    error: BaseException | None = None


@dataclass(frozen=True)
class DeltaBatch:
    """What one item of a replica's multiplexed stream carries: deltas of any number of requests, each
    request's in the order the engine produced them (see `delta_stream.py`)."""

    deltas: list[RequestDelta]


class ReplicaError(RuntimeError):
    """Base of the errors a replica raises at its boundary."""


class ReplicaNotAccepting(ReplicaError):
    """The replica is draining, stopping or not started; route the request elsewhere."""


def portable_error(error: Exception) -> Exception:
    """`error` if another process can unpickle it, else a `ValueError` or `RuntimeError` with its type's name and
    message. An exception whose `__init__` takes other arguments than its `args` pickles but does not unpickle,
    and one request's odd error must not break the batch, and with it the stream, that carries it."""
    try:
        pickle.loads(pickle.dumps(error, protocol=pickle.HIGHEST_PROTOCOL))
        return error
    except Exception:
        kind = ValueError if isinstance(error, ValueError) else RuntimeError
        return kind(f"{type(error).__name__}: {error}")


@dataclass(frozen=True)
class MigrationLimits:
    """Llumnix's knobs for multi-stage pre-copy (its defaults: 3 stages, last stage under 16 blocks)."""

    max_stages: int = 3
    last_stage_max_blocks: int = 16
    headroom_blocks: int = 1  # destination blocks kept free beyond what the request needs now
    resume_timeout_s: float = 30.0
    # Write pre-copied blocks into the destination's KV cache while the source decodes, so the pause
    # carries only the last stage (needs prefix caching on the destination).
    write_ahead: bool = True


class UnknownRequest(ReplicaError):
    """No request with this id is (still) on this replica."""


@dataclass(frozen=True)
class WeightUpdate:
    """New weights for a replica's engine, through vLLM's weight-update API and the pool's transfer backend
    (`engine_args.weight_transfer_config`). `init_info` and `update_info` are the backend's own (e.g.
    `rayfleet.actors.rl.weight_transfer`); the replica passes them through."""

    version: int
    update_info: dict[str, Any]
    init_info: dict[str, Any] = field(default_factory=dict)  # used by the engine's first update only
    # What happens to requests running at the update: "keep" freezes them and continues them on the new weights
    # (their KV is recomputed: a partial rollout); "abort" ends them with finish reason "abort" for a resubmit.
    interrupt: str = "keep"
    timeout_s: float = 60.0


@dataclass(frozen=True)
class WeightUpdateResult:
    replica_id: str
    version: int
    paused_s: float  # generation stood still this long
    interrupted: int  # requests running when generation paused


class WeightUpdateError(ReplicaError):
    """An update failed or timed out. The engine's weights are no known version: it generates nothing (its
    running requests were aborted) and takes no requests until an update succeeds."""
