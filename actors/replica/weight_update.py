"""New weights for one engine, through vLLM's own RL mechanisms, with every step bounded and checked.

The sequence is vLLM's: `pause_generation(mode=keep|abort, clear_cache=True)` (keep freezes running requests
and, with the cache cleared, recomputes their KV on the new weights when they continue: a partial rollout;
abort ends them), the weight-update API of the pool's transfer backend (`init_weight_transfer_engine` once,
`start_weight_update`, `update_weights`, `finish_weight_update(weight_version=...)`), then
`get_weight_version()` must answer the new version before `resume_generation()`. vLLM labels every output
token with the version of the step that sampled it (`CompletionOutput.weight_versions`), so a request that
spans an update carries both versions.

A step that fails or overruns the update's deadline leaves the weights in no known state: the engine's
version label becomes `INVALID_VERSION`, its running requests are aborted (their callers resubmit them), and
generation stays paused until an update succeeds. Nothing is left running silently on old or mixed weights.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable

from rayfleet.actors.replica.protocol import WeightUpdate, WeightUpdateError

logger = logging.getLogger("rayfleet.replica.weights")

INVALID_VERSION = "invalid"
# The backend's own waits get this share of the update's budget, so that the backend gives up (and resets its
# state) before the replica's deadline abandons the call.
BACKEND_TIMEOUT_SHARE = 0.4


class EngineWeights:
    """The weight-update side of one `AsyncLLM`; updates run one at a time."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._initialized = False
        self._lock = asyncio.Lock()
        self.healthy = True  # False after a failed update, until one succeeds

    @property
    def updating(self) -> bool:
        """An update is under way: generation is paused on purpose."""
        return self._lock.locked()

    async def version(self, timeout_s: float = 10.0) -> str:
        return await asyncio.wait_for(self.engine.get_weight_version(), timeout_s)

    async def update(self, update: WeightUpdate, running: int) -> float:
        """Apply `update`; returns how long generation stood still. Raises WeightUpdateError."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest, WeightTransferUpdateRequest

        if update.interrupt not in ("keep", "abort"):
            raise ValueError(f"interrupt must be 'keep' or 'abort', got '{update.interrupt}'")
        async with self._lock:
            deadline = time.monotonic() + update.timeout_s
            info = {**update.update_info, "timeout_s": BACKEND_TIMEOUT_SHARE * update.timeout_s}
            paused_at = time.monotonic()
            try:
                await _bounded(self.engine.pause_generation(mode=update.interrupt, clear_cache=True), deadline,
                               "pause_generation")
                if not self._initialized:
                    await _bounded(self.engine.init_weight_transfer_engine(
                        WeightTransferInitRequest(init_info=dict(update.init_info))), deadline,
                        "init_weight_transfer_engine")
                    self._initialized = True
                await _bounded(self.engine.start_weight_update(), deadline, "start_weight_update")
                await _bounded(self.engine.update_weights(WeightTransferUpdateRequest(update_info=info)), deadline,
                               "update_weights")
                await _bounded(self.engine.finish_weight_update(weight_version=str(update.version)), deadline,
                               "finish_weight_update")
                now = await _bounded(self.engine.get_weight_version(), deadline, "get_weight_version")
                if now != str(update.version):
                    raise WeightUpdateError(f"the engine reports weight version '{now}' after loading version "
                                            f"{update.version}")
            except Exception as error:
                await self._quarantine(update.version, error)
                if isinstance(error, WeightUpdateError):
                    raise
                raise WeightUpdateError(f"weight update to version {update.version} failed: "
                                        f"{type(error).__name__}: {error}") from error
            await _bounded(self.engine.resume_generation(), deadline, "resume_generation")
            self.healthy = True
            paused_s = time.monotonic() - paused_at
            logger.info("weights of version %d loaded; generation paused %.3f s, %d requests %s", update.version,
                        paused_s, running, "continued" if update.interrupt == "keep" else "aborted")
            return paused_s

    async def _quarantine(self, version: int, error: BaseException) -> None:
        """No known weights: label them so, abort what runs, stay paused (a later update resumes)."""
        self.healthy = False
        logger.error("weight update to version %d failed (%s: %s); generation stays paused until an update "
                     "succeeds", version, type(error).__name__, error)
        try:
            await asyncio.wait_for(self.engine.update_weight_version(INVALID_VERSION), 10)
            await asyncio.wait_for(self.engine.pause_generation(mode="abort", clear_cache=True), 10)
        except Exception:  # the engine itself is unreachable: its health check reports that
            logger.exception("could not quarantine the engine after the failed update")


async def _bounded(step: Awaitable, deadline: float, what: str):
    remaining = deadline - time.monotonic()
    try:
        return await asyncio.wait_for(step, max(remaining, 0.001))
    except asyncio.TimeoutError:
        raise WeightUpdateError(f"{what} did not finish within the update's deadline") from None
