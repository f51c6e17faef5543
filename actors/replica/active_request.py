"""One request running on a replica: its call, its output queue and the progress the fleet sees."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from rayfleet.actors.replica.protocol import GenerateCall


@dataclass
class ActiveRequest:
    call: GenerateCall
    prompt_len: int
    max_tokens: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    output_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)  # choice 0's tokens (migration writes ahead by them)
    first_token_at: float | None = None
    last_token_at: float | None = None
    last_token_wall: float | None = None  # wall clock: migration downtime spans two processes
    first_output: asyncio.Event = field(default_factory=asyncio.Event)
    num_cached_tokens: int | None = None  # the engine's prefix hit (local cache + KV loaded by the connector)
    arrival_time: float = field(default_factory=time.time)
    task: asyncio.Task | None = None
    # Set while the request is being moved out: the engine's abort output then must not end the
    # client's stream; the migration puts a handoff (or resumes locally) instead.
    leaving: bool = False
