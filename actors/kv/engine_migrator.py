"""Engine-side migration primitives over one ``AsyncLLM``: what a replica actor calls to move a request.

The engine must be built with :func:`migration_engine_kwargs` (rayfleet's KV connector and its worker
extension). A migration of request ``rid`` from engine A to engine B, with ``mig`` a fresh id::

    src, dst = EngineKVMigrator(engine_a), EngineKVMigrator(engine_b)
    # 1. submit on A with src.tag(params, rid); stream its tokens to the client as usual
    chunk = await src.export_complete_blocks(rid)                  # optional pre-copy rounds, A keeps running
    await dst.stage(mig, chunk)                                    # B maps the chunk's shared rows
    final = await src.stop_and_export(rid, first_block=chunk.end_block)   # abort on A + the rest of the KV
    if final is None: ...                                          # it finished on A first: nothing to move
    await dst.stage(mig, final.chunk)
    await src.release([chunk, final.chunk])                        # exported rows belong to the caller
    resume = EngineKVMigrator.resume(final, params, num_prompt_tokens, rid, mig)
    async for out in engine_b.generate({"prompt_token_ids": resume.prompt_token_ids},
                                       resume.sampling_params, rid): ...
    # client stream = A's streamed tokens + final.all_token_ids[num_prompt_tokens + len(streamed):] + B's tokens

B claims ``min(final.num_computed_tokens, len(all_token_ids) - 1)`` tokens from the staged KV (minus its
own prefix-cache hit) and computes one token. Token-exact for greedy (deterministic) sampling; see
``docs/kv_connector.md`` for what does not carry over (seeded generators, penalties' view of outputs).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.config import KVTransferConfig
from vllm.sampling_params import SamplingParams

from rayfleet.actors.kv.migration_state import RAYFLEET_PARAMS_KEY
from rayfleet.actors.kv.transfer import KVChunk, KVLayoutDescriptor, KVLayoutMismatchError
from rayfleet.actors.kv.store_config import KVStoreConfig
from rayfleet.kernels import share_rows

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

__all__ = [
    "EngineKVMigrator", "FinalKV", "KVChunk", "KVLayoutDescriptor", "KVLayoutMismatchError",
    "KVMigrationError", "KVRequestNotFoundError", "ResumeRequest", "migration_engine_kwargs",
]

_POLL_INTERVAL_S = 0.002
RPC_TIMEOUT_S = 60.0


def migration_engine_kwargs(kv_load_failure_policy: str = "recompute", kv_store: KVStoreConfig | None = None,
                            kv_store_namespace: str | None = None) -> dict[str, Any]:
    """Engine arguments (``AsyncEngineArgs(**...)``) that install rayfleet's connector and worker RPCs.

    ``kv_load_failure_policy`` is vLLM's answer to a resume whose staged KV (or a store block) is missing
    or incomplete: "recompute" (default here) recomputes the missing tokens, so the output stays correct,
    only slower; "fail" (vLLM's default) ends the request with finish reason "error". Either way the
    connector's ``load_errors`` / ``store_load_errors`` counter counts it.

    ``kv_store`` turns on prefix reuse across replicas and offload through that store (the engine
    processes need ``RAY_ADDRESS`` in their environment); ``kv_store_namespace`` overrides the hash
    namespace derived from the model and KV layout (see ``kv_prefix_store.store_settings``).
    """
    extra: dict[str, Any] = {}
    if kv_store is not None:
        extra = {"kv_store": kv_store.model_dump(mode="json"), "namespace": kv_store_namespace}
    return {
        "kv_transfer_config": KVTransferConfig(
            kv_connector="RayfleetKVConnector",
            kv_connector_module_path="rayfleet.actors.kv.connector",
            kv_role="kv_both",
            kv_load_failure_policy=kv_load_failure_policy,
            kv_connector_extra_config=extra,
        ),
        "worker_extension_cls": "rayfleet.actors.kv.worker_extension.KVMigrationWorkerExtension",
    }


class KVMigrationError(RuntimeError):
    """A migration step failed on the engine side."""


class KVRequestNotFoundError(KVMigrationError):
    """The engine does not (or no longer) track a migratable request with this id."""


@dataclass(frozen=True)
class FinalKV:
    """The stopped request: its remaining KV blocks, every token it has, and how many have KV."""

    chunk: KVChunk
    all_token_ids: list[int]  # prompt + every generated token the engine accepted
    num_computed_tokens: int  # tokens whose KV the blocks hold (len(all_token_ids) - 1 or len(all_token_ids))


@dataclass(frozen=True)
class ResumeRequest:
    """What the destination's ``generate`` needs to continue a migrated request."""

    prompt_token_ids: list[int]
    sampling_params: SamplingParams


class EngineKVMigrator:
    """Migration primitives of one ``AsyncLLM`` built with :func:`migration_engine_kwargs` (world size 1)."""

    def __init__(self, engine: AsyncLLM):
        self._engine = engine
        self._layout: KVLayoutDescriptor | None = None

    async def _rpc(self, method: str, *args: Any) -> Any:
        # Bounded: a hung engine core must fail its migration, not freeze the replica (or the controller) on it.
        results = await asyncio.wait_for(self._engine.collective_rpc(method, args=args), RPC_TIMEOUT_S)
        return results[0]

    async def _rpc_sent(self, method: str, *args: Any) -> asyncio.Future:
        """Send an RPC now; its reply comes as a future. The engine core reads its input socket in order and
        drains it between two steps, so what this engine's client sends next (an abort, a request) reaches it
        after the RPC, without waiting for the reply: that wait costs a whole engine step."""
        reply = asyncio.ensure_future(self._engine.collective_rpc(method, args=args))
        await asyncio.sleep(0)  # the task's first step runs down to the socket's send: no await comes before it
        return reply

    @staticmethod
    def tag(sampling_params: SamplingParams, request_id: str, **extra: Any) -> SamplingParams:
        """A copy of ``sampling_params`` that makes request ``request_id`` migratable."""
        params = sampling_params.clone()
        extra_args = dict(params.extra_args or {})
        kv_transfer_params = dict(extra_args.get("kv_transfer_params") or {})
        kv_transfer_params[RAYFLEET_PARAMS_KEY] = {"request_id": request_id, **extra}
        extra_args["kv_transfer_params"] = kv_transfer_params
        params.extra_args = extra_args
        return params

    async def layout(self) -> KVLayoutDescriptor:
        if self._layout is None:
            self._layout = KVLayoutDescriptor.from_wire(await self._rpc("rayfleet_kv_layout"))
        return self._layout

    async def export_complete_blocks(self, request_id: str, first_block: int = 0, transport: str = "host") -> KVChunk:
        """Pre-copy: the request's complete blocks from ``first_block`` on; the request keeps running (its
        engine steps while a CPU worker gathers them: two RPCs, the second once the rows are written).

        Raises :class:`KVRequestNotFoundError` when the engine tracks no such live request (finished,
        or not yet seen by the engine's first step after submission), :class:`KVMigrationError` when a
        preemption took its blocks during the gather.
        """
        wire = await self._rpc("rayfleet_export_blocks", request_id, first_block, transport)
        if wire["status"] != "live":
            raise KVRequestNotFoundError(f"request {request_id!r} is not running on this engine "
                                         f"({wire['status']})")
        chunk = KVChunk.from_wire(wire["chunk"])
        landed = {"status": "live"} if wire["landed"] else await self._rpc("rayfleet_export_landed", request_id)
        if landed["status"] == "live":
            return chunk
        chunk.release()
        if landed["status"] == "moved":
            raise KVMigrationError(f"request {request_id!r} was preempted while its blocks were copied")
        raise KVRequestNotFoundError(f"request {request_id!r} ended while its blocks were copied "
                                     f"({landed['status']})")

    async def stop_and_export(self, request_id: str, first_block: int = 0, timeout_s: float = 10.0,
                              transport: str = "host") -> FinalKV | None:
        """Abort the request and export its KV from ``first_block`` on, plus its token list.

        Returns None if the request finished normally before the stop took effect. The engine frees the
        request's blocks right after the export, or after ``timeout_s`` if this call fails midway.
        Raises TimeoutError if the engine never reports the request (e.g. an unknown id).
        """
        # The worker decides at the next step whether the aborted request's blocks are held: the expectation
        # only has to reach the engine before the abort.
        expect = await self._rpc_sent("rayfleet_expect_final", request_id, timeout_s)
        await self._engine.abort(request_id)
        await asyncio.wait_for(expect, RPC_TIMEOUT_S)
        deadline = time.monotonic() + timeout_s
        while True:
            wire = await self._rpc("rayfleet_export_final", request_id, first_block, transport)
            status = wire["status"]
            if status == "ready":
                return FinalKV(KVChunk.from_wire(wire["chunk"]), list(wire["all_token_ids"]), wire["num_computed_tokens"])
            if status == "finished":
                return None
            if status == "released":  # the engine saw the abort first and freed the blocks: nothing to export
                raise KVMigrationError(f"request {request_id!r} was aborted with no final export expected; "
                                       "its KV is freed")
            if status == "expired" or time.monotonic() > deadline:
                raise TimeoutError(f"request {request_id!r}: no final KV within {timeout_s} s ({status})")
            await asyncio.sleep(_POLL_INTERVAL_S)

    async def abort(self, request_id: str) -> None:
        """Abort the request in the engine (nothing happens if it is not there)."""
        await self._engine.abort(request_id)

    async def stage(self, migration_id: str, chunk: KVChunk) -> None:
        """Hold ``chunk`` on this (destination) engine until a request resumes ``migration_id``.

        The engine maps the chunk's shared rows (no copy); the caller still owns them and may release them
        once this returns. A chunk carried by value (from another node) is first written into shared rows
        of this process, released here.
        """
        staged = await self.send_stage(migration_id, chunk)
        if staged is not None:
            await asyncio.wait_for(staged, RPC_TIMEOUT_S)

    async def send_stage(self, migration_id: str, chunk: KVChunk) -> asyncio.Future | None:
        """`stage`, sent now, its reply a future (None for an empty chunk): a request submitted to this engine
        after this returns finds the chunk staged, so a resume need not wait for the reply first."""
        layout = await self.layout()
        if chunk.layout != layout:
            raise KVLayoutMismatchError(f"chunk layout {chunk.layout} != engine layout {layout}")
        if not chunk.num_blocks:
            return None
        local = chunk if chunk.shared is not None else _to_shared(chunk)
        staged = await self._rpc_sent("rayfleet_stage", migration_id, local.to_wire())
        if local is not chunk:  # the engine maps the rows while staging: this process' copy can go then
            staged.add_done_callback(lambda _: local.release())
        return staged

    async def gpu_uuids(self) -> list[str]:
        """GPUs the engine's worker sees, its own first (empty on a CPU): device rows it can open."""
        return await self._rpc("rayfleet_gpu_uuids")

    async def release(self, chunks: list[KVChunk], recycle: bool = False) -> None:
        """Free rows this engine exported once every stage that maps them has returned: shared files are
        unlinked here (or, with `recycle`, once no engine reads them again, kept warm for the engine's next
        export), device rows freed by the engine's worker."""
        for chunk in chunks:
            chunk.recycle() if recycle else chunk.release()
        device = [chunk.device.name for chunk in chunks if chunk.device is not None]
        if device:
            await self._rpc("rayfleet_release_rows", device)

    async def drop_staged(self, migration_id: str) -> bool:
        """Free staged data that will not be resumed; True if there was any."""
        return await self._rpc("rayfleet_drop_staged", migration_id)

    @staticmethod
    def resume(final: FinalKV, sampling_params: SamplingParams, num_prompt_tokens: int, request_id: str,
               migration_id: str, continued_tokens: int = 0) -> ResumeRequest:
        """Prompt and params for the destination: the whole token list as prompt, the rest of the budget.

        ``sampling_params`` are the request's original params; ``num_prompt_tokens`` its original prompt
        length, whose last ``continued_tokens`` were already output before (a replayed request). The result
        is tagged, so the resumed request is migratable again and its grammar continues (``continuation.py``).
        """
        num_generated = len(final.all_token_ids) - num_prompt_tokens
        params = sampling_params.clone()
        if params.max_tokens is not None:
            params.max_tokens -= num_generated
            if params.max_tokens <= 0:
                raise ValueError(f"request {request_id!r} has no tokens left to generate")
        params.min_tokens = max(0, params.min_tokens - num_generated)
        tagged = EngineKVMigrator.tag(params, request_id, load=migration_id, num_tokens=final.num_computed_tokens,
                                      continued=continued_tokens + num_generated)
        return ResumeRequest(list(final.all_token_ids), tagged)

    @property
    def can_write_ahead(self) -> bool:
        """Blocks written ahead survive until the resume only in the prefix cache."""
        return bool(self._engine.vllm_config.cache_config.enable_prefix_caching)

    async def write_ahead(self, migration_id: str, token_ids: list[int], request_id: str) -> None:
        """Write staged blocks of ``migration_id`` covering ``token_ids[:-1]`` into this engine's KV cache now.

        A one-token request over ``token_ids`` claims them from the staging (kept for the resume) and
        computes the last token; its blocks stay in the engine's prefix cache, so the resumed request finds
        them as a local hit and loads only what came after (the last stage). Cancelling the task aborts it.
        """
        params = self.tag(SamplingParams(max_tokens=1, temperature=0, detokenize=False), request_id,
                          load=migration_id, num_tokens=len(token_ids) - 1, keep_staged=True)
        async for _ in self._engine.generate({"prompt_token_ids": token_ids}, params, request_id=request_id):
            pass

    async def stats(self) -> dict[str, Any]:
        """The worker connector's counters (blocks/bytes exported and imported, loads, ...) and
        ``num_free_blocks``, the scheduler's free KV blocks as of the engine's last step."""
        return await self._rpc("rayfleet_kv_stats")

    async def free_kv_blocks(self) -> int:
        """Free KV blocks of the engine (cached-but-unreferenced blocks count as free)."""
        return (await self.stats())["num_free_blocks"]


def _to_shared(chunk: KVChunk) -> KVChunk:
    """A by-value chunk written into shared rows of this process (one copy), for its engine to map."""
    return KVChunk(chunk.first_block, chunk.num_blocks, chunk.layout, shared=share_rows(chunk.rows()))
