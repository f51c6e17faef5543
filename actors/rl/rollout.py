"""Rollouts: G sampled completions per task prompt on the fleet's rollout replicas, each scored by its task's
verifier and put into the sample store the moment it is done.

The driver starts a group only when the job's gate admits it (the staleness bound's admission, `policies.rl`),
and reaches the replicas through a `RolloutTransport`: the fleet layer's placement and token ledger, so a replica
lost mid-generation costs a replay of prompt + tokens so far on another replica, not a lost group. A completion
that a weight update aborted (interrupt "abort") continues the same way, from its tokens so far, on the new
weights. Every token keeps the weight version that sampled it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Iterator, Protocol

from rayfleet.actors.replica.continuity import derived_seed
from rayfleet.actors.replica.protocol import GenerateCall
from rayfleet.actors.rl.sample_store import SampleStore
from rayfleet.actors.rl.samples import Sample
from rayfleet.actors.tasks import TaskInstance, generate, mixture, score

logger = logging.getLogger("rayfleet.rl.rollout")

ABORTED = "abort"  # vLLM's finish reason for a request ended by pause_generation(mode="abort")
TASKS_PER_CHUNK = 1024


@dataclass(frozen=True)
class Completion:
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    token_versions: tuple[int, ...]
    finish_reason: str
    replays: int = 0


def label_versions(num_tokens: int, segments: list[tuple[int, list]], floor: int) -> list[int]:
    """Per-token weight versions of a completion made of one or more engine requests (a replay or a resubmit
    starts a new one). `segments` holds (first token of the request, vLLM's `WeightVersionSpan`s over that
    request's outputs); tokens no engine labelled (their engine died before finishing) get `floor`."""
    versions = [floor] * num_tokens
    for start, spans in segments:
        for span in spans:
            try:
                version = int(span.version)
            except ValueError:
                raise ValueError(f"tokens {start + span.start}..{start + span.end} carry weight version "
                                 f"'{span.version}': the engine was never synced (or its last update failed)") from None
            versions[start + span.start: start + span.end] = [version] * (span.end - span.start)
    return versions


class RolloutTransport(Protocol):
    async def complete(self, call: GenerateCall, version_floor: int) -> Completion:
        """Run `call` to its end on a rollout replica, surviving the loss of replicas. Tokens that no engine
        labelled (their replica died before finishing) carry `version_floor`: the oldest weights they can have
        come from."""


class RolloutGate(Protocol):
    async def admit(self) -> int:
        """Wait until a new group may start; returns the rollout pool's weight version (its version floor)."""

    def version_floor(self) -> int:
        """The rollout pool's current weight version."""

    def group_done(self) -> None:
        """A started group has all its samples in the store."""


class TaskStream:
    """Training prompts in a fixed order: prompt i is the same for every run with the same mix and seed, so a
    resumed run continues where the checkpoint's cursor says."""

    def __init__(self, cells: dict[tuple[str, str], float], seed: int, start: int = 0) -> None:
        self.cells, self.seed, self.position = cells, seed, start
        self._chunk_index, self._chunk = -1, []

    def __iter__(self) -> Iterator[TaskInstance]:
        return self

    def __next__(self) -> TaskInstance:
        chunk, offset = divmod(self.position, TASKS_PER_CHUNK)
        if chunk != self._chunk_index:
            self._chunk = mixture(self.cells, seed=self.seed * 7919 + chunk, count=TASKS_PER_CHUNK)
            self._chunk_index = chunk
        self.position += 1
        return self._chunk[offset]


def render_prompt(tokenizer, instance: TaskInstance) -> list[int]:
    """The prompt as the fleet renders a chat request (the model's chat template)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": instance.prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass
class RolloutCounters:
    groups_started: int = 0
    groups_done: int = 0
    samples_done: int = 0
    tokens: int = 0
    replays: int = 0
    resubmits: int = 0


class RolloutDriver:
    def __init__(self, transport: RolloutTransport, store: SampleStore, tokenizer, tasks: TaskStream,
                 gate: RolloutGate, group_size: int, temperature: float, max_tokens: int, seed: int = 0,
                 run_id: str = "run") -> None:
        self.transport, self.store, self.tokenizer, self.tasks, self.gate = transport, store, tokenizer, tasks, gate
        self.group_size, self.temperature, self.max_tokens = group_size, temperature, max_tokens
        self.seed, self.run_id = seed, run_id
        self.counters = RolloutCounters()
        self.failures: list[BaseException] = []

    async def run(self, stop: asyncio.Event) -> None:
        """Start groups as the gate admits them until `stop` is set; then cancel what still runs."""
        running: set[asyncio.Task] = set()
        try:
            while not stop.is_set():
                admit = asyncio.ensure_future(self.gate.admit())
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait({admit, stopped}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if not admit.done():
                    admit.cancel()
                    break
                floor = admit.result()
                instance = next(self.tasks)
                group_id = f"{self.run_id}-g{self.tasks.position - 1}"
                self.counters.groups_started += 1
                task = asyncio.create_task(self.group(instance, group_id, floor))
                running.add(task)
                task.add_done_callback(self._finished)
                task.add_done_callback(running.discard)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    def _finished(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("rollout group failed: %r", task.exception())
            self.failures.append(task.exception())

    async def group(self, instance: TaskInstance, group_id: str, version_floor: int) -> list[Sample]:
        prompt = render_prompt(self.tokenizer, instance)
        samples = await asyncio.gather(*(self.sample(instance, prompt, group_id, i, version_floor)
                                         for i in range(self.group_size)))
        # Consumers take whole groups: one store call for the group instead of one per sample (a Ray call each;
        # k = 1 ran 10-15% faster with it on the 2-core machine, docs/benchmarks-rl.md).
        await self.store.put_group(list(samples))
        self.counters.samples_done += len(samples)
        self.counters.groups_done += 1
        self.gate.group_done()
        return list(samples)

    async def sample(self, instance: TaskInstance, prompt: list[int], group_id: str, index: int,
                     version_floor: int) -> Sample:
        tokens: list[int] = []
        logprobs: list[float] = []
        versions: list[int] = []
        replays = resubmits = 0
        while True:
            suffix = f"-r{resubmits}" if resubmits else ""
            call = GenerateCall(request_id=f"{group_id}-{index}{suffix}", prompt_token_ids=prompt + tokens,
                                sampling_params=self.params(group_id, index, resubmits, self.max_tokens - len(tokens)))
            done = await self.transport.complete(call, version_floor)
            tokens += done.token_ids
            logprobs += done.logprobs
            versions += done.token_versions
            replays += done.replays
            if done.finish_reason != ABORTED or len(tokens) >= self.max_tokens:
                finish_reason = done.finish_reason
                break
            resubmits += 1  # a weight update ended it: continue from here on the new weights
            version_floor = self.gate.version_floor()
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        sample = Sample(group_id=group_id, index=index, group_size=self.group_size, task_key=instance.key,
                        prompt_token_ids=tuple(prompt), completion_token_ids=tuple(tokens),
                        rollout_logprobs=tuple(logprobs), token_versions=tuple(versions),
                        reward=score(instance, text), finish_reason=finish_reason, replays=replays,
                        resubmits=resubmits)
        self.counters.tokens += len(tokens)
        self.counters.replays += replays
        self.counters.resubmits += resubmits
        return sample

    def params(self, group_id: str, index: int, resubmits: int, max_tokens: int):
        from vllm import SamplingParams

        # A seed per (group, sample, continuation): the same run samples the same tokens from the same weights.
        seed = derived_seed(self.seed, group_id, index, resubmits)
        return SamplingParams(n=1, temperature=self.temperature, max_tokens=max(max_tokens, 1), logprobs=0,
                              seed=seed)


def held_out(cells: dict[tuple[str, str], float], seed: int, count: int) -> list[TaskInstance]:
    """Evaluation instances: `count` spread over the cells, consecutive seeds from `seed` (training prompts are
    drawn from scattered seeds, so a block far from zero is held out in practice)."""
    names = sorted(cells)
    per_cell = [count // len(names) + (i < count % len(names)) for i in range(len(names))]
    return [instance for (family, difficulty), n in zip(names, per_cell)
            for instance in generate(family, difficulty, seed=seed, count=n)]
